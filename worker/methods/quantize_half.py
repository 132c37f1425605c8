"""``quantize.half``: weights and compute in 16-bit floats (fp16 or bf16).

Every floating-point weight becomes 16-bit, so the file is about half the size; the
model's inputs and outputs stay as uploaded (float32), so callers feed it as before.

- pt2: the program's module gets ``.to(dtype)`` (parameters, buffers and tensor
  constants), float inputs are cast to ``dtype`` where they enter the graph and float
  outputs back to their dtype where they leave, and the dtype baked into the graph's
  casts and tensor factories (``x.to(torch.float32)``, ``torch.full(..., dtype=float32)``,
  which ``x.to(self.dtype)`` in the original code also traces to) follows; the graph is
  re-exported with the upload's dynamic dims.
- hf: the transformers module gets ``.to(dtype)`` and is saved with
  ``save_pretrained``, which records the dtype in ``config.json``; ``from_pretrained``
  loads it back in that dtype. Its inputs are token ids; its output (logits or hidden
  states) comes out in the new dtype, as transformers models do.
- onnx: ONNX Runtime's own converter (``onnxruntime.transformers.float16``) with
  ``keep_io_types``: float initializers and ops become float16, ops that have no fp16
  kernel (its default block list) stay float32 behind Cast nodes. bf16 is refused for
  onnx: ONNX Runtime's CPU provider has no bfloat16 kernels for Gemm/MatMul/Conv.

Speed: 16-bit halves memory traffic, which pays on GPUs (fp16/bf16 tensor cores) and on
CPUs with AVX512-BF16/AMX (bf16); on other CPUs eager fp16 kernels are not faster and
may be slower, which the measured latency shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Self

from pydantic import Field, ValidationInfo, model_validator

from worker.errors import UnsupportedError
from worker.methods.base import Choice, Method, MethodParams, Searchable, SearchRole, context_format

if TYPE_CHECKING:
    import torch

    from worker.context import StepContext
    from worker.formats import LoadedModel

ONNX_BF16_REFUSAL = (
    "dtype=bf16 is not supported for onnx models: ONNX Runtime's CPU provider has no "
    "bfloat16 kernels for Gemm/MatMul/Conv; use dtype=fp16, or a pt2 model"
)


class HalfPrecisionParams(MethodParams):
    """Half precision: store and run the weights as 16-bit floats.

    Halves the size of every floating-point weight. Inputs and outputs keep their
    float32 type at the model's boundary, so the model is called exactly as before.

    Args:
        dtype: ``"fp16"`` (IEEE half: 10-bit mantissa, range ±65504) or ``"bf16"``
            (bfloat16: float32's range with an 8-bit mantissa; safer for models with
            large activations). bf16 is supported for pt2 only: ONNX Runtime's CPU
            provider has no bfloat16 kernels, so an onnx model refuses it.

    Example:
        ``{"method": "quantize.half", "params": {"dtype": "fp16"}}``
    """

    dtype: Literal["fp16", "bf16"] = Field(
        default="fp16",
        description=(
            "16-bit float type of the weights: 'fp16' (IEEE half) or 'bf16' (bfloat16, "
            "pt2 only: ONNX Runtime has no CPU bfloat16 kernels)."
        ),
    )

    @model_validator(mode="after")
    def _supported_by_backend(self, info: ValidationInfo) -> Self:
        fmt = context_format(info)
        if fmt == "onnx" and self.dtype == "bf16":
            raise ValueError(ONNX_BF16_REFUSAL)
        return self


def quantize_half(model: LoadedModel, params: HalfPrecisionParams, ctx: StepContext) -> LoadedModel:
    """Convert the model's floating-point weights and compute to fp16 or bf16."""
    if model.format == "onnx":
        if params.dtype == "bf16":
            raise UnsupportedError(ONNX_BF16_REFUSAL, step=ctx.method)
        return _half_onnx(model, ctx)
    if model.format == "hf":
        return _half_hf(model, params, ctx)
    return _half_pt2(model, params, ctx)


def _half_hf(model: LoadedModel, params: HalfPrecisionParams, ctx: StepContext) -> LoadedModel:
    import torch

    from worker.formats import hf_model_from_module
    from worker.lifting import lift

    target = torch.float16 if params.dtype == "fp16" else torch.bfloat16
    module = lift(model)
    ctx.progress(0.1)
    before = _float_bytes(module)
    converted = sum(1 for t in module.parameters() if t.is_floating_point())
    module.to(target)
    result = hf_model_from_module(module, model.tokenizer, model.task or "")
    result.extra_files = dict(model.extra_files)
    ctx.log(
        f"converted {converted} parameters of the transformers model to {params.dtype}: "
        f"float weights {before} -> {_float_bytes(module)} bytes",
        data={"dtype": params.dtype, "tensors": converted},
    )
    ctx.progress(1.0)
    return result


# Tensor factories and casts whose baked-in float32 ``dtype`` follows the conversion.
_DTYPE_KWARG_OPS = frozenset(
    {
        "aten::_to_copy", "aten::to", "aten::full", "aten::full_like", "aten::zeros",
        "aten::zeros_like", "aten::ones", "aten::ones_like", "aten::empty", "aten::empty_like",
        "aten::empty_strided", "aten::new_full", "aten::new_zeros", "aten::new_ones",
        "aten::new_empty", "aten::arange", "aten::scalar_tensor", "aten::linspace",
        "aten::rand", "aten::randn", "aten::rand_like", "aten::randn_like", "aten::tensor",
        "aten::softmax", "aten::log_softmax", "aten::_softmax", "aten::sum", "aten::mean",
    }
)  # fmt: skip


