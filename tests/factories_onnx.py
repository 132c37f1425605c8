"""ONNX graphs as third-party exporters write them, built in code with tiny random weights.

Base graphs (:func:`conv_classifier`, :func:`mlp`, :func:`two_inputs_two_outputs`,
:func:`int32_ids_classifier`) are plain ``onnx.helper`` graphs; the rewrites reproduce
what exporters do to them: weights as ``Constant`` nodes (paddle2onnx), a batch dim of
``-1`` or ``0`` instead of a name, an old opset, external data files. Every function is
deterministic (fixed seeds).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

Dim = int | str


def _tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
    opset: int,
) -> onnx.ModelProto:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, "quirks", inputs, outputs, initializers)
    # IR version 7 is what opset-11..13 exporters wrote; newer opsets need a newer IR.
    ir_version = 7 if opset <= 13 else 8 if opset <= 17 else 9
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )
    model.producer_name = "squish-tests"
    onnx.checker.check_model(model)
    return model


def _info(name: str, elem_type: int, shape: list[Dim]) -> onnx.ValueInfoProto:
    from onnx import helper

    return helper.make_tensor_value_info(name, elem_type, shape)


def conv_classifier(
    *,
    opset: int = 17,
    batch: Dim = "N",
    height: Dim = 8,
    width: Dim = 8,
    channels: int = 8,
    classes: int = 10,
    input_name: str = "input",
    output_name: str = "logits",
    seed: int = 0,
) -> onnx.ModelProto:
    """Conv-dominated image classifier ``[batch, 1, H, W] -> [batch, classes]``: two 3x3
    convolutions with ReLU, a depthwise 3x3 one, global average pooling, a Gemm head."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    c = channels
    weights = {
        "conv1.w": rng.standard_normal((c, 1, 3, 3)) * 0.5,
        "conv1.b": rng.standard_normal(c) * 0.1,
        "conv2.w": rng.standard_normal((c, c, 3, 3)) * (1.0 / np.sqrt(9 * c)),
        "conv2.b": rng.standard_normal(c) * 0.1,
        "dw.w": rng.standard_normal((c, 1, 3, 3)) * 0.4,
        "dw.b": rng.standard_normal(c) * 0.1,
        "fc.w": rng.standard_normal((classes, c)) * (1.0 / np.sqrt(c)),
        "fc.b": rng.standard_normal(classes) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", [input_name, "conv1.w", "conv1.b"], ["c1"], name="conv1",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.w", "conv2.b"], ["c2"], name="conv2",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "dw.w", "dw.b"], ["c3"], name="dw", group=c,
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], [output_name], name="fc", transB=1),
    ]  # fmt: skip
    return _model(
        nodes,
        [_info(input_name, TensorProto.FLOAT, [batch, 1, height, width])],
        [_info(output_name, TensorProto.FLOAT, [batch, classes])],
        [_tensor(k, v.astype(np.float32)) for k, v in weights.items()],
        opset,
    )


def fully_convolutional(*, opset: int = 17, channels: int = 8, seed: int = 0) -> onnx.ModelProto:
    """A text-detector-like map ``[batch, 3, H, W] -> [batch, 1, H, W]`` of probabilities:
    convolutions only, no MatMul or Gemm."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    c = channels
    weights = {
        "backbone.w": rng.standard_normal((c, 3, 3, 3)) * (1.0 / np.sqrt(27)),
        "backbone.b": rng.standard_normal(c) * 0.1,
        "neck.w": rng.standard_normal((c, c, 3, 3)) * (1.0 / np.sqrt(9 * c)),
        "neck.b": rng.standard_normal(c) * 0.1,
        "head.w": rng.standard_normal((1, c, 1, 1)) * (1.0 / np.sqrt(c)),
        "head.b": rng.standard_normal(1) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "backbone.w", "backbone.b"], ["c1"], name="backbone",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "neck.w", "neck.b"], ["c2"], name="neck",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "head.w", "head.b"], ["logit"], name="head"),
        helper.make_node("Sigmoid", ["logit"], ["maps"], name="sigmoid"),
    ]  # fmt: skip
    return _model(
        nodes,
        [_info("x", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [_info("maps", TensorProto.FLOAT, ["batch", 1, "height", "width"])],
        [_tensor(k, v.astype(np.float32)) for k, v in weights.items()],
        opset,
    )


def mlp(
    *, opset: int = 17, batch: Dim = "N", features: int = 32, hidden: int = 64, classes: int = 8,
    seed: int = 0,
) -> onnx.ModelProto:  # fmt: skip
    """``[batch, features] -> [batch, classes]``: MatMul + Add + ReLU, then a Gemm."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    weights = {
        "fc1.w": rng.standard_normal((features, hidden)) / np.sqrt(features),
        "fc1.b": rng.standard_normal(hidden) * 0.1,
        "fc2.w": rng.standard_normal((classes, hidden)) / np.sqrt(hidden),
        "fc2.b": rng.standard_normal(classes) * 0.1,
    }
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.w"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "fc1.b"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h"], name="relu"),
        helper.make_node("Gemm", ["h", "fc2.w", "fc2.b"], ["y"], name="fc2", transB=1),
    ]
    return _model(
        nodes,
        [_info("x", TensorProto.FLOAT, [batch, features])],
        [_info("y", TensorProto.FLOAT, [batch, classes])],
        [_tensor(k, v.astype(np.float32)) for k, v in weights.items()],
        opset,
    )


