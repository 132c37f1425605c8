"""onnx: a single self-contained ``.onnx`` file, run with ONNX Runtime.

Checked by :mod:`worker.safety.onnx` (external data is refused: its paths would point at
files on the worker; ``onnx.checker`` must accept the model). It runs in an
``onnxruntime.InferenceSession`` (CPU provider, or CUDA for ``gpu``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.contract import ModelFormat
from worker.errors import InvalidModelError, UnsupportedError
from worker.formats.base import Runner, refused
from worker.formats.types import LoadedModel, TensorSpec
from worker.safety import NotThisFormat
from worker.safety import onnx as onnx_safety

if TYPE_CHECKING:
    import onnx

MAX_PROTO_BYTES = 2**31
"""Protobuf's limit: a larger model needs external data files, which squish refuses."""


def load_onnx_proto(path: Path) -> onnx.ModelProto:
    """Load a single-file ONNX model and check it (worker.safety's ONNX rules)."""
    with refused():
        try:
            return onnx_safety.check_onnx_file(path)
        except NotThisFormat as exc:
            raise onnx_safety.not_onnx(exc) from None


def _onnx_value_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    import onnx

    ttype = value.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)).name
    except (KeyError, TypeError, ValueError):
        dtype = onnx.TensorProto.DataType.Name(ttype.elem_type).lower()
    shape: list[int | str] = []
    for i, dim in enumerate(ttype.shape.dim):
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        else:
            shape.append(dim.dim_param or f"{value.name}_dim{i}")
    return TensorSpec(value.name, tuple(shape), dtype)


def onnx_model_from_proto(proto: onnx.ModelProto) -> LoadedModel:
    """Wrap a ModelProto; graph inputs that are initializers are not model inputs."""
    initializer_names = {t.name for t in proto.graph.initializer}
    inputs = [_onnx_value_spec(v) for v in proto.graph.input if v.name not in initializer_names]
    outputs = [_onnx_value_spec(v) for v in proto.graph.output]
    return LoadedModel(ModelFormat.onnx, inputs, outputs, proto=proto)


_WEIGHT_DTYPES = frozenset(
    {"float16", "bfloat16", "float32", "float64", "int8", "uint8", "int4", "uint4"}
)


_ONNX_QUANT_METADATA_INPUTS: dict[str, tuple[int, ...]] = {
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
    "MatMulInteger": (2, 3),
    "ConvInteger": (2, 3),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "QLinearConv": (1, 2, 4, 5, 6, 7),
    "DynamicQuantizeMatMul": (2, 3),
    "MatMulIntegerToFloat": (2, 3, 4, 5),
}


def _onnx_weight_initializers(model: LoadedModel) -> list[onnx.TensorProto]:
    import onnx

    assert model.proto is not None
    graph = model.proto.graph
    metadata: set[str] = set()
    dql_scales = {n.output[1] for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
    for node in graph.node:
        for index in _ONNX_QUANT_METADATA_INPUTS.get(node.op_type, ()):
            if index < len(node.input):
                metadata.add(node.input[index])
        if node.op_type == "Mul" and any(i in dql_scales for i in node.input):
            metadata.update(node.input)
    weights = []
    for tensor in graph.initializer:
        if tensor.name in metadata:
            continue
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).name
        except (KeyError, TypeError, ValueError):
            dtype = onnx.TensorProto.DataType.Name(tensor.data_type).lower()
        if dtype in _WEIGHT_DTYPES:
            weights.append(tensor)
    return weights


class OnnxBackend:
    """The onnx format (see the module docstring)."""

    format = ModelFormat.onnx

    def load(self, path: Path) -> LoadedModel:
        return onnx_model_from_proto(load_onnx_proto(path))

    def save(self, model: LoadedModel, path: Path) -> None:
        """One file, ``onnx.save``; refused over protobuf's 2 GiB."""
        import onnx

        assert model.proto is not None
        if model.proto.ByteSize() >= MAX_PROTO_BYTES:
            raise UnsupportedError(
                "the ONNX model is over 2 GiB, which needs external data files; not supported",
                step="save",
            )
        onnx.save(model.proto, str(path))

    def layer_counts(self, model: LoadedModel) -> Counter[str]:
        """Node op types (``domain.op_type`` outside the default domain)."""
        assert model.proto is not None
        counts: Counter[str] = Counter()
        for node in model.proto.graph.node:
            counts[node.op_type if not node.domain else f"{node.domain}.{node.op_type}"] += 1
        return counts

    def describe(self, model: LoadedModel) -> dict[str, Any]:
        return {}

    def weight_arrays(self, model: LoadedModel) -> dict[str, np.ndarray]:
        from onnx import numpy_helper

        return {t.name: numpy_helper.to_array(t) for t in _onnx_weight_initializers(model)}

    def weight_shapes(self, model: LoadedModel) -> dict[str, tuple[int, ...]]:
        """Float and 8-bit initializers, except quantization metadata: scales and zero
        points of quantize/dequantize and integer matmul/conv ops, and the weight scales
        ONNX Runtime multiplies after an integer matmul."""
        return {t.name: tuple(t.dims) for t in _onnx_weight_initializers(model)}

    def vocab_size(self, model: LoadedModel) -> int | None:
        return None

    def runner(self, model: LoadedModel, path: Path, device: str) -> Runner:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device == "gpu":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UnsupportedError(
                    "device 'gpu' requested but onnxruntime on this worker has no CUDA provider"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise InvalidModelError(
                f"ONNX Runtime cannot load the model: {exc}", step="load"
            ) from exc

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            return [np.asarray(o) for o in session.run(None, feeds)]

        return run
