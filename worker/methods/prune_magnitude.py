"""``prune.magnitude``: unstructured L1 magnitude pruning.

The smallest-magnitude weights are set to zero with ``torch.nn.utils.prune`` (per tensor
or with one global threshold) and the masks are folded in, so the saved model is a plain
dense model with zeros: smaller once compressed (``size_bytes_gzip``), not faster on
dense kernels. pt2 weights are edited in place in the program's state dict (the graph
does not change, so its input signature, dynamic dims included, is kept as uploaded);
onnx weights are the initializers feeding MatMul/Gemm/Conv.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from worker.errors import InvalidParamsError
from worker.methods.base import Method, MethodParams

if TYPE_CHECKING:
    import torch

    from worker.context import StepContext
    from worker.formats import LoadedModel


class MagnitudePruneParams(MethodParams):
    """Unstructured L1 magnitude pruning: zero the weights of smallest absolute value.

    Args:
        amount: fraction of the selected weights set to zero, strictly between 0 and 1.
            The pruned tensors reach exactly this sparsity, up to rounding to whole
            elements (per tensor with ``scope="layer"``, over all of them with ``"global"``).
        scope: ``"layer"`` prunes every selected tensor to ``amount``; ``"global"`` ranks
            all selected weights together under one threshold, so layers with many small
            weights lose more of them.
        layers: name substrings; when given, every float parameter (matrices and kernels;
            biases too with ``include_bias``) whose name contains one of them is pruned.
            By default the weights of Linear/Conv (pt2) or MatMul/Gemm/Conv (onnx) layers.
        include_bias: also prune the bias vectors of the selected layers.

    Example:
        ``{"method": "prune.magnitude", "params": {"amount": 0.5, "scope": "global"}}``
    """

    amount: float = Field(
        gt=0.0,
        lt=1.0,
        description="Fraction of the selected weights set to zero (0 < amount < 1).",
    )
    scope: Literal["layer", "global"] = Field(
        default="layer",
        description=(
            "'layer': prune each selected tensor to `amount`; 'global': one magnitude "
            "threshold over all selected tensors together."
        ),
    )
    layers: tuple[str, ...] | None = Field(
        default=None,
        min_length=1,
        description=(
            "Only prune parameters whose name contains one of these substrings. "
            "Default: the weights of Linear/Conv/MatMul/Gemm layers."
        ),
    )
    include_bias: bool = Field(
        default=False, description="Also prune the bias vectors of the selected layers."
    )


# aten op -> (argument positions holding weights, positions holding the bias)
_PT2_WEIGHT_ARGS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "aten::linear": ((1,), (2,)),
    "aten::conv1d": ((1,), (2,)),
    "aten::conv2d": ((1,), (2,)),
    "aten::conv3d": ((1,), (2,)),
    "aten::convolution": ((1,), (2,)),
    "aten::_convolution": ((1,), (2,)),
    "aten::conv_transpose1d": ((1,), (2,)),
    "aten::conv_transpose2d": ((1,), (2,)),
    "aten::conv_transpose3d": ((1,), (2,)),
    "aten::matmul": ((0, 1), ()),
    "aten::mm": ((0, 1), ()),
    "aten::bmm": ((0, 1), ()),
    "aten::addmm": ((1, 2), (0,)),
    "aten::baddbmm": ((1, 2), (0,)),
}
_ONNX_WEIGHT_INPUTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "MatMul": ((0, 1), ()),
    "Gemm": ((0, 1), (2,)),
    "Conv": ((1,), (2,)),
    "ConvTranspose": ((1,), (2,)),
}
# Nodes a weight may pass through between its initializer and the layer.
_ONNX_PASS_THROUGH = frozenset({"Transpose", "Identity", "Cast", "Reshape"})


def prune_magnitude(
    model: LoadedModel, params: MagnitudePruneParams, ctx: StepContext
) -> LoadedModel:
    """Zero the smallest-magnitude weights; returns the same model, edited."""
    import torch

    select = _pt2_targets if model.format == "pt2" else _onnx_targets
    tensors = select(model, params)
    if not tensors:
        what = (
            f"matching {list(params.layers)}"
            if params.layers
            else "in Linear/Conv/MatMul/Gemm layers"
        )
        raise InvalidParamsError(f"no prunable float weights {what}", step=ctx.method)
    ctx.progress(0.1)
    pruned = l1_prune(tensors, params.amount, params.scope)
    ctx.progress(0.8)
    if model.format == "pt2":
        assert model.program is not None
        with torch.no_grad():
            for name, value in pruned.items():
                model.program.state_dict[name].copy_(value)
    else:
        _onnx_write(model, pruned)
    per_tensor = {
        name: round(1.0 - int(torch.count_nonzero(t)) / t.numel(), 6) for name, t in pruned.items()
    }
    total = sum(t.numel() for t in pruned.values())
    zeros = sum(t.numel() - int(torch.count_nonzero(t)) for t in pruned.values())
    ctx.log(
        f"pruned {len(pruned)} tensors ({params.scope} scope) to sparsity {zeros / total:.4f}",
        data={"sparsity": per_tensor},
    )
    ctx.progress(1.0)
    return model


def l1_prune(
    tensors: dict[str, torch.Tensor], amount: float, scope: str
) -> dict[str, torch.Tensor]:
    """Prune copies of ``tensors`` with ``torch.nn.utils.prune`` and fold the masks in."""
    import torch
    from torch.nn.utils import prune

    holders: dict[str, torch.nn.Module] = {}
    for name, tensor in tensors.items():
        holder = torch.nn.Module()
        holder.register_parameter(
            "weight", torch.nn.Parameter(tensor.detach().clone(), requires_grad=False)
        )
        holders[name] = holder
    if scope == "global":
        prune.global_unstructured(
            [(h, "weight") for h in holders.values()],
            pruning_method=prune.L1Unstructured,
            amount=amount,
        )
    else:
        for holder in holders.values():
            prune.l1_unstructured(holder, "weight", amount=amount)
    result = {}
    for name, holder in holders.items():
        prune.remove(holder, "weight")
        result[name] = holder.get_parameter("weight").detach()
    return result


def _select(name: str, ndim: int, default_role: str | None, params: MagnitudePruneParams) -> bool:
    """Whether a float tensor is pruned. ``default_role``: "weight"/"bias" if a layer uses it."""
    if params.layers is not None:
        if not any(s in name for s in params.layers):
            return False
        return ndim >= 2 or (params.include_bias and ndim == 1)
    if default_role == "weight":
        return True
    return default_role == "bias" and params.include_bias


def _pt2_targets(model: LoadedModel, params: MagnitudePruneParams) -> dict[str, torch.Tensor]:
    import torch

    program = model.program
    assert program is not None
    to_param = program.graph_signature.inputs_to_parameters
    roles: dict[str, str] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        positions = _PT2_WEIGHT_ARGS.get(node.target._schema.name)
        if positions is None:
            continue
        for role, indices in zip(("weight", "bias"), positions, strict=True):
            for index in indices:
                arg = node.args[index] if index < len(node.args) else None
                if isinstance(arg, torch.fx.Node) and arg.name in to_param:
                    roles.setdefault(to_param[arg.name], role)
    targets: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name in program.graph_signature.parameters:
        tensor = program.state_dict[name]
        if not tensor.is_floating_point() or tensor.ndim == 0:
            continue
        if not _select(name, tensor.ndim, roles.get(name), params):
            continue
        if tensor.data_ptr() in seen_storage:  # a tied weight is pruned once
            continue
        seen_storage.add(tensor.data_ptr())
        targets[name] = tensor.detach()
    return targets


def _onnx_targets(model: LoadedModel, params: MagnitudePruneParams) -> dict[str, torch.Tensor]:
    import torch
    from onnx import numpy_helper

    assert model.proto is not None
    graph = model.proto.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def source(name: str) -> str | None:
        for _ in range(4):
            if name in initializers:
                return name
            node = producers.get(name)
            if node is None or node.op_type not in _ONNX_PASS_THROUGH or not node.input:
                return None
            name = node.input[0]
        return None

    roles: dict[str, str] = {}
    for node in graph.node:
        positions = _ONNX_WEIGHT_INPUTS.get(node.op_type)
        if positions is None:
            continue
        for role, indices in zip(("weight", "bias"), positions, strict=True):
            for index in indices:
                if index < len(node.input) and node.input[index]:
                    init = source(node.input[index])
                    if init is not None:
                        roles.setdefault(init, role)
    targets: dict[str, torch.Tensor] = {}
    for name, init in initializers.items():
        array = numpy_helper.to_array(init)
        if array.dtype.kind != "f" or array.ndim == 0:
            continue
        if _select(name, array.ndim, roles.get(name), params):
            targets[name] = torch.from_numpy(np.array(array))
    return targets


def _onnx_write(model: LoadedModel, pruned: dict[str, torch.Tensor]) -> None:
    from onnx import numpy_helper

    assert model.proto is not None
    for init in model.proto.graph.initializer:
        if init.name in pruned:
            init.CopyFrom(numpy_helper.from_array(pruned[init.name].numpy(), init.name))


METHOD = Method(
    name="prune.magnitude",
    summary="Unstructured L1 magnitude pruning: zero the smallest weights (per layer or global).",
    params=MagnitudePruneParams,
    formats=frozenset({"pt2", "onnx"}),
    handler=prune_magnitude,
    devices=frozenset({"cpu", "gpu"}),
)
