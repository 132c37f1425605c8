"""lowrank: SVD factorization of Linear / 1x1 conv (pt2) and MatMul / Gemm (onnx) layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from pydantic import ValidationError

from tests import factories
from tests.helpers import apply, saved, stock_program, stock_run, stock_weights
from worker.context import RecordingReporter
from worker.errors import InvalidParamsError
from worker.formats import LoadedModel, load_model
from worker.methods import get_method


def lowrank(model: LoadedModel, params: dict, tmp_path: Path, reporter=None) -> LoadedModel:
    return apply("lowrank", model, params, tmp_path, reporter=reporter)


def stock_parameters(path: Path) -> int:
    return sum(w.size for w in stock_weights(path).values())


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_parameter_count_drops_by_the_factorization(files, tmp_path: Path, fmt: str) -> None:
    reporter = RecordingReporter()
    result = lowrank(load_model(files[fmt], fmt), {"rank_ratio": 0.25}, tmp_path, reporter)
    out = saved(result, tmp_path / f"lowrank.{fmt}")
    # 64→128→64→10: the two hidden layers keep rank 16 of 64; the 10-wide head is
    # narrower than min_features (16) and stays.
    expected_drop = (128 * 64 - 16 * (128 + 64)) * 2
    assert stock_parameters(files[fmt]) - stock_parameters(out) == expected_drop
    skipped = [e["message"] for e in reporter.logs if "skipped" in e["message"]]
    assert len(skipped) == 1 and "narrower than min_features=16" in skipped[0]
    # The digits survive a 4x rank cut (the MLP was trained with weight decay).
    x, y = factories.digits_arrays()[2:]
    ref = stock_run(files[fmt], x)
    got = stock_run(out, x)
    assert (got.argmax(1) == y).mean() >= 0.95
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95
    for batch in (1, 17):  # the batch dim is still dynamic
        assert stock_run(out, x[:batch]).shape == (batch, 10)


class LowRankNet(torch.nn.Module):
    """Two 96-wide layers with rank-6 weights plus 1e-3 noise, and a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)

        def low_rank(out: int, inp: int) -> torch.Tensor:
            u, v = torch.randn(out, 6, generator=gen), torch.randn(6, inp, generator=gen)
            return (u @ v) / 10 + 1e-3 * torch.randn(out, inp, generator=gen)

        self.pointwise = torch.nn.Conv2d(48, 96, 1)
        self.fc1 = torch.nn.Linear(96 * 4, 96)
        self.fc2 = torch.nn.Linear(96, 96)
        self.head = torch.nn.Linear(96, 10)
        with torch.no_grad():
            self.pointwise.weight.copy_(low_rank(96, 48).reshape(96, 48, 1, 1))
            self.fc1.weight.copy_(low_rank(96, 96 * 4))
            self.fc2.weight.copy_(low_rank(96, 96))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pointwise(x)).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def low_rank_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lowrank")
    example = torch.randn(2, 48, 2, 2, generator=torch.Generator().manual_seed(1))
    module = LowRankNet().eval()
    return {
        "pt2": factories.export_pt2(module, example, root / "net.pt2"),
        "onnx": factories.export_onnx(module, example, root / "net.onnx"),
    }


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_error_is_small_at_high_energy_and_grows_as_rank_shrinks(
    low_rank_files: dict[str, Path], tmp_path: Path, fmt: str
) -> None:
    x = np.random.default_rng(0).standard_normal((32, 48, 2, 2)).astype(np.float32)
    ref = stock_run(low_rank_files[fmt], x)
    errors = {}
    sizes = {}
    for label, params in {
        "energy 0.9999": {"energy": 0.9999},
        "ratio 0.2": {"rank_ratio": 0.2},
        "ratio 0.05": {"rank_ratio": 0.05},
        "ratio 0.02": {"rank_ratio": 0.02},
    }.items():
        result = lowrank(load_model(low_rank_files[fmt], fmt), params, tmp_path)
        out = saved(result, tmp_path / f"{label.replace(' ', '_')}.{fmt}")
        errors[label] = relative_error(stock_run(out, x), ref)
        sizes[label] = stock_parameters(out)
    # The weights have rank 6 (+ noise): 99.99 % of the energy is in those 6 directions.
    assert errors["energy 0.9999"] < 0.01, errors
    assert errors["energy 0.9999"] < errors["ratio 0.05"] < errors["ratio 0.02"], errors
    assert errors["ratio 0.02"] > 0.1, errors
    assert sizes["energy 0.9999"] < 0.2 * stock_parameters(low_rank_files[fmt])
    assert sizes["ratio 0.2"] > sizes["ratio 0.05"] > sizes["ratio 0.02"]


def test_pt2_pointwise_conv_becomes_two_pointwise_convs(
    low_rank_files: dict[str, Path], tmp_path: Path
) -> None:
    reporter = RecordingReporter()
    result = lowrank(
        load_model(low_rank_files["pt2"], "pt2"), {"rank_ratio": 0.125}, tmp_path, reporter
    )
    program = stock_program(saved(result, tmp_path / "conv.pt2"))
    shapes = sorted(tuple(t.shape) for k, t in program.state_dict.items() if t.ndim == 4)
    assert shapes == [(6, 48, 1, 1), (96, 6, 1, 1)]  # rank 6 = 0.125 x 48
    summary = reporter.logs[-1]["data"]["factorized"]
    assert {f["layer"] for f in summary} == {"pointwise", "fc1", "fc2"}  # head: 10 < 16 wide


def test_onnx_layers_become_two_matmuls(files, tmp_path: Path) -> None:
    result = lowrank(load_model(files["onnx"], "onnx"), {"energy": 0.9}, tmp_path)
    proto = onnx.load(str(saved(result, tmp_path / "m.onnx")))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Gemm") == 3  # Gemm keeps each bias
    names = {t.name for t in proto.graph.initializer}
    assert "0.weight" not in names and "2.weight" not in names and "4.weight" in names
    assert {"0.weight.lowrank_inner", "0.weight.lowrank_outer"} <= names
    onnx.checker.check_model(proto)


def test_nothing_to_factorize_says_why(files, tmp_path: Path) -> None:
    with pytest.raises(InvalidParamsError, match=r"no layer was factorized.*not fewer than"):
        lowrank(load_model(files["pt2"], "pt2"), {"rank_ratio": 0.9}, tmp_path)
    with pytest.raises(InvalidParamsError, match="narrower than min_features=1000"):
        lowrank(load_model(files["onnx"], "onnx"), {"energy": 0.5, "min_features": 1000}, tmp_path)


def test_params_are_validated() -> None:
    method = get_method("lowrank")
    for bad in (
        {},
        {"rank_ratio": 0.5, "energy": 0.9},
        {"rank_ratio": 0},
        {"energy": 1.5},
        {"min_features": 0},
    ):
        with pytest.raises(ValidationError):
            method.validate_params(bad, "pt2")
    with pytest.raises(ValidationError, match="exactly one of rank_ratio"):
        method.validate_params({}, "onnx")
    params = method.validate_params({"energy": 0.95}, "onnx")
    assert method.validate_params(params.model_dump(mode="json"), "onnx") == params
    assert all(
        f.get("description") for f in method.describe()["params_schema"]["properties"].values()
    )
