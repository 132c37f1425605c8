"""Real ``nn.Module`` layers for an exported program, and back.

A pt2 model is an ExportedProgram: a flat aten graph whose ``program.module()`` has no
``nn.Linear`` or ``nn.Conv2d``, only ``aten.linear(x, weight, bias)`` calls on tensors.
Module-based libraries (torch-pruning's dependency graph, torchao's ``quantize_``, QAT,
plain training loops) need real layers. :func:`lift` gives them a ``torch.fx.GraphModule``
in which every ``aten.linear``, ``aten.conv1d``/``conv2d`` (and non-transposed
``aten.convolution``), ``aten.batch_norm``-family and ``aten.layer_norm`` call is a call
to a real ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.BatchNorm1d`` /
``nn.BatchNorm2d`` / ``nn.LayerNorm`` holding (a copy of) the same parameters. Each
layer is named after its weight's FQN without the trailing ``.weight``, dots replaced
by ``_`` (``layer1.0.conv1.weight`` -> submodule ``layer1_0_conv1``). Everything else
in the graph (activations, adds, concatenations, pooling, reshapes) stays an aten call,
which autograd records like any eager op, so the result trains and torch-pruning can
trace it. :func:`relower` exports such a module again, with the upload's input
signature and dynamic dims, after its tensors changed shape or value.

For ``hf`` models ``LoadedModel.module`` already is the transformers ``nn.Module``:
:func:`lift` returns it and :func:`relower` puts it back.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from worker.errors import UnsupportedError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import fx, nn

    from worker.formats import LoadedModel

__all__ = ["lift", "lifted_name", "relower"]


def lifted_name(weight_fqn: str) -> str:
    """The submodule name :func:`lift` gives the layer whose weight is ``weight_fqn``."""
    return weight_fqn.removesuffix(".weight").replace(".", "_")


def lift(model: LoadedModel) -> torch.nn.Module:
    """A trainable module with real layers that computes what ``model`` computes.

    pt2: a new ``torch.fx.GraphModule`` (in eval mode, every float parameter requiring
    grad) whose parameters and buffers are copies, so training or pruning it leaves
    ``model`` untouched. Parameters that feed no liftable layer keep their FQN as graph
    attributes. hf: the transformers module itself.

    Raises:
        UnsupportedError: the format has no module form (onnx).
    """
    if model.format == "hf":
        if model.module is None:
            raise UnsupportedError("this hf model was loaded without its module", step="lift")
        return model.module
    if model.format != "pt2" or model.program is None:
        raise UnsupportedError(
            f"{model.format} models have no PyTorch module form; lifting needs pt2 or hf",
            step="lift",
        )
    return _lift_program(model)


def relower(
    model: LoadedModel,
    module: torch.nn.Module,
    *,
    example_inputs: dict[str, np.ndarray] | None = None,
) -> LoadedModel:
    """Export ``module`` (usually a lifted, then changed, module) as ``model``'s successor.

    pt2: ``torch.export`` with ``model``'s input signature and dynamic dims (through
    :func:`worker.formats.reexport_pt2`), in eval mode; ``example_inputs`` (arrays by
    input name) are traced with instead of generated inputs. Works after layers changed
    shape (pruned channels) or type (quantized layers), as long as the inputs and the
    meaning of the outputs did not. hf: ``model`` with ``module`` in place.

    Raises:
        UnsupportedError: the module cannot be exported, or lost a dynamic dim.
    """
    if model.format == "hf":
        return dataclasses.replace(model, module=module)
    if model.format != "pt2":
        raise UnsupportedError(f"cannot re-export a module as {model.format}", step="relower")
    from worker.formats import reexport_pt2

    module.eval()
    return reexport_pt2(module, model, example_inputs)


# --------------------------------------------------------------------------------------
# Lifting


class _Layer(NamedTuple):
    """A layer built from one aten call: the module, its weight's FQN, the call's input."""

    module: nn.Module
    weight: str
    input: fx.Node


def _lift_program(model: LoadedModel) -> fx.GraphModule:
    import torch

    from worker.packing import layout_name

    assert model.program is not None
    source = model.program.module()
    graph = source.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)  # input guards of the unlifted module, not model code

    layers: dict[str, nn.Module] = {}  # by weight FQN: a shared weight makes one layer
    calls: dict[str, list[fx.Node]] = {}
    for node in list(graph.nodes):
        lifter = _ops().lifters.get(node.target) if node.op == "call_function" else None
        found = lifter(node, source) if lifter is not None else None
        if found is None:
            continue  # computed weights, transposed or training-mode ops stay aten calls
        known = layers.setdefault(found.weight, found.module)
        if known is not found.module and not _same_layer(known, found.module):
            continue
        with graph.inserting_before(node):
            call = graph.create_node(
                "call_module", found.weight, (found.input,), name=lifted_name(found.weight)
            )
        call.meta = dict(node.meta)
        if node.target in _ops().native_bn:
            for user in list(node.users):  # getitem(bn, 0): the normalized output
                user.replace_all_uses_with(call)
                graph.erase_node(user)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        calls.setdefault(found.weight, []).append(call)
    _flatten_views(graph)
    _remove_dead_reads(graph)

    root = torch.nn.Module()
    reads = [n for n in graph.nodes if n.op == "get_attr"]
    taken = {str(n.target).split(".", 1)[0] for n in reads if n.target not in calls}
    names: dict[str, str] = {}
    for weight, nodes in calls.items():
        name = lifted_name(weight)
        candidate, i = name, 1
        while candidate in taken:
            candidate, i = f"{name}_{i}", i + 1
        taken.add(candidate)
        names[weight] = candidate
        root.add_module(candidate, layers[weight])
        for call in nodes:
            call.target = candidate
    for read in reads:
        if read.target in names:  # a tied weight also read elsewhere stays one tensor
            read.target = f"{names[str(read.target)]}.weight"
        else:
            _copy_state(source, root, str(read.target))
    lifted = torch.fx.GraphModule(root, graph, class_name="LiftedModule")
    # A packed layer's layout is read by squish's metrics, not by the graph: neither
    # ``source`` nor the GraphModule keeps it on its own.
    program_state = model.program.state_dict
    for read in reads:
        layout = layout_name(str(read.target))
        if layout is not None and layout in program_state:
            owner_path, _, attr = layout.rpartition(".")
            owner = lifted.get_submodule(owner_path) if owner_path else lifted
            owner.register_buffer(attr, program_state[layout].clone())
    lifted.eval()
    for param in lifted.parameters():
        param.requires_grad_(param.is_floating_point())
    return lifted


def _same_layer(a: nn.Module, b: nn.Module) -> bool:
    """Whether a second call with a shared weight computes what the first layer does."""
    return type(a) is type(b) and a.extra_repr() == b.extra_repr()


def _flatten_views(graph: fx.Graph) -> None:
    """``view``/``reshape`` calls that flatten trailing dims become ``aten.flatten``.

    Exported graphs spell ``x.flatten(1)`` as ``view(x, [batch, 64])`` with the channel
    count as a literal; once pruning removes channels, that literal would be wrong.
    """
    import torch

    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (
            aten.view.default,
            aten.reshape.default,
            aten._unsafe_view.default,
        ):
            continue
        source = node.args[0]
        before = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        after = node.meta.get("val")
        if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
            continue
        start = after.ndim - 1
        if start < 0 or before.ndim <= after.ndim:
            continue
        same_lead = all(_same_dim(before.shape[i], after.shape[i]) for i in range(start))
        if not same_lead:
            continue
        with graph.inserting_before(node):
            flat = graph.call_function(aten.flatten.using_ints, (source, start, -1))
        flat.meta = dict(node.meta)
        node.replace_all_uses_with(flat)
        graph.erase_node(node)


def _same_dim(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # an undecidable symbolic comparison
        return False


def _remove_dead_reads(graph: fx.Graph) -> None:
    """Drop the weight reads, transposes and size queries the lifted layers replaced."""
    for node in reversed(list(graph.nodes)):
        if node.users or node.op not in ("get_attr", "call_function"):
            continue
        if node.op == "call_function" and node.is_impure():
            continue
        graph.erase_node(node)


def _attr_target(arg: Any) -> str | None:
    import torch

    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        return str(arg.target)
    return None


def _tensor(source: nn.Module, arg: Any) -> torch.Tensor | None:
    """The tensor a get_attr node reads, or None for a missing (None) argument."""
    target = _attr_target(arg)
    if target is None:
        return None
    owner_path, _, attr = target.rpartition(".")
    owner = source.get_submodule(owner_path) if owner_path else source
    value = getattr(owner, attr)
    return value  # type: ignore[no-any-return]


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def _param(tensor: torch.Tensor) -> torch.nn.Parameter:
    import torch

    return torch.nn.Parameter(tensor.detach().clone(), requires_grad=tensor.is_floating_point())


def _is_attr_or_none(*args: Any) -> bool:
    return all(a is None or _attr_target(a) is not None for a in args)


def _input(node: fx.Node, index: int = 0) -> fx.Node | None:
    import torch

    arg = node.args[index]
    return arg if isinstance(arg, torch.fx.Node) else None


def _linear(weight_arg: Any, bias_arg: Any, source: nn.Module, x: fx.Node | None) -> _Layer | None:
    import torch

    weight_fqn = _attr_target(weight_arg)
    if weight_fqn is None or x is None or not _is_attr_or_none(bias_arg):
        return None
    weight = _tensor(source, weight_arg)
    bias = _tensor(source, bias_arg)
    if weight is None or weight.ndim != 2:
        return None
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = _param(weight)
    if bias is not None:
        layer.bias = _param(bias)
    return _Layer(layer, weight_fqn, x)


def _lift_linear(node: fx.Node, source: nn.Module) -> _Layer | None:
    """``aten.linear(x, w, b=None)``."""
    return _linear(node.args[1], _arg(node, 2, "bias", None), source, _input(node))


def _transposed_weight(arg: Any) -> Any:
    """``w`` of ``permute(w, [1, 0])`` or ``t(w)`` (how decomposed graphs spell a Linear)."""
    import torch

    aten = torch.ops.aten
    if not isinstance(arg, torch.fx.Node) or arg.op != "call_function":
        return None
    if arg.target is aten.t.default:
        return arg.args[0]
    dims: Any = arg.args[1]
    if arg.target is aten.permute.default and list(dims) == [1, 0]:
        return arg.args[0]
    return None


def _lift_addmm(node: fx.Node, source: nn.Module) -> _Layer | None:
    """``aten.addmm(b, x, permute(w, [1, 0]))`` (beta = alpha = 1): a decomposed Linear."""
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    bias_arg = node.args[0]
    if _attr_target(bias_arg) is None:
        return None
    return _linear(_transposed_weight(node.args[2]), bias_arg, source, _input(node, 1))


def _lift_mm(node: fx.Node, source: nn.Module) -> _Layer | None:
    """``aten.mm(x, permute(w, [1, 0]))``: a decomposed Linear without bias."""
    return _linear(_transposed_weight(node.args[1]), None, source, _input(node))


def _conv(
    node: fx.Node,
    bias_arg: Any,
    source: nn.Module,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: int,
) -> _Layer | None:
    import torch

    weight_fqn = _attr_target(node.args[1])
    x = _input(node)
    if weight_fqn is None or x is None or not _is_attr_or_none(bias_arg):
        return None
    weight = _tensor(source, node.args[1])
    bias = _tensor(source, bias_arg)
    assert weight is not None
    cls: Any = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d}.get(weight.ndim)
    if cls is None:
        return None
    spatial = weight.ndim - 2
    layer = cls(
        weight.shape[1] * groups,
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=_tuple(stride, spatial),
        padding=padding if isinstance(padding, str) else _tuple(padding, spatial),
        dilation=_tuple(dilation, spatial),
        groups=groups,
        bias=bias is not None,
        device="meta",
    )
    layer.weight = _param(weight)
    if bias is not None:
        layer.bias = _param(bias)
    return _Layer(layer, weight_fqn, x)


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    values = tuple(int(v) for v in value)
    return values * n if len(values) == 1 else values


def _lift_conv(node: fx.Node, source: nn.Module) -> _Layer | None:
    """``aten.conv1d/conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1)``."""
    return _conv(
        node,
        _arg(node, 2, "bias", None),
        source,
        _arg(node, 3, "stride", 1),
        _arg(node, 4, "padding", 0),
        _arg(node, 5, "dilation", 1),
        int(_arg(node, 6, "groups", 1)),
    )


def _lift_convolution(node: fx.Node, source: nn.Module) -> _Layer | None:
    """``aten.convolution(x, w, b, stride, padding, dilation, transposed, out_pad, groups)``."""
    args: Any = node.args
    if args[6] or any(int(p) for p in args[7]):
        return None  # transposed convolutions stay aten calls
    return _conv(node, args[2], source, args[3], args[4], args[5], int(args[8]))


def _lift_batch_norm(node: fx.Node, source: nn.Module) -> _Layer | None:
    """``aten.batch_norm(x, w, b, mean, var, training, momentum, eps, cudnn)`` and the
    ``_native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)`` form."""
    import torch

    args: Any = node.args
    if node.target in _ops().native_bn:
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
            return None  # the saved statistics are used: not a plain inference BN
        mean_arg, var_arg, momentum, eps = args[3], args[4], args[5], args[6]
        training = False
    else:
        mean_arg, var_arg, training, momentum, eps = args[3], args[4], args[5], args[6], args[7]
    weight_fqn = _attr_target(args[1])
    x = _input(node)
    if training or weight_fqn is None or x is None:
        return None  # a BN exported in training mode normalizes with batch statistics
    if not all(_attr_target(a) is not None for a in (args[2], mean_arg, var_arg)):
        return None
    val = x.meta.get("val")
    rank = val.ndim if isinstance(val, torch.Tensor) else 0
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}.get(rank)
    weight = _tensor(source, args[1])
    if cls is None or weight is None:
        return None
    layer = cls(weight.shape[0], eps=float(eps), momentum=float(momentum))
    layer.weight = _param(weight)
    layer.bias = _param(_tensor(source, args[2]))  # type: ignore[arg-type]
    layer.running_mean = _tensor(source, mean_arg).detach().clone()  # type: ignore[union-attr]
    layer.running_var = _tensor(source, var_arg).detach().clone()  # type: ignore[union-attr]
    return _Layer(layer, weight_fqn, x)


def _lift_layer_norm(node: fx.Node, source: nn.Module) -> _Layer | None:
    """``aten.layer_norm(x, normalized_shape, weight, bias, eps, cudnn)``."""
    import torch

    weight_arg = _arg(node, 2, "weight", None)
    bias_arg = _arg(node, 3, "bias", None)
    weight_fqn = _attr_target(weight_arg)
    x = _input(node)
    if weight_fqn is None or x is None or not _is_attr_or_none(bias_arg):
        return None
    weight = _tensor(source, weight_arg)
    bias = _tensor(source, bias_arg)
    assert weight is not None
    dims: Any = node.args[1]
    shape = tuple(int(d) for d in dims)
    layer = torch.nn.LayerNorm(
        shape, eps=float(_arg(node, 4, "eps", 1e-5)), bias=bias is not None, device="meta"
    )
    layer.weight = _param(weight)
    if bias is not None:
        layer.bias = _param(bias)
    return _Layer(layer, weight_fqn, x)


class _OpTables(NamedTuple):
    lifters: dict[Any, Callable[[fx.Node, nn.Module], _Layer | None]]
    native_bn: frozenset[Any]  # ops returning (out, saved_mean, saved_invstd)


@functools.cache
def _ops() -> _OpTables:
    """Which aten ops become which layers (built on first use: importing stays cheap)."""
    import torch

    aten = torch.ops.aten
    return _OpTables(
        lifters={
            aten.linear.default: _lift_linear,
            aten.addmm.default: _lift_addmm,
            aten.mm.default: _lift_mm,
            aten.conv1d.default: _lift_conv,
            aten.conv2d.default: _lift_conv,
            aten.conv1d.padding: _lift_conv,
            aten.conv2d.padding: _lift_conv,
            aten.convolution.default: _lift_convolution,
            aten.batch_norm.default: _lift_batch_norm,
            aten._native_batch_norm_legit_no_training.default: _lift_batch_norm,
            aten.layer_norm.default: _lift_layer_norm,
        },
        native_bn=frozenset({aten._native_batch_norm_legit_no_training.default}),
    )


def _copy_state(source: nn.Module, root: nn.Module, target: str) -> None:
    """Give ``root`` a copy of the parameter, buffer or constant at ``target``."""
    import torch

    *path, attr = target.split(".")
    src, dst = source, root
    for part in path:
        src = getattr(src, part)
        child = getattr(dst, part, None)
        if child is None:
            child = torch.nn.Module()
            dst.add_module(part, child)
        dst = child
    if attr in dst.__dict__ or attr in dst._parameters or attr in dst._buffers:
        return
    value = getattr(src, attr)
    if attr in src._parameters:
        dst.register_parameter(attr, _param(value))
    elif attr in src._buffers:
        dst.register_buffer(attr, value.detach().clone())
    elif isinstance(value, torch.Tensor):
        setattr(dst, attr, value.detach().clone())
    else:
        setattr(dst, attr, copy.deepcopy(value))


# --------------------------------------------------------------------------------------
# Re-lowering
