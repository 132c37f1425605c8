"""Upload checks: decide what an uploaded file is, then apply the engine's safety rules.

The API process runs these on the finished temporary file (in a thread: they read the
file). This module only *detects* the format by content, compares it with what the client
declared, and turns a refusal into the upload's 4xx; the rules themselves are
:mod:`worker.safety`'s, the same functions the worker's loaders call, so an upload accepted
here is one the engine loads. Nothing unpickles anything, and reads are streamed (ONNX
files up to ``ONNX_FULL_CHECK_MAX_BYTES`` are parsed with onnx; larger ones get the
bounded-memory wire-format scan).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from worker.contract import DatasetFormat, upload_formats, values
from worker.safety import EXPORT_HELP, HF_SAVE_HELP, NotThisFormat, Unsafe, hf, onnx, pt2
from worker.safety import datasets as dataset_rules
from worker.safety._zip import ZIP_ERRORS, is_zip
from worker.safety.hf import HF_TITLE
from worker.safety.pickles import PICKLE_TITLE, is_pickle, pickle_refused, unsafe_pickle_globals
from worker.safety.safetensors import looks_like_safetensors

__all__ = [
    "DATASET_FORMATS",
    "HF_TITLE",
    "MODEL_FORMATS",
    "ONNX_FULL_CHECK_MAX_BYTES",
    "PICKLE_TITLE",
    "Rejected",
    "check_dataset_file",
    "check_model_file",
    "unsafe_pickle_globals",
]

MiB = 1 << 20
MODEL_FORMATS = upload_formats()
DATASET_FORMATS = values(DatasetFormat)
ONNX_FULL_CHECK_MAX_BYTES = 512 * MiB
"""ONNX files up to this size are parsed with onnx and checked by onnx.checker; larger
ones get a bounded-memory scan of the protobuf wire format (the API's memory, not a rule
of the format: the worker parses every file)."""


class Rejected(Exception):
    """An upload squish refuses; ``detail`` tells the user what to change."""

    def __init__(self, detail: str, *, title: str = "Invalid upload", status: int = 422) -> None:
        super().__init__(f"{title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail

    @classmethod
    def of(cls, exc: Unsafe) -> Rejected:
        """The upload's answer to a refusal by one of :mod:`worker.safety`'s checks."""
        return cls(exc.detail, title=exc.title, status=exc.status)


def _mismatch(detail: str) -> Rejected:
    return Rejected(detail, title="Model format mismatch")


def _normalize(declared: str | None, allowed: tuple[str, ...], what: str) -> str | None:
    if declared is None or not declared.strip():
        return None
    value = declared.strip().lower()
    if value not in allowed:
        raise Rejected(
            f"unknown {what} format {declared!r}; supported formats are {', '.join(allowed)}",
            title=f"Unsupported {what} format",
        )
    return value


def _extension(filename: str | None) -> str:
    if not filename or "." not in filename:
        return ""
    return filename.rsplit(".", 1)[1].lower()


def _read_head(path: Path, n: int = 16) -> tuple[bytes, int]:
    with open(path, "rb") as f:
        head = f.read(n)
        size = f.seek(0, 2)
    return head, size


# ======================================================================================
# Models
# ======================================================================================


def check_model_file(path: Path, declared_format: str | None, filename: str | None) -> str:
    """Validate an uploaded model file; return its format, ``"pt2"``, ``"onnx"`` or ``"hf"``.

    A zip with ``config.json`` at its root or in its single top folder is a Hugging Face
    model folder (``hf``); another zip must be a torch.export archive (``pt2``).

    Raises Rejected (422, or 415 for content of no supported type) with a detail that
    says what to change.
    """
    try:
        return _check_model_file(path, declared_format, filename)
    except Unsafe as exc:
        raise Rejected.of(exc) from None


def _check_model_file(path: Path, declared_format: str | None, filename: str | None) -> str:
    declared = _normalize(declared_format, MODEL_FORMATS, "model")
    head, size = _read_head(path)
    if size == 0:
        raise Rejected("the model file is empty", title="Empty model file")
    if is_pickle(head):
        raise pickle_refused("a pickle (torch.save of a module or state_dict, legacy format)")
    if is_zip(path, head) and _looks_like_hf(path):
        if declared in ("pt2", "onnx"):
            raise _mismatch(
                f"declared format {declared} but the file is a zipped Hugging Face model "
                "folder; send format=hf or omit it"
            )
        hf.check_hf_file(path)
        return "hf"
    if is_zip(path, head):
        try:
            pt2.check_pt2_archive(path, size)
        except Unsafe as exc:
            if declared == "hf" and exc.title != PICKLE_TITLE:
                raise hf.no_folder("declared format hf but the zip holds") from None
            if declared == "onnx" and exc.title != PICKLE_TITLE:
                raise _mismatch(
                    "declared format onnx but the file is a zip archive, not an ONNX model"
                ) from None
            raise
        if declared in ("onnx", "hf"):
            raise _mismatch(
                f"declared format {declared} but the file is a pt2 archive (torch.export.save); "
                "send format=pt2 or omit it"
            )
        return "pt2"
    if declared == "hf":
        raise _mismatch(
            "declared format hf but the file is not a zip archive; an hf model is a zipped "
            "Hugging Face model folder. " + HF_SAVE_HELP
        )
    try:
        if size <= ONNX_FULL_CHECK_MAX_BYTES:
            onnx.check_onnx_file(path)
        else:
            onnx.scan_onnx_wire(path, size)
    except NotThisFormat as exc:
        if declared == "pt2":
            raise _mismatch(
                "declared format pt2 but the file is not a valid pt2 (it is not a zip archive "
                "as written by torch.export.save). " + EXPORT_HELP
            ) from None
        if declared == "onnx" or _extension(filename) == "onnx":
            raise onnx.not_onnx(exc) from None
        if _extension(filename) == "pt2":
            raise Rejected(
                "the file is not a valid pt2 (not a zip archive); it may be corrupt. "
                + EXPORT_HELP,
                title="Invalid pt2 archive",
            ) from None
        raise Rejected(
            "the file is neither a torch.export archive (.pt2), an ONNX model nor a zipped "
            "Hugging Face model folder; supported formats are pt2, onnx and hf. " + EXPORT_HELP,
            title="Unsupported model type",
            status=415,
        ) from None
    if declared == "pt2":
        raise _mismatch(
            "declared format pt2 but the file is an ONNX model; send format=onnx or omit it"
        )
    return "onnx"


def _looks_like_hf(path: Path) -> bool:
    """A zip with config.json at its root or in its single top folder, and no pt2 marker."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if not hf.is_litter(n)]
    except ZIP_ERRORS:
        return False
    if any(n.count("/") == 1 and n.endswith("/archive_format") for n in names):
        return False
    return any(
        n == "config.json" or (n.count("/") == 1 and n.endswith("/config.json")) for n in names
    )


