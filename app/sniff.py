"""Torch-free validation of uploaded models and datasets, before anything is stored.

The API process runs these checks on the finished temporary file (in a thread:
they read the file). They decide the format by content, compare it with what the
client declared, and refuse what a worker could not load safely. Nothing here
unpickles anything: pickles are recognised by their bytes, and the one pickle a
torch.export archive legitimately carries (its sample inputs) is only *scanned*
opcode by opcode with ``pickletools``, never executed. Reads are streamed, so
memory stays bounded whatever the file size (except ``onnx.load`` on ONNX files
up to ``ONNX_FULL_CHECK_MAX_BYTES``).

A Hugging Face model (``hf``) is a zip of a ``save_pretrained`` folder. Without importing
transformers or torch, the API checks every member's path (no absolute or ``..`` paths,
no links: zip-slip), CRC and size, refuses code (``*.py``, an ``auto_map`` in any JSON at
the folder's root: remote code is never trusted) and pickled weights
(``pytorch_model.bin``, ``*.pt``, ``*.pkl``), reads config.json (``model_type``,
``architectures``) and each ``*.safetensors`` header, and wants tokenizer files. The
worker that inspects the upload then checks that the architecture is one transformers
itself provides.
"""

from __future__ import annotations

import _compat_pickle
import json
import math
import pickletools
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "DATASET_FORMATS",
    "MODEL_FORMATS",
    "ONNX_FULL_CHECK_MAX_BYTES",
    "Rejected",
    "check_dataset_file",
    "check_model_file",
]

MiB = 1 << 20
MODEL_FORMATS = ("pt2", "onnx", "hf")
DATASET_FORMATS = ("npz", "safetensors", "jsonl")
ONNX_FULL_CHECK_MAX_BYTES = 512 * MiB
"""ONNX files up to this size are parsed with onnx and checked by onnx.checker; larger
ones get a bounded-memory scan of the protobuf wire format."""
READ_CHUNK = MiB
MAX_JSON_MEMBER_BYTES = 256 * MiB
MAX_PICKLE_BYTES = 64 * MiB
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000
MAX_JSONL_LINE_BYTES = 16 * MiB
MAX_PROTO_DEPTH = 64
MAX_PROTO_FIELDS = 20_000_000
MAX_ARRAYS = 1024

EXPORT_HINT = (
    "Export the model instead and upload the result: "
    '`ep = torch.export.export(model, (example_input,)); torch.export.save(ep, "model.pt2")`, '
    'or `torch.onnx.export(model, (example_input,), "model.onnx", dynamo=True, '
    "external_data=False)`."
)


PICKLE_TITLE = "Pickled PyTorch object refused"


