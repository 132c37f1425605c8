"""torch.export archives (``.pt2``): what torch.export.save writes, and nothing that loads code.

``torch.export.load`` can unpickle (``torch.load(weights_only=False)`` for pickled payloads
and sample inputs, ``pickle.loads`` for opaque objects, TorchScript object pickles), load
AOTInductor shared libraries, and ``sympy.sympify`` (``eval``) symbolic-shape strings. This
module refuses all of that from the archive's bytes alone: the layout must be the one
torch 2.x's ``torch.export.save`` writes (``archive_format`` ``pt2``, ``archive_version``
``0``, per program ``models/<name>.json`` with its weights and constants configs and sample
inputs); every payload must be a plain tensor; sample-input pickles are scanned, never run;
symbolic expressions must be plain arithmetic. The worker then loads the archive with
unpickling refused and checks the graph's call targets (that part needs torch).
"""

from __future__ import annotations

import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

from worker.safety import EXPORT_HELP, Unsafe
from worker.safety._zip import (
    check_crcs,
    check_expansion,
    check_not_encrypted,
    is_zip,
    load_json_member,
    open_zip,
    read_small,
)
from worker.safety.pickles import is_pickle, pickle_refused, scan_pickle

__all__ = ["ARCHIVE_VERSION", "check_pt2_archive", "check_pt2_file", "check_sym_expr"]

ARCHIVE_VERSION = b"0"
"""The pt2 archive spec version torch.export.save writes and torch.export.load requires."""
INVALID = "Invalid pt2 archive"
_NATIVE_CODE_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia")
_NATIVE_CODE_SUFFIXES = (".so", ".dll", ".dylib")
_OBJECT_PREFIXES = ("custom_obj_", "opaque_obj_")
# The payload files torch.export.save names for plain tensors, per folder.
_PAYLOAD_NAMES = {"data/weights/": re.compile(r"weight_\d+"), "data/constants/": re.compile(r"tensor_\d+")}  # fmt: skip
_MODEL_FILE = re.compile(r"models/([^/]+)\.json")
_MAX_EXPR_CHARS = 10_000


def _invalid(detail: str) -> Unsafe:
    return Unsafe(detail, title=INVALID)


def _corrupt(reason: str) -> Unsafe:
    return Unsafe(
        f"the pt2 archive is corrupt or truncated ({reason}); upload the complete file "
        "written by torch.export.save",
        title="Corrupt model file",
    )


def check_pt2_file(path: Path) -> frozenset[str]:
    """Check a file that should be a pt2 archive; return the operator namespaces it calls.

    Raises:
        Unsafe: a pickle, not a zip, or an archive :func:`check_pt2_archive` refuses.
    """
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(16)
        size = fh.seek(0, 2)
    if is_pickle(head):
        raise pickle_refused("a pickle (torch.save of a module or state_dict, legacy format)")
    if not is_zip(path, head):
        raise _invalid(
            f"the file is not a pt2 archive (not a zip file, or truncated). {EXPORT_HELP}"
        )
    return check_pt2_archive(path, size)


def check_pt2_archive(path: Path, size: int) -> frozenset[str]:
    """Check a zip file as a torch.export archive; return the operator namespaces it calls
    (``aten``, ``quantized_decomposed``, ``torchao`` ...: what the loader must register)."""
    with open_zip(path, _corrupt) as archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            raise pickle_refused(
                "a torch.save / TorchScript zip archive (it holds a pickle, data.pkl)"
            )
        format_entries = [n for n in names if n.count("/") == 1 and n.endswith("/archive_format")]
        if not format_entries:
            raise Unsafe(_not_pt2_detail(names), title="Not a pt2 archive")
        root = format_entries[0].split("/", 1)[0]
        prefix = root + "/"
        stray = [n for n in names if not n.startswith(prefix)]
        if stray:
            raise _invalid(
                f"the pt2 archive has entries outside its root folder {root!r}: {stray[:3]}"
            )
        by_rel = {info.filename[len(prefix) :]: info for info in infos}

        check_expansion(infos, size, "the pt2 archive", _invalid)
        for info in infos:
            check_not_encrypted(info, "entry", _invalid)
        check_crcs(archive, infos, _corrupt)

        if read_small(archive, by_rel["archive_format"]) != b"pt2":
            raise Unsafe(
                f"the archive_format entry does not say pt2. {EXPORT_HELP}",
                title="Not a pt2 archive",
            )
        _check_version(archive, by_rel)
        native = [
            r
            for r in by_rel
            if r.startswith(_NATIVE_CODE_DIRS) or r.endswith(_NATIVE_CODE_SUFFIXES)
        ]
        if native:
            raise Unsafe(
                f"the pt2 archive contains compiled code ({native[0]!r}, e.g. from AOTInductor); "
                "loading it would run native code from the upload. Save the ExportedProgram "
                "with torch.export.save instead",
                title="Compiled code refused",
            )
        ops_used: set[str] = set()
        for model_name in _model_names(by_rel):
            _check_program_entries(archive, by_rel, model_name, ops_used)
        for rel, info in by_rel.items():
            for folder in _PAYLOAD_NAMES:
                if rel.startswith(folder) and rel.endswith("_config.json"):
                    _check_payload_config(archive, info, folder, by_rel)
                elif rel.startswith(folder) and rel[len(folder) :].startswith(_OBJECT_PREFIXES):
                    raise _custom_object_refused(rel)
        for rel, info in by_rel.items():
            if rel.startswith("data/sample_inputs/"):
                _check_sample_inputs(archive, info)
        return frozenset(ops_used)


