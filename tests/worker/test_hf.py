"""Hugging Face models (format hf): safe loading, inspection, saving, running, text data."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests import factories_text
from worker.context import NullReporter, RecordingReporter, StepContext
from worker.data import fit_dataset, load_dataset
from worker.errors import DatasetMismatchError, InvalidModelError, UnsupportedError
from worker.formats import (
    LoadedModel,
    Runtime,
    generate_inputs,
    inspect_model,
    load_model,
    save_model,
)
from worker.metrics import measure_model
from worker.pipeline import PipelineSpec, run_pipeline

TEXT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run many times faster on one thread on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "classifier": factories_text.tiny_bert_hf_zip(root / "bert.zip"),
        "at_root": factories_text.tiny_bert_hf_zip(root / "bert_root.zip", top=None),
        "encoder": factories_text.tiny_bert_encoder_zip(root / "encoder.zip"),
        "eval": factories_text.sentiment_jsonl(root / "test.jsonl"),
        "train": factories_text.sentiment_jsonl(root / "train.jsonl", split="train"),
    }


def unzip(path: Path, dest: Path) -> Path:
    with zipfile.ZipFile(path) as zf:
        zf.extractall(dest)
    return dest


def rezip(src: Path, dst: Path, *, edit=None, extra=None, drop=()) -> Path:
    """Copy a zip, passing members through ``edit(name, bytes)``, adding and dropping some."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = zin.read(info.filename)
            zout.writestr(info.filename, edit(info.filename, data) if edit else data)
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return dst


def edit_config(change):
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("config.json") and not name.endswith("tokenizer_config.json"):
            doc = json.loads(data)
            change(doc)
            return json.dumps(doc).encode()
        return data

    return edit


def ctx(tmp_path: Path, method: str = "test", **datasets) -> StepContext:
    return StepContext(
        step=0, method=method, reporter=RecordingReporter(), datasets=datasets, device="cpu",
        work_dir=tmp_path,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Loading, inspecting, saving


@pytest.mark.parametrize("layout", ["classifier", "at_root"])
def test_inspect_reports_parameters_layers_signature_and_task(hf, layout: str) -> None:
    model, _ = factories_text.tiny_bert_classifier()
    info = inspect_model(hf[layout], "hf")
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["task"] == "sequence-classification"
    assert info["architecture"] == "BertForSequenceClassification"
    # 2 layers x (q, k, v, attention output, intermediate, output) + pooler + classifier
    assert info["layers"]["Linear"] == 14 and info["layers"]["Embedding"] == 3
    assert [i["name"] for i in info["inputs"]] == TEXT_INPUTS
    for spec in info["inputs"]:
        assert spec["shape"] == ["batch", "sequence"] and spec["dtype"] == "int64"
    assert info["outputs"] == [{"name": "logits", "shape": ["batch", 2], "dtype": "float32"}]


def test_feature_extraction_model(hf) -> None:
    info = inspect_model(hf["encoder"], "hf")
    assert info["task"] == "feature-extraction" and info["architecture"] == "BertModel"
    assert info["outputs"][0]["name"] == "last_hidden_state"
    assert info["outputs"][0]["shape"] == ["batch", "sequence", factories_text.HIDDEN]


def test_runtime_matches_transformers_at_any_batch_and_length(hf) -> None:
    import torch

    model, _ = factories_text.tiny_bert_classifier()
    runtime = Runtime(hf["classifier"], "hf")
    for batch, length in ((1, 5), (3, 11)):
        feeds = generate_inputs(runtime.model, batch=batch, seed=batch)
        feeds = {k: v[:, :length].copy() for k, v in feeds.items()}
        assert feeds["attention_mask"].all() and feeds["input_ids"].max() > 0
        [logits] = runtime(feeds)
        with torch.inference_mode():
            expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits
        assert logits.shape == (batch, 2)
        np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5)