class Rejected(Exception):
    """An upload squish refuses; ``detail`` tells the user what to change."""

    def __init__(self, detail: str, *, title: str = "Invalid upload", status: int = 422) -> None:
        super().__init__(f"{title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail


class _NotThisFormat(Exception):
    """Internal: the bytes are not this format at all (so another may be tried)."""


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


def _is_pickle(head: bytes) -> bool:
    # Protocol 2+ pickles (torch.save's legacy format, pickle.dumps) open with PROTO n.
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _is_zip(path: Path, head: bytes) -> bool:
    return head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or zipfile.is_zipfile(path)


def _pickle_refused(kind: str) -> Rejected:
    return Rejected(
        f"The file is {kind}. It was NOT unpickled: unpickling an upload can run arbitrary "
        f"code, so squish never does. {EXPORT_HINT}",
        title=PICKLE_TITLE,
    )


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
    declared = _normalize(declared_format, MODEL_FORMATS, "model")
    head, size = _read_head(path)
    if size == 0:
        raise Rejected("the model file is empty", title="Empty model file")
    if _is_pickle(head):
        raise _pickle_refused("a pickle (torch.save of a module or state_dict, legacy format)")
    if _is_zip(path, head) and _looks_like_hf(path):
        if declared in ("pt2", "onnx"):
            raise Rejected(
                f"declared format {declared} but the file is a zipped Hugging Face model "
                "folder; send format=hf or omit it",
                title="Model format mismatch",
            )
        _check_hf(path, size)
        return "hf"
    if _is_zip(path, head):
        try:
            _check_pt2(path, size)
        except Rejected as exc:
            if declared == "hf" and exc.title != PICKLE_TITLE:
                raise _bad_hf(
                    "declared format hf but the zip holds no Hugging Face model folder: "
                    "config.json must be at the zip's root or in its single top folder. "
                    + HF_SAVE_HINT
                ) from None
            if declared == "onnx" and exc.title != PICKLE_TITLE:
                raise Rejected(
                    "declared format onnx but the file is a zip archive, not an ONNX model",
                    title="Model format mismatch",
                ) from None
            raise
        if declared in ("onnx", "hf"):
            raise Rejected(
                f"declared format {declared} but the file is a pt2 archive (torch.export.save); "
                "send format=pt2 or omit it",
                title="Model format mismatch",
            )
        return "pt2"
    if declared == "hf":
        raise Rejected(
            "declared format hf but the file is not a zip archive; an hf model is a zipped "
            "Hugging Face model folder. " + HF_SAVE_HINT,
            title="Model format mismatch",
        )
    try:
        _check_onnx(path, size)
    except _NotThisFormat as exc:
        if declared == "pt2":
            raise Rejected(
                "declared format pt2 but the file is not a valid pt2 (it is not a zip archive "
                "as written by torch.export.save). " + EXPORT_HINT,
                title="Model format mismatch",
            ) from None
        if declared == "onnx" or _extension(filename) == "onnx":
            raise Rejected(
                f"the file is not a valid ONNX model ({exc}); it may be corrupt or truncated",
                title="Invalid ONNX model",
            ) from None
        if _extension(filename) == "pt2":
            raise Rejected(
                "the file is not a valid pt2 (not a zip archive); it may be corrupt. "
                + EXPORT_HINT,
                title="Invalid pt2 archive",
            ) from None
        raise Rejected(
            "the file is neither a torch.export archive (.pt2), an ONNX model nor a zipped "
            "Hugging Face model folder; supported formats are pt2, onnx and hf. " + EXPORT_HINT,
            title="Unsupported model type",
            status=415,
        ) from None
    if declared == "pt2":
        raise Rejected(
            "declared format pt2 but the file is an ONNX model; send format=onnx or omit it",
            title="Model format mismatch",
        )
    return "onnx"


# --- pt2 (torch.export.save) ----------------------------------------------------------

_NATIVE_CODE_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia")
_OBJECT_PREFIXES = ("custom_obj_", "opaque_obj_")


def _corrupt_pt2(reason: str) -> Rejected:
    return Rejected(
        f"the pt2 archive is corrupt or truncated ({reason}); upload the complete file "
        "written by torch.export.save",
        title="Corrupt model file",
    )


def _check_pt2(path: Path, size: int) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as exc:
        raise _corrupt_pt2(str(exc)) from None
    with archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            raise _pickle_refused(
                "a torch.save / TorchScript zip archive (it holds a pickle, data.pkl)"
            )
        format_entries = [n for n in names if n.count("/") == 1 and n.endswith("/archive_format")]
        if not format_entries:
            if any(n.endswith("config.json") for n in names) and any(
                n.endswith(".safetensors") for n in names
            ):
                hint = (
                    "It looks like a Hugging Face model folder (format hf), but an hf zip "
                    "needs config.json at its root or in its single top folder. "
                )
            else:
                hint = ""
            raise Rejected(
                "the zip archive is not a torch.export archive: it has no archive_format "
                f"entry. {hint}{EXPORT_HINT}",
                title="Not a pt2 archive",
            )
        root = format_entries[0].split("/", 1)[0]
        prefix = root + "/"
        stray = [n for n in names if not n.startswith(prefix)]
        if stray:
            raise Rejected(
                f"the pt2 archive has entries outside its root folder {root!r}: {stray[:3]}",
                title="Invalid pt2 archive",
            )
        by_rel = {info.filename[len(prefix) :]: info for info in infos}

        total = sum(info.file_size for info in infos)
        if total > 16 * size + 64 * MiB:
            raise Rejected(
                f"the pt2 archive expands to {total} bytes from {size}; refusing a zip bomb",
                title="Invalid pt2 archive",
            )
        for info in infos:
            if info.flag_bits & 0x1:
                raise Rejected(f"entry {info.filename!r} is encrypted", title="Invalid pt2 archive")
        _check_crcs(archive, infos)

        if _read_small(archive, by_rel["archive_format"]) != b"pt2":
            raise Rejected(
                "the archive_format entry does not say pt2; " + EXPORT_HINT,
                title="Not a pt2 archive",
            )
        version_entry = by_rel.get("archive_version")
        version = b"0" if version_entry is None else _read_small(archive, version_entry)
        if version != b"0":
            raise Rejected(
                f"unsupported pt2 archive_version {version[:16].decode('latin-1')!r}; squish "
                "loads version 0 archives (torch 2.x torch.export.save)",
                title="Unsupported pt2 archive",
            )
        native = [r for r in by_rel if r.startswith(_NATIVE_CODE_DIRS)]
        if native:
            raise Rejected(
                f"the pt2 archive contains compiled code ({native[0]!r}, e.g. from AOTInductor); "
                "loading it would run native code from the upload. Save the ExportedProgram "
                "with torch.export.save instead",
                title="Compiled code refused",
            )

        models = [r for r in by_rel if r.startswith("models/") and r.endswith(".json")]
        if not models:
            raise Rejected(
                "the pt2 archive has no models/*.json (the serialized graph); " + EXPORT_HINT,
                title="Invalid pt2 archive",
            )
        for rel in models:
            if not isinstance(_load_json_member(archive, by_rel[rel]), dict):
                raise Rejected(
                    f"{by_rel[rel].filename} is not a JSON object", title="Invalid pt2 archive"
                )

        for rel, info in by_rel.items():
            for folder in ("data/weights/", "data/constants/"):
                if rel.startswith(folder) and rel.endswith("_config.json"):
                    _check_payload_config(archive, info, folder, by_rel)
                elif rel.startswith(folder) and rel[len(folder) :].startswith(_OBJECT_PREFIXES):
                    raise _custom_object_refused(rel)

        for rel, info in by_rel.items():
            if rel.startswith("data/sample_inputs/"):
                _check_sample_inputs(archive, info)


def _read_small(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The first bytes of a marker entry (``archive_format``…), stripped; never the whole entry."""
    with archive.open(info) as member:
        return member.read(64).strip()


def _check_crcs(
    archive: zipfile.ZipFile,
    infos: list[zipfile.ZipInfo],
    corrupt: Callable[[str], Rejected] = _corrupt_pt2,
) -> None:
    """Read every member to its end in chunks: zipfile verifies each CRC-32 at EOF."""
    for info in infos:
        try:
            with archive.open(info) as member:
                while member.read(READ_CHUNK):
                    pass
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
            raise corrupt(f"{info.filename}: {exc}") from None


def _load_json_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    if info.file_size > MAX_JSON_MEMBER_BYTES:
        raise Rejected(
            f"{info.filename} is larger than {MAX_JSON_MEMBER_BYTES} bytes",
            title="Invalid pt2 archive",
        )
    try:
        with archive.open(info) as member:
            return json.load(member)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Rejected(
            f"{info.filename} is not valid JSON: {exc}", title="Invalid pt2 archive"
        ) from None


def _custom_object_refused(what: str) -> Rejected:
    return Rejected(
        f"the pt2 archive holds a custom or opaque object constant ({what}); loading it would "
        "mean unpickling it, which squish never does with an upload. Export a model whose "
        "constants are plain tensors",
        title="Pickled object in pt2 refused",
    )


def _check_payload_config(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, folder: str, by_rel: dict[str, zipfile.ZipInfo]
) -> None:
    config = _load_json_member(archive, info)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise Rejected(f"{info.filename} has no 'config' object", title="Invalid pt2 archive")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise Rejected(
                f"{info.filename}: entry {fqn!r} has no path_name", title="Invalid pt2 archive"
            )
        path_name = meta["path_name"]
        if path_name.startswith(_OBJECT_PREFIXES):
            raise _custom_object_refused(f"{fqn!r} in {info.filename}")
        if meta.get("use_pickle") is True:
            raise Rejected(
                f"{info.filename}: {fqn!r} is stored pickled (use_pickle: true, a tensor "
                "subclass); loading it would mean unpickling it, which squish never does with "
                "an upload. Export with plain tensors (e.g. unwrap quantized tensor subclasses)",
                title="Pickled object in pt2 refused",
            )
        if folder + path_name not in by_rel:
            raise Rejected(
                f"{info.filename}: {fqn!r} refers to {folder + path_name}, which is missing",
                title="Invalid pt2 archive",
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
_SAFE_GLOBALS = {
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
}  # fmt: skip
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
            if (module, attr) not in _SAFE_GLOBALS:
                found.append(f"{module}.{attr}")
        elif name == "STACK_GLOBAL":
            if len(recent) >= 2 and isinstance(recent[-1], str) and isinstance(recent[-2], str):
                module, attr = _py3_name(recent[-2], recent[-1])
                if (module, attr) not in _SAFE_GLOBALS:
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


def _check_sample_inputs(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """torch.export.load unpickles the sample inputs (falling back to weights_only=False)."""
    if info.file_size == 0:
        return
    try:
        with archive.open(info) as member:
            if member.read(2) == b"PK":
                member.seek(0)
                with zipfile.ZipFile(member) as inner:
                    for inner_info in inner.infolist():
                        if inner_info.filename.endswith(".pkl"):
                            with inner.open(inner_info) as stream:
                                _scan_sample_pickle(info.filename, inner_info.file_size, stream)
            else:
                member.seek(0)
                _scan_sample_pickle(info.filename, info.file_size, member)
    except (zipfile.BadZipFile, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise Rejected(
            f"{info.filename} (the sample inputs) is not a valid torch.save archive: {exc}",
            title="Invalid pt2 archive",
        ) from None


def _scan_sample_pickle(where: str, size: int, stream: IO[bytes]) -> None:
    if size > MAX_PICKLE_BYTES:
        raise Rejected(
            f"{where}: the sample inputs pickle is too large", title="Unsafe pt2 archive"
        )
    unsafe = unsafe_pickle_globals(stream)
    if unsafe:
        raise Rejected(
            f"{where} (the sample inputs) references {', '.join(unsafe[:5])}; loading it could "
            "run arbitrary code, so the archive is refused. Export with plain tensor example "
            "inputs",
            title="Unsafe pt2 archive",
        )


# --- hf (a zipped Hugging Face Transformers model folder) -------------------------------

HF_TITLE = "Invalid Hugging Face model"
HF_MAX_MEMBERS = 10_000
HF_MAX_TENSORS = 1_000_000
HF_SAVE_HINT = (
    "Save it with `model.save_pretrained(folder, safe_serialization=True)` and "
    "`tokenizer.save_pretrained(folder)`, then zip the folder."
)
# What an hf zip may not hold; the worker's loader (worker.formats) applies the same lists.
HF_CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".dll", ".dylib")
HF_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
HF_OTHER_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".keras", ".gguf")
_HF_TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
     "sentencepiece.bpe.model", "tokenizer.model"}
)  # fmt: skip
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _hf_ignored(name: str) -> bool:
    """Finder litter that zips of a folder often carry; the worker skips it too."""
    return name.startswith("__MACOSX/") or name.rsplit("/", 1)[-1] == ".DS_Store"


def _looks_like_hf(path: Path) -> bool:
    """A zip with config.json at its root or in its single top folder, and no pt2 marker."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if not _hf_ignored(n)]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError):
        return False
    if any(n.count("/") == 1 and n.endswith("/archive_format") for n in names):
        return False
    return any(
        n == "config.json" or (n.count("/") == 1 and n.endswith("/config.json")) for n in names
    )


def _bad_hf(detail: str) -> Rejected:
    return Rejected(detail, title=HF_TITLE)


def _corrupt_hf(reason: str) -> Rejected:
    return Rejected(
        f"the zip is corrupt or truncated ({reason}); upload the complete file",
        title="Corrupt model file",
    )


def _check_hf_name(info: zipfile.ZipInfo) -> None:
    name = info.filename
    parts = name.rstrip("/").split("/")
    if (
        name.startswith("/")
        or "\\" in name
        or re.match(r"^[A-Za-z]:", name)
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise _bad_hf(
            f"the zip member {name!r} has an absolute, empty or '..' path; a zip must only "
            "hold the model folder's own files"
        )
    if stat.S_ISLNK(info.external_attr >> 16):
        raise _bad_hf(f"the zip member {name!r} is a symbolic link; zip the files themselves")
    if info.flag_bits & 0x1:
        raise _bad_hf(f"the zip member {name!r} is encrypted")
    lower = parts[-1].lower()
    if lower.endswith(HF_CODE_SUFFIXES):
        raise Rejected(
            f"the model folder contains code ({name}). squish never runs code from an upload "
            "(trust_remote_code is always off): upload a model whose architecture is part of "
            "the transformers library, without .py files",
            title="Remote code refused",
        )
    if not info.is_dir() and lower.endswith(HF_PICKLE_SUFFIXES):
        raise Rejected(
            f"the model folder contains {name}, a pickled PyTorch file. It was NOT unpickled: "
            "unpickling an upload can run arbitrary code, so squish never does. Save the "
            "weights as safetensors instead and leave out pytorch_model.bin / *.pt / *.pkl: "
            + HF_SAVE_HINT,
            title=PICKLE_TITLE,
        )
    if not info.is_dir() and lower.endswith(HF_OTHER_WEIGHT_SUFFIXES):
        raise _bad_hf(
            f"the model folder contains {name}, weights in a format other than safetensors "
            f"(TensorFlow, Flax or GGUF); squish loads PyTorch safetensors weights. {HF_SAVE_HINT}"
        )


def _hf_json(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    if info.file_size > MAX_JSON_MEMBER_BYTES:
        raise _bad_hf(f"{info.filename} is larger than {MAX_JSON_MEMBER_BYTES} bytes")
    try:
        with archive.open(info) as member:
            return json.load(member)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad_hf(f"{info.filename} is not valid JSON: {exc}") from None


def _check_hf(path: Path, size: int) -> None:
    """A zipped Hugging Face model folder: safe names, safetensors weights, no code."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as exc:
        raise Rejected(
            f"the zip is corrupt or truncated ({exc}); upload the complete file",
            title="Corrupt model file",
        ) from None
    with archive:
        infos = [i for i in archive.infolist() if not _hf_ignored(i.filename)]
        if len(infos) > HF_MAX_MEMBERS:
            raise _bad_hf(f"the zip has more than {HF_MAX_MEMBERS} members")
        for info in infos:
            _check_hf_name(info)
        files = [i for i in infos if not i.is_dir()]
        total = sum(info.file_size for info in files)
        if total > 16 * size + 64 * MiB:
            raise _bad_hf(f"the zip expands to {total} bytes from {size}; refusing a zip bomb")
        names = {info.filename: info for info in files}
        if "config.json" in names:
            prefix = ""
        else:
            tops = {n.split("/", 1)[0] for n in names}
            prefix = tops.pop() + "/" if len(tops) == 1 and all("/" in n for n in names) else ""
            if prefix + "config.json" not in names:
                raise _bad_hf(
                    "the zip holds no Hugging Face model folder: config.json must be at the "
                    "zip's root or in its single top folder. " + HF_SAVE_HINT
                )
        _check_crcs(archive, files, _corrupt_hf)
        root = {n[len(prefix) :]: info for n, info in names.items()}

        config = _hf_json(archive, root["config.json"])
        if not isinstance(config, dict):
            raise _bad_hf("the Hugging Face config.json is not a JSON object")
        for rel, info in root.items():
            if "/" in rel or not rel.endswith(".json"):
                continue
            doc = config if rel == "config.json" else _hf_json(archive, info)
            if isinstance(doc, dict) and "auto_map" in doc:
                raise Rejected(
                    f"{rel} has an auto_map, which points transformers at custom model code. "
                    "squish never runs code from an upload (trust_remote_code is always off): "
                    "upload a model whose architecture is part of the transformers library",
                    title="Remote code refused",
                )
        _check_hf_config(config)
        weights = [rel for rel in root if "/" not in rel and rel.endswith(".safetensors")]
        if not weights:
            raise _bad_hf(
                f"the Hugging Face model folder has no *.safetensors weights. {HF_SAVE_HINT}"
            )
        for rel in weights:
            info = root[rel]

            def bad(detail: str, rel: str = rel) -> Rejected:
                return _bad_hf(f"{rel}: bad safetensors header: {detail}")

            with archive.open(info) as member:
                _safetensors_header(member, info.file_size, bad, HF_MAX_TENSORS)
        if not any(rel in _HF_TOKENIZER_FILES for rel in root):
            raise _bad_hf(
                "the Hugging Face model folder has no tokenizer files (tokenizer.json, "
                "vocab.txt, tokenizer_config.json ...); save them into the folder with "
                "`tokenizer.save_pretrained(folder)` before zipping it"
            )


def _check_hf_config(config: dict[str, Any]) -> None:
    if "quantization_config" in config:
        raise _bad_hf(
            "the Hugging Face config.json has a quantization_config: pre-quantized models are "
            "not supported; upload the floating-point model and let squish quantize it"
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not _IDENTIFIER.fullmatch(model_type.replace("-", "_")):
        raise _bad_hf(
            'the Hugging Face config.json has no "model_type" (e.g. "bert"); save the model '
            "with save_pretrained, which writes it"
        )
    architectures = config.get("architectures")
    if (
        not isinstance(architectures, list)
        or not architectures
        or not all(isinstance(a, str) and _IDENTIFIER.fullmatch(a) for a in architectures)
    ):
        raise _bad_hf(
            'the Hugging Face config.json has no "architectures" list naming a transformers '
            'class (e.g. ["BertForSequenceClassification"]); save the model with '
            "save_pretrained, which writes it"
        )


# --- ONNX ----------------------------------------------------------------------------


def _check_onnx(path: Path, size: int) -> None:
    """Raise _NotThisFormat if this is not an ONNX ModelProto, Rejected if it is a bad one."""
    if size <= ONNX_FULL_CHECK_MAX_BYTES:
        _check_onnx_full(path)
    else:
        _check_onnx_wire(path, size)


def _external_data_refused(where: str) -> Rejected:
    return Rejected(
        f"the ONNX model stores tensor data in external files ({where}); upload a single-file "
        "model: export with `torch.onnx.export(..., external_data=False)` or re-save with "
        "`onnx.save_model(model, 'model.onnx', save_as_external_data=False)` (under 2 GB)",
        title="External ONNX data refused",
    )


def _check_onnx_full(path: Path) -> None:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, and other types on odd input
        raise _NotThisFormat(f"it does not parse as an ONNX protobuf: {exc}") from None
    if not model.HasField("graph"):
        raise _NotThisFormat("it has no graph")
    for where, tensor in _onnx_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            raise _external_data_refused(where or tensor.name)
    if not model.graph.output:
        raise Rejected("the ONNX graph has no outputs", title="Invalid ONNX model")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        message = str(exc).strip().splitlines()
        raise Rejected(
            f"onnx.checker rejected the model: {message[0] if message else type(exc).__name__}",
            title="Invalid ONNX model",
        ) from None


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
        raise _NotThisFormat(f"bad or truncated varint at byte {pos}")

    def message(self, start: int, end: int, kind: int, depth: int) -> set[int]:
        if depth > MAX_PROTO_DEPTH:
            raise Rejected("the ONNX model nests graphs too deeply", title="Invalid ONNX model")
        seen: set[int] = set()
        pos = start
        while pos < end:
            self.fields += 1
            if self.fields > MAX_PROTO_FIELDS:
                raise Rejected(
                    f"the ONNX model has more than {MAX_PROTO_FIELDS} protobuf fields to check",
                    title="Invalid ONNX model",
                )
            tag, pos = self.varint(pos, end)
            field, wire = tag >> 3, tag & 7
            if field == 0:
                raise _NotThisFormat(f"field number 0 at byte {pos}")
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
                    raise _NotThisFormat(f"field {field} at byte {pos} runs past its end")
                if kind == _TENSOR and field == _TENSOR_EXTERNAL_DATA:
                    raise _external_data_refused(f"a tensor at byte {start}")
                sub = _SUBMESSAGES[kind].get(field)
                if sub is not None:
                    self.message(pos, pos + length, sub, depth + 1)
                pos += length
            else:
                raise _NotThisFormat(f"invalid wire type {wire} at byte {pos}")
            if pos > end:
                raise _NotThisFormat(f"field {field} runs past the end of its message")
            if kind == _MODEL and field in (1, 7) and wire != (0 if field == 1 else 2):
                raise _NotThisFormat(f"field {field} has the wrong wire type")
            seen.add(field)
        return seen


def _check_onnx_wire(path: Path, size: int) -> None:
    with open(path, "rb", buffering=64 * 1024) as f:
        fields = _WireScanner(f).message(0, size, _MODEL, 0)
    if 7 not in fields:
        raise _NotThisFormat("it has no graph (protobuf field 7)")
    if 1 not in fields:
        raise Rejected("the ONNX model has no ir_version", title="Invalid ONNX model")


# ======================================================================================
# Datasets
# ======================================================================================


def check_dataset_file(
    path: Path, filename: str | None, declared_format: str | None
) -> tuple[str, dict[str, Any]]:
    """Validate an uploaded dataset; return its format and a summary of its contents.

    npz / safetensors: ``{"arrays": {name: {"shape": [...], "dtype": "float32"}},
    "num_samples": N, "has_labels": bool}``; jsonl: ``{"num_samples": N, "has_labels": bool}``.
    """
    declared = _normalize(declared_format, DATASET_FORMATS, "dataset")
    head, size = _read_head(path)
    if size == 0:
        raise Rejected("the dataset file is empty", title="Empty dataset")
    if _is_pickle(head):
        raise Rejected(
            "the file is a Python pickle. It was NOT unpickled: unpickling an upload can run "
            "arbitrary code. Save arrays with numpy.savez('data.npz', inputs=..., labels=...) "
            "or safetensors, or text as JSON lines",
            title="Pickled dataset refused",
        )
    by_name = _extension(filename)
    expected = declared or (by_name if by_name in DATASET_FORMATS else None)
    kind: str | None = None
    if _is_zip(path, head):
        kind = "npz"
    elif len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
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
            _check_safetensors(path, size)  # raises with the precise header problem
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
    if kind == "npz":
        return kind, _check_arrays(_npz_arrays(path), "the .npz file")
    if kind == "safetensors":
        return kind, _check_arrays(_check_safetensors(path, size), "the safetensors file")
    return kind, _check_jsonl(path)


_DATASET_NAMES = {
    "npz": "a zip archive (npz)",
    "safetensors": "a safetensors file",
    "jsonl": "JSON lines (jsonl)",
}
_Arrays = dict[str, tuple[list[int], str, str]]  # name -> (shape, dtype name, dtype kind)


def _invalid(detail: str) -> Rejected:
    return Rejected(detail, title="Invalid dataset")


def _npz_arrays(path: Path) -> _Arrays:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise _invalid(f"the .npz file is corrupt or truncated ({exc})") from None
    arrays: _Arrays = {}
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


_SAFETENSORS_DTYPES: dict[str, tuple[str, int, str]] = {
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


def _bad_safetensors(detail: str) -> Rejected:
    return Rejected(f"bad safetensors header: {detail}", title="Invalid dataset")


def _check_safetensors(path: Path, size: int) -> _Arrays:
    with open(path, "rb") as f:
        return _safetensors_header(f, size, _bad_safetensors, MAX_ARRAYS)


def _safetensors_header(
    f: IO[bytes], size: int, bad: Callable[[str], Rejected], max_tensors: int
) -> _Arrays:
    """Check a safetensors header read from ``f`` (``size`` bytes in all); memory bounded."""
    raw_len = f.read(8)
    if len(raw_len) < 8:
        raise bad("the file is shorter than the 8-byte header length")
    header_len = struct.unpack("<Q", raw_len)[0]
    if header_len > min(size - 8, MAX_SAFETENSORS_HEADER_BYTES):
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
    arrays: _Arrays = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise bad("__metadata__ must be an object of strings")
            continue
        if not isinstance(entry, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _SAFETENSORS_DTYPES:
            raise bad(
                f"tensor {name!r} has dtype {dtype!r}; supported: {', '.join(_SAFETENSORS_DTYPES)}"
            )
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
        dtype_name, itemsize, kind = _SAFETENSORS_DTYPES[dtype]
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


def _check_arrays(arrays: _Arrays, what: str) -> dict[str, Any]:
    if not arrays:
        raise _invalid(f"{what} holds no arrays; add an 'inputs' array and optional 'labels'")
    inputs = ["inputs"] if "inputs" in arrays else [n for n in arrays if n != "labels"]
    if not inputs:
        raise _invalid(f"{what} holds only 'labels'; add an 'inputs' array (or named input arrays)")
    for name, (shape, _, _) in arrays.items():
        if not shape:
            raise _invalid(
                f"array {name!r} is a scalar; every array needs a first dimension (the samples)"
            )
    if "labels" in arrays:
        shape, dtype, kind = arrays["labels"]
        if len(shape) != 1 or kind not in "iu":
            raise _invalid(
                f"'labels' must be a 1-D integer array of class indices, got shape "
                f"{tuple(shape)} {dtype}"
            )
    firsts = {shape[0] for shape, _, _ in arrays.values()}
    if len(firsts) != 1:
        shapes = ", ".join(f"{name} {tuple(shape)}" for name, (shape, _, _) in arrays.items())
        raise _invalid(
            f"the arrays do not share their first dimension (the number of samples): {shapes}"
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
        "has_labels": "labels" in arrays,
    }


def _check_jsonl(path: Path) -> dict[str, Any]:
    count = 0
    labelled: bool | None = None
    with open(path, "rb") as f:
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
            if has_label and (
                isinstance(record["label"], bool) or not isinstance(record["label"], int | str)
            ):
                raise _invalid(f'line {number}: "label" must be an integer or a string')
            if labelled is None:
                labelled = has_label
            elif labelled != has_label:
                raise _invalid(f'line {number}: "label" must be on every line or on none')
            count += 1
    if count == 0:
        raise _invalid("the .jsonl file holds no records")
    return {"num_samples": count, "has_labels": bool(labelled)}
