"""metrics.steps: every step's model is saved and measured like the artifact."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.context import RecordingReporter
from worker.errors import JobCancelled
from worker.pipeline import STEP_ITERATIONS, PipelineSpec, run_pipeline

STEP_FIELDS = {
    "method", "params", "seconds", "format", "size_bytes", "size_bytes_gzip", "parameters",
    "nonzero_parameters", "sparsity", "macs", "latency_ms", "latency_iterations",
}  # fmt: skip
MLP_PARAMETERS = 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run many times faster on one thread on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spec(fmt: str, steps, **kwargs) -> PipelineSpec:
    return PipelineSpec(
        steps=steps, output_format=fmt, batch_sizes=[1, 8], warmup=2, iterations=12, **kwargs
    )


def test_one_entry_per_step_measured_after_that_step(files, tmp_path: Path) -> None:
    steps = [
        ("prune.magnitude", {"amount": 0.3}),
        ("prune.magnitude", {"amount": 0.6}),
        ("quantize.dynamic", {}),
    ]
    result = run_pipeline(
        files["onnx"], "onnx", spec("onnx", steps), {"eval": files["eval"]}, tmp_path / "w",
        RecordingReporter(),
    )  # fmt: skip
    metrics = result.metrics
    entries = metrics["steps"]
    assert [e["method"] for e in entries] == [name for name, _ in steps]
    for entry, (_, params) in zip(entries, steps, strict=True):
        assert STEP_FIELDS | {"accuracy", "fidelity"} <= set(entry)
        assert entry["format"] == "onnx"
        assert entry["params"]["amount" if "amount" in params else "dtype"] == params.get(
            "amount", "int8"
        )
        assert entry["seconds"] >= 0 and entry["parameters"] == MLP_PARAMETERS
        assert set(entry["latency_ms"]) == {"batch_1", "batch_8"}
        assert "peak_memory_bytes" not in entry
    first, second, last = entries
    # Pruning again to 60% of the weights leaves fewer nonzeros than 30%.
    weights = 64 * 128 + 128 * 64 + 64 * 10
    assert first["nonzero_parameters"] == MLP_PARAMETERS - round(0.3 * 64 * 128) * 2 - round(
        0.3 * 64 * 10
    )
    assert second["nonzero_parameters"] < first["nonzero_parameters"]
    assert second["sparsity"] == pytest.approx(0.6 * weights / MLP_PARAMETERS, abs=0.002)
    # Intermediate models are timed with fewer runs; the last entry is the artifact's.
    assert first["latency_iterations"] == second["latency_iterations"] == STEP_ITERATIONS
    assert last["latency_iterations"] == 12
    for key in ("size_bytes", "nonzero_parameters", "latency_ms", "accuracy"):
        assert last[key] == metrics["compressed"][key]
    assert last["fidelity"] == metrics["fidelity"]
    assert last["size_bytes"] < second["size_bytes"]  # int8 weights
    # Fidelity falls as sparsity rises; accuracy is measured on the eval set each time.
    assert first["fidelity"]["cosine_similarity"] > second["fidelity"]["cosine_similarity"]
    assert first["accuracy"] >= 0.93 and second["accuracy"] >= 0.9
    # Top-level metrics are unchanged, and the report carries the same steps.
    top = {"original", "compressed", "fidelity", "ratios", "steps", "hardware", "layers"}
    assert top == set(metrics)
    report = json.loads(result.report_path.read_text())
    assert report["steps"] == json.loads(json.dumps(entries))
    assert not list((tmp_path / "w").glob("step*"))  # intermediate files are removed


def test_without_eval_data_steps_have_fidelity_but_no_accuracy(files, tmp_path: Path) -> None:
    steps = [("prune.magnitude", {"amount": 0.5}), ("prune.magnitude", {"amount": 0.7})]
    result = run_pipeline(
        files["onnx"], "onnx", spec("onnx", steps), {}, tmp_path, RecordingReporter()
    )
    for entry in result.metrics["steps"]:
        assert entry["format"] == "onnx"
        assert "accuracy" not in entry
        assert 0 < entry["fidelity"]["cosine_similarity"] <= 1.0 + 1e-9


def test_cancelling_while_a_step_is_measured_stops_the_job(files, tmp_path: Path) -> None:
    class CancelAt(RecordingReporter):
        def progress(self, fraction: float, stage: str | None = None) -> None:
            super().progress(fraction, stage)
            if stage == "measure_step":
                raise JobCancelled("cancelled by the user")

    steps = [("prune.magnitude", {"amount": 0.5}), ("quantize.dynamic", {})]
    reporter = CancelAt()
    with pytest.raises(JobCancelled):
        run_pipeline(files["pt2"], "pt2", spec("pt2", steps), {}, tmp_path / "w", reporter)
    assert "quantize.dynamic" not in {e["stage"] for e in reporter.events}
