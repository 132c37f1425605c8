"""A slower result is never left at that: the warning names the other runtimes the model
could run in, with the speedup measured where that is cheap."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import apply, saved
from worker.context import RecordingReporter
from worker.contract import ModelFormat
from worker.formats import load_model
from worker.measurement.alternatives import find_alternatives
from worker.measurement.ratios import ratios
from worker.measurement.result_warnings import Alternative, warn_about_the_result
from worker.measurement.runs import generated_inputs
from worker.pipeline import PipelineSpec, run_pipeline
from worker.schemas import Fidelity, Latency, ModelMetrics, PipelineMetrics


def _slower_result() -> PipelineMetrics:
    original = ModelMetrics(latency_ms={"batch_1": Latency(p50=1.0, p95=1.0, mean=1.0)})
    compressed = ModelMetrics(latency_ms={"batch_1": Latency(p50=4.0, p95=4.0, mean=4.0)})
    faithful = Fidelity(cosine_similarity=1.0, mse=0.0, max_abs_error=0.0)
    return PipelineMetrics(
        original=original, compressed=compressed, fidelity=faithful,
        ratios=ratios(original, compressed),
    )  # fmt: skip


def test_the_warning_names_measured_and_unmeasured_alternatives() -> None:
    log = RecordingReporter()
    alternatives = [
        Alternative(ModelFormat.onnx, speedup={"batch_1": 2.6}),
        Alternative(ModelFormat.aoti, why_not_measured="compiling takes a minute"),
    ]
    warn_about_the_result(_slower_result(), "pt2", log, alternatives)
    (warning,) = log.logs
    message = warning["message"]
    assert "slower than the original at batch 1" in message
    assert (
        "as onnx (onnxruntime) this model runs 2.60x as fast as the original (measured)" in message
    )
    assert (
        "output_format 'aoti' (inductor) may be faster, not measured (compiling takes a minute)"
        in message
    )
    assert warning["data"] == {"batch": "batch_1", "speedup": 0.25, "alternatives": {"onnx": 2.6}}


def _alternatives(path: Path, fmt: str, upload: str = "pt2") -> list[Alternative]:
    model = load_model(path, fmt)
    inputs = generated_inputs(model)
    original = ModelMetrics(latency_ms={"batch_1": Latency(p50=1.0, p95=1.0, mean=1.0)})
    return find_alternatives(
        upload, (path, fmt), original, ["batch_1"], inputs=inputs, warmup=1, iterations=3,
        device="cpu", reporter=RecordingReporter(),
    )  # fmt: skip


def test_an_fp32_artifact_is_measured_in_onnx_runtime_and_aoti_is_named(
    files: dict[str, Path],
) -> None:
    onnx, aoti = _alternatives(files["pt2"], "pt2")
    assert onnx.format == "onnx" and onnx.speedup["batch_1"] > 0  # converted and timed
    assert aoti.format == "aoti" and not aoti.speedup and "compiling" in str(aoti.why_not_measured)


def test_a_quantized_artifact_names_its_alternatives_without_figures(
    files: dict[str, Path], tmp_path: Path
) -> None:
    quantized = apply("quantize.dynamic", load_model(files["pt2"], "pt2"), {}, tmp_path)
    found = _alternatives(saved(quantized, tmp_path / "int8.pt2"), "pt2")
    assert [a.format for a in found] == ["onnx", "aoti"]
    assert not any(a.speedup for a in found)
    assert "run again in ONNX Runtime" in str(found[0].why_not_measured)


def test_an_onnx_upload_has_no_other_runtime(files: dict[str, Path]) -> None:
    assert _alternatives(files["onnx"], "onnx", upload="onnx") == []


def test_a_slower_pipeline_result_names_the_runtimes_that_would_pay(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """torchao int8 in eager PyTorch runs reference kernels: slower than fp32."""
    log = RecordingReporter()
    spec = PipelineSpec(steps=[("quantize.dynamic", {})], output_format="pt2", batch_sizes=[1])
    result = run_pipeline(files["pt2"], "pt2", spec, {}, tmp_path, log)
    assert result.metrics["ratios"]["speedup"]["batch_1"] < 0.95
    (warning,) = [e for e in log.logs if "slower than the original" in e["message"]]
    assert "output_format 'onnx' (onnxruntime) may be faster" in warning["message"]
    assert "output_format 'aoti' (inductor) may be faster" in warning["message"]