def _half_pt2(model: LoadedModel, params: HalfPrecisionParams, ctx: StepContext) -> LoadedModel:
    import torch

    from worker.formats import reexport_pt2

    assert model.program is not None
    target = torch.float16 if params.dtype == "fp16" else torch.bfloat16
    module = model.program.module()
    ctx.progress(0.1)
    before = _float_bytes(module)
    module.to(target)
    converted = _convert_graph(module, target)
    if not converted:
        raise UnsupportedError("the model has no float32 weights to convert", step=ctx.method)
    ctx.progress(0.4)
    result = reexport_pt2(module, model)
    ctx.progress(0.9)
    after = sum(
        t.numel() * t.element_size()
        for t in result.program.state_dict.values()  # type: ignore[union-attr]
        if t.is_floating_point()
    )
    ctx.log(
        f"converted {converted} weight tensors to {params.dtype}: float weights "
        f"{before} -> {after} bytes; inputs and outputs stay float32",
        data={"dtype": params.dtype, "tensors": converted},
    )
    ctx.progress(1.0)
    return result


def _float_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point())


def _convert_graph(module: torch.fx.GraphModule, target: torch.dtype) -> int:
    """Retype the graph around already-converted weights; returns the tensors converted."""
    import torch

    graph = module.graph
    converted = sum(1 for t in [*module.parameters(), *module.buffers()] if t.dtype == target)
    # Tensor constants that are neither parameters nor buffers.
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        owner_path, _, attr = str(node.target).rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        value = getattr(owner, attr)
        if (
            isinstance(value, torch.Tensor)
            and not isinstance(value, torch.nn.Parameter)
            and attr not in owner._buffers
            and value.dtype == torch.float32
        ):
            setattr(owner, attr, value.to(target))
            converted += 1
    for node in list(graph.nodes):
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            name = node.target._schema.name
            if name == "aten::_assert_tensor_metadata":
                graph.erase_node(node)  # asserts the dtypes the conversion just changed
                continue
            if name in _DTYPE_KWARG_OPS:
                if node.kwargs.get("dtype") == torch.float32:
                    node.kwargs = {**node.kwargs, "dtype": target}
                node.args = tuple(target if a is torch.float32 else a for a in node.args)
    # Float inputs enter as float32 and are cast once, where they enter the graph.
    for node in list(graph.nodes):
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype == torch.float32:
            with graph.inserting_after(node):
                cast = graph.call_function(
                    torch.ops.aten._to_copy.default, (node,), {"dtype": target}
                )
            node.replace_all_uses_with(
                cast,
                delete_user_cb=lambda user, cast=cast: (
                    user is not cast and user.op != "call_module"
                ),
            )
    output = next(n for n in graph.nodes if n.op == "output")
    flat = output.args[0]
    new_flat = []
    for arg in flat:
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        if isinstance(val, torch.Tensor) and val.dtype.is_floating_point:
            with graph.inserting_before(output):
                arg = graph.call_function(
                    torch.ops.aten._to_copy.default, (arg,), {"dtype": val.dtype}
                )
        new_flat.append(arg)
    output.args = (type(flat)(new_flat), *output.args[1:])
    graph.lint()
    module.recompile()
    return converted


def _half_onnx(model: LoadedModel, ctx: StepContext) -> LoadedModel:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    from worker.formats.onnx import normalize_onnx, onnx_weight_tensors, validated_output

    model = normalize_onnx(model, ctx, step=ctx.method)
    assert model.proto is not None
    floats = [t for t in onnx_weight_tensors(model) if t.data_type == onnx.TensorProto.FLOAT]
    if not floats:
        raise UnsupportedError(
            "the model has no float32 weights to convert (as initializers or Constant nodes)",
            step=ctx.method,
        )
    ctx.progress(0.1)
    proto = convert_float_to_float16(model.proto, keep_io_types=True)
    # The converter appends the boundary Casts at the end; ONNX requires nodes in
    # topological order (onnx.checker refuses the model otherwise).
    OnnxModel(proto).topological_sort()
    result = validated_output(
        proto, model, step=ctx.method, library="ONNX Runtime's float16 converter",
        advice="Keep this model in float32, or try quantize.weight_only or quantize.dynamic.",
    )  # fmt: skip
    ctx.progress(0.8)
    halves = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    kept = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    ctx.log(
        f"converted {len(halves)} initializers to float16 with ONNX Runtime's converter; "
        f"{len(kept)} stay float32 (ops without fp16 kernels); inputs and outputs stay float32",
        data={"float32_initializers": kept[:20]},
    )
    ctx.progress(1.0)
    return result


METHOD = Method(
    name="quantize.half",
    summary="Half precision: fp16 or bf16 weights and compute, float32 inputs and outputs.",
    params=HalfPrecisionParams,
    formats=frozenset({"pt2", "onnx", "hf"}),
    handler=quantize_half,
    devices=frozenset({"cpu", "gpu"}),
    post_conversion=True,
    search=Searchable(SearchRole.precision, {"dtype": Choice(("fp16", "bf16"))}),
)
