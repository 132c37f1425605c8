"""MACs: multiply-accumulates of the matmul and convolution ops, for one sample."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from worker.context import Reporter
from worker.contract import ModelFormat
from worker.errors import UnsupportedError
from worker.formats import LoadedModel, Runtime
from worker.measurement.runs import make_batch

if TYPE_CHECKING:
    import onnx


def count_macs(runtime: Runtime, inputs: dict[str, np.ndarray], reporter: Reporter) -> int | None:
    """MACs for one sample (batch 1, or static batch / B); None (logged) if not countable."""
    model = runtime.model
    batch = model.static_batch or 1
    feeds = make_batch(inputs, batch)
    try:
        counter = _COUNTERS.get(ModelFormat(model.format))
        if counter is None:
            raise UnsupportedError(
                f"the kernels of {model.format} models run outside PyTorch's dispatcher "
                "and an ONNX graph, where squish counts MACs"
            )
        total = counter(runtime, feeds)
    except UnsupportedError as exc:
        reporter.log(f"macs not measured: {exc.message}", "warning")
        return None
    return round(total / batch)


def _torch_macs(runtime: Runtime, feeds: dict[str, np.ndarray]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    if runtime.device != "cpu":
        raise UnsupportedError("counted on CPU workers only")
    counter = FlopCounterMode(display=False)
    with counter:
        runtime(feeds)
    return counter.get_total_flops() / 2


_COUNTERS: dict[ModelFormat, Callable[[Runtime, dict[str, np.ndarray]], float]] = {
    ModelFormat.pt2: _torch_macs,
    ModelFormat.hf: _torch_macs,
    ModelFormat.onnx: lambda runtime, feeds: _onnx_macs(runtime.model, feeds),
}


_ONNX_MAC_OPS = {
    # op type -> (input index of A / data, input index of the weight)
    "MatMul": (0, 1),
    "MatMulInteger": (0, 1),
    "QLinearMatMul": (0, 3),
    "Gemm": (0, 1),
    "Conv": (0, 1),
    "ConvInteger": (0, 1),
    "QLinearConv": (0, 3),
    "ConvTranspose": (0, 1),
}


def _onnx_macs(model: LoadedModel, feeds: dict[str, np.ndarray]) -> float:
    return sum(onnx_macs_by_op(model, feeds).values())


def onnx_macs_by_op(model: LoadedModel, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """MACs by op type, from shapes inferred with the inputs pinned to ``feeds``' shapes.

    ONNX's own shape inference first; where its data propagation stops (``Range`` and
    ``Slice`` on shapes, as in the attention masks of exported transformers), ONNX
    Runtime's symbolic shape inference, without the exporter's symbolic value_info.
    """
    import onnx

    assert model.proto is not None
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    for value in proto.graph.input:
        if value.name in feeds:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, feeds[value.name].shape, strict=True):
                dim.Clear()
                dim.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        return _macs_by_op(inferred)
    except (onnx.shape_inference.InferenceError, ValueError, UnsupportedError) as exc:
        first = exc
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    del proto.graph.value_info[:]
    try:
        inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    except Exception as exc:  # the tool raises assorted types on graphs it cannot follow
        raise UnsupportedError(f"ONNX shape inference failed: {first}") from exc
    if inferred is None:
        raise UnsupportedError(f"ONNX shape inference failed: {first}")
    return _macs_by_op(inferred)


def _macs_by_op(inferred: onnx.ModelProto) -> dict[str, float]:
    shapes: dict[str, list[int] | None] = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = (
            [d.dim_value for d in dims] if all(d.HasField("dim_value") for d in dims) else None
        )
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    total: dict[str, float] = {}
    for node in inferred.graph.node:
        if node.op_type not in _ONNX_MAC_OPS or node.domain not in ("", "ai.onnx"):
            continue
        a_index, w_index = _ONNX_MAC_OPS[node.op_type]
        a_shape = shapes.get(node.input[a_index])
        w_shape = shapes.get(node.input[w_index])
        out_shape = shapes.get(node.output[0])
        if a_shape is None or w_shape is None or out_shape is None:
            raise UnsupportedError(
                f"the shapes around {node.op_type} node {node.name!r} are unknown"
            )
        out_numel = int(np.prod(out_shape))
        if node.op_type in ("MatMul", "MatMulInteger", "QLinearMatMul"):
            macs = out_numel * a_shape[-1]
        elif node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            macs = out_numel * (a_shape[0] if trans_a else a_shape[-1])
        elif node.op_type == "ConvTranspose":
            macs = int(np.prod(a_shape)) * int(np.prod(w_shape[1:]))
        else:
            macs = out_numel * int(np.prod(w_shape[1:]))
        total[node.op_type] = total.get(node.op_type, 0.0) + macs
    return total
