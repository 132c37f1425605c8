"""prune.structured: channels really removed (parameters and MACs drop), on an MLP and on a
CNN with residual blocks, BatchNorm and a concatenation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from tests import factories, factories_cnn
from tests.helpers import apply, saved, step_context, stock_module, stock_program
from worker.context import NullReporter, RecordingReporter
from worker.data import Dataset, load_dataset
from worker.errors import InvalidParamsError
from worker.formats import load_model
from worker.lifting import lift, relower
from worker.methods import get_method
from worker.metrics import measure_model
from worker.training import model_forward, supervised_loss, train

METHOD = "prune.structured"


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("structured")
    return {
        "pt2": factories_cnn.cnn_pt2(root / "cnn.pt2"),
        "half_width": factories.export_pt2(
            factories_cnn.cnn(width=16), factories_cnn.example_images(), root / "cnn16.pt2"
        ),
        "train": factories_cnn.images_npz(root / "train.npz"),
        "train_unlabelled": factories_cnn.images_npz(root / "train_x.npz", labels=False),
    }


def prune(path: Path, params: dict, tmp_path: Path, datasets=None, reporter=None):
    model = load_model(path, "pt2")
    return apply(METHOD, model, params, tmp_path, datasets=datasets, reporter=reporter)


def measured(path: Path, x: np.ndarray) -> dict:
    """Parameters and MACs as the job's metrics measure them (from the file)."""
    return measure_model(
        path, "pt2", inputs={"x": x}, batch_sizes=[], warmup=0, iterations=1, device="cpu",
        reporter=NullReporter(),
    )  # fmt: skip


def conv_channels(path: Path) -> dict[str, int]:
    weights = stock_program(path).state_dict
    return {k.removesuffix(".weight"): v.shape[0] for k, v in weights.items() if v.ndim == 4}


def test_local_pruning_of_the_cnn_gives_exactly_a_half_width_cnn(cnn, tmp_path: Path) -> None:
    """Every coupled group loses half its channels: the residual trunk (stem + both
    blocks' second convs), each block's inner conv and each concatenated branch; the
    result has the parameters and MACs of the same CNN built at half width."""
    out = saved(prune(cnn["pt2"], {"amount": 0.5}, tmp_path), tmp_path / "pruned.pt2")
    x = factories_cnn.digits_images()[2][:8]
    original, pruned, half = (measured(p, x) for p in (cnn["pt2"], out, cnn["half_width"]))
    assert pruned["parameters"] == half["parameters"] < 0.27 * original["parameters"]
    assert pruned["macs"] == half["macs"] < 0.27 * original["macs"]
    assert set(conv_channels(out).values()) == {16, 8}
    module = stock_module(out)
    with torch.no_grad():
        assert module(torch.from_numpy(x[:5])).shape == (5, 10)  # dynamic batch, head kept


@pytest.mark.parametrize(
    ("importance", "scope"),
    [("l1", "global"), ("l2", "local"), ("taylor", "global"), ("bn_scale", "local"),
     ("random", "global")],
)  # fmt: skip
def test_every_importance_shrinks_the_cnn(cnn, tmp_path: Path, importance: str, scope: str) -> None:
    datasets = {"train": load_dataset(cnn["train"])}
    params = {"amount": 0.4, "importance": importance, "scope": scope}
    out = saved(prune(cnn["pt2"], params, tmp_path, datasets), tmp_path / "pruned.pt2")
    x = factories_cnn.digits_images()[2][:8]
    before, after = measured(cnn["pt2"], x), measured(out, x)
    assert after["parameters"] < 0.6 * before["parameters"]
    assert after["macs"] < 0.6 * before["macs"]
    channels = conv_channels(out)
    assert all(0 < c < 32 for name, c in channels.items() if "branch" not in name)
    with torch.no_grad():
        assert stock_module(out)(torch.from_numpy(x)).shape == (8, 10)


