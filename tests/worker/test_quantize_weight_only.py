"""quantize.weight_only: int8/int4 Linear weights on real pt2 and onnx models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from tests import factories
from tests.helpers import apply, cosine, stock_accuracy, stock_program, stock_run
from worker.context import RecordingReporter
from worker.errors import UnsupportedError
from worker.formats import load_model, save_model
from worker.methods import quantize_weight_only

METHOD = quantize_weight_only.METHOD
WIDE_SHAPES = [(10, 512), (512, 256), (512, 512)]


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A weight-dominated MLP (256 -> 512 -> 512 -> 10) as pt2 and onnx."""
    import torch

    root = tmp_path_factory.mktemp("weight-only")
    module = factories.mlp(hidden=(512, 512), in_features=256)
    example = torch.randn(4, 256)
    return {
        "pt2": factories.export_pt2(module, example, root / "wide.pt2"),
        "onnx": factories.export_onnx(module, example, root / "wide.onnx"),
    }


def test_pt2_int8_per_channel(wide, tmp_path: Path) -> None:
    import torch

    model = apply(METHOD, load_model(wide["pt2"], "pt2"), {"bits": 8}, tmp_path)
    out = tmp_path / "int8.pt2"
    save_model(model, out)
    load_model(out, "pt2")  # squish's own loader: plain tensors, nothing pickled
    program = stock_program(out)
    int8 = sorted(tuple(t.shape) for t in program.state_dict.values() if t.dtype == torch.int8)
    assert [s for s in int8 if len(s) == 2 and s[1] > 1] == WIDE_SHAPES
    big_floats = [
        k for k, t in program.state_dict.items() if t.is_floating_point() and t.numel() > 512
    ]
    assert big_floats == []
    assert out.stat().st_size / wide["pt2"].stat().st_size <= 0.32
    x = np.random.default_rng(0).standard_normal((7, 256)).astype(np.float32)
    assert (
        cosine(stock_run(out, x, check_loader=True), stock_run(wide["pt2"], x, check_loader=True))
        >= 0.999
    )
    assert stock_run(out, x[:1], check_loader=True).shape == (1, 10)  # dynamic batch kept


