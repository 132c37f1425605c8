"""Tiny Hugging Face text models and text datasets built in code, for tests.

A two-layer BERT (hidden size 32) with a WordPiece vocabulary trained here with the
``tokenizers`` library on a small synthetic sentiment corpus; saved as a real Transformers
folder (``save_pretrained``: config.json, safetensors weights, tokenizer files) and zipped
the way a user would upload it. Everything is deterministic and takes seconds on a CPU.
"""

from __future__ import annotations

import json
import zipfile
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tests.helpers import one_thread

if TYPE_CHECKING:
    import torch

POSITIVE = ("great", "good", "fun", "loved", "wonderful", "excellent", "enjoyed", "brilliant")
NEGATIVE = ("bad", "awful", "terrible", "boring", "hated", "poor", "dull", "weak")
SUBJECTS = ("movie", "film", "plot", "story", "acting", "music", "ending", "cast")
FILLERS = ("the", "a", "was", "is", "really", "very", "so", "and", "quite", "i", "this", "it")
HIDDEN = 32
MAX_POSITIONS = 64


def sentiment_texts(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``n`` short reviews and their labels (1 positive, 0 negative), from templates."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        words = list(rng.choice(FILLERS, size=int(rng.integers(2, 6))))
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(SUBJECTS)))
        sentiment = POSITIVE if label else NEGATIVE
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(sentiment)))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64)


def sentiment_split(split: str) -> tuple[list[str], np.ndarray]:
    """The ``train`` (400 reviews) or ``test`` (200 reviews) split."""
    if split == "train":
        return sentiment_texts(400, seed=1)
    if split == "test":
        return sentiment_texts(200, seed=2)
    raise ValueError(f"split must be 'train' or 'test', not {split!r}")


def tiny_tokenizer() -> Any:
    """A BERT tokenizer whose WordPiece vocabulary ``tokenizers`` trains on the corpus."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=specials, min_frequency=1, show_progress=False
    )
    corpus = sentiment_split("train")[0] + [" ".join(POSITIVE + NEGATIVE + SUBJECTS + FILLERS)]
    wordpiece.train_from_iterator(corpus, trainer=trainer)
    return BertTokenizer(vocab=wordpiece.get_vocab(), model_max_length=MAX_POSITIONS)


def _config(vocab_size: int, **extra: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS,
        num_labels=2,
        **extra,
    )


@cache
def _trained_state(epochs: int) -> dict[str, torch.Tensor]:
    import torch

    with torch.inference_mode(False), torch.enable_grad(), one_thread():
        return _train(epochs)


def _train(epochs: int) -> dict[str, torch.Tensor]:
    import torch
    from transformers import BertForSequenceClassification

    tokenizer = tiny_tokenizer()
    texts, labels = sentiment_split("train")
    enc = tokenizer(texts, padding="longest", return_tensors="pt")
    torch.manual_seed(0)
    model = BertForSequenceClassification(_config(tokenizer.vocab_size))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    y = torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(texts), generator=gen)
        for i in range(0, len(texts), 32):
            idx = order[i : i + 32]
            opt.zero_grad()
            out = model(**{k: v[idx] for k, v in enc.items()}, labels=y[idx])
            out.loss.backward()
            opt.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_bert_classifier(trained: bool = True, epochs: int = 3) -> tuple[Any, Any]:
    """``(BertForSequenceClassification, tokenizer)``; trained on the sentiment train split
    (test accuracy ≈ 1.0) unless told; each call returns a fresh module in eval mode."""
    import torch
    from transformers import BertForSequenceClassification

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = BertForSequenceClassification(_config(tokenizer.vocab_size))
    if trained:
        model.load_state_dict(_trained_state(epochs))
    return model.eval(), tokenizer


def tiny_bert_encoder() -> tuple[Any, Any]:
    """``(BertModel, tokenizer)``: the classifier's encoder as a feature-extraction model."""
    from transformers import BertModel

    classifier, tokenizer = tiny_bert_classifier()
    encoder = BertModel(classifier.config)
    encoder.load_state_dict(classifier.bert.state_dict())
    encoder.config.architectures = ["BertModel"]
    return encoder.eval(), tokenizer


def save_folder(model: Any, tokenizer: Any, folder: Path) -> Path:
    """``save_pretrained`` the model and tokenizer into ``folder``."""
    folder = Path(folder)
    model.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def zip_folder(folder: Path, path: Path, *, top: str | None = "model", extra=None) -> Path:
    """Zip a model folder as a user would: under one top folder (or at the root with
    ``top=None``); ``extra`` maps more member names (relative to the root) to bytes."""
    folder, path = Path(folder), Path(path)
    prefix = f"{top}/" if top else ""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                zf.write(file, prefix + file.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(prefix + name, data)
    return path


def tiny_bert_hf_zip(path: Path, *, trained: bool = True, top: str | None = "model") -> Path:
    """The tiny BERT sentiment classifier as an uploadable hf zip at ``path``."""
    model, tokenizer = tiny_bert_classifier(trained=trained)
    folder = save_folder(model, tokenizer, Path(path).with_suffix(".d"))
    return zip_folder(folder, path, top=top)


def tiny_bert_encoder_zip(path: Path) -> Path:
    """The tiny BERT encoder (feature extraction, ``BertModel``) as an hf zip at ``path``."""
    model, tokenizer = tiny_bert_encoder()
    folder = save_folder(model, tokenizer, Path(path).with_suffix(".d"))
    return zip_folder(folder, path)


def sentiment_jsonl(path: Path, split: str = "test", labels: bool = True) -> Path:
    """The sentiment ``split`` as a ``.jsonl`` dataset: ``{"text", "label"}`` per line."""
    texts, y = sentiment_split(split)
    lines = [
        json.dumps({"text": t, "label": int(label)} if labels else {"text": t})
        for t, label in zip(texts, y, strict=True)
    ]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def text_accuracy(model: Any, tokenizer: Any, split: str = "test") -> float:
    """Accuracy of a sequence classifier on the sentiment ``split``."""
    import torch

    texts, labels = sentiment_split(split)
    enc = tokenizer(texts, padding="longest", return_tensors="pt")
    with torch.inference_mode():
        pred = model(**enc).logits.argmax(-1).numpy()
    return float((pred == labels).mean())