def test_save_round_trips_and_loads_with_stock_transformers(hf, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = load_model(hf["classifier"], "hf")
    out = tmp_path / "copy.zip"
    save_model(model, out)
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".py"))]
    assert inspect_model(out, "hf") == inspect_model(hf["classifier"], "hf")

    folder = unzip(out, tmp_path / "unzipped")
    stock = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts, labels = factories_text.sentiment_split("test")
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert (stock(**enc).logits.argmax(-1).numpy() == labels).mean() >= 0.97


def test_extra_files_of_the_folder_are_kept(hf, tmp_path: Path) -> None:
    modules = json.dumps([{"idx": 0, "name": "0", "path": "", "type": "Transformer"}]).encode()
    src = rezip(
        hf["classifier"], tmp_path / "st.zip",
        extra={"model/modules.json": modules, "model/1_Pooling/config.json": b'{"mean": true}',
               "model/README.md": b"# tiny", "__MACOSX/model/._config.json": b"junk"},
    )  # fmt: skip
    out = tmp_path / "out.zip"
    save_model(load_model(src, "hf"), out)
    with zipfile.ZipFile(out) as zf:
        assert zf.read("modules.json") == modules
        assert zf.read("1_Pooling/config.json") == b'{"mean": true}'
        assert not [n for n in zf.namelist() if "MACOSX" in n]


# --------------------------------------------------------------------------------------
# Safety: nothing from an upload runs, nothing is unpickled


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"model/pytorch_model.bin": b"\x80\x02}q\x00."}, ["pickled", "safe_serialization"]),
        ({"model/weights.pt": b"PK"}, ["pickled"]),
        ({"model/modeling_evil.py": b"import os"}, ["code", "transformers library"]),
        ({"../escape.txt": b"x"}, ["'..' path"]),
        ({"/etc/evil.json": b"{}"}, ["absolute"]),
        ({"model/tf_model.h5": b"x"}, ["safetensors"]),
    ],
)
def test_unsafe_members_are_refused(hf, tmp_path: Path, extra, words) -> None:
    bad = rezip(hf["classifier"], tmp_path / "bad.zip", extra=extra)
    with pytest.raises(InvalidModelError) as err:
        load_model(bad, "hf")
    for word in words:
        assert word in err.value.message


def test_symlink_member_is_refused(hf, tmp_path: Path) -> None:
    bad = rezip(hf["classifier"], tmp_path / "bad.zip")
    with zipfile.ZipFile(bad, "a") as zf:
        info = zipfile.ZipInfo("model/vocab.txt")
        info.external_attr = 0o120777 << 16  # a symbolic link to /etc/passwd
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(InvalidModelError, match="symbolic link"):
        load_model(bad, "hf")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda c: c.update(auto_map={"AutoModel": "modeling_evil.EvilModel"}), ["auto_map"]),
        (lambda c: c.update(architectures=["EvilModelForSequenceClassification"]), ["not a transformers"]),
        (lambda c: c.update(architectures=["GPT2ForSequenceClassification"]), ["not a transformers"]),
        (lambda c: c.pop("model_type"), ["model_type"]),
        (lambda c: c.pop("architectures"), ["architectures"]),
        (lambda c: c.update(quantization_config={"quant_method": "torchao"}), ["pre-quantized"]),
    ],
)  # fmt: skip
def test_bad_configs_are_refused(hf, tmp_path: Path, change, words) -> None:
    bad = rezip(hf["classifier"], tmp_path / "bad.zip", edit=edit_config(change))
    with pytest.raises((InvalidModelError, UnsupportedError)) as err:
        load_model(bad, "hf")
    for word in words:
        assert word in err.value.message


