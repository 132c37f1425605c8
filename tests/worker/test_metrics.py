"""Measurement helpers: each figure checked against an independent computation."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from tests import factories
from worker.context import NullReporter, RecordingReporter
from worker.errors import UnsupportedError
from worker.metrics import accuracy, compare_outputs, gzip_size, measure_model, run_model


def test_gzip_size_matches_gzip(files) -> None:
    data = files["onnx"].read_bytes()
    assert gzip_size(files["onnx"]) == len(gzip.compress(data, compresslevel=6, mtime=0))


def test_compare_outputs() -> None:
    ref = [np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])]
    same = compare_outputs(ref, [ref[0].copy()])
    assert same == {
        "cosine_similarity": 1.0,
        "mse": 0.0,
        "max_abs_error": 0.0,
        "top1_agreement": 1.0,
    }
    other = compare_outputs(ref, [np.array([[1.0, 2.0, 3.5], [1.0, 2.0, 3.0]])])
    assert other["top1_agreement"] == 0.5
    assert other["max_abs_error"] == 2.0
    assert other["mse"] == pytest.approx((0.25 + 4 + 4) / 6)
    assert 0 < other["cosine_similarity"] < 1
    assert "top1_agreement" not in compare_outputs([np.ones((4, 1))], [np.ones((4, 1))])


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
        assert metrics["macs"] == expected, fmt
        assert metrics["parameters"] == sum(p.numel() for p in net.parameters())


def test_measure_reports_progress_and_static_batch(files) -> None:
    reporter = RecordingReporter()
    x = factories.digits_arrays()[2][:8]
    metrics = measure_model(
        files["pt2_static"], "pt2", inputs={"input": x}, batch_sizes=[1, 2], warmup=0,
        iterations=3, device="cpu", reporter=reporter,
    )  # fmt: skip
    assert set(metrics["latency_ms"]) == {"batch_4"}
    assert metrics["macs"] == 64 * 128 + 128 * 64 + 64 * 10  # per sample
    assert len(reporter.events) >= 3 and reporter.events[-1]["fraction"] == 1.0
    assert any("static" in line["message"] for line in reporter.logs)