def _not_pt2_detail(names: list[str]) -> str:
    if any(
        n == "serialized_exported_program.json" or n.endswith("/serialized_exported_program.json")
        for n in names
    ):
        return (
            "the pt2 file uses the legacy (PyTorch 2.7 or older) layout, which loads through "
            f"pickle; re-save it with a current PyTorch. {EXPORT_HELP}"
        )
    hint = ""
    if any(n.endswith("config.json") for n in names) and any(
        n.endswith(".safetensors") for n in names
    ):
        hint = (
            "It looks like a Hugging Face model folder (format hf), but an hf zip "
            "needs config.json at its root or in its single top folder. "
        )
    return f"the zip archive is not a torch.export archive: it has no archive_format entry. {hint}{EXPORT_HELP}"


def _check_version(archive: zipfile.ZipFile, by_rel: dict[str, zipfile.ZipInfo]) -> None:
    # torch.export.save always writes archive_version, and torch.export.load refuses an
    # archive without it (its reader does not default to "0"), so it is required here too.
    entry = by_rel.get("archive_version")
    if entry is None:
        raise _invalid(
            "the pt2 archive has no archive_version entry, which torch.export.save writes "
            "and torch.export.load requires; upload the complete file written by "
            f"torch.export.save. {EXPORT_HELP}"
        )
    version = read_small(archive, entry)
    if version != ARCHIVE_VERSION:
        raise Unsafe(
            f"unsupported pt2 archive_version {version[:16].decode('latin-1')!r}; squish "
            f"loads version {ARCHIVE_VERSION.decode()} archives (torch 2.x torch.export.save)",
            title="Unsupported pt2 archive",
        )


def _model_names(by_rel: dict[str, zipfile.ZipInfo]) -> list[str]:
    """The programs of the archive: ``models/<name>.json``, and nothing else under models/."""
    names = []
    for rel in by_rel:
        if not rel.startswith("models/") or rel.endswith("/"):
            continue
        match = _MODEL_FILE.fullmatch(rel)
        if match is None:
            # torch.export.load takes every file under models/ for a program
            raise _invalid(f"the pt2 archive has {rel!r} under models/, which is not a program")
        names.append(match.group(1))
    if not names:
        raise _invalid(
            f"the pt2 archive has no models/*.json (the serialized graph). {EXPORT_HELP}"
        )
    return names


def _check_program_entries(
    archive: zipfile.ZipFile, by_rel: dict[str, zipfile.ZipInfo], model: str, ops_used: set[str]
) -> None:
    for legacy in (f"data/weights/{model}.pt", f"data/constants/{model}.pt"):
        if legacy in by_rel:
            raise _invalid(
                f"the archive stores {legacy} in the legacy pickled layout; re-save it with a "
                f"current PyTorch. {EXPORT_HELP}"
            )
    # what torch.export.load reads for each program
    for needed in (
        f"data/weights/{model}_weights_config.json",
        f"data/constants/{model}_constants_config.json",
        f"data/sample_inputs/{model}.pt",
    ):
        if needed not in by_rel:
            raise _invalid(f"the pt2 archive is incomplete: {needed} is missing")
    info = by_rel[f"models/{model}.json"]
    program = load_json_member(archive, info, _invalid)
    if not isinstance(program, dict):
        raise _invalid(f"{info.filename} is not a JSON object")
    _check_program_json(program, ops_used)


def _custom_object_refused(what: str) -> Unsafe:
    return Unsafe(
        f"the pt2 archive holds a custom or opaque object constant ({what}); loading it would "
        "mean unpickling it, which squish never does with an upload. Export a model whose "
        "constants are plain tensors",
        title="Pickled object in pt2 refused",
    )


