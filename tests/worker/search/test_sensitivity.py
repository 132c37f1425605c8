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


def test_prune_magnitude_sensitivity_allocation(files: dict[str, Path], tmp_path: Path) -> None:
    from worker.context import RecordingReporter, StepContext
    from worker.data import load_dataset
    from worker.formats import load_model, weight_arrays
    from worker.measurement.fidelity import sample_cosines
    from worker.measurement.runs import run_model
    from worker.methods import get_method

    method = get_method("prune.magnitude")
    model = load_model(files["pt2"], "pt2")
    data = load_dataset(files["eval"])
    log = RecordingReporter()
    ctx = StepContext(step=0, method=method.name, reporter=log, datasets={"eval": data},
                      device="cpu", work_dir=tmp_path)  # fmt: skip
    params = method.validate_params(
        {"amount": 0.9, "allocation": "sensitivity", "min_cosine": 0.995}, "pt2"
    )
    pruned = method.handler(model, params, ctx)
    amounts = next(line["data"]["amounts"] for line in log.logs if "allocation" in line["message"])
    assert len(amounts) == 3 and len(set(amounts.values())) > 1  # layers differ
    assert all(0.0 <= a <= 0.9 for a in amounts.values())
    weights = weight_arrays(pruned)
    for name, amount in amounts.items():
        assert abs(float((weights[name] == 0).mean()) - amount) < 0.01
    # each tensor alone keeps the bound; together they still stay close
    path = tmp_path / "pruned.pt2"
    from worker.formats import save_model

    save_model(pruned, path)
    feeds = {"x": data.inputs["inputs"][:256]}
    before = run_model(files["pt2"], "pt2", feeds, 64)
    after = run_model(path, "pt2", feeds, 64)
    assert float(sample_cosines(before, after).mean()) > 0.95
    assert method.validate_params({"amount": 0.5, "allocation": "sensitivity"}, "pt2")
    with pytest.raises(ValueError, match="pt2 and hf"):
        method.validate_params({"amount": 0.5, "allocation": "sensitivity"}, "onnx")
