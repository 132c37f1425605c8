"""Dataset files: ``.npz`` and ``.safetensors`` arrays, ``.jsonl`` text (DESIGN §7).

Arrays are checked from their headers (no array is read, nothing is unpickled): numeric
dtypes only, a shared first dimension (the samples), ``inputs`` or named input arrays (not
both), optional ``labels`` as a 1-D integer array of class indices. A ``.jsonl`` file holds
one JSON object per line with a string ``text`` and, on every line or on none, a ``label``
(an integer or a class name). The API runs :func:`check_dataset` on an upload; the worker's
loader runs the same function before reading the arrays, and reads text through
:func:`iter_jsonl`, so both apply the same rules.
"""

from __future__ import annotations

import json
import math
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from worker.contract import DatasetFormat, values
from worker.safety import Unsafe
from worker.safety._zip import ZIP_ERRORS
from worker.safety.pickles import is_pickle
from worker.safety.safetensors import Arrays, check_header

__all__ = [
    "FORMATS",
    "LABELS",
    "SINGLE_INPUT",
    "check_arrays",
    "check_dataset",
    "check_head",
    "iter_jsonl",
]

FORMATS = values(DatasetFormat)
LABELS = "labels"
SINGLE_INPUT = "inputs"
MAX_ARRAYS = 1024
MAX_JSONL_LINE_BYTES = 16 << 20
INVALID = "Invalid dataset"


def _invalid(detail: str) -> Unsafe:
    return Unsafe(detail, title=INVALID)


def check_head(head: bytes, size: int) -> None:
    """Refuse an empty file and a pickle, whatever the file claims to be."""
    if size == 0:
        raise Unsafe("the dataset file is empty", title="Empty dataset")
    if is_pickle(head):
        raise Unsafe(
            "the file is a Python pickle. It was NOT unpickled: unpickling an upload can run "
            "arbitrary code. Save arrays with numpy.savez('data.npz', inputs=..., labels=...) "
            "or safetensors, or text as JSON lines",
            title="Pickled dataset refused",
        )


def check_dataset(path: Path, fmt: str) -> dict[str, Any]:
    """Check a dataset file in format ``fmt``; return a summary of its contents.

    npz / safetensors: ``{"arrays": {name: {"shape": [...], "dtype": "float32"}},
    "num_samples": N, "has_labels": bool}``; jsonl: ``{"num_samples": N, "has_labels": bool}``.

    Raises:
        Unsafe: what is wrong with the file.
    """
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(16)
        size = f.seek(0, 2)
    check_head(head, size)
    try:
        check = _CHECKS[DatasetFormat(fmt)]
    except ValueError:
        raise ValueError(f"unknown dataset format {fmt!r}; known: {', '.join(FORMATS)}") from None
    return check(path, size)


def _check_npz(path: Path, size: int) -> dict[str, Any]:
    return check_arrays(_npz_arrays(path), "the .npz file")


def _check_safetensors(path: Path, size: int) -> dict[str, Any]:
    return check_arrays(_safetensors_arrays(path, size), "the safetensors file")


def _check_jsonl(path: Path, size: int) -> dict[str, Any]:
    count, labelled = 0, False
    for _, label in iter_jsonl(path):
        count, labelled = count + 1, label is not None
    return {"num_samples": count, "has_labels": labelled}


_CHECKS: dict[DatasetFormat, Callable[[Path, int], dict[str, Any]]] = {
    DatasetFormat.npz: _check_npz,
    DatasetFormat.safetensors: _check_safetensors,
    DatasetFormat.jsonl: _check_jsonl,
}


