"""SmoothQuant: activation outliers migrated into the weights before static int8.

Static int8 gives every activation tensor one scale. Transformer encoders have a few input
channels of their Linear layers (after a LayerNorm, after GELU) whose values are tens of
times larger than the rest, so one scale wastes most of the 8 bits on them. SmoothQuant
(Xiao et al., 2023) divides each input channel ``j`` by

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

and multiplies the matching weight row by ``s_j``: ``(X / s) @ (s * W) = X @ W`` exactly in
float, while the activation's range evens out (``alpha`` = 1 moves all of it into the
weights, 0 none). ``max|X_j|`` is measured on the calibration data; layers that read the
same tensor (a block's query, key and value) share ``s``, with ``max|W_j|`` over all of them.

The division by ``s`` is folded into what produces the tensor when nothing else reads it: a
LayerNormalization's scale and bias, or a MatMul/Gemm's weight columns and its bias. Where
the tensor is read elsewhere too (a post-LN encoder's LayerNorm output also feeds the
residual connection) or comes from an op that does not commute with scaling (GELU), a
``Mul`` by ``1/s`` is inserted before the layers; it stays float (the quantizer is told to
leave it, which is what ONNX Runtime's own SmoothQuant option does), and the quantizer then
measures the smoothed tensor.

ONNX Runtime's ``SmoothQuant`` extra option imports ``neural_compressor.adaptor.ox_utils``,
which Intel Neural Compressor removed in 3.0 (its ONNX code moved to a separate package
with another API), so squish does it here, on the ONNX graph (numpy, onnx, ONNX Runtime):
:func:`smooth_onnx`.

pt2 programs are smoothed the same way before torchao's PT2E quantizer
(:func:`smooth_pt2`), on the ``torch.fx.GraphModule`` that ``ExportedProgram.module()``
gives: its linear layers are ``aten.linear.default`` calls whose weight (``[out, in]``, so
``s`` scales columns) is a ``get_attr``; ``max|X_j|`` is recorded by a ``torch.fx``
interpreter on the calibration batches; ``1/s`` is folded into a producing
``aten.layer_norm.default`` or ``aten.linear.default`` that nothing else reads, otherwise an
``aten.mul.Tensor`` by a ``1/s`` buffer is inserted. ``X86InductorQuantizer`` annotates a
``mul`` only when both its inputs have the same shape, so the inserted one (``[..., C]``
times ``[C]``) stays float and the observer of the linear layers' input sees the smoothed
tensor. Torch is imported inside the functions: this module loads without it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx
    import torch

DEFAULT_ALPHA = 0.5
_FLOOR = 1e-5  # a channel never seen non-zero (or an all-zero weight row) is left as it is
SMOOTH_SUFFIX = "_smoothed"
"""Appended to a tensor's name for the ``Mul`` inserted to smooth it and its output; its
``1/s`` constant adds ``_inverse`` (not ``_scale``: ONNX Runtime names the quantization
scale of tensor ``t`` ``t_scale``)."""


def smoothing_factors(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """Per input channel ``max|X_j|^alpha / max|W_j|^(1-alpha)``; 1 where either is zero."""
    act = np.asarray(act_max, dtype=np.float64)
    weight = np.asarray(weight_max, dtype=np.float64)
    usable = (act > _FLOOR) & (weight > _FLOOR)
    factors = np.ones_like(act)
    factors[usable] = act[usable] ** alpha / weight[usable] ** (1.0 - alpha)
    return factors.astype(np.float32)


@dataclass(frozen=True)
class SmoothedInput:
    """One smoothed tensor: the layers that read it and where ``1/s`` went.

    Attributes:
        tensor: the smoothed tensor's name (an ONNX tensor, a ``torch.fx`` node).
        layers: the layers whose weights took ``s`` (those reading the tensor): ONNX node
            names, pt2 module paths (``info.layer_names``).
        folded_into: the layer whose parameters took ``1/s`` (a LayerNorm, or a
            MatMul/Gemm/linear layer and its bias), or None when a ``Mul`` was inserted.
        range_before / range_after: ``max|X|`` over the tensor's channels, before and after
            smoothing (``max_j max|X_j| / s_j``).
    """

    tensor: str
    layers: tuple[str, ...]
    folded_into: str | None
    range_before: float
    range_after: float


@dataclass(frozen=True)
class SmoothingResult:
    """What :func:`smooth_onnx` or :func:`smooth_pt2` did: the smoothed model (a new
    ``onnx.ModelProto``; the ``torch.fx.GraphModule`` given, changed), the smoothed inputs,
    the inserted ``Mul`` nodes."""

    model: onnx.ModelProto | torch.fx.GraphModule
    inputs: list[SmoothedInput]
    inserted: list[str]

    def summary(self) -> dict[str, Any]:
        """The job log's figures: counts, the layers smoothed, where ``1/s`` went, and the
        largest activation ranges before/after."""
        folded = sum(1 for s in self.inputs if s.folded_into is not None)
        return {
            "smoothed_inputs": len(self.inputs),
            "smoothed_layers": sum(len(s.layers) for s in self.inputs),
            "layers": [name for s in self.inputs for name in s.layers],
            "folded_into": [s.folded_into for s in self.inputs if s.folded_into is not None],
            "folded": folded,
            "mul_inserted": len(self.inputs) - folded,
            "max_range_before": max((s.range_before for s in self.inputs), default=0.0),
            "max_range_after": max((s.range_after for s in self.inputs), default=0.0),
        }


@dataclass
class _Layer:
    node: onnx.NodeProto
    weight: str
    input_axis: int  # the weight axis that meets the activation's channels


def smooth_onnx(
    proto: onnx.ModelProto,
    batches: Iterable[dict[str, np.ndarray]],
    alpha: float = DEFAULT_ALPHA,
    *,
    skip: Sequence[str] = (),
) -> SmoothingResult:
    """``proto`` with its MatMul/Gemm layers' inputs smoothed (the module docstring).

    Args:
        proto: a float ONNX model; not modified.
        batches: calibration feeds (by input name) that ONNX Runtime runs to measure
            ``max|X_j|``.
        alpha: the migration strength, 0..1.
        skip: node names left as they are (a step's ``exclude``).

    Layers with a constant 2-D weight are smoothed: ``MatMul(X, W)`` (W is ``[K, N]``) and
    ``Gemm(X, W)`` (``[K, N]``, or ``[N, K]`` with ``transB``). A weight that layers reading
    different tensors share, and a tensor that is a graph output, are left alone.
    """
    import onnx
    from onnx import numpy_helper

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, not {alpha}")
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    producers: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
        for name in node.output:
            producers[name] = node
    # Graph outputs, and tensors that a subgraph (If, Loop) reads from this scope, have
    # readers the consumer map does not see: they are neither smoothed nor folded into.
    outputs = {o.name for o in graph.output} | _outer_scope_reads(graph)

    groups: dict[str, list[_Layer]] = defaultdict(list)
    for node in graph.node:
        layer = _smoothable(node, inits, set(skip))
        if layer is not None and node.input[0] not in inits and node.input[0] not in outputs:
            groups[node.input[0]].append(layer)
    # A weight shared by layers that read different tensors cannot take two scalings.
    readers: dict[str, set[str]] = defaultdict(set)
    for tensor, layers in groups.items():
        for layer in layers:
            readers[layer.weight].add(tensor)
    groups = {
        t: ls
        for t, ls in groups.items()
        if all(len(readers[ly.weight]) == 1 for ly in ls)
        and all(len(consumers[ly.weight]) == 1 for ly in ls)
    }
    if not groups:
        return SmoothingResult(model, [], [])

    act_max = _activation_ranges(model, list(groups), batches)
    smoothed: list[SmoothedInput] = []
    muls: list[onnx.NodeProto] = []
    for tensor, layers in groups.items():
        x_max = act_max.get(tensor)
        weights = [numpy_helper.to_array(inits[ly.weight]) for ly in layers]
        if x_max is None or any(
            w.shape[ly.input_axis] != x_max.shape[0] for w, ly in zip(weights, layers, strict=True)
        ):
            continue  # not a per-channel match (a broadcast MatMul of another rank)
        w_max = np.max(
            [np.abs(w).max(axis=1 - ly.input_axis) for w, ly in zip(weights, layers, strict=True)],
            axis=0,
        )
        factors = smoothing_factors(x_max, w_max, alpha)
        for weight, layer in zip(weights, layers, strict=True):
            shape = [1, 1]
            shape[layer.input_axis] = -1
            scaled = (weight * factors.reshape(shape)).astype(weight.dtype)
            inits[layer.weight].CopyFrom(numpy_helper.from_array(scaled, layer.weight))
        folded = _fold_division(tensor, factors, producers, consumers, inits, layers, outputs)
        if folded is None:
            muls.append(_insert_mul(graph, tensor, factors, layers, weights[0].dtype))
        smoothed.append(
            SmoothedInput(
                tensor=tensor,
                layers=tuple(ly.node.name for ly in layers),
                folded_into=folded,
                range_before=float(x_max.max()),
                range_after=float((x_max / factors).max()),
            )
        )
    _place(graph, muls)
    return SmoothingResult(model, smoothed, [m.name for m in muls])


def _outer_scope_reads(graph: onnx.GraphProto) -> set[str]:
    import onnx

    names: set[str] = set()
    stack = [
        sub
        for node in graph.node
        for attr in node.attribute
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)
    ]
    while stack:
        sub = stack.pop()
        for node in sub.node:
            names.update(node.input)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    return names


def _smoothable(
    node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], skip: set[str]
) -> _Layer | None:
    if node.name in skip or len(node.input) < 2 or node.input[1] not in inits:
        return None
    weight = inits[node.input[1]]
    if len(weight.dims) != 2 or weight.data_type not in (1, 10, 11):  # float, f16, double
        return None
    if node.op_type == "MatMul":
        return _Layer(node, node.input[1], 0)
    if node.op_type == "Gemm":
        attrs = {a.name: a for a in node.attribute}
        if "transA" in attrs and attrs["transA"].i:
            return None
        trans_b = "transB" in attrs and attrs["transB"].i
        return _Layer(node, node.input[1], 1 if trans_b else 0)
    return None


def _activation_ranges(
    model: onnx.ModelProto, tensors: list[str], batches: Iterable[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """``max|X_j|`` over the last axis' channels of each tensor, on every batch."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    inputs = [i.name for i in session.get_inputs()]
    ranges: dict[str, np.ndarray] = {}
    for batch in batches:
        values = session.run(tensors, {k: batch[k] for k in inputs})
        for name, value in zip(tensors, values, strict=True):
            array = np.asarray(value)
            if array.ndim == 0 or not np.issubdtype(array.dtype, np.floating):
                continue
            channel_max = np.abs(array.reshape(-1, array.shape[-1])).max(axis=0)
            ranges[name] = np.maximum(ranges[name], channel_max) if name in ranges else channel_max
    return ranges


def _only_read_by(
    tensor: str, consumers: dict[str, list[onnx.NodeProto]], layers: list[_Layer]
) -> bool:
    ids = {id(ly.node) for ly in layers}
    return all(id(node) in ids for node in consumers[tensor])


def _fold_division(
    tensor: str,
    factors: np.ndarray,
    producers: dict[str, onnx.NodeProto],
    consumers: dict[str, list[onnx.NodeProto]],
    inits: dict[str, onnx.TensorProto],
    layers: list[_Layer],
    outputs: set[str],
) -> str | None:
    """Divide what produces ``tensor`` by ``factors`` if only ``layers`` read it; the node's
    name, or None."""
    from onnx import numpy_helper

    producer = producers.get(tensor)
    if producer is None or tensor in outputs or not _only_read_by(tensor, consumers, layers):
        return None

    def private(name: str) -> bool:  # a constant that nothing else reads
        return name in inits and len(consumers[name]) == 1

    def divide(name: str, axis: int) -> None:
        array = numpy_helper.to_array(inits[name])
        shape = [1] * array.ndim
        shape[axis] = -1
        inits[name].CopyFrom(
            numpy_helper.from_array((array / factors.reshape(shape)).astype(array.dtype), name)
        )

    def channels(name: str, axis: int) -> bool:
        dims = inits[name].dims
        return len(dims) > axis >= -len(dims) and dims[axis] == len(factors)

    def matrix(name: str) -> bool:  # a private [K, N] weight whose N columns are the channels
        return private(name) and len(inits[name].dims) == 2 and channels(name, 1)

    if producer.op_type == "LayerNormalization":
        params = [n for n in producer.input[1:3] if n]
        if all(private(n) and len(inits[n].dims) == 1 and channels(n, 0) for n in params):
            for name in params:
                divide(name, 0)
            return producer.name
        return None
    if producer.op_type == "Add":  # a bias: Add(MatMul(x, W), b) with nothing else on it
        bias = next((n for n in producer.input if private(n) and channels(n, -1)), None)
        other = next((n for n in producer.input if n != bias), None)
        if bias is None or other is None or other in outputs or len(consumers[other]) != 1:
            return None
        inner = producers.get(other)
        if inner is None:
            return None
        if inner.op_type == "MatMul" and matrix(inner.input[1]):
            divide(inner.input[1], 1)
            divide(bias, len(inits[bias].dims) - 1)
            return inner.name
        return None
    if producer.op_type == "MatMul" and matrix(producer.input[1]):
        divide(producer.input[1], 1)
        return producer.name
    return None


def _insert_mul(
    graph: onnx.GraphProto,
    tensor: str,
    factors: np.ndarray,
    layers: list[_Layer],
    dtype: np.dtype,
) -> onnx.NodeProto:
    """A ``Mul`` by ``1/factors`` that ``layers`` read instead of ``tensor`` (not yet in the
    graph: :func:`_place` puts it)."""
    import onnx
    from onnx import numpy_helper

    taken = {n.name for n in graph.node} | {t.name for t in graph.initializer}
    base = tensor + SMOOTH_SUFFIX
    name, index = base, 0
    while name in taken or f"{name}_inverse" in taken:
        index += 1
        name = f"{base}_{index}"
    graph.initializer.append(
        numpy_helper.from_array((1.0 / factors).astype(dtype), f"{name}_inverse")
    )
    for layer in layers:
        layer.node.input[0] = name
    return onnx.helper.make_node("Mul", [tensor, f"{name}_inverse"], [name], name=name)


def _place(graph: onnx.GraphProto, muls: list[onnx.NodeProto]) -> None:
    """Put each inserted ``Mul`` right after the node that produces its input (first, for a
    graph input), which keeps the graph in the topological order ONNX requires."""
    produced = {name for node in graph.node for name in node.output}
    nodes = [mul for mul in muls if mul.input[0] not in produced]
    after: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for mul in muls:
        if mul.input[0] in produced:
            after[mul.input[0]].append(mul)
    for node in graph.node:
        nodes.append(node)
        for output in node.output:
            nodes.extend(after.pop(output, []))
    copies = []
    for node in nodes:
        copy = type(node)()
        copy.CopyFrom(node)
        copies.append(copy)
    del graph.node[:]
    graph.node.extend(copies)


# -- pt2 programs (torch.fx) ----------------------------------------------------------------


@dataclass
class _Linear:
    node: torch.fx.Node
    weight: str  # the get_attr target of its [out, in] weight
    name: str  # its layer name (module path), as exclude names it


def smooth_pt2(
    graph_module: torch.fx.GraphModule,
    batches: Iterable[tuple[tuple[Any, ...], dict[str, Any]]],
    alpha: float = DEFAULT_ALPHA,
    *,
    skip: Iterable[str] = (),
) -> SmoothingResult:
    """``graph_module`` with its linear layers' inputs smoothed (the module docstring).

    Args:
        graph_module: what ``ExportedProgram.module()`` gives; changed in place. Its
            tensors are replaced, never written into: that module shares them with the
            program's state dict.
        batches: ``(args, kwargs)`` of the program's forward, on which ``max|X_j|`` is
            measured.
        alpha: the migration strength, 0..1.
        skip: layer names (module paths, a step's resolved ``exclude``) whose parameters
            are left as they are: neither smoothed nor folded into.

    ``aten.linear.default`` calls with a float 2-D ``get_attr`` weight that nothing else
    reads are smoothed; those reading the same node share ``s``.
    """
    import torch

    from worker.layers import layer_of

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, not {alpha}")
    skipped = set(skip)
    graph = graph_module.graph
    readers = _attr_readers(graph)
    groups: dict[torch.fx.Node, list[_Linear]] = defaultdict(list)
    for node in graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.aten.linear.default:
            continue
        source, weight = node.args[0], node.args[1]
        if not isinstance(source, torch.fx.Node) or source.op == "get_attr":
            continue
        if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
            continue
        target = str(weight.target)
        tensor = _attr(graph_module, target)
        name = layer_of(target)
        if (
            name in skipped
            or readers[target] != 1
            or not isinstance(tensor, torch.Tensor)
            or tensor.ndim != 2
            or not tensor.is_floating_point()
        ):
            continue
        groups[source].append(_Linear(node, target, name))
    if not groups:
        return SmoothingResult(graph_module, [], [])

    act_max = _pt2_activation_ranges(graph_module, set(groups), batches)
    smoothed: list[SmoothedInput] = []
    inserted: list[str] = []
    with torch.no_grad():
        for source, layers in groups.items():
            x_max = act_max.get(source)
            weights = [_attr(graph_module, ly.weight) for ly in layers]
            if x_max is None or any(w.shape[1] != x_max.shape[0] for w in weights):
                continue
            w_max = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0)
            factors = smoothing_factors(x_max, w_max.double().numpy(), alpha)
            scale = torch.from_numpy(factors)
            for weight, layer in zip(weights, layers, strict=True):
                _set_attr(graph_module, layer.weight, weight.detach() * scale.to(weight.dtype))
            folded = _fold_pt2(graph_module, source, layers, scale, readers, skipped)
            if folded is None:
                inserted.append(_insert_pt2_mul(graph_module, source, layers, 1.0 / scale))
            smoothed.append(
                SmoothedInput(
                    tensor=source.name,
                    layers=tuple(ly.name for ly in layers),
                    folded_into=folded,
                    range_before=float(x_max.max()),
                    range_after=float((x_max / factors).max()),
                )
            )
    graph.lint()
    graph_module.recompile()
    return SmoothingResult(graph_module, smoothed, inserted)