def test_round_to_keeps_channel_counts_at_multiples(cnn, tmp_path: Path) -> None:
    reporter = RecordingReporter()
    model = prune(cnn["pt2"], {"amount": 0.3, "round_to": 8}, tmp_path, reporter=reporter)
    channels = conv_channels(saved(model, tmp_path / "pruned.pt2"))
    # 32 channels - 30% = 22.4, rounded down to 16; the 16-channel branches to 8
    assert channels == {
        "stem_0": 16, "block1_conv1": 16, "block1_conv2": 16, "block2_conv1": 16,
        "block2_conv2": 16, "branch_a": 8, "branch_b": 8,
    }  # fmt: skip
    summary = next(e for e in reporter.logs if e["message"].startswith("removed channels"))
    assert summary["data"]["channels"]["stem_0"] == [32, 16]


def test_ignored_layers_keep_their_channels(cnn, tmp_path: Path) -> None:
    params = {"amount": 0.5, "ignore": ["block1.conv1", "branch_b.weight"]}
    channels = conv_channels(saved(prune(cnn["pt2"], params, tmp_path), tmp_path / "p.pt2"))
    assert channels["block1_conv1"] == 32 and channels["branch_b"] == 16
    assert channels["block2_conv1"] == 16 and channels["branch_a"] == 8


def test_mlp_neurons_removed_and_accuracy_recovers_after_fine_tuning(files, tmp_path) -> None:
    pruned = prune(files["pt2"], {"amount": 0.5}, tmp_path)
    weights = pruned.program.state_dict
    assert [tuple(weights[f"{i}.weight"].shape) for i in (0, 2, 4)] == [
        (64, 64), (32, 64), (10, 32),
    ]  # fmt: skip
    assert sum(weights[k].numel() for k in pruned.program.graph_signature.parameters) == 6570
    assert pruned.inputs[0].is_dynamic(0)
    x_train, y_train, _, _ = factories.digits_arrays()
    before = factories.digits_accuracy(stock_module(saved(pruned, tmp_path / "pruned.pt2")))
    tuned = fine_tune(pruned, x_train, y_train, tmp_path, epochs=5)
    after = factories.digits_accuracy(stock_module(saved(tuned, tmp_path / "tuned.pt2")))
    assert after >= 0.94, (before, after)  # the unpruned MLP scores ~0.97


def test_cnn_accuracy_recovers_after_fine_tuning(cnn, tmp_path: Path) -> None:
    pruned = prune(cnn["pt2"], {"amount": 0.5, "importance": "l2"}, tmp_path)
    x_train, y_train, _, _ = factories_cnn.digits_images()
    before = factories_cnn.images_accuracy(stock_module(saved(pruned, tmp_path / "pruned.pt2")))
    # Seeded order, one thread: the same weights every run. lr 1e-3 for 3 epochs, not 3e-3
    # for 2: at 3e-3 the final accuracy swung from 0.80 to 0.97 with the shuffling seed, so
    # float-level differences between machines decided the outcome (0.9133 here). Measured
    # at 1e-3 over shuffling seeds 0-9: 0.949-0.964, seed 0 (this run) 0.9644.
    tuned = fine_tune(pruned, x_train, y_train, tmp_path, epochs=3, lr=1e-3)
    accuracy = factories_cnn.images_accuracy(stock_module(saved(tuned, tmp_path / "tuned.pt2")))
    # Pruned to half width the CNN falls from ~0.97 towards chance (0.10): 0.10-0.25 measured
    # on different machines, the trained fixture's floats deciding where in that range.
    assert before <= 0.4
    assert accuracy >= 0.93  # the unpruned CNN scores ~0.97


def fine_tune(model, x: np.ndarray, y: np.ndarray, tmp_path: Path, epochs: int, lr: float = 3e-3):
    module = lift(model)
    train(
        module, inputs={model.inputs[0].name: x}, labels=y, loss_fn=supervised_loss,
        epochs=epochs, lr=lr, batch_size=64, ctx=step_context(tmp_path, "finetune", step=1),
        forward=model_forward(model),
    )  # fmt: skip
    return relower(model, module)


