"""run_pipeline end to end: real steps, real measurements, honest reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import factories
from worker.context import NullReporter, RecordingReporter
from worker.errors import DatasetMismatchError, JobCancelled, UnsupportedError
from worker.pipeline import PipelineSpec, run_pipeline
from worker.schemas import PipelineMetrics

PRUNE_AND_QUANTIZE = [("prune.magnitude", {"amount": 0.5}), ("quantize.dynamic", {"dtype": "int8"})]
MODEL_METRICS = {
    "size_bytes", "size_bytes_gzip", "parameters", "nonzero_parameters", "sparsity", "macs",
    "latency_ms", "peak_memory_bytes", "accuracy",
}  # fmt: skip
MLP_MACS = 64 * 128 + 128 * 64 + 64 * 10


def spec(fmt: str, steps=PRUNE_AND_QUANTIZE, **kwargs) -> PipelineSpec:
    kwargs.setdefault("batch_sizes", [1, 16])
    return PipelineSpec(steps=steps, output_format=fmt, warmup=1, iterations=5, **kwargs)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_prune_then_quantize_end_to_end(files, tmp_path: Path, fmt: str) -> None:
    reporter = RecordingReporter()
    result = run_pipeline(
        files[fmt], fmt, spec(fmt), {"eval": files["eval"], "calibration": files["calibration"]},
        tmp_path / "work", reporter,
    )  # fmt: skip
    metrics = result.metrics
    original, compressed = metrics["original"], metrics["compressed"]
    assert set(original) == MODEL_METRICS and set(compressed) == MODEL_METRICS
    assert result.artifact_path.exists() and result.artifact_format == fmt
    # Sizes are the files' sizes; gzip is measured, not guessed.
    assert original["size_bytes"] == files[fmt].stat().st_size
    assert compressed["size_bytes"] == result.artifact_path.stat().st_size
    for m in (original, compressed):
        assert 0 < m["size_bytes_gzip"] < m["size_bytes"]
        assert m["parameters"] == 17226
        assert m["macs"] == MLP_MACS
        assert m["peak_memory_bytes"] > 0
        assert set(m["latency_ms"]) == {"batch_1", "batch_16"}
        for timing in m["latency_ms"].values():
            assert 0 < timing["p50"] <= timing["p95"]
            assert timing["mean"] > 0
    assert original["sparsity"] == 0.0 and original["nonzero_parameters"] == 17226
    # Weights of the three layers are half zero; biases are not pruned.
    zeros = 2 * round(0.5 * 64 * 128) + round(0.5 * 64 * 10)
    assert compressed["nonzero_parameters"] == 17226 - zeros
    assert compressed["sparsity"] == pytest.approx(zeros / 17226)
    assert compressed["size_bytes"] < original["size_bytes"]
    assert compressed["size_bytes_gzip"] < original["size_bytes_gzip"] / 2
    # Accuracy within one point of fp32 on the digits test split.
    assert original["accuracy"] >= 0.93
    assert compressed["accuracy"] >= original["accuracy"] - 0.01
    fidelity = metrics["fidelity"]
    assert fidelity["top1_agreement"] >= 0.95
    assert 0.9 < fidelity["cosine_similarity"] <= 1.0 + 1e-9
    assert fidelity["max_abs_error"] > 0 and fidelity["mse"] > 0
    ratios = metrics["ratios"]
    assert ratios["size"] == pytest.approx(original["size_bytes"] / compressed["size_bytes"])
    assert ratios["speedup"]["batch_1"] == pytest.approx(
        original["latency_ms"]["batch_1"]["p50"] / compressed["latency_ms"]["batch_1"]["p50"]
    )
    report = json.loads(result.report_path.read_text())
    assert report["metrics"] == json.loads(json.dumps(metrics))
    # The stored JSON reads back through the API's model unchanged, as the typed result.
    assert PipelineMetrics.model_validate(metrics) == result.measured
    assert PipelineMetrics.model_validate(metrics).to_json() == metrics
    assert report["spec"]["output_format"] == fmt
    assert any("pruned 3 tensors" in line["message"] for line in report["log"])
    # Progress: monotonic, ends at 1, stages include each method.
    fractions = [e["fraction"] for e in reporter.events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    stages = {e["stage"] for e in reporter.events}
    assert {
        "prune.magnitude",
        "quantize.dynamic",
        "measure_original",
        "measure_compressed",
    } <= stages


def test_without_data_fidelity_uses_generated_inputs(files, tmp_path: Path) -> None:
    reporter = RecordingReporter()
    steps = [("prune.magnitude", {"amount": 0.3, "scope": "global"})]
    result = run_pipeline(files["onnx"], "onnx", spec("onnx", steps), {}, tmp_path, reporter)
    assert "accuracy" not in result.metrics["original"]
    assert set(result.metrics["fidelity"]) == {
        "cosine_similarity",
        "mse",
        "max_abs_error",
        "top1_agreement",
    }
    messages = " ".join(line["message"] for line in reporter.logs)
    assert "generated from the model's signature" in messages
    assert "accuracy not measured" in messages


def test_static_batch_skips_other_batch_sizes_and_says_why(files, tmp_path: Path) -> None:
    reporter = RecordingReporter()
    steps = [("prune.magnitude", {"amount": 0.5})]
    result = run_pipeline(
        files["pt2_static"], "pt2", spec("pt2", steps, batch_sizes=[1, 4]), {"eval": files["eval"]},
        tmp_path, reporter,
    )  # fmt: skip
    assert set(result.metrics["compressed"]["latency_ms"]) == {"batch_4"}
    assert "speedup" in result.metrics["ratios"]
    assert any(
        "batch sizes [1]" in line["message"] and "static" in line["message"]
        for line in reporter.logs
    )
    # Every eval sample was scored despite 450 not being a multiple of 4.
    assert result.metrics["compressed"]["accuracy"] >= 0.93


def test_dataset_of_the_wrong_shape_names_both_shapes(files, tmp_path: Path) -> None:
    bad = factories.write_npz(tmp_path / "bad.npz", np.zeros((20, 32), np.float32))
    with pytest.raises(DatasetMismatchError) as err:
        run_pipeline(files["onnx"], "onnx", spec("onnx"), {"eval": bad}, tmp_path, NullReporter())
    message = err.value.message
    assert ", 64] float32" in message and "[20, 32] float32" in message
    assert err.value.code == "dataset_mismatch"


def test_dataset_with_unknown_input_names_is_refused(files, tmp_path: Path) -> None:
    bad = factories.write_npz(tmp_path / "bad.npz", {"pixels": np.zeros((5, 64), np.float32)})
    with pytest.raises(DatasetMismatchError, match="pixels"):
        run_pipeline(files["onnx"], "onnx", spec("onnx"), {"eval": bad}, tmp_path, NullReporter())


def test_output_format_must_match(files, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="output_format"):
        run_pipeline(files["onnx"], "onnx", spec("pt2"), {}, tmp_path, NullReporter())


def test_cancellation_stops_the_pipeline(files, tmp_path: Path) -> None:
    class CancelAt(RecordingReporter):
        def progress(self, fraction: float, stage: str | None = None) -> None:
            super().progress(fraction, stage)
            if stage == "quantize.dynamic":
                raise JobCancelled("cancelled by the user")

    reporter = CancelAt()
    with pytest.raises(JobCancelled):
        run_pipeline(files["onnx"], "onnx", spec("onnx"), {}, tmp_path / "work", reporter)
    assert not (tmp_path / "work" / "model.onnx").exists()


def test_a_slower_or_broken_result_is_said_plainly(files, tmp_path: Path) -> None:
    """torchao int8 in eager PyTorch is several times slower than fp32 (reference kernels),
    and 95 % magnitude pruning wrecks the MLP: both land in the events as warnings."""
    reporter = RecordingReporter()
    steps = [("prune.magnitude", {"amount": 0.95}), ("quantize.dynamic", {})]
    result = run_pipeline(
        files["pt2"], "pt2", spec("pt2", steps), {"eval": files["eval"]}, tmp_path, reporter
    )
    warnings = [line for line in reporter.logs if line["level"] == "warning"]
    slower = [w for w in warnings if "slower than the original" in w["message"]]
    assert {w["data"]["batch"] for w in slower} == {
        k for k, v in result.metrics["ratios"]["speedup"].items() if v < 0.95
    }
    assert slower and all("output_format 'onnx'" in w["message"] for w in slower)
    assert result.metrics["fidelity"]["top1_agreement"] < 0.9
    assert any("differ strongly" in w["message"] for w in warnings)


def test_a_faithful_faster_result_raises_no_warning(files, tmp_path: Path) -> None:
    reporter = RecordingReporter()
    steps = [("quantize.dynamic", {})]
    result = run_pipeline(
        files["onnx"], "onnx", spec("onnx", steps), {"eval": files["eval"]}, tmp_path, reporter
    )
    assert result.metrics["fidelity"]["top1_agreement"] >= 0.95
    assert not [line for line in reporter.logs if "differ strongly" in line["message"]]
