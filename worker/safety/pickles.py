"""Pickles: recognised by their bytes and scanned opcode by opcode, never executed.

Unpickling an upload can run arbitrary code, so squish refuses every pickle it could
avoid and *scans* the one kind a torch.export archive carries (its sample inputs) with
``pickletools``: what the pickle would import must be on an allow-list of the globals a
``torch.save`` of tensors, shapes, dtypes and plain containers references.
"""

from __future__ import annotations

import _compat_pickle
import pickletools
from typing import IO

from worker.safety import EXPORT_HELP, Unsafe

PICKLE_TITLE = "Pickled PyTorch object refused"
MAX_PICKLE_BYTES = 64 << 20


def is_pickle(head: bytes) -> bool:
    """Protocol 2+ pickles (torch.save's legacy format, pickle.dumps) open with PROTO n."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def pickle_refused(kind: str) -> Unsafe:
    """The refusal of a pickled model (``kind`` says which kind of file it is)."""
    return Unsafe(
        f"The file is {kind}. It was NOT unpickled: squish never unpickles an upload, "
        f"because unpickling can run arbitrary code. {EXPORT_HELP}",
        title=PICKLE_TITLE,
    )


# Globals a torch.save of tensors, shapes, dtypes and plain containers may reference: the
# core of torch's weights_only allow-list. Anything else could be a call to arbitrary code.
_TORCH_DTYPES = {
    "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "half", "float", "double", "short", "int", "long", "cfloat", "cdouble",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "quint8", "qint8", "qint32", "quint4x2",
}  # fmt: skip
_TORCH_STORAGES = {
    f"{name}Storage"
    for name in (
        "Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte",
        "Bool", "ComplexFloat", "ComplexDouble", "QUInt8", "QInt8", "QInt32", "QUInt4x2",
        "Untyped",
    )
}  # fmt: skip
SAFE_GLOBALS = frozenset({
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("torch.serialization", "_get_layout"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("_codecs", "encode"),
    ("builtins", "set"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    *(("torch", name) for name in _TORCH_DTYPES | _TORCH_STORAGES),
    *(("torch.storage", name) for name in ("UntypedStorage", "TypedStorage")),
    *(("torch", name) for name in ("per_tensor_affine", "per_tensor_symmetric",
                                   "per_channel_affine", "per_channel_symmetric",
                                   "per_channel_affine_float_qparams")),
    *(("torch._utils", name) for name in ("_rebuild_tensor", "_rebuild_tensor_v2",
                                          "_rebuild_tensor_v3", "_rebuild_parameter",
                                          "_rebuild_parameter_with_state", "_rebuild_qtensor",
                                          "_rebuild_sparse_tensor", "_rebuild_nested_tensor",
                                          "_rebuild_meta_tensor_no_storage")),
})  # fmt: skip
_STRING_OPS = {
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
    "SHORT_BINUNICODE", "BINUNICODE8",
}  # fmt: skip
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def _py3_name(module: str, name: str) -> tuple[str, str]:
    """Python 2 names (``__builtin__``, ``copy_reg``) as the unpickler would resolve them."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def unsafe_pickle_globals(stream: IO[bytes]) -> list[str]:
    """Scan a pickle without executing it; return what it would import beyond the allow-list.

    ``pickletools.genops`` only decodes opcodes. A STACK_GLOBAL whose module and name
    are not two string pushes right before it cannot be resolved statically and is
    reported as unsafe; extension-registry opcodes (EXT1/2/4) are too.
    """
    found: list[str] = []
    recent: list[str | None] = []  # values pushed by the latest opcodes (None: not a string)
    memo: dict[int, str | None] = {}
    for opcode, arg, _pos in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            module, attr = _py3_name(module, attr)
            if (module, attr) not in SAFE_GLOBALS:
                found.append(f"{module}.{attr}")
        elif name == "STACK_GLOBAL":
            if len(recent) >= 2 and isinstance(recent[-1], str) and isinstance(recent[-2], str):
                module, attr = _py3_name(recent[-2], recent[-1])
                if (module, attr) not in SAFE_GLOBALS:
                    found.append(f"{module}.{attr}")
            else:
                found.append("<unresolvable STACK_GLOBAL>")
        elif name in ("EXT1", "EXT2", "EXT4"):
            found.append(f"<extension code {arg}>")
        if name in _STRING_OPS:
            recent.append(arg if isinstance(arg, str) else None)
        elif name in _GET_OPS:
            recent.append(memo.get(int(arg)))  # type: ignore[arg-type]
        elif name in _PUT_OPS:
            memo[int(arg)] = recent[-1] if recent else None  # type: ignore[arg-type]
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        else:
            recent.append(None)
        del recent[:-2]
    return found


def scan_pickle(stream: IO[bytes], size: int, where: str, *, title: str) -> None:
    """Refuse a pickle that is too large or would import anything beyond the allow-list."""
    if size > MAX_PICKLE_BYTES:
        raise Unsafe(f"{where}: the pickle is larger than {MAX_PICKLE_BYTES} bytes", title=title)
    unsafe = unsafe_pickle_globals(stream)
    if unsafe:
        raise Unsafe(
            f"{where} references {', '.join(unsafe[:5])}; loading it could run arbitrary "
            "code, so the file is refused. Export with plain tensor example inputs",
            title=title,
        )
