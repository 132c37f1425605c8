"""``quantize.dynamic``: int8 weights, activations quantized to 8 bits at run time.

- onnx: ``onnxruntime.quantization.quantize_dynamic``. It quantizes MatMul (Gemm is
  rewritten to MatMul first), Conv, Attention, LSTM and Gather weights; the model then
  runs ``DynamicQuantizeLinear`` + ``MatMulInteger``/``ConvInteger``. On a graph whose
  multiply-accumulates are mostly convolutions, the default quantizes MatMul/Gemm only:
  ONNX Runtime's ``ConvInteger`` has no fused kernel (the digits CNN: 5.4x slower than
  float at batch 1, 15x at 32; reported 3-9x slower and cosine 0.67 on an ImageNet
  classifier); ``op_types`` with ``Conv`` asks for them anyway.
- pt2: torchao's PT2E flow on the exported graph (``prepare_pt2e``/``convert_pt2e`` with
  ``X86InductorQuantizer`` in dynamic mode), which annotates Linear layers. Weights are
  folded to int8 constants, the graph is re-exported with the upload's dynamic dims and
  loads with ``torch.export.load`` (the ``quantized_decomposed`` ops come with torch).
  Run eagerly, these are reference ops (dequantize, fp32 matmul): the file is ~4x
  smaller, but eager latency is not better; lowering with ``torch.compile`` is what makes
  it fast, and squish measures the eager runtime the file loads into.
- hf: not in PyTorch. With ``output_format: onnx`` a pt2 or hf model is converted to
  ONNX before this step when it ends the pipeline (``worker.convert``), so the step runs
  in ONNX Runtime on the converted model and the artifact gets its int8 kernels.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import Field, ValidationInfo, field_validator, model_validator

from worker.errors import UnsupportedError
from worker.layers import (
    Exclude,
    exclude_from_pt2e,
    excluded_layers,
    onnx_nodes_to_exclude,
    record_onnx_layers,
    record_pt2e_layers,
)
from worker.methods.base import Choice, Method, MethodParams, Searchable, SearchRole, context_format
from worker.methods.quantize_static import checked_op_types

if TYPE_CHECKING:
    import numpy as np

    from worker.context import StepContext
    from worker.formats import LoadedModel

# The operator types ONNX Runtime's dynamic quantizer handles (IntegerOps and common
# registries of onnxruntime.quantization.registry; Gemm is rewritten to MatMul first).
ORT_DYNAMIC_OP_TYPES = frozenset(
    {"Attention", "Conv", "EmbedLayerNormalization", "Gather", "Gemm", "LSTM", "MatMul",
     "Transpose"}
)  # fmt: skip
CONV_DOMINATED = 0.5
"""Share of a graph's multiply-accumulates in convolutions above which the default
``op_types`` leaves Conv float."""


class DynamicQuantizeParams(MethodParams):
    """Dynamic post-training quantization: int8 weights, int8 activations at run time.

    Needs no data: weight ranges come from the weights, activation ranges are computed
    per batch while the model runs. A ``calibration`` dataset, when given, is only used
    to trace the pt2 graph with realistic inputs.

    Args:
        dtype: weight type; only ``"int8"`` for now.
        per_channel: one scale per output channel (more accurate) instead of one per tensor.
        symmetric: weights quantized around zero (zero point 0). ``false`` (asymmetric,
            with a zero point per scale) is supported for onnx only: torchao's x86
            quantizer takes symmetric weights only, so a pt2 model refuses it.
        reduce_range: quantize to 7 bits of range, which x86 CPUs without VNNI need to
            avoid overflow in their u8 x s8 int8 kernels (ONNX Runtime's and torchao's
            advice); onnx: weights, pt2: activations. Turn off only for VNNI/ARM targets.
        op_types: onnx only: the operator types to quantize (ONNX Runtime's
            ``op_types_to_quantize``; ``Gemm`` and ``MatMul`` both mean MatMul/Gemm).
            Default: every type ONNX Runtime handles, except Conv on a graph whose
            multiply-accumulates are mostly convolutions (the job's events say so):
            dynamic int8 convolutions are slow and inaccurate in ONNX Runtime, where
            ``quantize.static`` with calibration data gives fast int8 convolutions.
        exclude: layers left float, as the model's ``info.layer_names`` lists them
            (module paths for pt2, node names for onnx) or ``re:`` patterns: torchao's
            module-name configuration (pt2), ONNX Runtime's ``nodes_to_exclude`` (onnx).

    Example:
        ``{"method": "quantize.dynamic", "params": {"dtype": "int8", "per_channel": true}}``
    """

    dtype: Literal["int8"] = Field(
        default="int8", description="Weight type of the quantized layers; only int8 for now."
    )
    per_channel: bool = Field(
        default=True,
        description="One scale per output channel (true) or one per weight tensor (false).",
    )
    symmetric: bool = Field(
        default=True,
        description=(
            "Symmetric weights (zero point 0). false (asymmetric) is supported for onnx "
            "models only; pt2 (torchao x86 quantizer) refuses it."
        ),
    )
    reduce_range: bool = Field(
        default=True,
        description=(
            "Use 7 bits of range to avoid int8 overflow on x86 CPUs without VNNI "
            "(onnx: weights, pt2: activations)."
        ),
    )

    op_types: tuple[str, ...] | None = Field(
        default=None,
        min_length=1,
        max_length=len(ORT_DYNAMIC_OP_TYPES),
        description=(
            "onnx only: operator types to quantize, e.g. ['MatMul', 'Gemm'] or ['Conv']; "
            "null: every type ONNX Runtime handles, except Conv on convolution-dominated "
            "graphs (slow and inaccurate as dynamic int8: use quantize.static for them)."
        ),
    )
    exclude: Exclude = None

    @model_validator(mode="after")
    def _supported_by_backend(self, info: ValidationInfo) -> Self:
        fmt = context_format(info)
        if fmt == "pt2" and not self.symmetric:
            raise ValueError(
                "symmetric=false is not supported for pt2 models: torchao's x86 quantizer "
                "only quantizes weights symmetrically; use symmetric=true, or an onnx model"
            )
        if fmt == "pt2" and self.op_types is not None:
            raise ValueError(
                "op_types is for onnx models (ONNX Runtime); torchao's x86 dynamic "
                "quantizer chooses the Linear layers of a pt2 model itself: leave op_types out"
            )
        return self

    @field_validator("op_types")
    @classmethod
    def _known_op_types(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return checked_op_types(value, ORT_DYNAMIC_OP_TYPES, "dynamically")


def quantize_dynamic(
    model: LoadedModel, params: DynamicQuantizeParams, ctx: StepContext
) -> LoadedModel:
    """Quantize the model's weights to int8 with dynamic int8 activations."""
    if model.format == "onnx":
        return _quantize_onnx(model, params, ctx)
    if not params.symmetric:
        raise UnsupportedError(
            "symmetric=false is not supported for pt2 models (torchao's x86 quantizer "
            "takes symmetric weights only)",
            step=ctx.method,
        )
    return _quantize_pt2(model, params, ctx)


def _quantize_onnx(
    model: LoadedModel, params: DynamicQuantizeParams, ctx: StepContext
) -> LoadedModel:
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    from worker.formats import layer_names
    from worker.formats.onnx import normalize_onnx, validated_output

    # DynamicQuantizeLinear exists from opset 11 (ORT would upgrade an older model itself,
    # unchecked).
    model = normalize_onnx(model, ctx, step=ctx.method, min_opset=11, why="DynamicQuantizeLinear")
    assert model.proto is not None
    excluded = excluded_layers(params, layer_names(model), ctx.method)
    op_types, conv_share = _onnx_op_types(model, params, ctx)
    source = ctx.work_dir / f"step{ctx.step}_float.onnx"
    target = ctx.work_dir / f"step{ctx.step}_int8.onnx"
    onnx.save(model.proto, str(source))
    ctx.progress(0.2)
    ort_quantize_dynamic(
        source,
        target,
        per_channel=params.per_channel,
        reduce_range=params.reduce_range,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=op_types,
        nodes_to_exclude=onnx_nodes_to_exclude(excluded),
        extra_options={"WeightSymmetric": params.symmetric},
    )
    ctx.progress(0.8)
    proto = onnx.load(str(target))
    source.unlink(missing_ok=True)
    target.unlink(missing_ok=True)
    result = validated_output(
        proto, model, step=ctx.method, library="ONNX Runtime's quantize_dynamic",
        advice="Try per_channel=false, op_types=['MatMul', 'Gemm'], or quantize.static.",
    )  # fmt: skip
    quantized = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    integer_ops = sorted({n.op_type for n in proto.graph.node if n.op_type.endswith("Integer")})
    if not integer_ops:
        if conv_share is not None:
            raise UnsupportedError(
                f"this graph is convolution-dominated ({conv_share:.0%} of its "
                "multiply-accumulates in Conv) and has no MatMul or Gemm with constant "
                "weights; dynamic int8 convolutions are slower than float and inaccurate in "
                "ONNX Runtime, so quantize.dynamic leaves them float by default: use "
                "quantize.static with a calibration dataset, or op_types=['Conv'] to force them",
                step=ctx.method,
            )
        raise UnsupportedError(
            "ONNX Runtime found no layer to quantize dynamically (it handles MatMul, Gemm, "
            "Conv, Attention, LSTM with constant weights)"
            + (f" among op_types {', '.join(params.op_types)}" if params.op_types else ""),
            step=ctx.method,
        )
    record_onnx_layers(ctx, model, result, excluded)
    ctx.log(
        f"quantized {len(integer_ops)} op types to int8 with ONNX Runtime: {', '.join(integer_ops)}",
        data={"int8_initializers": len(quantized), "op_types": op_types},
    )
    ctx.progress(1.0)
    return result


def _onnx_op_types(
    model: LoadedModel, params: DynamicQuantizeParams, ctx: StepContext
) -> tuple[list[str] | None, float | None]:
    """ORT's ``op_types_to_quantize``, and the graph's share of convolution MACs when the
    default left Conv out because of it (else None)."""
    if params.op_types is not None:
        # ORT rewrites Gemm to MatMul before it looks at op types.
        return sorted({"MatMul" if t == "Gemm" else t for t in params.op_types}), None
    share = _conv_share(model)
    if share is None or share <= CONV_DOMINATED:
        return None, None
    ctx.log(
        f"{share:.0%} of this graph's multiply-accumulates are convolutions: quantizing "
        "MatMul/Gemm only and leaving Conv float (ONNX Runtime's dynamic ConvInteger is "
        "slower than float Conv and far less faithful); quantize.static with a calibration "
        "dataset gives int8 convolutions, op_types=['Conv', 'MatMul'] forces dynamic ones",
        "warning",
        data={"conv_mac_share": share, "op_types": ["MatMul"]},
    )
    return ["MatMul"], share


def _conv_share(model: LoadedModel) -> float | None:
    """The share of the graph's multiply-accumulates in Conv/ConvTranspose, counted from
    shapes inferred at batch 1, or from weight sizes when shapes cannot be inferred; None
    without any conv, matmul or gemm."""
    import numpy as np

    from worker.formats import generate_inputs, weight_shapes
    from worker.measurement.macs import onnx_macs_by_op

    assert model.proto is not None
    convs = ("Conv", "ConvTranspose")
    try:
        by_op = onnx_macs_by_op(model, generate_inputs(model, batch=1))
    except UnsupportedError:
        shapes = weight_shapes(model)
        by_op = {}
        for node in model.proto.graph.node:
            if node.op_type in (*convs, "MatMul", "Gemm") and len(node.input) > 1:
                size = float(np.prod(shapes.get(node.input[1], (0,))))
                by_op[node.op_type] = by_op.get(node.op_type, 0.0) + size
    total = sum(v for k, v in by_op.items() if k in (*convs, "MatMul", "Gemm"))
    if not total:
        return None
    return sum(by_op.get(k, 0.0) for k in convs) / total


def _quantize_pt2(
    model: LoadedModel, params: DynamicQuantizeParams, ctx: StepContext
) -> LoadedModel:
    import torch
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import QuantizationSpec
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from worker.formats import layer_names, pt2_example_args, reexport_pt2

    assert model.program is not None
    config = get_default_x86_inductor_quantization_config(
        is_dynamic=True, reduce_range=params.reduce_range
    )
    if not params.per_channel:
        per_tensor = QuantizationSpec(
            dtype=torch.int8,
            quant_min=-128,
            quant_max=127,
            qscheme=torch.per_tensor_symmetric,
            is_dynamic=False,
            observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12),
        )
        config = dataclasses.replace(config, weight=per_tensor)
    quantizer = X86InductorQuantizer().set_global(config)
    excluded = excluded_layers(params, layer_names(model), ctx.method)
    exclude_from_pt2e(quantizer, excluded, model.program)
    feeds = _trace_feeds(model, ctx)
    ctx.progress(0.1)
    prepared = prepare_pt2e(model.program.module(), quantizer)
    args, kwargs = pt2_example_args(model, feeds)
    with torch.no_grad():
        prepared(*args, **kwargs)  # records the weight ranges
    ctx.progress(0.4)
    converted = convert_pt2e(prepared)
    int8 = [
        n.target
        for n in converted.graph.nodes
        if n.op == "get_attr" and _attr(converted, str(n.target)).dtype == torch.int8
    ]
    if not int8:
        raise UnsupportedError(
            "torchao's x86 dynamic quantizer found no Linear layer to quantize", step=ctx.method
        )
    record_pt2e_layers(ctx, model, converted, excluded)
    ctx.progress(0.6)
    quantized = reexport_pt2(converted, model, feeds)
    ctx.log(
        f"quantized {len(int8)} weight tensors to int8 with torchao (PT2E, x86 dynamic)",
        data={"per_channel": params.per_channel, "reduce_range": params.reduce_range},
    )
    ctx.progress(1.0)
    return quantized


def _attr(module: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _trace_feeds(model: LoadedModel, ctx: StepContext) -> dict[str, np.ndarray] | None:
    """A few calibration samples to trace with, sized to a static batch if there is one."""
    import numpy as np

    from worker.data import fit_dataset

    dataset = ctx.datasets.get("calibration")
    if dataset is None:
        return None
    batch = model.static_batch or min(8, dataset.num_samples)
    feeds = fit_dataset(model, "calibration", dataset.head(batch))
    if model.static_batch is None and batch < 2:
        return None  # one sample would specialize a dynamic batch dim
    return {k: np.resize(v, (batch, *v.shape[1:])) for k, v in feeds.items()}


METHOD = Method(
    name="quantize.dynamic",
    summary="Dynamic post-training quantization: int8 weights, int8 activations at run time.",
    params=DynamicQuantizeParams,
    formats=frozenset({"pt2", "onnx"}),
    handler=quantize_dynamic,
    datasets_optional=frozenset({"calibration"}),
    devices=frozenset({"cpu"}),
    post_conversion=True,
    search=Searchable(SearchRole.precision, {"per_channel": Choice((True, False))}, exclude=True),
)
