"""``prune.semi_structured``: the 2:4 sparsity pattern on Linear layers.

In every group of 4 consecutive input weights of a Linear layer (4 neighbours along
``in_features``, for each output), the 2 of largest magnitude are kept and the other 2
set to zero: exactly 50 % sparsity, in the pattern NVIDIA's sparse tensor cores (Ampere
and later) run at up to twice the dense speed. Eligible layers have ``in_features``
divisible by 4 and at least ``min_features`` inputs and outputs; the others stay dense,
and the job's log names them.

The weights are stored dense, with the zeros, so the artifact loads with stock tools
everywhere (pt2: the program's state dict is edited in place, the graph and its dynamic
dims are kept; onnx: the initializers feeding MatMul/Gemm). On a CPU that brings no
speed-up (the log says so); on a CUDA GPU the speed-up comes from converting the weights
with ``torch.sparse.to_sparse_semi_structured`` after loading: a sparse semi-structured
tensor cannot be stored in a pt2 file without pickling, which squish never loads. On a
``gpu`` target the method checks, on the worker's GPU, that every pruned weight converts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from worker.errors import InvalidParamsError
from worker.layers import Exclude, excluded_layers, record_layers
from worker.methods.base import Method, MethodParams, Searchable, SearchRole

if TYPE_CHECKING:
    import torch

    from worker.context import StepContext
    from worker.formats import LoadedModel

GROUP = 4  # weights per group
KEPT = 2  # non-zeros per group


class SemiStructuredPruneParams(MethodParams):
    """2:4 semi-structured pruning of Linear layers (sparse tensor cores' pattern).

    Args:
        layers: name substrings; when given, only Linear layers whose weight name (pt2:
            parameter FQN such as ``"0.weight"``; onnx: initializer name) contains one of
            them are pruned. By default every eligible Linear layer.
        min_features: Linear layers with fewer input or output features than this stay
            dense: small layers gain nothing from sparse kernels, and a classifier head
            with a few outputs loses accuracy for no speed.
        exclude: layers left dense, as the model's ``info.layer_names`` lists them
            (module paths for pt2, node names for onnx) or ``re:`` patterns.

    Example:
        ``{"method": "prune.semi_structured", "params": {"min_features": 64}}``
    """

    layers: tuple[str, ...] | None = Field(
        default=None,
        min_length=1,
        description=(
            "Only prune Linear layers whose weight name contains one of these substrings. "
            "Default: every eligible Linear layer."
        ),
    )
    min_features: int = Field(
        default=16,
        ge=GROUP,
        description=(
            "Linear layers with fewer input or output features than this stay dense "
            "(small layers and classifier heads)."
        ),
    )
    exclude: Exclude = None


def prune_semi_structured(
    model: LoadedModel, params: SemiStructuredPruneParams, ctx: StepContext
) -> LoadedModel:
    """Zero 2 of every 4 consecutive input weights of the eligible Linear layers."""
    import torch

    found = _pt2_linear_weights(model) if model.format == "pt2" else _onnx_linear_weights(model)
    if params.layers is not None:
        found = {k: v for k, v in found.items() if any(s in k for s in params.layers)}
    from worker.methods.prune_magnitude import tensor_layers

    owners = tensor_layers(model)
    excluded = excluded_layers(params, list(dict.fromkeys(owners.values())), ctx.method)
    found = {k: v for k, v in found.items() if owners.get(k) not in excluded}
    if not found:
        what = f"matching {list(params.layers)}" if params.layers else "in this model"
        raise InvalidParamsError(f"no Linear layer weights {what}", step=ctx.method)
    eligible: dict[str, tuple[torch.Tensor, int]] = {}
    skipped: dict[str, str] = {}
    for name, (weight, in_axis) in found.items():
        reason = _ineligible(weight, in_axis, params.min_features)
        if reason is None:
            eligible[name] = (weight, in_axis)
        else:
            skipped[name] = reason
    if skipped:
        ctx.log(
            f"left {len(skipped)} Linear layers dense: "
            + "; ".join(f"{name} ({why})" for name, why in skipped.items()),
            "warning",
            data={"dense_layers": skipped},
        )
    if not eligible:
        raise InvalidParamsError(
            "no Linear layer is eligible for 2:4 sparsity (in_features must be a multiple "
            f"of 4 and in/out features at least min_features={params.min_features})",
            step=ctx.method,
        )
    ctx.progress(0.1)
    pruned: dict[str, torch.Tensor] = {}
    for i, (name, (weight, in_axis)) in enumerate(eligible.items()):
        pruned[name] = two_four(weight, in_axis)
        ctx.progress(0.1 + 0.7 * (i + 1) / len(eligible))
    if model.format == "pt2":
        assert model.program is not None
        with torch.no_grad():
            for name, value in pruned.items():
                model.program.state_dict[name].copy_(value)
    else:
        _onnx_write(model, pruned)
    sparsity = {
        name: round(1.0 - int(t.count_nonzero()) / t.numel(), 6) for name, t in pruned.items()
    }
    ctx.log(
        f"2:4 sparsity on {len(pruned)} Linear layers (2 of every 4 consecutive input "
        "weights zeroed)",
        data={"sparsity": sparsity},
    )
    changed = {owners.get(name, name): value for name, value in sparsity.items()}
    kept = {owners.get(name, name): why for name, why in skipped.items()}
    kept.update({layer: "excluded" for layer in excluded})
    for layer in dict.fromkeys(owners.values()):
        if layer not in changed:
            kept.setdefault(layer, "not an eligible Linear layer")
    record_layers(ctx, list(changed), kept, sparsity=changed)
    if ctx.device == "gpu":
        _check_cuda_conversion({n: (t, eligible[n][1]) for n, t in pruned.items()}, ctx)
    else:
        ctx.log(
            "2:4 sparsity brings no speed-up on CPU: the weights are stored dense with zeros "
            "(smaller once compressed, same speed). On an NVIDIA GPU (Ampere or later), "
            "convert the pruned Linear weights with torch.sparse.to_sparse_semi_structured "
            "(fp16/bf16) after loading to run the sparse tensor-core kernels."
        )
    ctx.progress(1.0)
    return model


def two_four(weight: torch.Tensor, in_axis: int) -> torch.Tensor:
    """A copy of ``weight`` keeping the 2 largest |w| of every 4 along ``in_axis``."""
    import torch

    moved = weight.detach().movedim(in_axis, -1).contiguous()
    groups = moved.reshape(-1, GROUP)
    keep = groups.abs().topk(KEPT, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return (groups * mask).reshape(moved.shape).movedim(-1, in_axis).contiguous()


def _ineligible(weight: torch.Tensor, in_axis: int, min_features: int) -> str | None:
    if not weight.is_floating_point():
        return f"{weight.dtype} weights"
    in_features, out_features = weight.shape[in_axis], weight.shape[1 - in_axis]
    if in_features % GROUP:
        return f"in_features {in_features} is not a multiple of {GROUP}"
    if min(in_features, out_features) < min_features:
        return f"{in_features} -> {out_features} features, below min_features={min_features}"
    return None


def _pt2_linear_weights(model: LoadedModel) -> dict[str, tuple[torch.Tensor, int]]:
    """Parameters used as Linear weights: ``{fqn: (tensor, axis of in_features)}``.

    ``aten.linear(x, w)`` and the decomposed ``addmm(b, x, permute(w, [1, 0]))`` /
    ``mm(x, t(w))`` forms; every such weight is stored ``[out, in]``.
    """
    import torch

    program = model.program
    assert program is not None
    aten = torch.ops.aten
    to_param = program.graph_signature.inputs_to_parameters

    def param_of(arg: object) -> str | None:
        if isinstance(arg, torch.fx.Node) and arg.op == "placeholder":
            return to_param.get(arg.name)
        return None

    def transposed_param(arg: object) -> str | None:
        if not isinstance(arg, torch.fx.Node) or arg.op != "call_function":
            return None
        args: Any = arg.args
        if arg.target is aten.t.default or (
            arg.target is aten.permute.default and list(args[1]) == [1, 0]
        ):
            return param_of(args[0])
        return None

    found: dict[str, tuple[torch.Tensor, int]] = {}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.linear.default:
            fqn = param_of(node.args[1])
        elif node.target is aten.addmm.default:
            fqn = transposed_param(node.args[2])
        elif node.target is aten.mm.default:
            fqn = transposed_param(node.args[1])
        else:
            continue
        if fqn is not None and program.state_dict[fqn].ndim == 2:
            found.setdefault(fqn, (program.state_dict[fqn].detach(), 1))
    return found


def _onnx_linear_weights(model: LoadedModel) -> dict[str, tuple[torch.Tensor, int]]:
    """Initializers used as the B matrix of MatMul/Gemm: ``{name: (tensor, in axis)}``.

    MatMul(x, W) and Gemm(x, W, transB=0) hold W as ``[in, out]`` (in axis 0); Gemm with
    transB=1 and a Transpose between the initializer and the op flip it.
    """
    import onnx
    import torch
    from onnx import numpy_helper

    assert model.proto is not None
    graph = model.proto.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    found: dict[str, tuple[torch.Tensor, int]] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        flips = 0
        if node.op_type == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            flips += int(attrs.get("transB", 0))
        name = node.input[1]
        while name not in initializers:
            producer = producers.get(name)
            if producer is None or producer.op_type != "Transpose" or not producer.input:
                break
            perm = [list(a.ints) for a in producer.attribute if a.name == "perm"]
            if perm and perm[0] != [1, 0]:
                break
            flips += 1
            name = producer.input[0]
        if name not in initializers or name in found:
            continue
        array = numpy_helper.to_array(initializers[name])
        if array.ndim == 2 and array.dtype.kind == "f":
            found[name] = (torch.from_numpy(np.array(array)), flips % 2)
    return found


def _onnx_write(model: LoadedModel, pruned: dict[str, torch.Tensor]) -> None:
    from onnx import numpy_helper

    assert model.proto is not None
    for init in model.proto.graph.initializer:
        if init.name in pruned:
            init.CopyFrom(numpy_helper.from_array(pruned[init.name].numpy(), init.name))


def _check_cuda_conversion(pruned: dict[str, tuple[torch.Tensor, int]], ctx: StepContext) -> None:
    """gpu target only: convert each pruned weight (fp16, as ``[out, in]``) to torch's
    sparse semi-structured format on this worker's GPU; say which the kernels accept."""
    import torch

    if not torch.cuda.is_available():
        ctx.log("no CUDA device on this worker: the 2:4 conversion was not checked", "warning")
        return
    from torch.sparse import to_sparse_semi_structured

    accepted, refused = [], {}
    for name, (weight, in_axis) in pruned.items():
        dense = (weight if in_axis == 1 else weight.T).to("cuda", torch.float16).contiguous()
        try:
            sparse = to_sparse_semi_structured(dense)
            same = bool(torch.equal(sparse.to_dense(), dense))
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            refused[name] = str(exc).splitlines()[0]
            continue
        if same:
            accepted.append(name)
        else:
            refused[name] = "the sparse form does not round-trip"
    ctx.log(
        f"on this GPU, {len(accepted)} of {len(pruned)} pruned weights convert with "
        "torch.sparse.to_sparse_semi_structured (fp16) for the sparse tensor-core kernels; "
        "the artifact stores them dense, convert them after loading",
        "warning" if refused else "info",
        data={"converts": accepted, "refused": refused},
    )


METHOD = Method(
    name="prune.semi_structured",
    summary=(
        "2:4 semi-structured sparsity on Linear layers: 2 of every 4 consecutive input "
        "weights zeroed (NVIDIA sparse tensor-core pattern)."
    ),
    params=SemiStructuredPruneParams,
    formats=frozenset({"pt2", "onnx"}),
    handler=prune_semi_structured,
    devices=frozenset({"cpu", "gpu"}),
    search=Searchable(SearchRole.structure),
)
