"""prune.magnitude and quantize.dynamic, on real pt2 and onnx models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import factories
from tests.helpers import apply, stock_program, stock_run, stock_weights
from worker.data import load_dataset
from worker.errors import InvalidParamsError
from worker.formats import load_model, save_model

LAYER_WEIGHTS = {
    "pt2": ["0.weight", "2.weight", "4.weight"],
    "onnx": ["0.weight", "2.weight", "4.weight"],
}


def sparsity(a: np.ndarray) -> float:
    return 1.0 - np.count_nonzero(a) / a.size


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_reaches_the_requested_sparsity(files, tmp_path: Path, fmt: str, scope: str) -> None:
    model = apply(
        "prune.magnitude", load_model(files[fmt], fmt), {"amount": 0.6, "scope": scope}, tmp_path
    )
    out = tmp_path / f"pruned.{fmt}"
    save_model(model, out)
    weights = stock_weights(out)
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
    original = stock_weights(files[fmt])["0.weight"]
    kept = np.abs(original[weights["0.weight"] != 0])
    dropped = np.abs(original[weights["0.weight"] == 0])
    assert dropped.max() <= kept.min()
    x = factories.digits_arrays()[2][:7]
    assert stock_run(out, x).shape == (7, 10)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_prune_layers_filter_and_bias(files, tmp_path: Path, fmt: str) -> None:
    params = {"amount": 0.5, "layers": ["2."], "include_bias": True}
    model = apply("prune.magnitude", load_model(files[fmt], fmt), params, tmp_path)
    out = tmp_path / f"pruned.{fmt}"
    save_model(model, out)
    weights = stock_weights(out)
    assert sparsity(weights["2.weight"]) == pytest.approx(0.5)
    assert sparsity(weights["2.bias"]) == pytest.approx(0.5)
    assert sparsity(weights["0.weight"]) == 0.0
    assert sparsity(weights["4.weight"]) == 0.0


def test_prune_with_no_matching_layer_says_so(files, tmp_path: Path) -> None:
    with pytest.raises(InvalidParamsError, match="no prunable"):
        apply(
            "prune.magnitude",
            load_model(files["onnx"], "onnx"),
            {"amount": 0.5, "layers": ["nope"]},
            tmp_path,
        )


def test_quantize_onnx_makes_weights_int8(files, tmp_path: Path) -> None:
    import onnx

    model = apply("quantize.dynamic", load_model(files["onnx"], "onnx"), {}, tmp_path)
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
    ref = stock_run(files["onnx"], x)
    got = stock_run(out, x)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.85


def test_quantize_pt2_makes_weights_int8_and_keeps_dynamic_batch(files, tmp_path: Path) -> None:
    import torch

    model = apply("quantize.dynamic", load_model(files["pt2"], "pt2"), {}, tmp_path)
    out = tmp_path / "int8.pt2"
    save_model(model, out)
    program = stock_program(out)  # stock loader: the ops ship with torch
    tensors = {**program.state_dict, **program.constants}
    int8 = [t for t in tensors.values() if t.dtype == torch.int8]
    assert sorted(tuple(t.shape) for t in int8) == [(10, 64), (64, 128), (128, 64)]
    float_matrices = [k for k, t in tensors.items() if t.is_floating_point() and t.ndim >= 2]
    assert float_matrices == []
    x = factories.digits_arrays()[2]
    ref = stock_run(files["pt2"], x)
    for batch in (1, 3, 17):  # dynamic batch survived the re-export
        got = stock_run(out, x[:batch])
        assert got.shape == (batch, 10)
    got = stock_run(out, x)
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
        "quantize.dynamic", load_model(files["pt2_static"], "pt2"), {"per_channel": False},
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
    model = apply("quantize.dynamic", load_model(src, fmt), {}, tmp_path)
    out = tmp_path / f"wide_int8.{fmt}"
    save_model(model, out)
    ratio = out.stat().st_size / src.stat().st_size
    assert ratio <= 0.35, ratio
