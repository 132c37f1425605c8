"""Datasets: calibration, training and evaluation arrays uploaded with a job.

``.npz`` and ``.safetensors`` files hold arrays. ``.jsonl`` files hold text for Hugging
Face (``hf``) models: one JSON object per line with a ``text`` string and, optionally, a
``label`` (a class index, or a class name from the model's ``config.label2id``). They are
tokenized once, when loaded, with the uploaded model's own tokenizer into the arrays the
model takes (``input_ids``, ``attention_mask`` and, for BERT-like models,
``token_type_ids``), padded to the longest text of the file and truncated to
``max_length`` tokens, so from then on a text dataset is arrays like any other.

What a dataset file may hold is :mod:`worker.safety.datasets`'s rule, the one the upload
check applies: it runs before the arrays are read, and text is read through it.
"""

from __future__ import annotations

import contextlib
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.contract import DatasetFormat
from worker.errors import DatasetMismatchError, UnsupportedError
from worker.safety import Unsafe
from worker.safety.datasets import LABELS, SINGLE_INPUT, check_dataset, iter_jsonl

if TYPE_CHECKING:
    from worker.formats import LoadedModel, TensorSpec

LABELS_KEY = LABELS
SINGLE_INPUT_KEY = SINGLE_INPUT
MAX_TEXT_TOKENS = 512
_SUFFIX_FORMATS = {f".{fmt}": fmt for fmt in DatasetFormat}


@dataclass
class Dataset:
    """Arrays of one dataset.

    Attributes:
        inputs: model inputs by name. A single array stored as ``inputs`` feeds the
            model's only input whatever its name; otherwise each key names an input.
        labels: ``[N]`` class indices (or ``[N, C]`` one-hot) when given.
        num_samples: N, the size of the leading (batch) axis shared by every array.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    num_samples: int

    @property
    def is_single_input(self) -> bool:
        return list(self.inputs) == [SINGLE_INPUT_KEY]

    def head(self, n: int) -> Dataset:
        """The first ``n`` samples."""
        n = min(n, self.num_samples)
        labels = None if self.labels is None else self.labels[:n]
        return Dataset({k: v[:n] for k, v in self.inputs.items()}, labels, n)


def load_dataset(
    path: Path, model: LoadedModel | None = None, *, max_length: int | None = None
) -> Dataset:
    """Read a dataset file: ``.npz`` (no pickles), ``.safetensors``, or ``.jsonl`` text.

    Args:
        path: the file; its suffix says its format.
        model: the model the data is for; a ``.jsonl`` file needs an ``hf`` model with a
            tokenizer (see the module docstring).
        max_length: (jsonl) truncate texts to this many tokens; default: the smallest of
            the tokenizer's and the model's maximum lengths and 512.

    Raises:
        DatasetMismatchError: the file is unreadable, empty, or its arrays disagree on N.
        UnsupportedError: ``.jsonl`` without an hf model, or another format.
    """
    path = Path(path)
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UnsupportedError(
            f"unknown dataset format {path.suffix or path.name!r}; use .npz or .safetensors "
            "with an 'inputs' array (or several named inputs) and optional 'labels'",
            step="load_datasets",
        )
    if fmt is DatasetFormat.jsonl:  # text: read through the rules, then tokenized
        return _load_jsonl(path, model, max_length)
    with _refused(path):
        check_dataset(path, fmt)  # the upload's rules, from the headers: nothing unpickled
    arrays = _ARRAY_READERS[fmt](path)
    labels = arrays.pop(LABELS_KEY, None)
    num_samples = len(next(iter(arrays.values())))
    return Dataset(inputs=arrays, labels=labels, num_samples=num_samples)


@contextlib.contextmanager
def _refused(path: Path) -> Iterator[None]:
    """A refusal by worker.safety's dataset rules, as the engine's DatasetMismatchError."""
    try:
        yield
    except Unsafe as exc:
        raise DatasetMismatchError(f"{path.name}: {exc.detail}", step="load_datasets") from None


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise DatasetMismatchError(
            f"{path.name}: not a readable .npz file ({exc})", step="load_datasets"
        ) from exc


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise DatasetMismatchError(
            f"{path.name}: not a readable .safetensors file ({exc})", step="load_datasets"
        ) from exc


_ARRAY_READERS: dict[DatasetFormat, Callable[[Path], dict[str, np.ndarray]]] = {
    DatasetFormat.npz: _read_npz,
    DatasetFormat.safetensors: _read_safetensors,
}


def _read_jsonl(path: Path) -> tuple[list[str], list[int | str] | None]:
    texts: list[str] = []
    labels: list[int | str] = []
    with _refused(path):
        for text, label in iter_jsonl(path):
            texts.append(text)
            if label is not None:
                labels.append(label)
    return texts, (labels if labels else None)


def _label_indices(name: str, labels: list[int | str], model: LoadedModel) -> np.ndarray:
    """Class indices: integers as given, names through the model's ``config.label2id``."""
    if all(isinstance(label, int) for label in labels):
        return np.asarray(labels, dtype=np.int64)
    config = getattr(model.module, "config", None)
    label2id = dict(getattr(config, "label2id", None) or {})
    unknown = sorted({str(label) for label in labels if isinstance(label, str)} - set(label2id))
    if unknown:
        raise DatasetMismatchError(
            f"{name}: labels {unknown[:5]} are not class names of the model "
            f"(config.label2id has {sorted(label2id)[:10]}); use class indices or those names",
            step="load_datasets",
        )
    return np.asarray(
        [label if isinstance(label, int) else int(label2id[label]) for label in labels],
        dtype=np.int64,
    )


