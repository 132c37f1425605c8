"""quantize.qat: quantization-aware training on the digits, compared with post-training
quantization of the same model at the same bit width."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tests import factories
from tests.helpers import apply, one_thread, saved, stock_accuracy, stock_program
from worker.context import RecordingReporter
from worker.data import Dataset
from worker.errors import InvalidParamsError
from worker.formats import load_model
from worker.methods import get_method

METHOD = get_method("quantize.qat")
# QAT may not lose more than this against post-training quantization at the same bits.
TOLERANCE = 0.01


def compressed(name: str, path: Path, params: dict, tmp_path: Path, datasets: dict, reporter=None):
    """``name`` applied to the pt2 file ``path``, saved under ``tmp_path``; returns the file."""
    model = apply(
        name, load_model(path, "pt2"), params, tmp_path, datasets=datasets, reporter=reporter
    )
    return saved(model, tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}.pt2")


@pytest.fixture(scope="module")
def digits() -> dict[str, Dataset]:
    x_train, y_train, x_test, y_test = factories.digits_arrays()
    return {
        "train": Dataset({"inputs": x_train}, y_train, len(x_train)),
        "calibration": Dataset({"inputs": x_train}, None, len(x_train)),
        "eval": Dataset({"inputs": x_test}, y_test, len(x_test)),
    }


def test_int8_qat_matches_static_ptq_and_has_int8_weights(files, tmp_path: Path, digits) -> None:
    import torch

    _, _, x_test, y_test = factories.digits_arrays()
    reporter = RecordingReporter()
    train_only = {"train": digits["train"]}
    qat = compressed(
        "quantize.qat", files["pt2"], {"epochs": 2, "lr": 1e-4}, tmp_path, train_only, reporter
    )
    ptq = compressed("quantize.static", files["pt2"], {}, tmp_path, digits)
    program = stock_program(qat)
    tensors = {**program.state_dict, **program.constants}
    int8 = sorted(tuple(t.shape) for t in tensors.values() if t.dtype == torch.int8)
    assert int8 == [(10, 64), (64, 128), (128, 64)]
    assert [k for k, t in tensors.items() if t.is_floating_point() and t.ndim >= 2] == []
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "quantized_decomposed.quantize_per_tensor.default" in ops  # uint8 activations
    assert reporter.logs[-1]["data"]["epochs_run"] == 2
    qat_accuracy, ptq_accuracy = (
        stock_accuracy(p, x_test, y_test, check_loader=True) for p in (qat, ptq)
    )
    assert qat_accuracy >= ptq_accuracy - TOLERANCE


def test_int4_qat_matches_weight_only_ptq_and_is_packed(files, tmp_path: Path, digits) -> None:
    import torch

    _, _, x_test, y_test = factories.digits_arrays()
    params = {"weight_bits": 4, "group_size": 32, "epochs": 2, "lr": 1e-4}
    qat = compressed("quantize.qat", files["pt2"], params, tmp_path, {"train": digits["train"]})
    ptq = compressed(
        "quantize.weight_only", files["pt2"], {"bits": 4, "group_size": 32}, tmp_path, {}
    )
    state = stock_program(qat).state_dict
    packed = {k: t for k, t in state.items() if k.endswith(".packed")}
    assert sorted(t.numel() for t in packed.values()) == [320, 4096, 4096]  # two per byte
    assert all(t.dtype == torch.uint8 for t in packed.values())
    assert [k for k, t in state.items() if t.is_floating_point() and t.ndim == 2] == []
    qat_accuracy, ptq_accuracy = (
        stock_accuracy(p, x_test, y_test, check_loader=True) for p in (qat, ptq)
    )
    assert qat_accuracy >= ptq_accuracy - TOLERANCE


def test_int8_qat_on_a_residual_cnn_folds_batchnorm(tmp_path: Path, digits) -> None:
    import torch
    from torch import nn

    class ResidualCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.head = nn.Linear(8 * 16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(y + self.bn2(self.conv2(y)))
            return self.head(nn.functional.max_pool2d(y, 2).flatten(1))

    x_train, y_train, x_test, y_test = factories.digits_arrays()
    images, test_images = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    net = ResidualCNN()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xs, ys = torch.from_numpy(images), torch.from_numpy(y_train)
    with one_thread():
        for _ in range(2):
            for i in range(0, len(xs), 64):
                opt.zero_grad()
                nn.functional.cross_entropy(net(xs[i : i + 64]), ys[i : i + 64]).backward()
                opt.step()
    src = factories.export_pt2(net.eval(), torch.from_numpy(test_images[:4]), tmp_path / "cnn.pt2")
    data = {
        "train": Dataset({"inputs": images[:640]}, y_train[:640], 640),
        "calibration": Dataset({"inputs": images[:256]}, None, 256),
    }
    qat = compressed("quantize.qat", src, {"epochs": 1, "lr": 1e-4}, tmp_path, data)
    ptq = compressed("quantize.static", src, {"calibrate_method": "minmax"}, tmp_path, data)
    program = stock_program(qat)
    tensors = {**program.state_dict, **program.constants}
    int8 = sorted(tuple(t.shape) for t in tensors.values() if t.dtype == torch.int8)
    assert int8 == [(8, 1, 3, 3), (8, 8, 3, 3), (10, 128)]
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in op for op in ops)
    qat_accuracy, ptq_accuracy = (
        stock_accuracy(p, test_images, y_test, check_loader=True) for p in (qat, ptq)
    )
    assert qat_accuracy >= ptq_accuracy - TOLERANCE
    assert qat_accuracy >= 0.9


def test_needs_labelled_train_data(files, tmp_path: Path) -> None:
    assert METHOD.datasets_required == frozenset({"train"})
    assert METHOD.formats == frozenset({"pt2"})
    with pytest.raises(InvalidParamsError, match="needs a train dataset"):
        compressed("quantize.qat", files["pt2"], {}, tmp_path, {})
    for bad in ({"weight_bits": 2}, {"epochs": 0}, {"group_size": 48}, {"lr": 0}):
        with pytest.raises(ValidationError):
            METHOD.validate_params(bad)
