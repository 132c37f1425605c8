"""prune.activation: the least active neurons/channels are removed, tensors shrink."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests import factories, factories_cnn
from tests.helpers import apply, stock_module
from worker.context import RecordingReporter
from worker.data import Dataset, load_dataset
from worker.errors import InvalidParamsError
from worker.formats import load_model, save_model
from worker.methods import get_method
from worker.metrics import weight_counts

METHOD = "prune.activation"


def prune(path: Path, params: dict, tmp_path: Path, calibration: Dataset | None, reporter=None):
    datasets = {} if calibration is None else {"calibration": calibration}
    model = load_model(path, "pt2")
    return apply(METHOD, model, params, tmp_path, datasets=datasets, reporter=reporter)


def constructed_mlp() -> nn.Module:
    """4 -> 6 -> 2; hidden unit j computes relu(c_j * x0), so its mean |activation| is
    c_j * mean(x0) for c_j > 0 and 0 otherwise. Unit 1 has the largest weight of all but
    never fires; a weight-magnitude criterion would keep it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[:, 0] = torch.tensor([3.0, -5.0, 1.0, 0.5, 4.0, 2.0])
        model[0].bias.zero_()
    return model.eval()


def test_removes_exactly_the_least_active_neurons(tmp_path: Path) -> None:
    module = constructed_mlp()
    path = factories.export_pt2(module, torch.rand(4, 4), tmp_path / "mlp.pt2")
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, (200, 4)).astype(np.float32)
    x[:, 0] = rng.uniform(0.5, 1.5, 200)
    with torch.no_grad():
        hidden = torch.relu(module[0](torch.from_numpy(x))).numpy()
    mean_abs = np.abs(hidden).mean(axis=0)  # 1/N Σ|a_i| per neuron
    expected_kept = np.sort(np.argsort(mean_abs, kind="stable")[3:])
    assert list(expected_kept) == [0, 4, 5]

    reporter = RecordingReporter()
    calibration = Dataset({"inputs": x}, None, len(x))
    pruned = prune(path, {"amount": 0.5, "batch_size": 64}, tmp_path, calibration, reporter)
    weights = pruned.program.state_dict
    original = {k: v.detach() for k, v in module.state_dict().items()}
    assert torch.equal(weights["0.weight"], original["0.weight"][expected_kept])
    assert torch.equal(weights["0.bias"], original["0.bias"][expected_kept])
    assert torch.equal(weights["2.weight"], original["2.weight"][:, expected_kept])
    assert torch.equal(weights["2.bias"], original["2.bias"])  # the output layer is kept
    assert any("over 200 calibration samples" in e["message"] for e in reporter.logs)
    out = tmp_path / "pruned.pt2"
    save_model(pruned, out)
    reloaded = stock_module(out)
    with torch.no_grad():
        full, small = module(torch.from_numpy(x)).numpy(), reloaded(torch.from_numpy(x)).numpy()
    # unit 1 never fires; the output loses exactly the contributions of units 2 and 3
    lost = hidden[:, [2, 3]] @ original["2.weight"][:, [2, 3]].numpy().T
    np.testing.assert_allclose(small, full - lost, atol=1e-5)


def test_cnn_channels_shrink_through_residuals_and_concat(tmp_path: Path) -> None:
    path = factories_cnn.cnn_pt2(tmp_path / "cnn.pt2")
    half = factories.export_pt2(
        factories_cnn.cnn(width=16), factories_cnn.example_images(), tmp_path / "cnn16.pt2"
    )
    calibration = load_dataset(factories_cnn.images_npz(tmp_path / "cal.npz", labels=False))
    pruned = prune(path, {"amount": 0.5, "max_samples": 256}, tmp_path, calibration)
    # every coupled group lost half its channels: the same architecture at half width
    assert (
        weight_counts(pruned)["parameters"] == weight_counts(load_model(half, "pt2"))["parameters"]
    )
    shapes = {k: tuple(v.shape) for k, v in pruned.program.state_dict.items()}
    assert shapes["stem_0.weight"] == (16, 1, 3, 3)
    assert shapes["block1_conv1.weight"] == (16, 16, 3, 3)
    assert shapes["branch_a.weight"] == (8, 16, 1, 1)
    assert shapes["head.weight"] == (10, 16)
    out = tmp_path / "pruned.pt2"
    save_model(pruned, out)
    with torch.no_grad():
        y = stock_module(out)(factories_cnn.example_images(7))
    assert y.shape == (7, 10)


def test_static_batch_models_run_whole_batches(tmp_path: Path) -> None:
    path = factories.tiny_mlp_pt2(tmp_path / "mlp.pt2", dynamic_batch=False)
    x = factories.digits_arrays()[0][:10]  # not a multiple of the static batch of 4
    pruned = prune(path, {"amount": 0.25}, tmp_path, Dataset({"inputs": x}, None, 10))
    assert pruned.static_batch == 4
    assert tuple(pruned.program.state_dict["0.weight"].shape) == (96, 64)


def test_needs_calibration_data(tmp_path: Path) -> None:
    path = factories.tiny_mlp_pt2(tmp_path / "mlp.pt2", trained=False)
    with pytest.raises(InvalidParamsError, match="calibration dataset"):
        prune(path, {"amount": 0.5}, tmp_path, None)
    method = get_method(METHOD)
    assert method.datasets_required == {"calibration"} and method.formats == {"pt2"}