def two_inputs_two_outputs(*, opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """An image and a feature vector in; logits and the image embedding out."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    weights = {
        "conv.w": rng.standard_normal((8, 1, 3, 3)) * 0.5,
        "conv.b": rng.standard_normal(8) * 0.1,
        "meta.w": rng.standard_normal((4, 8)) * 0.5,
        "head.w": rng.standard_normal((16, 5)) * 0.25,
        "head.b": rng.standard_normal(5) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["image", "conv.w", "conv.b"], ["c"], name="conv",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["embedding"], name="flatten"),
        helper.make_node("MatMul", ["meta", "meta.w"], ["m"], name="meta_fc"),
        helper.make_node("Concat", ["embedding", "m"], ["joined"], name="concat", axis=1),
        helper.make_node("MatMul", ["joined", "head.w"], ["h"], name="head"),
        helper.make_node("Add", ["h", "head.b"], ["logits"], name="head_bias"),
    ]  # fmt: skip
    return _model(
        nodes,
        [
            _info("image", TensorProto.FLOAT, ["batch", 1, 8, 8]),
            _info("meta", TensorProto.FLOAT, ["batch", 4]),
        ],
        [
            _info("logits", TensorProto.FLOAT, ["batch", 5]),
            _info("embedding", TensorProto.FLOAT, ["batch", 8]),
        ],
        [_tensor(k, v.astype(np.float32)) for k, v in weights.items()],
        opset,
    )


def int32_ids_classifier(
    *, opset: int = 13, vocab: int = 50, dim: int = 32, classes: int = 3, seed: int = 0
) -> onnx.ModelProto:
    """tf2onnx style: an int32 token-id input named ``input_ids:0``, an embedding Gather,
    a mean over the tokens, a MatMul head, an output named ``Identity:0``."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    weights = {
        "embedding": rng.standard_normal((vocab, dim)),
        "dense/kernel": rng.standard_normal((dim, dim)) / np.sqrt(dim),
        "dense/bias": rng.standard_normal(dim) * 0.1,
        "out/kernel": rng.standard_normal((dim, classes)) / np.sqrt(dim),
    }
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids:0"], ["emb"], name="embed", axis=0),
        helper.make_node("ReduceMean", ["emb"], ["mean"], name="mean", axes=[1], keepdims=0),
        helper.make_node("MatMul", ["mean", "dense/kernel"], ["d0"], name="dense"),
        helper.make_node("Add", ["d0", "dense/bias"], ["d1"], name="dense_bias"),
        helper.make_node("Relu", ["d1"], ["d"], name="relu"),
        helper.make_node("MatMul", ["d", "out/kernel"], ["Identity:0"], name="out"),
    ]
    return _model(
        nodes,
        [_info("input_ids:0", TensorProto.INT32, ["unk__10", "unk__11"])],
        [_info("Identity:0", TensorProto.FLOAT, ["unk__10", classes])],
        [_tensor(k, v.astype(np.float32)) for k, v in weights.items()],
        opset,
    )


# --- what exporters do to them ---------------------------------------------------------


def weights_as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer moved into a ``Constant`` node at the top of the graph, as
    paddle2onnx writes weights."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    constants = [
        helper.make_node("Constant", [], [t.name], name=f"{t.name}_const", value=t)
        for t in graph.initializer
    ]
    names = {t.name for t in graph.initializer}
    nodes = constants + list(graph.node)
    inputs = [v for v in graph.input if v.name not in names]
    del graph.initializer[:]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.extend(inputs)
    onnx.checker.check_model(out)
    return out


def batch_dim(model: onnx.ModelProto, value: int = -1) -> onnx.ModelProto:
    """Axis 0 of every graph input and output written as ``value`` (``-1`` or ``0``), as
    some exporters write an unknown batch instead of naming it."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for info in [*out.graph.input, *out.graph.output]:
        dim = info.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = value
    return out


def save(model: onnx.ModelProto, path: Path) -> Path:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def save_with_external_data(model: onnx.ModelProto, path: Path) -> Path:
    """Weights in a side file next to ``path`` (``path.name + '.data'``)."""
    import onnx

    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=path.name + ".data", size_threshold=0,
    )  # fmt: skip
    return path


def float_weight_count(model: onnx.ModelProto) -> int:
    """Float weights the graph holds, in initializers or Constant nodes (counted here
    independently of squish)."""
    from onnx import TensorProto, numpy_helper

    tensors = list(model.graph.initializer)
    tensors += [
        a.t
        for n in model.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    ]
    return sum(numpy_helper.to_array(t).size for t in tensors if t.data_type == TensorProto.FLOAT)


def samples(
    model: onnx.ModelProto, n: int, *, seed: int = 1, vocab: int = 50
) -> dict[str, np.ndarray]:
    """``n`` inputs for every graph input (initializers excepted): standard normal floats,
    token ids below ``vocab`` for integers; axis 0 of size ``n``, any other unfixed dim 8."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        ttype = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        shape = [
            d.dim_value if d.dim_value > 0 else (n if axis == 0 else 8)
            for axis, d in enumerate(ttype.shape.dim)
        ]
        if dtype.kind == "f":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = rng.integers(0, vocab, size=shape).astype(dtype)
    return feeds
