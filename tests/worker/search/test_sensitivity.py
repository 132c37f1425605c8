"""Per-layer sensitivity on the digits MLP: every layer measured, ranked, and the ranking
says something true about the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.context import NullReporter
from worker.search.sensitivity import analyze, prune_smallest, quantize_int8


def test_the_changes() -> None:
    weight = np.arange(-8, 8, dtype=np.float32).reshape(2, 8) / 3
    assert np.abs(quantize_int8(weight) - weight).max() <= np.abs(weight).max() / 127 / 2 + 1e-6
    pruned = prune_smallest(weight, 0.5)
    assert (pruned == 0).sum() == 8 and np.abs(pruned).max() == np.abs(weight).max()


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_every_layer_is_measured_and_ranked(files: dict[str, Path], tmp_path: Path, fmt: str) -> None:  # fmt: skip
    result = analyze(files[fmt], fmt, {"eval": files["eval"]}, "cpu", tmp_path, NullReporter())
    assert result.complete and result.samples == 256
    assert len(result.layers) == 3  # the MLP's three Linear layers
    ranks = sorted(s.rank for s in result.layers.values() if s.rank is not None)
    assert ranks == [1, 2, 3]
    for figures in result.layers.values():
        assert figures.quantized_cosine is not None and figures.pruned_cosine is not None
        assert 0.9 < figures.quantized_cosine <= 1.0  # int8 weights barely move a layer
        assert figures.pruned_cosine < figures.quantized_cosine  # halving it moves it more
        assert figures.quantized_accuracy is not None and figures.pruned_accuracy is not None
    if fmt == "pt2":  # the model is restored after each change
        again = analyze(files[fmt], fmt, {"eval": files["eval"]}, "cpu", tmp_path, NullReporter())
        assert again.to_json() == result.to_json()


def test_a_deadline_stops_early(files: dict[str, Path], tmp_path: Path) -> None:
    result = analyze(files["pt2"], "pt2", {"eval": files["eval"]}, "cpu", tmp_path,
                     NullReporter(), deadline=0.0)  # fmt: skip
    assert not result.complete and result.layers == {}
