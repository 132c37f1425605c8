"""ONNX models: one self-contained file (external data would point at files on the worker).

Two checks with the same rules: :func:`check_onnx_file` parses the file with ``onnx`` and runs
``onnx.checker``; :func:`scan_onnx_wire` walks the protobuf wire format with seeks, in
memory independent of the file's size, for files too large to parse in the API process.
The ``onnx`` package is imported inside the functions (it is not torch, but heavy).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from worker.safety import NotThisFormat, Unsafe

if TYPE_CHECKING:
    import onnx

__all__ = [
    "INVALID",
    "check_onnx_file",
    "check_onnx_model",
    "not_onnx",
    "parse_onnx",
    "scan_onnx_wire",
]

INVALID = "Invalid ONNX model"
MAX_PROTO_DEPTH = 64
MAX_PROTO_FIELDS = 20_000_000


def not_onnx(exc: NotThisFormat) -> Unsafe:
    """The refusal of a file that should be ONNX and is not (``exc`` says why)."""
    return Unsafe(
        f"the file is not a valid ONNX model ({exc.detail}); it may be corrupt or truncated",
        title=INVALID,
    )


def _external_data_refused(where: str) -> Unsafe:
    return Unsafe(
        f"the ONNX model keeps tensor data in external data files ({where}); upload a "
        "single-file model: export with `torch.onnx.export(..., external_data=False)` or "
        "re-save with `onnx.save_model(model, 'model.onnx', save_as_external_data=False)` "
        "(under 2 GB)",
        title="External ONNX data refused",
    )


def parse_onnx(path: Path) -> onnx.ModelProto:
    """The file as a ModelProto, external data not loaded.

    Raises:
        NotThisFormat: it does not parse as an ONNX protobuf, or holds no graph.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, and other types on odd input
        raise NotThisFormat(
            f"it does not parse as an ONNX protobuf: {exc}", title=INVALID
        ) from None
    if not model.HasField("graph"):
        raise NotThisFormat("it has no graph", title=INVALID)
    return model


def check_onnx_model(model: onnx.ModelProto) -> None:
    """No tensor kept in external data, at least one output, and onnx.checker's approval."""
    import onnx

    for where, tensor in _onnx_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            raise _external_data_refused(where or tensor.name)
    if not model.graph.output:
        raise Unsafe("the ONNX graph has no outputs", title=INVALID)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        message = str(exc).strip().splitlines()
        raise Unsafe(
            f"onnx.checker rejected the model: {message[0] if message else type(exc).__name__}",
            title=INVALID,
        ) from None


def check_onnx_file(path: Path) -> onnx.ModelProto:
    """Parse and check an ONNX file; return the checked ModelProto.

    Raises:
        NotThisFormat: not an ONNX protobuf at all.
        Unsafe: an ONNX model squish refuses.
    """
    model = parse_onnx(path)
    check_onnx_model(model)
    return model


def _onnx_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    """Every TensorProto in the model: initializers, sparse ones, and attribute tensors."""
    graphs: list[Any] = [model.graph]
    graphs += [g for info in model.training_info for g in (info.initialization, info.algorithm)]
    nodes: list[Any] = [node for function in model.functions for node in function.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            for tensor in graph.initializer:
                yield tensor.name, tensor
            for sparse in graph.sparse_initializer:
                yield sparse.values.name, sparse.values
                yield sparse.indices.name, sparse.indices
            nodes.extend(graph.node)
            continue
        node = nodes.pop()
        for attr in node.attribute:
            if attr.HasField("t"):
                yield f"{node.name}.{attr.name}", attr.t
            for tensor in attr.tensors:
                yield f"{node.name}.{attr.name}", tensor
            for sparse in [attr.sparse_tensor, *attr.sparse_tensors]:
                yield f"{node.name}.{attr.name}", sparse.values
            if attr.HasField("g"):
                graphs.append(attr.g)
            graphs.extend(attr.graphs)


# --- the wire-format scan ---------------------------------------------------------------

# Which length-delimited fields hold sub-messages worth descending into (field numbers
# from onnx.proto); everything else is skipped by length.
_MODEL, _GRAPH, _NODE, _ATTR, _TENSOR, _SPARSE, _FUNC, _TRAIN = range(8)
_SUBMESSAGES: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAIN, 25: _FUNC},
    _TRAIN: {1: _GRAPH, 2: _GRAPH},
    _FUNC: {7: _NODE},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {},
}
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14


def _not_onnx(reason: str) -> NotThisFormat:
    return NotThisFormat(reason, title=INVALID)


class _WireScanner:
    """Walks protobuf wire format from a file with seeks: memory independent of size."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.fields = 0

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        self.f.seek(pos)
        raw = self.f.read(min(10, end - pos))
        value = 0
        for i, byte in enumerate(raw):
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                return value, pos + i + 1
        raise _not_onnx(f"bad or truncated varint at byte {pos}")

    def message(self, start: int, end: int, kind: int, depth: int) -> set[int]:
        if depth > MAX_PROTO_DEPTH:
            raise Unsafe("the ONNX model nests graphs too deeply", title=INVALID)
        seen: set[int] = set()
        pos = start
        while pos < end:
            self.fields += 1
            if self.fields > MAX_PROTO_FIELDS:
                raise Unsafe(
                    f"the ONNX model has more than {MAX_PROTO_FIELDS} protobuf fields to check",
                    title=INVALID,
                )
            tag, pos = self.varint(pos, end)
            field, wire = tag >> 3, tag & 7
            if field == 0:
                raise _not_onnx(f"field number 0 at byte {pos}")
            if wire == 0:
                value, pos = self.varint(pos, end)
                if kind == _TENSOR and field == _TENSOR_DATA_LOCATION and value == 1:
                    raise _external_data_refused(f"a tensor at byte {start}")
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, pos = self.varint(pos, end)
                if pos + length > end:
                    raise _not_onnx(f"field {field} at byte {pos} runs past its end")
                if kind == _TENSOR and field == _TENSOR_EXTERNAL_DATA:
                    raise _external_data_refused(f"a tensor at byte {start}")
                sub = _SUBMESSAGES[kind].get(field)
                if sub is not None:
                    self.message(pos, pos + length, sub, depth + 1)
                pos += length
            else:
                raise _not_onnx(f"invalid wire type {wire} at byte {pos}")
            if pos > end:
                raise _not_onnx(f"field {field} runs past the end of its message")
            if kind == _MODEL and field in (1, 7) and wire != (0 if field == 1 else 2):
                raise _not_onnx(f"field {field} has the wrong wire type")
            seen.add(field)
        return seen


def scan_onnx_wire(path: Path, size: int) -> None:
    """The rules of :func:`check_onnx_file` that need no parse, in bounded memory
    (onnx.checker's own rules are left to the worker, which parses the file).

    Raises:
        NotThisFormat: not an ONNX protobuf at all.
        Unsafe: an ONNX model squish refuses.
    """
    with open(path, "rb", buffering=64 * 1024) as f:
        fields = _WireScanner(f).message(0, size, _MODEL, 0)
    if 7 not in fields:
        raise _not_onnx("it has no graph (protobuf field 7)")
    if 1 not in fields:
        raise Unsafe("the ONNX model has no ir_version", title=INVALID)