def _npz_arrays(path: Path) -> Arrays:
    try:
        archive = zipfile.ZipFile(path)
    except ZIP_ERRORS as exc:
        raise _invalid(f"the .npz file is corrupt or truncated ({exc})") from None
    arrays: Arrays = {}
    with archive:
        if len(archive.infolist()) > MAX_ARRAYS:
            raise _invalid(f"the .npz holds more than {MAX_ARRAYS} arrays")
        for info in archive.infolist():
            if info.is_dir():
                continue
            if not info.filename.endswith(".npy"):
                raise _invalid(
                    f"the .npz holds {info.filename!r}, which is not a .npy array; "
                    "write the file with numpy.savez"
                )
            name = info.filename[: -len(".npy")]
            try:
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                    else:
                        raise ValueError(f"unsupported .npy format version {version}")
                    header_end = member.tell()
            except (ValueError, EOFError, zipfile.BadZipFile, zlib.error, OSError) as exc:
                raise _invalid(f"array {name!r} in the .npz is not a valid .npy: {exc}") from None
            if dtype.hasobject:
                raise _invalid(
                    f"array {name!r} has an object dtype, which would need unpickling; "
                    "save numeric arrays (text datasets go in .jsonl)"
                )
            if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
                raise _invalid(
                    f"array {name!r} has dtype {dtype}; use bool, integer or float arrays "
                    "(text datasets go in .jsonl)"
                )
            expected = header_end + math.prod(shape) * dtype.itemsize
            if info.file_size != expected:
                raise _invalid(
                    f"array {name!r} should be {expected} bytes for shape {tuple(shape)} "
                    f"{dtype}, but is {info.file_size}; the file is corrupt or truncated"
                )
            arrays[name] = (list(shape), str(dtype), dtype.kind)
    return arrays


def _safetensors_arrays(path: Path, size: int) -> Arrays:
    def bad(detail: str) -> Unsafe:
        return _invalid(f"bad safetensors header: {detail}")

    with path.open("rb") as f:
        return check_header(f, size, bad, MAX_ARRAYS)


def check_arrays(arrays: Arrays, what: str) -> dict[str, Any]:
    """The rules every array dataset follows; return its summary (see :func:`check_dataset`)."""
    if not arrays:
        raise _invalid(f"{what} holds no arrays; add an 'inputs' array and optional 'labels'")
    inputs = [n for n in arrays if n != LABELS]
    if not inputs:
        raise _invalid(f"{what} holds only 'labels'; add an 'inputs' array (or named input arrays)")
    if SINGLE_INPUT in inputs and len(inputs) > 1:
        others = sorted(n for n in inputs if n != SINGLE_INPUT)
        raise _invalid(f"{what} has both 'inputs' and named arrays {others}; use one or the other")
    for name, (shape, _, _) in arrays.items():
        if not shape:
            raise _invalid(
                f"array {name!r} is a scalar; every array needs a first dimension (the samples)"
            )
    firsts = {shape[0] for shape, _, _ in arrays.values()}
    if len(firsts) != 1:
        shapes = ", ".join(f"{name} {tuple(shape)}" for name, (shape, _, _) in arrays.items())
        raise _invalid(
            f"every array needs the same leading (sample) axis, the number of samples; got {shapes}"
        )
    if LABELS in arrays:
        shape, dtype, kind = arrays[LABELS]
        if len(shape) != 1 or kind not in "iu":
            raise _invalid(
                f"'labels' must be a 1-D integer array of class indices, got shape "
                f"{tuple(shape)} {dtype}"
            )
    num_samples = firsts.pop()
    if num_samples == 0:
        raise _invalid(f"{what} holds no samples (the first dimension is 0)")
    return {
        "arrays": {
            name: {"shape": list(shape), "dtype": dtype}
            for name, (shape, dtype, _) in arrays.items()
        },
        "num_samples": num_samples,
        "has_labels": LABELS in arrays,
    }


def iter_jsonl(path: Path) -> Iterator[tuple[str, int | str | None]]:
    """``(text, label)`` per record of a ``.jsonl`` file (label None when unlabelled).

    Raises:
        Unsafe: a line that breaks the rules (see the module docstring), or no record.
    """
    count = 0
    labelled: bool | None = None
    with Path(path).open("rb") as f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_JSONL_LINE_BYTES + 1), b""), 1):
            if len(raw) > MAX_JSONL_LINE_BYTES:
                raise _invalid(f"line {number} is longer than {MAX_JSONL_LINE_BYTES} bytes")
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise _invalid(f"line {number} is not valid UTF-8 JSON: {exc}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise _invalid(
                    f'line {number} must be a JSON object with a string "text" '
                    '(and an optional "label"), e.g. {"text": "great movie", "label": 1}'
                )
            has_label = "label" in record
            label = record.get("label")
            if has_label and (isinstance(label, bool) or not isinstance(label, int | str)):
                raise _invalid(f'line {number}: "label" must be an integer or a string')
            if labelled is None:
                labelled = has_label
            elif labelled != has_label:
                raise _invalid(f'line {number}: "label" must be on every line or on none')
            count += 1
            yield record["text"], label if has_label else None
    if count == 0:
        raise _invalid("the .jsonl file holds no records")
