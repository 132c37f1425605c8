"""safetensors headers, checked without reading the tensors (memory bounded by the header)."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import IO

from worker.safety import Unsafe

MAX_HEADER_BYTES = 100_000_000

DTYPES: dict[str, tuple[str, int, str]] = {
    "BOOL": ("bool", 1, "b"),
    "U8": ("uint8", 1, "u"),
    "I8": ("int8", 1, "i"),
    "U16": ("uint16", 2, "u"),
    "I16": ("int16", 2, "i"),
    "U32": ("uint32", 4, "u"),
    "I32": ("int32", 4, "i"),
    "U64": ("uint64", 8, "u"),
    "I64": ("int64", 8, "i"),
    "F16": ("float16", 2, "f"),
    "BF16": ("bfloat16", 2, "f"),
    "F32": ("float32", 4, "f"),
    "F64": ("float64", 8, "f"),
    "F8_E4M3": ("float8_e4m3fn", 1, "f"),
    "F8_E5M2": ("float8_e5m2", 1, "f"),
}
"""safetensors dtype -> (numpy-style name, item size, numpy dtype kind)."""

Arrays = dict[str, tuple[list[int], str, str]]
"""Array name -> (shape, dtype name, dtype kind)."""


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """An 8-byte little-endian header length that fits the file, then a JSON object."""
    return len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8


def check_header(f: IO[bytes], size: int, bad: Callable[[str], Unsafe], max_tensors: int) -> Arrays:
    """Check a safetensors header read from ``f`` (``size`` bytes in all); return its tensors.

    Offsets must tile the data section exactly, each tensor's span must match its shape and
    dtype, and the header must be a JSON object of at most ``max_tensors`` tensors.
    """
    raw_len = f.read(8)
    if len(raw_len) < 8:
        raise bad("the file is shorter than the 8-byte header length")
    header_len = struct.unpack("<Q", raw_len)[0]
    if header_len > min(size - 8, MAX_HEADER_BYTES):
        raise bad(f"header length {header_len} exceeds the file ({size} bytes) or the 100 MB limit")
    raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("not a JSON object")
    if len(header) > max_tensors + 1:
        raise bad(f"more than {max_tensors} tensors")
    data_size = size - 8 - header_len
    arrays: Arrays = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise bad("__metadata__ must be an object of strings")
            continue
        if not isinstance(entry, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise bad(f"tensor {name!r} has dtype {dtype!r}; supported: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise bad(
                f"tensor {name!r} has data_offsets {offsets!r} outside the {data_size} data bytes"
            )
        dtype_name, itemsize, kind = DTYPES[dtype]
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise bad(
                f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes, but shape {shape} "
                f"{dtype_name} needs {math.prod(shape) * itemsize}"
            )
        spans.append((offsets[0], offsets[1], name))
        arrays[name] = (shape, dtype_name, kind)
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise bad(f"tensor {name!r} does not start where the previous one ends")
        position = end
    if position != data_size:
        raise bad(
            f"the tensors cover {position} of the {data_size} data bytes; the file is corrupt "
            "or truncated"
        )
    return arrays
