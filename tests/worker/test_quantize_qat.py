"""quantize.qat: quantization-aware training on the digits, compared with post-training
quantization of the same model at the same bit width."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests import factories
from worker.context import NullReporter, RecordingReporter, StepContext
from worker.data import Dataset
from worker.errors import InvalidParamsError
from worker.formats import load_model, save_model
from worker.methods import get_method

METHOD = get_method("quantize.qat")
# QAT may not lose more than this against post-training quantization at the same bits.
TOLERANCE = 0.01


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models train many times faster single-threaded on busy shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def apply(name: str, path: Path, params: dict, tmp_path: Path, datasets: dict, reporter=None):
    method = get_method(name)
    model = load_model(path, "pt2")
    ctx = StepContext(
        step=0, method=name, reporter=reporter or NullReporter(), datasets=datasets,
        device="cpu", work_dir=tmp_path,
    )  # fmt: skip
    with one_thread():
        result = method.handler(model, method.validate_params(params, "pt2"), ctx)
    out = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}.pt2"
    save_model(result, out)
    return out


def accuracy(path: Path, x, y) -> float:
    import torch

    load_model(path, "pt2")  # squish's loader: nothing pickled, only operators
    module = torch.export.load(str(path)).module()  # stock loader
    with torch.inference_mode():
        return float((module(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


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
    qat = apply(
        "quantize.qat", files["pt2"], {"epochs": 2, "lr": 1e-4}, tmp_path, train_only, reporter
    )
    ptq = apply("quantize.static", files["pt2"], {}, tmp_path, digits)
    program = torch.export.load(str(qat))
    tensors = {**program.state_dict, **program.constants}
    int8 = sorted(tuple(t.shape) for t in tensors.values() if t.dtype == torch.int8)
    assert int8 == [(10, 64), (64, 128), (128, 64)]
    assert [k for k, t in tensors.items() if t.is_floating_point() and t.ndim >= 2] == []
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "quantized_decomposed.quantize_per_tensor.default" in ops  # uint8 activations
    assert reporter.logs[-1]["data"]["epochs_run"] == 2
    assert accuracy(qat, x_test, y_test) >= accuracy(ptq, x_test, y_test) - TOLERANCE


def test_int4_qat_matches_weight_only_ptq_and_is_packed(files, tmp_path: Path, digits) -> None:
    import torch

    _, _, x_test, y_test = factories.digits_arrays()
    params = {"weight_bits": 4, "group_size": 32, "epochs": 2, "lr": 1e-4}
    qat = apply("quantize.qat", files["pt2"], params, tmp_path, {"train": digits["train"]})
    ptq = apply("quantize.weight_only", files["pt2"], {"bits": 4, "group_size": 32}, tmp_path, {})
    state = torch.export.load(str(qat)).state_dict
    packed = {k: t for k, t in state.items() if k.endswith(".packed")}
    assert sorted(t.numel() for t in packed.values()) == [320, 4096, 4096]  # two per byte
    assert all(t.dtype == torch.uint8 for t in packed.values())
    assert [k for k, t in state.items() if t.is_floating_point() and t.ndim == 2] == []
    assert accuracy(qat, x_test, y_test) >= accuracy(ptq, x_test, y_test) - TOLERANCE


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
    qat = apply("quantize.qat", src, {"epochs": 1, "lr": 1e-4}, tmp_path, data)
    ptq = apply("quantize.static", src, {"calibrate_method": "minmax"}, tmp_path, data)
    program = torch.export.load(str(qat))
    tensors = {**program.state_dict, **program.constants}
    int8 = sorted(tuple(t.shape) for t in tensors.values() if t.dtype == torch.int8)
    assert int8 == [(8, 1, 3, 3), (8, 8, 3, 3), (10, 128)]
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in op for op in ops)
    assert accuracy(qat, test_images, y_test) >= accuracy(ptq, test_images, y_test) - TOLERANCE
    assert accuracy(qat, test_images, y_test) >= 0.9


def test_needs_labelled_train_data(files, tmp_path: Path) -> None:
    assert METHOD.datasets_required == frozenset({"train"})
    assert METHOD.formats == frozenset({"pt2"})
    with pytest.raises(InvalidParamsError, match="needs a train dataset"):
        apply("quantize.qat", files["pt2"], {}, tmp_path, {})
    for bad in ({"weight_bits": 2}, {"epochs": 0}, {"group_size": 48}, {"lr": 0}):
        with pytest.raises(ValidationError):
            METHOD.validate_params(bad)