def test_auto_map_in_tokenizer_config_is_refused(hf, tmp_path: Path) -> None:
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("tokenizer_config.json"):
            doc = json.loads(data)
            doc["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
            return json.dumps(doc).encode()
        return data

    with pytest.raises(InvalidModelError, match="auto_map"):
        load_model(rezip(hf["classifier"], tmp_path / "bad.zip", edit=edit), "hf")


def test_folder_without_safetensors_or_config_is_refused(hf, tmp_path: Path) -> None:
    no_weights = rezip(hf["classifier"], tmp_path / "a.zip", drop={"model/model.safetensors"})
    with pytest.raises(InvalidModelError, match="safetensors"):
        load_model(no_weights, "hf")
    no_config = rezip(hf["classifier"], tmp_path / "b.zip", drop={"model/config.json"})
    with pytest.raises(InvalidModelError, match=r"config\.json"):
        load_model(no_config, "hf")
    not_zip = tmp_path / "c.zip"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(InvalidModelError, match="not a zip"):
        load_model(not_zip, "hf")


# --------------------------------------------------------------------------------------
# Text datasets


def test_jsonl_is_tokenized_with_the_models_tokenizer(hf, tmp_path: Path) -> None:
    model = load_model(hf["classifier"], "hf")
    dataset = load_dataset(hf["eval"], model)
    texts, labels = factories_text.sentiment_split("test")
    assert dataset.num_samples == len(texts) == 200
    assert list(dataset.inputs) == TEXT_INPUTS
    np.testing.assert_array_equal(dataset.labels, labels)
    ids, mask = dataset.inputs["input_ids"], dataset.inputs["attention_mask"]
    assert ids.dtype == np.int64 and ids.shape == mask.shape
    # Padded to the longest text; the mask marks the real tokens, [CLS] opens each text.
    assert mask.sum(1).max() == ids.shape[1] and mask.sum(1).min() < ids.shape[1]
    assert (ids[:, 0] == model.tokenizer.cls_token_id).all()
    assert (ids[mask == 0] == model.tokenizer.pad_token_id).all()
    expected = model.tokenizer(texts[0])["input_ids"]
    assert ids[0, : len(expected)].tolist() == expected
    feeds = fit_dataset(model, "eval", dataset)
    assert list(feeds) == TEXT_INPUTS
    truncated = load_dataset(hf["eval"], model, max_length=4)
    assert truncated.inputs["input_ids"].shape == (200, 4)


def test_jsonl_string_labels_use_label2id(hf, tmp_path: Path) -> None:
    model = load_model(hf["classifier"], "hf")
    path = tmp_path / "named.jsonl"
    path.write_text(
        '{"text": "great film", "label": "LABEL_1"}\n{"text": "dull", "label": "LABEL_0"}\n'
    )
    assert load_dataset(path, model).labels.tolist() == [1, 0]
    path.write_text('{"text": "great film", "label": "positive"}\n')
    with pytest.raises(DatasetMismatchError, match="label2id"):
        load_dataset(path, model)


def test_jsonl_for_other_formats_or_malformed_is_refused(hf, tmp_path: Path) -> None:
    for other in (None, LoadedModel("pt2", [], []), LoadedModel("onnx", [], [])):
        with pytest.raises(UnsupportedError, match="Hugging Face"):
            load_dataset(hf["eval"], other)
    model = load_model(hf["classifier"], "hf")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(DatasetMismatchError, match="every line or on none"):
        load_dataset(bad, model)
    bad.write_text('{"txt": "a"}\n')
    with pytest.raises(DatasetMismatchError, match='"text"'):
        load_dataset(bad, model)


# --------------------------------------------------------------------------------------
# Measuring and methods


def test_measure_counts_parameters_and_macs(hf, tmp_path: Path) -> None:
    model = load_model(hf["classifier"], "hf")
    inputs = fit_dataset(model, "eval", load_dataset(hf["eval"], model))
    measured = measure_model(
        hf["classifier"], "hf", inputs=inputs, batch_sizes=[1, 4], warmup=1, iterations=3,
        device="cpu", reporter=NullReporter(), with_peak_memory=False,
    )  # fmt: skip
    assert measured["parameters"] == inspect_model(hf["classifier"], "hf")["parameters"]
    assert measured["nonzero_parameters"] == measured["parameters"] - factories_text.HIDDEN
    length = inputs["input_ids"].shape[1]
    # The encoder's Linear layers alone: 2 layers x (4 x 32x32 + 2 x 32x64) per token.
    assert measured["macs"] >= length * 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert set(measured["latency_ms"]) == {"batch_1", "batch_4"}
    assert "peak_memory_bytes" not in measured


def test_prune_magnitude_on_hf(hf, tmp_path: Path) -> None:
    from torch import nn
    from transformers import AutoModelForSequenceClassification

    from worker.methods import get_method

    method = get_method("prune.magnitude")
    model = load_model(hf["classifier"], "hf")
    assert model.module is not None
    embeddings_before = model.module.bert.embeddings.word_embeddings.weight.detach().clone()
    params = method.validate_params({"amount": 0.4}, "hf")
    pruned = method.handler(model, params, ctx(tmp_path, "prune.magnitude"))
    assert pruned.module is not None
    linears = [m for m in pruned.module.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 14
    for layer in linears:
        sparsity = 1 - int(layer.weight.count_nonzero()) / layer.weight.numel()
        assert sparsity == pytest.approx(0.4, abs=0.01)
        assert layer.bias.count_nonzero() > 0  # biases are kept
    embeddings = pruned.module.bert.embeddings.word_embeddings.weight
    assert embeddings.equal(embeddings_before)  # embeddings are not Linear layers
    out = tmp_path / "pruned.zip"
    save_model(pruned, out)
    stock = AutoModelForSequenceClassification.from_pretrained(unzip(out, tmp_path / "p"))
    assert float((stock.classifier.weight == 0).float().mean()) == pytest.approx(0.4, abs=0.02)
    tokenizer = factories_text.tiny_tokenizer()
    assert factories_text.text_accuracy(stock.eval(), tokenizer) >= 0.95


def test_pipeline_on_hf_with_text_data(hf, tmp_path: Path) -> None:
    reporter = RecordingReporter()
    spec = PipelineSpec(
        steps=[("prune.magnitude", {"amount": 0.3})], output_format="hf",
        batch_sizes=[1, 8], warmup=1, iterations=3,
    )  # fmt: skip
    result = run_pipeline(
        hf["classifier"], "hf", spec, {"eval": hf["eval"], "calibration": hf["train"]},
        tmp_path / "work", reporter,
    )  # fmt: skip
    assert result.artifact_path.suffix == ".zip" and result.artifact_format == "hf"
    metrics = result.metrics
    original, compressed = metrics["original"], metrics["compressed"]
    assert original["accuracy"] >= 0.97
    assert compressed["accuracy"] >= original["accuracy"] - 0.02
    # Only the padding token's embedding row is zero in the original.
    assert original["sparsity"] < 0.002 and compressed["sparsity"] > 0.2
    assert compressed["size_bytes_gzip"] < original["size_bytes_gzip"]
    assert metrics["fidelity"]["top1_agreement"] >= 0.97
    assert original["peak_memory_bytes"] > 0 and compressed["peak_memory_bytes"] > 0
    assert original["macs"] == compressed["macs"] > 0
    assert [s["method"] for s in metrics["steps"]] == ["prune.magnitude"]
    assert inspect_model(result.artifact_path, "hf")["task"] == "sequence-classification"


def test_quantize_dynamic_on_hf_needs_onnx_output(hf, tmp_path: Path) -> None:
    spec = PipelineSpec(steps=[("quantize.dynamic", {})], output_format="hf")
    with pytest.raises(UnsupportedError) as err:
        run_pipeline(hf["classifier"], "hf", spec, {}, tmp_path, NullReporter())
    assert "does not accept hf" in err.value.message
    assert "output_format to 'onnx'" in err.value.message