def _attr_readers(graph: torch.fx.Graph) -> dict[str, int]:
    """How many nodes read each ``get_attr`` target (a tied weight has several)."""
    readers: dict[str, int] = defaultdict(int)
    for node in graph.nodes:
        if node.op == "get_attr":
            readers[str(node.target)] += len(node.users)
    return readers


def _attr(module: torch.nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _set_attr(module: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Point ``target`` at a new tensor, as the same kind of attribute it was."""
    import torch

    owner_path, _, name = target.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if name in owner._parameters:
        old = owner._parameters[name]
        grad = bool(old is not None and old.requires_grad)
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=grad)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def _pt2_activation_ranges(
    graph_module: torch.fx.GraphModule,
    nodes: set[torch.fx.Node],
    batches: Iterable[tuple[tuple[Any, ...], dict[str, Any]]],
) -> dict[torch.fx.Node, np.ndarray]:
    """``max|X_j|`` over the last axis' channels of each node's value, on every batch."""
    import torch
    from torch.utils import _pytree as pytree

    ranges: dict[torch.fx.Node, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            value = super().run_node(n)
            if (
                n in nodes
                and isinstance(value, torch.Tensor)
                and value.ndim > 0
                and value.is_floating_point()
            ):
                channel_max = value.detach().abs().reshape(-1, value.shape[-1]).amax(dim=0)
                channel_max = channel_max.double()
                ranges[n] = torch.maximum(ranges[n], channel_max) if n in ranges else channel_max
            return value

    recorder = Recorder(graph_module)
    with torch.no_grad():
        for args, kwargs in batches:
            # The graph's placeholders are the forward's inputs flattened by its in_spec.
            recorder.run(*pytree.tree_leaves((tuple(args), dict(kwargs))))
    return {n: r.numpy() for n, r in ranges.items()}


def _fold_pt2(
    graph_module: torch.fx.GraphModule,
    source: torch.fx.Node,
    layers: list[_Linear],
    scale: torch.Tensor,
    readers: dict[str, int],
    skipped: set[str],
) -> str | None:
    """Divide what produces ``source`` by ``scale`` if only ``layers`` read it: a LayerNorm's
    weight and bias, or a linear layer's weight rows and bias; that layer's name, or None."""
    import torch

    from worker.layers import layer_of

    if set(source.users) != {ly.node for ly in layers} or source.op != "call_function":
        return None
    channels = len(scale)

    def private(arg: object, rank: int) -> str | None:  # a get_attr only this node reads
        if not isinstance(arg, torch.fx.Node) or arg.op != "get_attr":
            return None
        target = str(arg.target)
        value = _attr(graph_module, target)
        ok = (
            readers[target] == 1
            and isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and value.ndim == rank
            and value.shape[0] == channels
        )
        return target if ok else None

    def divide(target: str) -> None:
        value = _attr(graph_module, target).detach()
        shape = [-1] + [1] * (value.ndim - 1)
        _set_attr(graph_module, target, value / scale.to(value.dtype).reshape(shape))

    if source.target == torch.ops.aten.layer_norm.default:
        args = list(source.args) + [None] * (4 - len(source.args))
        shape, weight_arg, bias_arg = args[1], args[2], args[3]
        weight = private(weight_arg, 1)
        bias = private(bias_arg, 1)
        one_axis = isinstance(shape, list | tuple) and len(shape) == 1
        if weight is None or (bias_arg is not None and bias is None) or not one_axis:
            return None
    elif source.target == torch.ops.aten.linear.default and len(source.args) >= 2:
        weight = private(source.args[1], 2)
        bias_arg = source.args[2] if len(source.args) > 2 else None
        bias = private(bias_arg, 1)
        if weight is None or (bias_arg is not None and bias is None):
            return None
    else:
        return None
    name = layer_of(weight)
    if name in skipped or (bias is not None and layer_of(bias) in skipped):
        return None
    for target in (weight, bias):
        if target is not None:
            divide(target)
    return name


def _insert_pt2_mul(
    graph_module: torch.fx.GraphModule,
    source: torch.fx.Node,
    layers: list[_Linear],
    inverse: torch.Tensor,
) -> str:
    """An ``aten.mul.Tensor(source, 1/s)`` that ``layers`` read instead of ``source``, its
    ``1/s`` a buffer of the module (a constant of the re-exported program); its name."""
    import torch

    graph = graph_module.graph
    taken = {n.name for n in graph.nodes}
    base = source.name + SMOOTH_SUFFIX
    name, index = base, 0
    while name in taken or hasattr(graph_module, f"{name}_inverse"):
        index += 1
        name = f"{base}_{index}"
    value = source.meta.get("val")
    dtype = value.dtype if isinstance(value, torch.Tensor) else inverse.dtype
    graph_module.register_buffer(f"{name}_inverse", inverse.to(dtype))
    with graph.inserting_after(source):
        constant = graph.get_attr(f"{name}_inverse")
    with graph.inserting_after(constant):
        mul = graph.call_function(torch.ops.aten.mul.Tensor, (source, constant))
    mul._rename(name)
    fake_mode = getattr(value, "fake_mode", None)
    if fake_mode is not None:  # what export writes, and what the quantizer reads
        with fake_mode:
            constant.meta["val"] = fake_mode.from_tensor(getattr(graph_module, f"{name}_inverse"))
            mul.meta["val"] = value * constant.meta["val"]
    if "nn_module_stack" in source.meta:
        mul.meta["nn_module_stack"] = dict(source.meta["nn_module_stack"])
    for layer in layers:
        layer.node.replace_input_with(source, mul)
    return mul.name