def _check_payload_config(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, folder: str, by_rel: dict[str, zipfile.ZipInfo]
) -> None:
    """Every entry a plain tensor payload: an allow-listed file name, not pickled, present."""
    config = load_json_member(archive, info, _invalid)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _invalid(f"{info.filename} has no 'config' object")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise _invalid(f"{info.filename}: entry {fqn!r} has no path_name")
        path_name = meta["path_name"]
        if path_name.startswith(_OBJECT_PREFIXES):
            raise _custom_object_refused(f"{fqn!r} in {info.filename}")
        if meta.get("use_pickle"):
            raise Unsafe(
                f"{info.filename}: {fqn!r} is stored pickled (use_pickle: true, a tensor "
                "subclass); loading it would mean unpickling it, which squish never does with "
                "an upload. Export with plain tensors (e.g. unwrap quantized tensor subclasses)",
                title="Pickled object in pt2 refused",
            )
        if not _PAYLOAD_NAMES[folder].fullmatch(path_name):
            raise _invalid(
                f"{info.filename}: {fqn!r} refers to {path_name!r}, which is not a plain tensor "
                "payload as torch.export.save names them"
            )
        if not isinstance(meta.get("tensor_meta"), dict):
            raise _invalid(f"{info.filename}: {fqn!r} has no tensor metadata")
        if folder + path_name not in by_rel:
            raise _invalid(
                f"{info.filename}: {fqn!r} refers to {folder + path_name}, which is missing"
            )


def _check_sample_inputs(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """torch.export.load unpickles the sample inputs (falling back to weights_only=False)."""
    if info.file_size == 0:
        return
    where = f"{info.filename} (the sample inputs)"
    try:
        with archive.open(info) as member:
            if member.read(2) == b"PK":
                member.seek(0)
                with zipfile.ZipFile(member) as inner:
                    for inner_info in inner.infolist():
                        if inner_info.filename.endswith(".pkl"):
                            with inner.open(inner_info) as stream:
                                _scan(stream, inner_info.file_size, where)
            else:
                member.seek(0)
                _scan(member, info.file_size, where)
    except (zipfile.BadZipFile, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise _invalid(f"{where} is not a valid torch.save archive: {exc}") from None


def _scan(stream: IO[bytes], size: int, where: str) -> None:
    scan_pickle(stream, size, where, title="Unsafe pt2 archive")


# --- symbolic shapes ------------------------------------------------------------------

# torch writes symbolic shapes with sympy's srepr, e.g. "Mul(Integer(2), Symbol('s0',
# positive=True, integer=True))", and reads them back with sympy.sympify, which evals.
_ALLOWED_SYMPY_NAMES = frozenset(
    {
        # torch.utils._sympy.functions (the deserializer's sympify locals)
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
        "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow",
        "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat",
        "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
        # sympy atoms, arithmetic, relations and logic as srepr prints them
        "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs",
        "floor", "ceiling", "Piecewise", "ExprCondPair", "Equality", "Unequality",
        "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "Eq", "Ne", "Lt",
        "Le", "Gt", "Ge", "And", "Or", "Not", "true", "false", "True", "False", "oo", "zoo",
        "nan", "Infinity", "NegativeInfinity", "BooleanTrue", "BooleanFalse", "Half", "One",
        "Zero", "NegativeOne", "precision",
        # sympy assumption keywords
        "algebraic", "antihermitian", "commutative", "complex", "composite", "even",
        "extended_negative", "extended_nonnegative", "extended_nonpositive", "extended_nonzero",
        "extended_positive", "extended_real", "finite", "hermitian", "imaginary", "infinite",
        "integer", "irrational", "negative", "noninteger", "nonnegative", "nonpositive",
        "nonzero", "odd", "polar", "positive", "prime", "rational", "real", "transcendental",
        "zero",
    }
)  # fmt: skip
_SYMBOL_NAME = re.compile(r"[a-z]{1,8}\d+")
_EXPR_TOKEN = re.compile(
    r"(?P<num>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
    r"|(?P<name>[A-Za-z_]\w*)"
    r"|(?P<str>'[A-Za-z0-9_.+-]{0,64}')"
    r"|(?P<op>\*\*|//|[-+*/%(),<>=!&|~^]|\s+)"
)


def _check_program_json(node: Any, ops_used: set[str]) -> None:
    """Walk the serialized program: symbolic expressions must be plain arithmetic."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "expr_str":
                    check_sym_expr(value)
                elif key == "target" and isinstance(value, str):
                    parts = value.split(".")
                    if len(parts) > 2 and parts[:2] == ["torch", "ops"]:
                        ops_used.add(parts[2])
                if isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, dict | list))


def check_sym_expr(expr: Any) -> None:
    """torch parses these with sympy.sympify, which evals; allow arithmetic on symbols only."""
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR_CHARS:
        raise _invalid("a symbolic shape expression in the archive is malformed")
    pos = 0
    for match in _EXPR_TOKEN.finditer(expr):
        if match.start() != pos:
            break
        name = match.group("name")
        if name is not None and not (name in _ALLOWED_SYMPY_NAMES or _SYMBOL_NAME.fullmatch(name)):
            break
        pos = match.end()
    if pos != len(expr):
        raise Unsafe(
            f"refusing a symbolic shape expression that is not plain arithmetic: {expr[:80]!r}",
            title="Unsafe pt2 archive",
        )
