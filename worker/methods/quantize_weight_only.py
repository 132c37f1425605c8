"""``quantize.weight_only``: int8 or int4 Linear weights, float activations.

The weights of Linear layers (MatMul in ONNX) are stored as 8 or 4-bit integers with a
float scale per output channel or per group of ``group_size`` inputs, and dequantized
where they are used; activations stay float. It needs no data. Weight-only quantization
pays where a model is memory-bound (large Linear layers, small batches).

- pt2, ``bits=8``: torchao's ``Int8WeightOnlyConfig`` on the lifted Linear layers
  (``worker.lifting``); the torchao tensor subclasses are unwrapped to plain int8 and
  float32 tensors before re-export, so the artifact has no pickled weights and loads
  with ``torch.export.load`` (its graph: int8 -> float matmul, times the scale).
- pt2, ``bits=4``: torchao's ``IntxWeightOnlyConfig(torch.int4, PerGroup)`` chooses the
  int4 values and scales; squish then stores two int4 codes per byte
  (:mod:`worker.packing`) and the graph unpacks them with plain aten ops. torchao's own
  int4 layouts are not used: on CPU torchao 0.18 has none that is packed (its
  ``Int4WeightOnlyConfig`` needs CUDA kernels, ``IntxWeightOnlyConfig`` keeps one int4
  per int8 byte), and its tensor subclasses export as pickles, which squish refuses.
- onnx (4 or 8 bits): ONNX Runtime's ``MatMulNBitsQuantizer`` (Gemm rewritten to
  MatMul first): every MatMul with constant weights becomes ``com.microsoft.MatMulNBits``,
  which ONNX Runtime runs with blockwise int4/int8 kernels on CPU and CUDA.

The stored weights are decoded by ordinary ops (pt2) or ONNX Runtime kernels available
on both providers, so the same artifact runs on ``cpu`` and ``gpu`` workers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, Self

from pydantic import Field, ValidationInfo, model_validator

from worker.errors import UnsupportedError
from worker.layers import (
    Exclude,
    excluded_layers,
    onnx_nodes_to_exclude,
    record_layers,
    record_onnx_layers,
)
from worker.methods.base import Choice, Method, MethodParams, Searchable, SearchRole, context_format

if TYPE_CHECKING:
    import torch

    from worker.context import StepContext
    from worker.formats import LoadedModel

DEFAULT_GROUP = 128


class WeightOnlyQuantizeParams(MethodParams):
    """Weight-only quantization: int8 or int4 Linear weights, float activations.

    Supported per format (the same on cpu and gpu workers):

    - pt2: ``bits=8`` symmetric, per output channel or per group (torchao);
      ``bits=4`` symmetric or asymmetric, per group, packed two per byte.
    - onnx: ``bits=8`` or ``4``, symmetric or asymmetric, per group (ONNX Runtime's
      ``MatMulNBits``).

    A Linear layer whose input size is not a multiple of ``group_size`` keeps its float
    weights (pt2; the job's events list them).

    Args:
        bits: 8 (about 1/4 of the float32 size) or 4 (about 1/8 plus the scales).
        group_size: inputs sharing one scale: 32, 64, 128 or 256 (smaller: more accurate,
            more scales). Default: one scale per output channel for pt2 with ``bits=8``,
            groups of 128 otherwise.
        symmetric: integers centred on zero (no zero point). ``false`` stores a zero
            point per group (a better fit for skewed weights); not available for pt2
            with ``bits=8`` (torchao's int8 weight-only scheme is symmetric).
        onnx_int8_compute: onnx only: run ``MatMulNBits`` at ONNX Runtime's accuracy
            level 4, which quantizes the activations to int8 per block inside the kernel
            (measured 16x faster than float math for 8-bit weights at batch 1 on a
            256-512-512-10 MLP); ``false``: dequantize and compute in float32
            (accuracy level 1). pt2 artifacts always compute in float.
        exclude: layers left float, as the model's ``info.layer_names`` lists them
            (module paths for pt2, node names for onnx) or ``re:`` patterns: left out of
            torchao's ``quantize_`` filter (pt2), ONNX Runtime's ``nodes_to_exclude``
            (onnx).

    Example:
        ``{"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 32}}``
    """

    bits: Literal[8, 4] = Field(default=8, description="Weight bits: 8 or 4.")
    group_size: Literal[32, 64, 128, 256] | None = Field(
        default=None,
        description=(
            "Inputs per scale: 32, 64, 128 or 256. Default: per output channel for pt2 "
            "with bits=8, 128 otherwise."
        ),
    )
    symmetric: bool = Field(
        default=True,
        description=(
            "Symmetric integers (no zero point); false adds a zero point per group "
            "(not for pt2 with bits=8)."
        ),
    )
    onnx_int8_compute: bool = Field(
        default=True,
        description=(
            "onnx only: MatMulNBits computes with int8-quantized activations (ONNX Runtime "
            "accuracy level 4, fast on CPU); false: float32 math. pt2 computes in float."
        ),
    )
    exclude: Exclude = None

    @model_validator(mode="after")
    def _supported_by_backend(self, info: ValidationInfo) -> Self:
        fmt = context_format(info)
        problem = unsupported_reason(self, fmt) if fmt is not None else None
        if problem:
            raise ValueError(problem)
        return self


def unsupported_reason(params: WeightOnlyQuantizeParams, fmt: str) -> str | None:
    """Why ``fmt``'s backend cannot do what ``params`` ask, or None."""
    if fmt == "pt2" and params.bits == 8 and not params.symmetric:
        return (
            "symmetric=false with bits=8 is not supported for pt2 models: torchao's int8 "
            "weight-only scheme is symmetric; use symmetric=true, bits=4, or an onnx model"
        )
    return None


def quantize_weight_only(
    model: LoadedModel, params: WeightOnlyQuantizeParams, ctx: StepContext
) -> LoadedModel:
    """Store the Linear weights as int8/int4 with float scales."""
    problem = unsupported_reason(params, model.format)
    if problem:
        raise UnsupportedError(problem, step=ctx.method)
    if model.format == "onnx":
        return _quantize_onnx(model, params, ctx)
    return _quantize_pt2(model, params, ctx)


def _quantize_pt2(
    model: LoadedModel, params: WeightOnlyQuantizeParams, ctx: StepContext
) -> LoadedModel:
    from torch import nn
    from torchao.quantization import quantize_

    from worker.formats import layer_names
    from worker.lifting import lift, lifted_name, relower

    module = lift(model)
    ctx.progress(0.1)
    group = params.group_size or (None if params.bits == 8 else DEFAULT_GROUP)
    names = layer_names(model)
    excluded = excluded_layers(params, names, ctx.method)
    lifted = {lifted_name(f"{name}.weight"): name for name in names}  # back to the model's
    linears = {name: m for name, m in module.named_modules() if type(m) is nn.Linear}
    linears = {n: m for n, m in linears.items() if lifted.get(n, n) not in excluded}
    chosen = {n for n, m in linears.items() if group is None or m.in_features % group == 0}
    skipped = sorted(set(linears) - chosen)
    if not chosen:
        what = (
            "no Linear layer"
            if not linears
            else f"no Linear layer with inputs divisible by {group}"
        )
        raise UnsupportedError(
            f"{what} to quantize; choose a group_size that divides the layers' input sizes",
            step=ctx.method,
        )
    config = _torchao_config(params.bits, group, params.symmetric)
    quantize_(module, config, filter_fn=lambda m, fqn: fqn in chosen)
    ctx.progress(0.5)
    if params.bits == 8:
        from torchao.utils import unwrap_tensor_subclass

        unwrap_tensor_subclass(module)  # plain int8/float32 tensors: no pickled weights
    else:
        from worker.packing import int4_layer

        for name in sorted(chosen):
            _replace(module, name, int4_layer(module.get_submodule(name)))
    ctx.progress(0.7)
    kept = {lifted.get(n, n): f"inputs not divisible by {group}" for n in skipped}
    kept.update({name: "excluded" for name in excluded})
    kept.update({n: "not a Linear layer" for n in names if n not in kept})
    changed = [lifted.get(n, n) for n in sorted(chosen)]
    record_layers(ctx, changed, kept, dtype=f"int{params.bits}")
    quantized = relower(model, module)
    layout = f"groups of {group}" if group else "one scale per output channel"
    ctx.log(
        f"quantized {len(chosen)} Linear weights to int{params.bits} ({layout}, "
        f"{'symmetric' if params.symmetric else 'asymmetric'})"
        + (f"; {len(skipped)} kept float (inputs not divisible by {group})" if skipped else ""),
        data={"quantized": sorted(chosen), "kept_float": skipped},
    )
    ctx.progress(1.0)
    return quantized


def _torchao_config(bits: int, group: int | None, symmetric: bool) -> object:
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, MappingType
    from torchao.quantization.granularity import PerGroup, PerRow

    if bits == 8:
        granularity = PerRow() if group is None else PerGroup(group)
        return Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False)
    assert group is not None
    return IntxWeightOnlyConfig(
        weight_dtype=torch.int4,  # type: ignore[attr-defined]
        granularity=PerGroup(group),
        mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC,
    )


def _replace(root: torch.nn.Module, name: str, layer: torch.nn.Module) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    setattr(owner, attr, layer)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """ONNX Runtime's weight quantizer logs a line per node at INFO."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _quantize_onnx(
    model: LoadedModel, params: WeightOnlyQuantizeParams, ctx: StepContext
) -> LoadedModel:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.onnx_model import ONNXModel

    from worker.formats import layer_names
    from worker.formats.onnx import normalize_onnx, validated_output

    model = normalize_onnx(model, ctx, step=ctx.method)
    assert model.proto is not None
    excluded = excluded_layers(params, layer_names(model), ctx.method)
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    wrapped = ONNXModel(proto)
    wrapped.replace_gemm_with_matmul()
    ctx.progress(0.2)
    block = params.group_size or DEFAULT_GROUP
    with _quiet("onnxruntime.quantization.matmul_nbits_quantizer"):
        quantizer = MatMulNBitsQuantizer(
            wrapped.model,
            bits=params.bits,
            block_size=block,
            is_symmetric=params.symmetric,
            accuracy_level=4 if params.onnx_int8_compute else 1,
            nodes_to_exclude=onnx_nodes_to_exclude(excluded),
        )
        quantizer.process()
    result = quantizer.model.model
    ctx.progress(0.8)
    nodes = [n for n in result.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        convs = any(n.op_type in ("Conv", "ConvTranspose") for n in model.proto.graph.node)
        raise UnsupportedError(
            "ONNX Runtime found no MatMul/Gemm with constant weights to quantize"
            + (
                "; weight-only quantization covers MatMul/Gemm layers only: for this "
                "model's convolutions use quantize.static with a calibration dataset"
                if convs
                else ""
            ),
            step=ctx.method,
        )
    quantized = validated_output(
        result, model, step=ctx.method, library="ONNX Runtime's MatMulNBitsQuantizer",
        advice="Try bits=8, another group_size, or onnx_int8_compute=false.",
    )  # fmt: skip
    record_onnx_layers(ctx, model, quantized, excluded)
    ctx.log(
        f"quantized {len(nodes)} MatMul weights to int{params.bits} (blocks of {block}, "
        f"{'symmetric' if params.symmetric else 'asymmetric'}) with ONNX Runtime's MatMulNBits, "
        f"computing with {'int8' if params.onnx_int8_compute else 'float32'} activations",
        data={"nodes": [n.name for n in nodes]},
    )
    ctx.progress(1.0)
    return quantized


METHOD = Method(
    name="quantize.weight_only",
    summary="Weight-only int8/int4 Linear weights with per-channel or per-group scales.",
    params=WeightOnlyQuantizeParams,
    formats=frozenset({"pt2", "onnx"}),
    handler=quantize_weight_only,
    devices=frozenset({"cpu", "gpu"}),
    post_conversion=True,
    search=Searchable(SearchRole.precision, {"bits": Choice((8, 4))}, exclude=True),
)
