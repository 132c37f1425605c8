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
with another API), so squish does it here, on the ONNX graph (numpy, onnx, ONNX Runtime).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

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
        tensor: the smoothed tensor's name.
        layers: the nodes whose weights took ``s`` (those reading the tensor).
        folded_into: the node whose parameters took ``1/s`` (a LayerNormalization, or a
            MatMul/Gemm and its bias), or None when a ``Mul`` was inserted.
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
    """What :func:`smooth_onnx` did: the new graph, the smoothed inputs, the inserted nodes."""

    proto: onnx.ModelProto
    inputs: list[SmoothedInput]
    inserted: list[str]

    def summary(self) -> dict[str, Any]:
        """The job log's figures: counts and the largest activation ranges before/after."""
        folded = sum(1 for s in self.inputs if s.folded_into is not None)
        return {
            "smoothed_inputs": len(self.inputs),
            "smoothed_layers": sum(len(s.layers) for s in self.inputs),
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