class ScaledConvs(nn.Module):
    """conv -> ReLU -> x * scale (a bare [1, C, 1, 1] parameter) -> conv -> pool -> Linear."""

    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1))
        self.c2 = nn.ConvTranspose2d(8, 8, 2, stride=2) if transposed else nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(torch.relu(self.c1(x)) * self.scale).mean((2, 3)))


def test_parameters_outside_layers_are_pruned_with_their_channels(tmp_path: Path) -> None:
    example = factories_cnn.example_images()
    path = factories.export_pt2(ScaledConvs().eval(), example, tmp_path / "scaled.pt2")
    pruned = prune(path, {"amount": 0.5}, tmp_path)
    shapes = {k: tuple(v.shape) for k, v in pruned.program.state_dict.items()}
    assert shapes["scale"] == (1, 4, 1, 1) and shapes["c1.weight"] == (4, 1, 3, 3)
    assert shapes["c2.weight"] == (4, 4, 1, 1) and shapes["fc.weight"] == (10, 4)


def test_channels_coupled_to_unliftable_ops_are_left_alone(tmp_path: Path) -> None:
    """A transposed convolution stays an aten call: its channels cannot be cut safely."""
    example = factories_cnn.example_images()
    module = ScaledConvs(transposed=True).eval()
    path = factories.export_pt2(module, example, tmp_path / "transposed.pt2")
    with pytest.raises(InvalidParamsError, match="cannot lift into a layer"):
        prune(path, {"amount": 0.5}, tmp_path)


def test_static_batch_model_stays_static(files, tmp_path: Path) -> None:
    pruned = prune(files["pt2_static"], {"amount": 0.25}, tmp_path)
    assert pruned.static_batch == 4
    assert tuple(pruned.program.state_dict["0.weight"].shape) == (96, 64)


def test_taylor_needs_labelled_data(cnn, tmp_path: Path) -> None:
    unlabelled = {"calibration": load_dataset(cnn["train_unlabelled"])}
    with pytest.raises(InvalidParamsError, match=r"labelled data.*calibration dataset has no"):
        prune(cnn["pt2"], {"amount": 0.5, "importance": "taylor"}, tmp_path, unlabelled)
    with pytest.raises(InvalidParamsError, match="train or calibration dataset with a 'labels'"):
        prune(cnn["pt2"], {"amount": 0.5, "importance": "taylor"}, tmp_path)


def test_taylor_uses_labelled_calibration_data(files, tmp_path: Path) -> None:
    x, y, _, _ = factories.digits_arrays()
    data = {"calibration": Dataset({"inputs": x[:128]}, y[:128], 128)}
    reporter = RecordingReporter()
    prune(files["pt2"], {"amount": 0.5, "importance": "taylor"}, tmp_path, data, reporter)
    assert any("128 calibration samples" in e["message"] for e in reporter.logs)


def test_bn_scale_needs_batch_norm(files, tmp_path: Path) -> None:
    with pytest.raises(InvalidParamsError, match="this model has none"):
        prune(files["pt2"], {"amount": 0.5, "importance": "bn_scale"}, tmp_path)


def test_unknown_ignored_layer_is_refused_with_the_layer_names(files, tmp_path: Path) -> None:
    with pytest.raises(InvalidParamsError, match=r"\['conv9'\].*its layers are.*0, 2, 4"):
        prune(files["pt2"], {"amount": 0.5, "ignore": ["conv9"]}, tmp_path)


@pytest.mark.parametrize(
    "params",
    [{"amount": 1.5}, {"amount": 0.0}, {}, {"amount": 0.5, "round_to": 0},
     {"amount": 0.5, "importance": "l3"}, {"amount": 0.5, "scope": "layer"},
     {"amount": 0.5, "unknown": 1}],
)  # fmt: skip
def test_bad_params_are_refused(params: dict) -> None:
    with pytest.raises(ValidationError):
        get_method(METHOD).validate_params(params, "pt2")


def test_declares_pt2_only_and_optional_data() -> None:
    method = get_method(METHOD)
    assert method.formats == {"pt2"}
    assert method.datasets_optional == {"calibration", "train"} and not method.datasets_required