# ======================================================================================
# Datasets
# ======================================================================================

_DATASET_NAMES = {
    "npz": "a zip archive (npz)",
    "safetensors": "a safetensors file",
    "jsonl": "JSON lines (jsonl)",
}


def check_dataset_file(
    path: Path, filename: str | None, declared_format: str | None
) -> tuple[str, dict[str, Any]]:
    """Validate an uploaded dataset; return its format and a summary of its contents.

    npz / safetensors: ``{"arrays": {name: {"shape": [...], "dtype": "float32"}},
    "num_samples": N, "has_labels": bool}``; jsonl: ``{"num_samples": N, "has_labels": bool}``.
    """
    try:
        return _check_dataset_file(path, filename, declared_format)
    except Unsafe as exc:
        raise Rejected.of(exc) from None


def _check_dataset_file(
    path: Path, filename: str | None, declared_format: str | None
) -> tuple[str, dict[str, Any]]:
    declared = _normalize(declared_format, DATASET_FORMATS, "dataset")
    head, size = _read_head(path)
    dataset_rules.check_head(head, size)
    by_name = _extension(filename)
    expected = declared or (by_name if by_name in DATASET_FORMATS else None)
    kind: str | None = None
    if is_zip(path, head):
        kind = "npz"
    elif looks_like_safetensors(head, size):
        kind = "safetensors"
    elif head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        kind = "jsonl"
    if kind is None:
        if head.startswith(b"\x93NUMPY"):
            raise Rejected(
                "the file is a single .npy array; put the arrays in an .npz archive: "
                "numpy.savez('data.npz', inputs=..., labels=...)",
                title="Unsupported dataset type",
                status=415,
            )
        if expected == "safetensors":
            dataset_rules.check_dataset(path, "safetensors")  # raises the header's problem
        if expected:
            raise Rejected(
                f"the file is not a valid {expected} file; it may be corrupt or truncated",
                title="Invalid dataset",
            )
        raise Rejected(
            "unsupported dataset type: send an .npz or .safetensors file with an 'inputs' "
            "array (or named input arrays) and optional 'labels', or .jsonl with 'text'",
            title="Unsupported dataset type",
            status=415,
        )
    if declared and declared != kind:
        raise Rejected(
            f"declared format {declared} but the file is {_DATASET_NAMES[kind]}",
            title="Dataset format mismatch",
        )
    return kind, dataset_rules.check_dataset(path, kind)