@pytest.mark.parametrize("symmetric", [True, False])
def test_pt2_int4_is_packed_two_per_byte_and_decodes_to_torchaos_values(
    wide, tmp_path: Path, symmetric: bool
) -> None:
    import torch
    from torchao.quantization import quantize_

    from worker.lifting import lift
    from worker.packing import unpack_codes

    params = {"bits": 4, "group_size": 32, "symmetric": symmetric}
    model = apply(METHOD, load_model(wide["pt2"], "pt2"), params, tmp_path)
    out = tmp_path / "int4.pt2"
    save_model(model, out)
    load_model(out, "pt2")
    state = stock_program(out).state_dict
    packed = {k.removesuffix(".packed"): v for k, v in state.items() if k.endswith(".packed")}
    assert sorted(v.numel() for v in packed.values()) == sorted(o * i // 2 for o, i in WIDE_SHAPES)
    assert all(v.dtype == torch.uint8 for v in packed.values())
    assert [k for k, t in state.items() if t.is_floating_point() and t.ndim == 2] == []
    ratio = out.stat().st_size / wide["pt2"].stat().st_size
    assert ratio <= (0.22 if symmetric else 0.25), ratio
    # The stored codes decode exactly to torchao's own int4 dequantization.
    reference = lift(load_model(wide["pt2"], "pt2"))
    config = quantize_weight_only._torchao_config(4, 32, symmetric)
    quantize_(reference, config)
    for name, layer in reference.named_children():
        if not hasattr(layer, "weight"):
            continue
        expected = layer.weight.dequantize()
        out_f, in_f = expected.shape
        codes = unpack_codes(packed[name], 4, out_f * in_f).reshape(out_f, in_f // 32, 32)
        decoded = (codes.float() - state[f"{name}.offset"]) * state[f"{name}.scale"]
        assert torch.equal(decoded.reshape(out_f, in_f), expected)
    # parameters count the logical int4 weights (and biases), not the packed bytes
    from worker.formats import inspect_model

    assert (
        inspect_model(out, "pt2")["parameters"] == inspect_model(wide["pt2"], "pt2")["parameters"]
    )
    x = np.random.default_rng(0).standard_normal((7, 256)).astype(np.float32)
    assert (
        cosine(stock_run(out, x, check_loader=True), stock_run(wide["pt2"], x, check_loader=True))
        >= 0.99
    )


@pytest.mark.parametrize(("fmt", "int8_compute"), [("pt2", True), ("onnx", True), ("onnx", False)])
@pytest.mark.parametrize("bits", [8, 4])
def test_digits_accuracy_is_kept(
    files, tmp_path: Path, fmt: str, bits: int, int8_compute: bool
) -> None:
    params = {"bits": bits, "group_size": 32, "onnx_int8_compute": int8_compute}
    model = apply(METHOD, load_model(files[fmt], fmt), params, tmp_path)
    out = tmp_path / f"wo.{fmt}"
    save_model(model, out)
    _, _, x_test, y_test = factories.digits_arrays()
    fp32 = stock_accuracy(files[fmt], x_test, y_test, check_loader=True)
    quantized = stock_accuracy(out, x_test, y_test, check_loader=True)
    assert quantized >= fp32 - (0.005 if bits == 8 else 0.02)


@pytest.mark.parametrize("bits", [8, 4])
def test_onnx_matmul_nbits(wide, tmp_path: Path, bits: int) -> None:
    import onnx

    params = {"bits": bits, "group_size": 64, "symmetric": False}
    model = apply(METHOD, load_model(wide["onnx"], "onnx"), params, tmp_path)
    out = tmp_path / "nbits.onnx"
    save_model(model, out)
    proto = onnx.load(str(out))
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 3 and not {"Gemm", "MatMul"} & {n.op_type for n in proto.graph.node}
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["bits"] == bits and attrs["block_size"] == 64
        assert attrs["accuracy_level"] == 4  # int8 compute, the fast CPU kernels
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    weights = sum(o * i for o, i in WIDE_SHAPES)
    biases = sum(o for o, _ in WIDE_SHAPES)
    # Only the biases and one scale per block of 64 stay float.
    assert sum(int(np.prod(t.dims)) for t in floats) == biases + weights // 64
    ratio = out.stat().st_size / wide["onnx"].stat().st_size
    assert ratio <= (0.3 if bits == 8 else 0.18), ratio
    x = np.random.default_rng(0).standard_normal((7, 256)).astype(np.float32)
    assert (
        cosine(stock_run(out, x, check_loader=True), stock_run(wide["onnx"], x, check_loader=True))
        >= 0.99
    )


def test_layers_the_group_does_not_divide_stay_float(files, tmp_path: Path) -> None:
    import torch

    reporter = RecordingReporter()
    model = apply(METHOD, load_model(files["pt2"], "pt2"), {"bits": 4}, tmp_path, reporter=reporter)
    state = model.program.state_dict  # type: ignore[union-attr]
    # Inputs 64, 128, 64: only the 128-input layer divides into groups of 128.
    assert [k for k in state if k.endswith(".packed")] == ["2.packed"]
    assert state["0.weight"].dtype == torch.float32
    assert reporter.logs[-1]["data"]["kept_float"] == ["0", "4"]
    with pytest.raises(UnsupportedError, match="divisible by 256"):
        apply(METHOD, load_model(files["pt2"], "pt2"), {"bits": 4, "group_size": 256}, tmp_path)


def test_backend_limits_are_refused() -> None:
    assert METHOD.validate_params({"bits": 8, "symmetric": False}, "onnx").symmetric is False
    assert METHOD.validate_params({"bits": 4, "symmetric": False}, "pt2").bits == 4
    with pytest.raises(ValidationError, match="symmetric=false with bits=8 is not supported"):
        METHOD.validate_params({"bits": 8, "symmetric": False}, "pt2")
    for bad in ({"bits": 2}, {"bits": 4, "group_size": 48}, {"bits": 16}, {"scheme": "x"}):
        with pytest.raises(ValidationError):
            METHOD.validate_params(bad)