def _load_jsonl(path: Path, model: LoadedModel | None, max_length: int | None) -> Dataset:
    if model is None or model.format != "hf":
        kind = "no model" if model is None else f"a {model.format} model"
        raise UnsupportedError(
            f"{path.name}: text datasets (.jsonl with 'text' and 'label') are for Hugging Face "
            f"(hf) models, which bring their tokenizer; this is {kind}: upload arrays as "
            ".npz or .safetensors",
            step="load_datasets",
        )
    if model.tokenizer is None:
        raise UnsupportedError(
            f"{path.name}: the hf model was uploaded without tokenizer files, so text cannot "
            "be tokenized; upload the model with tokenizer.save_pretrained(folder) files, or "
            "the dataset as arrays (.npz with input_ids, attention_mask)",
            step="load_datasets",
        )
    texts, raw_labels = _read_jsonl(path)
    tokenizer = model.tokenizer
    if max_length is None:
        limits = [MAX_TEXT_TOKENS, int(getattr(tokenizer, "model_max_length", MAX_TEXT_TOKENS))]
        positions = getattr(getattr(model.module, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            limits.append(positions)
        max_length = min(limits)
    names = [spec.name for spec in model.inputs]
    try:
        encoded = tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="np",
            return_token_type_ids="token_type_ids" in names,
            return_attention_mask="attention_mask" in names,
        )
    except Exception as exc:  # tokenizers raise their own types
        raise DatasetMismatchError(
            f"{path.name}: the model's tokenizer failed on the texts: {type(exc).__name__}: {exc}",
            step="load_datasets",
        ) from exc
    missing = [name for name in names if name not in encoded]
    if missing:
        raise DatasetMismatchError(
            f"{path.name}: the tokenizer does not produce the model inputs {missing}",
            step="load_datasets",
        )
    arrays = {name: np.asarray(encoded[name], dtype=np.int64) for name in names}
    labels = None if raw_labels is None else _label_indices(path.name, raw_labels, model)
    return Dataset(inputs=arrays, labels=labels, num_samples=len(texts))


def fit_dataset(model: LoadedModel, role: str, dataset: Dataset) -> dict[str, np.ndarray]:
    """Match a dataset to the model's inputs and cast it to their dtypes.

    Axis 0 of every array is the sample axis (it becomes the batch axis); the rank and
    every static non-batch dim must match, and the dtype must cast within its kind
    (ints and floats feed a float input; floats cannot feed an integer input).

    Returns:
        Arrays by model input name, in input order.

    Raises:
        DatasetMismatchError: naming the expected and the given shapes.
    """
    expected = ", ".join(s.describe() for s in model.inputs)
    if dataset.is_single_input:
        if len(model.inputs) != 1:
            raise DatasetMismatchError(
                f"{role} dataset has one 'inputs' array but the model takes "
                f"{len(model.inputs)} inputs ({expected}); store one array per input name",
                step="check_datasets",
            )
        given = {model.inputs[0].name: dataset.inputs[SINGLE_INPUT_KEY]}
    else:
        names = {s.name for s in model.inputs}
        missing = sorted(names - set(dataset.inputs))
        extra = sorted(set(dataset.inputs) - names)
        if missing or extra:
            raise DatasetMismatchError(
                f"{role} dataset arrays {sorted(dataset.inputs)} do not match the model inputs "
                f"({expected}); missing {missing}, unexpected {extra}",
                step="check_datasets",
            )
        given = dataset.inputs
    feeds: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        array = given[spec.name]
        _check_array(role, spec, array)
        target = np.dtype("float32" if spec.dtype == "bfloat16" else spec.dtype)
        feeds[spec.name] = np.ascontiguousarray(array, dtype=target)
    return feeds


def _check_array(role: str, spec: TensorSpec, array: np.ndarray) -> None:
    fits = array.ndim == spec.rank and all(
        not isinstance(dim, int) or axis == 0 or dim == array.shape[axis]
        for axis, dim in enumerate(spec.shape)
    )
    target = np.dtype("float32" if spec.dtype == "bfloat16" else spec.dtype)
    castable = np.can_cast(array.dtype, target, casting="same_kind") and not (
        target.kind in "iub" and array.dtype.kind == "f"
    )
    if fits and castable:
        return
    expected = "[" + ", ".join(str(d) for d in spec.shape) + f"] {spec.dtype}"
    given = f"{list(array.shape)} {array.dtype}"
    raise DatasetMismatchError(
        f"{role} dataset does not fit model input {spec.name!r}: expected shape {expected} "
        f"(axis 0 is the sample axis), given {given}",
        step="check_datasets",
    )
