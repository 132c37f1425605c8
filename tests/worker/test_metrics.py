"""Measurement helpers: each figure checked against an independent computation."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from tests import factories
from worker.context import NullReporter, RecordingReporter
from worker.errors import UnsupportedError
from worker.measurement.fidelity import accuracy, compare_outputs
from worker.measurement.model import measure_model
from worker.measurement.ratios import ratios
from worker.measurement.result_warnings import warn_about_the_result
from worker.measurement.runs import run_model
from worker.measurement.size import gzip_size
from worker.schemas import Fidelity, Latency, ModelMetrics, PipelineMetrics


def test_gzip_size_matches_gzip(files) -> None:
    data = files["onnx"].read_bytes()
    assert gzip_size(files["onnx"]) == len(gzip.compress(data, compresslevel=6, mtime=0))


def test_compare_outputs() -> None:
    ref = [np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])]
    same = compare_outputs(ref, [ref[0].copy()]).to_json()
    assert same == {
        "cosine_similarity": 1.0,
        "mse": 0.0,
        "max_abs_error": 0.0,
        "top1_agreement": 1.0,
    }
    other = compare_outputs(ref, [np.array([[1.0, 2.0, 3.5], [1.0, 2.0, 3.0]])])
    assert other.top1_agreement == 0.5
    assert other.max_abs_error == 2.0
    assert other.mse == pytest.approx((0.25 + 4 + 4) / 6)
    assert 0 < other.cosine_similarity < 1
    single = compare_outputs([np.ones((4, 1))], [np.ones((4, 1))])
    assert single.top1_agreement is None and "top1_agreement" not in single.to_json()


def test_accuracy() -> None:
    scores = [np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])]
    assert accuracy(scores, np.array([1, 0, 0])) == pytest.approx(2 / 3)
    assert accuracy(scores, np.eye(2)[[1, 0, 1]]) == 1.0
    with pytest.raises(UnsupportedError):
        accuracy([np.ones((3, 1))], np.array([1, 0, 1]))


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_run_model_covers_every_sample(files, fmt: str) -> None:
    x = factories.digits_arrays()[2][:10]
    out = run_model(files[fmt], fmt, {"input": x}, batch_size=3)
    assert out[0].shape == (10, 10)
    reference = factories.train_digits_mlp()(__import__("torch").from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(out[0], reference, rtol=1e-4, atol=1e-4)
    if fmt == "pt2":  # a static batch of 4: padded last batch, padded rows dropped
        static = run_model(files["pt2_static"], "pt2", {"input": x}, batch_size=3)
        np.testing.assert_allclose(static[0], out[0], rtol=1e-5, atol=1e-5)


def test_macs_agree_between_formats_for_a_conv_net(tmp_path: Path) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.Flatten(),
        nn.Linear(4 * 7 * 7, 10),
    ).eval()  # fmt: skip
    example = torch.randn(2, 3, 16, 16)
    expected = 16 * 16 * 8 * 3 * 9 + 7 * 7 * 4 * 8 * 9 + 4 * 7 * 7 * 10
    inputs = {"input": np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)}
    paths = {
        "pt2": factories.export_pt2(net, example, tmp_path / "c.pt2"),
        "onnx": factories.export_onnx(net, example, tmp_path / "c.onnx"),
    }
    for fmt, path in paths.items():
        metrics = measure_model(
            path, fmt, inputs=inputs, batch_sizes=[2], warmup=0, iterations=2, device="cpu",
            reporter=NullReporter(),
        )  # fmt: skip
        assert metrics.macs == expected, fmt
        assert metrics.parameters == sum(p.numel() for p in net.parameters())


def test_measure_reports_progress_and_static_batch(files) -> None:
    reporter = RecordingReporter()
    x = factories.digits_arrays()[2][:8]
    metrics = measure_model(
        files["pt2_static"], "pt2", inputs={"input": x}, batch_sizes=[1, 2], warmup=0,
        iterations=3, device="cpu", reporter=reporter,
    )  # fmt: skip
    assert metrics.latency_ms is not None and set(metrics.latency_ms) == {"batch_4"}
    assert metrics.macs == 64 * 128 + 128 * 64 + 64 * 10  # per sample
    assert len(reporter.events) >= 3 and reporter.events[-1]["fraction"] == 1.0
    assert any("static" in line["message"] for line in reporter.logs)


def timed(**p50_by_batch: float) -> dict[str, Latency]:
    return {key: Latency(p50=p50, p95=p50, mean=p50) for key, p50 in p50_by_batch.items()}


def test_ratios_are_original_over_compressed_where_both_were_measured() -> None:
    original = ModelMetrics(size_bytes=1000, latency_ms=timed(batch_1=2.0, batch_8=8.0))
    compressed = ModelMetrics(size_bytes=250, latency_ms=timed(batch_1=1.0))
    assert ratios(original, compressed).to_json() == {"size": 4.0, "speedup": {"batch_1": 2.0}}
    assert ratios(ModelMetrics(), compressed).to_json() == {}


def result(original_p50: float, compressed_p50: float, fidelity: Fidelity) -> PipelineMetrics:
    original = ModelMetrics(latency_ms=timed(batch_1=original_p50))
    compressed = ModelMetrics(latency_ms=timed(batch_1=compressed_p50))
    return PipelineMetrics(
        original=original,
        compressed=compressed,
        fidelity=fidelity,
        ratios=ratios(original, compressed),
    )


def test_a_slower_or_far_result_is_warned_about_with_what_to_change() -> None:
    faithful = Fidelity(cosine_similarity=0.999, mse=0.0, max_abs_error=0.1, top1_agreement=1.0)
    far = Fidelity(cosine_similarity=0.999, mse=0.1, max_abs_error=2.0, top1_agreement=0.5)
    quiet = RecordingReporter()
    warn_about_the_result(result(1.0, 0.96, faithful), "pt2", quiet)  # within 5 %
    assert quiet.logs == []

    log = RecordingReporter()
    warn_about_the_result(result(1.0, 4.0, far), "pt2", log)
    slower, differ = log.logs
    assert "slower than the original at batch 1" in slower["message"]
    assert "output_format 'onnx'" in slower["message"]
    assert slower["data"] == {"batch": "batch_1", "speedup": 0.25}
    assert "differ strongly" in differ["message"] and "top-1 agreement 0.5000" in differ["message"]
    assert differ["data"] == far.to_json()

    onnx = RecordingReporter()
    warn_about_the_result(result(1.0, 4.0, faithful), "onnx", onnx)
    assert len(onnx.logs) == 1 and "output_format" not in onnx.logs[0]["message"]
