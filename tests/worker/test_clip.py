"""clip: per-layer weight clamping to a range, a percentile range or mean ± k·std, with
an optional fine-tune inside the range; pt2, onnx and hf."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from tests import factories, factories_text
from tests.helpers import apply, saved, stock_accuracy, stock_program, stock_weights
from worker.context import RecordingReporter
from worker.data import Dataset
from worker.errors import InvalidParamsError
from worker.formats import load_model
from worker.methods import clip
from worker.spec import DatasetInfo, PipelineRequest, check_pipeline

METHOD = clip.METHOD
MLP_WEIGHTS = {"0.weight": "0", "2.weight": "2", "4.weight": "4"}


def clip_log(reporter: RecordingReporter) -> dict:
    (entry,) = [e for e in reporter.logs if e["message"].startswith("clipped ")]
    return entry["data"]  # type: ignore[no-any-return]


def expected_bounds(w: np.ndarray, params: dict) -> tuple[float, float]:
    """The range of one tensor, computed with numpy."""
    flat = w.astype(np.float64).ravel()
    if params["mode"] == "percentile":
        p = params.get("percentile", 99.9)
        return float(np.percentile(flat, 100 - p)), float(np.percentile(flat, p))
    if params["mode"] == "sigma":
        k = params.get("k", 3.0)
        return float(flat.mean() - k * flat.std()), float(flat.mean() + k * flat.std())
    return params.get("min", -np.inf), params.get("max", np.inf)


# --------------------------------------------------------------------------------------
# Params


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"mode": "range"}, "needs min, max or both"),
        ({"mode": "range", "min": 0.1, "max": -0.1}, "must be below max"),
        ({"mode": "range", "min": 0.1, "max": 0.1}, "must be below max"),
        ({"mode": "sigma", "percentile": 99.0}, "percentile belongs to mode 'percentile'"),
        ({"mode": "percentile", "k": 2.0}, "k belongs to mode 'sigma'"),
        ({"mode": "sigma", "min": -1.0, "max": 1.0}, "min and max belong to mode 'range'"),
        ({"mode": "percentile", "percentile": 100.0}, "less than 100"),
        ({"mode": "percentile", "percentile": 50.0}, "greater than 50"),
        ({"mode": "sigma", "k": 0.0}, "greater than 0"),
        ({"mode": "median"}, "'range', 'percentile' or 'sigma'"),
        ({"epochs": -1}, "greater than or equal to 0"),
    ],
)  # fmt: skip
def test_one_mode_and_only_its_fields(params: dict, words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        METHOD.validate_params(params)


def test_modes_data_needs_and_formats() -> None:
    assert METHOD.formats == frozenset({"pt2", "onnx", "hf"})
    assert METHOD.validate_params({}).mode == "sigma"
    assert METHOD.validate_params({"mode": "range", "max": 0.5}).min is None
    with pytest.raises(ValidationError, match="onnx models cannot be trained"):
        METHOD.validate_params({"epochs": 1}, "onnx")
    assert METHOD.validate_params({"epochs": 1}, "pt2").epochs == 1
    # train (with labels) only when it fine-tunes
    assert check_pipeline(PipelineRequest("pt2", [("clip", {})])) == []
    (problem,) = check_pipeline(PipelineRequest("pt2", [("clip", {"epochs": 2})]))
    assert problem.loc == ("datasets", "train") and "needs a train dataset" in problem.msg
    unlabelled = {"train": DatasetInfo(has_labels=False)}
    (problem,) = check_pipeline(
        PipelineRequest("hf", [("clip", {"epochs": 2})], datasets=unlabelled)
    )
    assert "with labels" in problem.msg
    (problem,) = check_pipeline(PipelineRequest("onnx", [("clip", {"epochs": 2})]))
    assert problem.loc == ("pipeline", 0, "params")


# --------------------------------------------------------------------------------------
# pt2 and onnx


@pytest.mark.parametrize(
    "params",
    [
        {"mode": "range", "min": -0.2, "max": 0.25},
        {"mode": "range", "max": 0.1},
        {"mode": "percentile", "percentile": 99.0},
        {"mode": "sigma", "k": 2.0},
        {"mode": "sigma"},
    ],
)
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_weights_are_clamped_per_layer_and_counted(
    files, tmp_path: Path, fmt: str, params: dict
) -> None:
    original = stock_weights(files[fmt])
    reporter = RecordingReporter()
    model = apply(METHOD, load_model(files[fmt], fmt), params, tmp_path, reporter=reporter)
    out = saved(model, tmp_path / f"clipped.{fmt}")
    after = stock_weights(out)
    logged = clip_log(reporter)
    matrices = {name for name, w in original.items() if w.ndim >= 2}
    assert len(matrices) == 3 and len(logged["clipped"]) == 3
    counts = {}
    for name in matrices:
        w = original[name]
        low, high = expected_bounds(w, params)
        np.testing.assert_array_equal(after[name], np.clip(w, low, high).astype(w.dtype))
        counts[name] = int(((w < low) | (w > high)).sum())
        if fmt == "pt2":  # layers by module path (onnx: by node, below)
            assert logged["clipped"][MLP_WEIGHTS[name]] == counts[name]
            assert logged["bounds"][MLP_WEIGHTS[name]] == pytest.approx([low, high])
    assert sorted(logged["clipped"].values()) == sorted(counts.values())
    assert sum(counts.values()) > 0
    assert logged["weights"] == sum(original[n].size for n in matrices)
    for name in set(original) - matrices:  # biases are not clipped
        np.testing.assert_array_equal(after[name], original[name])
    x_test, y_test = factories.digits_arrays()[2:]
    assert stock_accuracy(out, x_test, y_test, check_loader=True) >= 0.9


def test_pt2_keeps_its_graph_and_dynamic_batch(files, tmp_path: Path) -> None:
    import torch

    before = stock_program(files["pt2"])
    model = apply(METHOD, load_model(files["pt2"], "pt2"), {"mode": "sigma", "k": 2.0}, tmp_path)
    after = stock_program(saved(model, tmp_path / "clipped.pt2"))
    assert str(after.graph) == str(before.graph)
    assert after.module()(torch.rand(13, 64)).shape == (13, 10)


def test_onnx_layers_are_named_by_their_nodes(files, tmp_path: Path) -> None:
    import onnx

    reporter = RecordingReporter()
    apply(METHOD, load_model(files["onnx"], "onnx"), {"mode": "sigma", "k": 2.0}, tmp_path,
          reporter=reporter)  # fmt: skip
    proto = onnx.load(str(files["onnx"]))
    readers = {n.name for n in proto.graph.node if n.op_type in ("Gemm", "MatMul")}
    assert set(clip_log(reporter)["clipped"]) == readers and len(readers) == 3


def test_a_range_that_holds_every_weight_clips_none(files, tmp_path: Path) -> None:
    reporter = RecordingReporter()
    params = {"mode": "range", "min": -100.0, "max": 100.0}
    model = apply(METHOD, load_model(files["pt2"], "pt2"), params, tmp_path, reporter=reporter)
    assert set(clip_log(reporter)["clipped"].values()) == {0}
    after = stock_weights(saved(model, tmp_path / "same.pt2"))
    for name, w in stock_weights(files["pt2"]).items():
        np.testing.assert_array_equal(after[name], w)


def test_fine_tuning_stays_inside_the_range(files, tmp_path: Path) -> None:
    x_train, y_train, x_test, y_test = factories.digits_arrays()
    train = {"train": Dataset({"inputs": x_train}, y_train, len(x_train))}
    params = {"mode": "sigma", "k": 1.5}
    clipped_only = saved(
        apply(METHOD, load_model(files["pt2"], "pt2"), params, tmp_path), tmp_path / "c.pt2"
    )
    reporter = RecordingReporter()
    tuned = apply(
        METHOD, load_model(files["pt2"], "pt2"), {**params, "epochs": 2, "lr": 1e-3}, tmp_path,
        datasets=train, reporter=reporter,
    )  # fmt: skip
    tuned_file = saved(tuned, tmp_path / "tuned.pt2")
    bounds = clip_log(reporter)["bounds"]
    before, after = stock_weights(clipped_only), stock_weights(tuned_file)
    moved = 0
    for name, layer in MLP_WEIGHTS.items():
        low, high = bounds[layer]
        # the lifted layers are named by their path with "_" for "."
        w = after.get(name, after.get(name.replace(".weight", "").replace(".", "_") + ".weight"))
        assert w is not None
        assert w.min() >= np.float32(low) and w.max() <= np.float32(high)
        assert np.isclose(w, low).sum() + np.isclose(w, high).sum() > 0  # some sit on a bound
        moved += int((w != before[name]).sum())
    assert moved > 1000  # it trained
    assert any(e["message"].startswith("fine-tuned 2 epochs") for e in reporter.logs)
    tuned_acc = stock_accuracy(tuned_file, x_test, y_test, check_loader=True)
    assert tuned_acc >= stock_accuracy(clipped_only, x_test, y_test) - 0.01
    assert tuned_acc >= 0.95


def test_straight_through_clamp_passes_the_gradient() -> None:
    import torch
    from torch.nn.utils import parametrize

    from worker.methods.clip import straight_through_clamp

    layer = torch.nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-2.0, -0.5, 0.5, 2.0], [0.0, 1.5, -1.5, 0.1]]))
    parametrize.register_parametrization(layer, "weight", straight_through_clamp(-1.0, 1.0))
    assert float(layer.weight.detach().abs().max()) == 1.0  # the forward sees the clamp
    x = torch.ones(3, 4)
    layer(x).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert grad is not None and torch.equal(grad, torch.full((2, 4), 3.0))  # also outside


# --------------------------------------------------------------------------------------
# hf


def test_hf_weight_matrices_are_clipped_and_load_with_transformers(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    src = factories_text.tiny_bert_hf_zip(tmp_path / "bert.zip")
    model = load_model(src, "hf")
    assert model.module is not None
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    reporter = RecordingReporter()
    clipped = apply(METHOD, model, {"mode": "percentile", "percentile": 99.5}, tmp_path,
                    reporter=reporter)  # fmt: skip
    out = saved(clipped, tmp_path / "clipped.zip")
    with zipfile.ZipFile(out) as zf:
        zf.extractall(tmp_path / "unzipped")
    folder = next(p.parent for p in (tmp_path / "unzipped").rglob("config.json"))
    stock = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    logged = clip_log(reporter)
    for name, param in stock.named_parameters():
        param, w = param.detach(), before[name]
        if w.ndim < 2:
            assert torch.equal(param, w), name  # biases and LayerNorms are left alone
            continue
        layer = name.rpartition(".")[0]
        low, high = logged["bounds"][layer]
        assert float(param.min()) >= low - 1e-6 and float(param.max()) <= high + 1e-6
        assert logged["clipped"][layer] == int(((w < low) | (w > high)).sum())
    assert "bert.embeddings.word_embeddings" in logged["clipped"]
    assert factories_text.text_accuracy(stock, factories_text.tiny_tokenizer()) >= 0.9


# --------------------------------------------------------------------------------------
# exclude and metrics.layers


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_exclude_leaves_layers_as_they_were(files, tmp_path: Path, fmt: str) -> None:
    from tests.helpers import step_context
    from worker.formats import layer_names

    model = load_model(files[fmt], fmt)
    names = layer_names(model)
    assert len(names) == 3
    ctx = step_context(tmp_path, METHOD.name)
    params = METHOD.validate_params({"mode": "sigma", "k": 1.0, "exclude": [names[1]]}, fmt)
    out = saved(METHOD.handler(model, params, ctx), tmp_path / f"clipped.{fmt}")
    before, after = stock_weights(files[fmt]), stock_weights(out)
    changed = [n for n in before if not np.array_equal(before[n], after[n])]
    assert len(changed) == 2  # the other two weight matrices
    assert (str(ctx.layers[names[1]].status), ctx.layers[names[1]].reason) == ("kept", "excluded")
    for layer in (names[0], names[2]):
        entry = ctx.layers[layer].to_json()
        assert entry["status"] == "changed" and entry["clipped"] > 0 and entry["steps"] == [0]
    assert sum(ctx.layers[n].to_json()["clipped"] for n in (names[0], names[2])) == sum(
        int((before[n] != after[n]).sum()) for n in changed
    )
    with pytest.raises(InvalidParamsError, match="exclude names no layer"):
        apply(METHOD, load_model(files[fmt], fmt), {"exclude": ["fc9"]}, tmp_path)
    problems = check_pipeline(
        PipelineRequest(fmt, [("clip", {"exclude": ["fc9"]})], layer_names=names)
    )
    assert [p.loc for p in problems] == [("pipeline", 0, "params", "exclude")]


def test_a_job_reports_the_weights_clipped_per_layer(files, tmp_path: Path) -> None:
    from worker.pipeline import PipelineSpec, run_pipeline

    reporter = RecordingReporter()
    spec = PipelineSpec(
        steps=[("clip", {"mode": "range", "min": -0.3, "max": 0.3}), ("quantize.static", {})],
        output_format="pt2", batch_sizes=[1], warmup=1, iterations=3,
    )  # fmt: skip
    datasets = {"eval": files["eval"], "calibration": files["calibration"]}
    result = run_pipeline(files["pt2"], "pt2", spec, datasets, tmp_path / "work", reporter)
    weights = stock_weights(files["pt2"])
    outside = {n.removesuffix(".weight"): int((np.abs(w) > 0.3).sum()) for n, w in weights.items()}
    clip_step = result.metrics["steps"][0]
    assert {n: e["clipped"] for n, e in clip_step["layers"].items()} == {
        n: c for n, c in outside.items() if n in MLP_WEIGHTS.values()
    }
    assert all(e["clipped"] > 0 for e in clip_step["layers"].values())
    assert clip_log(reporter)["clipped"] == {
        k: v for k, v in outside.items() if k in clip_step["layers"]
    }
    assert result.metrics["compressed"]["accuracy"] >= 0.9
