"""prune.magnitude and quantize.dynamic, on real pt2 and onnx models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import factories
from worker.context import NullReporter, StepContext
from worker.data import load_dataset
from worker.errors import InvalidParamsError
from worker.formats import load_model, save_model
from worker.methods import get_method

LAYER_WEIGHTS = {
    "pt2": ["0.weight", "2.weight", "4.weight"],
    "onnx": ["0.weight", "2.weight", "4.weight"],
}


def apply(model, name: str, params: dict, tmp_path: Path, datasets=None):
    method = get_method(name)
    ctx = StepContext(
        step=0, method=name, reporter=NullReporter(), datasets=datasets or {}, device="cpu",
        work_dir=tmp_path,
    )  # fmt: skip
    return method.handler(model, method.validate_params(params, model.format), ctx)


def stock_weights(path: Path, fmt: str) -> dict[str, np.ndarray]:
    """Weights read back with stock tools only."""
    if fmt == "pt2":
        import torch

        program = torch.export.load(str(path))
        return {k: v.detach().numpy() for k, v in program.state_dict.items()}
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def stock_run(path: Path, fmt: str, x: np.ndarray) -> np.ndarray:
    if fmt == "pt2":
        import torch

        module = torch.export.load(str(path)).module()
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def sparsity(a: np.ndarray) -> float:
    return 1.0 - np.count_nonzero(a) / a.size


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_reaches_the_requested_sparsity(files, tmp_path: Path, fmt: str, scope: str) -> None:
    model = apply(
        load_model(files[fmt], fmt), "prune.magnitude", {"amount": 0.6, "scope": scope}, tmp_path
    )
    out = tmp_path / f"pruned.{fmt}"
    save_model(model, out)
    weights = stock_weights(out, fmt)
    pruned = [weights[name] for name in LAYER_WEIGHTS[fmt]]
    if scope == "layer":
        for w in pruned:
            assert sparsity(w) == pytest.approx(round(0.6 * w.size) / w.size)
    else:
        total = sum(w.size for w in pruned)
        zeros = sum(w.size - np.count_nonzero(w) for w in pruned)
        assert zeros == round(0.6 * total)
        assert len({round(sparsity(w), 3) for w in pruned}) > 1  # one threshold, uneven layers
    for bias in ("0.bias", "2.bias", "4.bias"):
        assert np.count_nonzero(weights[bias]) == weights[bias].size
    # The pruned weights are the smallest ones of the original.
    original = stock_weights(files[fmt], fmt)["0.weight"]
    kept = np.abs(original[weights["0.weight"] != 0])
    dropped = np.abs(original[weights["0.weight"] == 0])
    assert dropped.max() <= kept.min()
    x = factories.digits_arrays()[2][:7]
    assert stock_run(out, fmt, x).shape == (7, 10)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_prune_layers_filter_and_bias(files, tmp_path: Path, fmt: str) -> None:
    params = {"amount": 0.5, "layers": ["2."], "include_bias": True}
    model = apply(load_model(files[fmt], fmt), "prune.magnitude", params, tmp_path)
    out = tmp_path / f"pruned.{fmt}"
    save_model(model, out)
    weights = stock_weights(out, fmt)
    assert sparsity(weights["2.weight"]) == pytest.approx(0.5)
    assert sparsity(weights["2.bias"]) == pytest.approx(0.5)
    assert sparsity(weights["0.weight"]) == 0.0
    assert sparsity(weights["4.weight"]) == 0.0


def test_prune_with_no_matching_layer_says_so(files, tmp_path: Path) -> None:
    with pytest.raises(InvalidParamsError, match="no prunable"):
        apply(
            load_model(files["onnx"], "onnx"),
            "prune.magnitude",
            {"amount": 0.5, "layers": ["nope"]},
            tmp_path,
        )


def test_quantize_onnx_makes_weights_int8(files, tmp_path: Path) -> None:
    import onnx

    model = apply(load_model(files["onnx"], "onnx"), "quantize.dynamic", {}, tmp_path)
    out = tmp_path / "int8.onnx"
    save_model(model, out)
    proto = onnx.load(str(out))
    ops = {n.op_type for n in proto.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert not ops & {"Gemm", "MatMul"}
    int8 = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert len([n for n in int8 if "weight" in n and "zero_point" not in n]) == 3
    assert all(len(t.dims) <= 1 for t in floats)  # only biases and scales stay float
    x = factories.digits_arrays()[2][:9]
    ref = stock_run(files["onnx"], "onnx", x)
    got = stock_run(out, "onnx", x)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.85


def test_quantize_pt2_makes_weights_int8_and_keeps_dynamic_batch(files, tmp_path: Path) -> None:
    import torch

    model = apply(load_model(files["pt2"], "pt2"), "quantize.dynamic", {}, tmp_path)
    out = tmp_path / "int8.pt2"
    save_model(model, out)
    program = torch.export.load(str(out))  # stock loader: the ops ship with torch
    tensors = {**program.state_dict, **program.constants}
    int8 = [t for t in tensors.values() if t.dtype == torch.int8]
    assert sorted(tuple(t.shape) for t in int8) == [(10, 64), (64, 128), (128, 64)]
    float_matrices = [k for k, t in tensors.items() if t.is_floating_point() and t.ndim >= 2]
    assert float_matrices == []
    x = factories.digits_arrays()[2]
    ref = stock_run(files["pt2"], "pt2", x)
    for batch in (1, 3, 17):  # dynamic batch survived the re-export
        got = stock_run(out, "pt2", x[:batch])
        assert got.shape == (batch, 10)
    got = stock_run(out, "pt2", x)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.97
    # A fresh interpreter loads it with stock tools, torchao imported for its op library.
    code = (
        "import sys, torch, torchao\n"
        "m = torch.export.load(sys.argv[1]).module()\n"
        "assert m(torch.randn(5, 64)).shape == (5, 10)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_quantize_pt2_keeps_a_static_batch(files, tmp_path: Path) -> None:
    model = apply(
        load_model(files["pt2_static"], "pt2"), "quantize.dynamic", {"per_channel": False},
        tmp_path, datasets={"calibration": load_dataset(files["calibration"])},
    )  # fmt: skip
    assert model.inputs[0].shape == (4, 64)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_quantized_file_is_about_a_quarter_of_fp32(tmp_path: Path, fmt: str) -> None:
    import torch

    module = factories.mlp(hidden=(512, 512), in_features=256)
    example = torch.randn(4, 256)
    src = tmp_path / f"wide.{fmt}"
    if fmt == "pt2":
        factories.export_pt2(module, example, src)
    else:
        factories.export_onnx(module, example, src)
    model = apply(load_model(src, fmt), "quantize.dynamic", {}, tmp_path)
    out = tmp_path / f"wide_int8.{fmt}"
    save_model(model, out)
    ratio = out.stat().st_size / src.stat().st_size
    assert ratio <= 0.35, ratio
