"""prune.semi_structured: the 2:4 pattern on Linear layers of pt2 and onnx models."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from tests import factories
from tests.helpers import apply, stock_accuracy, stock_weights
from worker.context import RecordingReporter
from worker.errors import InvalidParamsError
from worker.formats import load_model, pt2_model_from_program, save_model
from worker.methods import get_method

METHOD = "prune.semi_structured"


def assert_two_four(weight: np.ndarray) -> None:
    """Every 4 consecutive input weights (rows of an ``[out, in]`` matrix) hold ≥ 2 zeros."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    assert ((groups == 0).sum(axis=2) >= 2).all()
    assert 1.0 - np.count_nonzero(weight) / weight.size == 0.5


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_two_of_every_four_input_weights_are_zero(files, tmp_path: Path, fmt: str) -> None:
    before = stock_weights(files[fmt])
    reporter = RecordingReporter()
    model = apply(METHOD, load_model(files[fmt], fmt), {}, tmp_path, reporter=reporter)
    out = tmp_path / f"sparse.{fmt}"
    save_model(model, out)
    after = stock_weights(out)
    for name in ("0.weight", "2.weight"):  # [out, in] in both formats here
        assert_two_four(after[name])
        kept = after[name] != 0
        np.testing.assert_array_equal(after[name][kept], before[name][kept])
        # the kept two are the largest |w| of their group
        groups_before = np.abs(before[name]).reshape(-1, 4)
        groups_after = np.abs(after[name]).reshape(-1, 4)
        np.testing.assert_allclose(
            np.sort(groups_after, axis=1)[:, 2:], np.sort(groups_before, axis=1)[:, 2:]
        )
    np.testing.assert_array_equal(after["4.weight"], before["4.weight"])  # 10 outputs: dense
    dense = [e for e in reporter.logs if e["message"].startswith("left 1 Linear layers dense")]
    assert "4.weight" in dense[0]["data"]["dense_layers"]
    assert any("no speed-up on CPU" in e["message"] for e in reporter.logs)
    _, _, x_test, y_test = factories.digits_arrays()
    accuracy = stock_accuracy(out, x_test, y_test)
    assert accuracy >= 0.85  # 50 % of the hidden weights gone, no fine-tuning; dense ≈ 0.97
    if fmt == "pt2":
        assert model.inputs[0].is_dynamic(0)


def test_layers_whose_inputs_do_not_group_by_four_are_left_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
    path = factories.export_pt2(module, torch.randn(4, 30), tmp_path / "odd.pt2")
    reporter = RecordingReporter()
    model = apply(METHOD, load_model(path, "pt2"), {"min_features": 4}, tmp_path, reporter=reporter)
    weights = model.program.state_dict
    assert torch.equal(weights["0.weight"], module[0].weight)
    assert_two_four(weights["2.weight"].detach().numpy())
    warning = next(e for e in reporter.logs if e["level"] == "warning")
    assert warning["data"]["dense_layers"] == {"0.weight": "in_features 30 is not a multiple of 4"}


def test_decomposed_linear_layers_are_found(tmp_path: Path) -> None:
    module = factories.train_digits_mlp()
    ep = torch.export.export(module, (torch.randn(4, 64),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deepcopy of a tree spec
        ep = ep.run_decompositions()
    model = apply(METHOD, pt2_model_from_program(ep), {"layers": ["2."]}, tmp_path)
    weights = model.program.state_dict
    assert_two_four(weights["2.weight"].detach().numpy())
    assert torch.count_nonzero(weights["0.weight"]) == weights["0.weight"].numel()


def test_onnx_matmul_with_a_transposed_initializer(tmp_path: Path) -> None:
    """MatMul(x, W) holds W as [in, out]: the groups of 4 run along axis 0."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 24)).astype(np.float32)  # [in, out]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 24])],
        [numpy_helper.from_array(w, "w")],
    )
    path = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    model = apply(METHOD, load_model(path, "onnx"), {}, tmp_path)
    out = tmp_path / "mm_sparse.onnx"
    save_model(model, out)
    assert_two_four(stock_weights(out)["w"].T)


def test_gpu_target_without_cuda_says_the_check_was_skipped(files, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this worker has a GPU")
    reporter = RecordingReporter()
    apply(METHOD, load_model(files["pt2"], "pt2"), {}, tmp_path, device="gpu", reporter=reporter)
    assert any("no CUDA device" in e["message"] for e in reporter.logs)


def test_nothing_eligible_is_an_error(files, tmp_path: Path) -> None:
    with pytest.raises(InvalidParamsError, match="no Linear layer is eligible"):
        apply(METHOD, load_model(files["pt2"], "pt2"), {"layers": ["4."]}, tmp_path)
    with pytest.raises(InvalidParamsError, match=r"no Linear layer weights matching \['conv'\]"):
        apply(METHOD, load_model(files["pt2"], "pt2"), {"layers": ["conv"]}, tmp_path)


@pytest.mark.parametrize("params", [{"min_features": 2}, {"layers": []}, {"amount": 0.5}])
def test_bad_params_are_refused(params: dict) -> None:
    with pytest.raises(ValidationError):
        get_method(METHOD).validate_params(params, "pt2")


def test_declares_both_formats() -> None:
    assert get_method(METHOD).formats == {"pt2", "onnx"}
