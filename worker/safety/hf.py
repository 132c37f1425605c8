"""Zipped Hugging Face Transformers model folders (``hf``): files only, no code, no pickles.

A ``save_pretrained`` folder, zipped, with ``config.json`` at the zip's root or in its single
top folder. Every member's path is checked (no absolute or ``..`` paths, no links: zip-slip),
with its CRC and the total size; code (``*.py``, native libraries, an ``auto_map`` in any JSON
at the folder's root: remote code is never trusted), pickled weights (``pytorch_model.bin``,
``*.pt``, ``*.pkl`` ...) and weights of other frameworks are refused; config.json must name a
``model_type`` and ``architectures`` and no ``quantization_config``; the weights are
``*.safetensors`` with valid headers; tokenizer files are there. The worker then checks that
the architecture is one transformers itself provides (that part needs transformers).
"""

from __future__ import annotations

import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.safety import HF_SAVE_HELP, Unsafe
from worker.safety._zip import (
    check_crcs,
    check_expansion,
    check_not_encrypted,
    load_json_member,
    open_zip,
)
from worker.safety.pickles import PICKLE_TITLE
from worker.safety.safetensors import check_header

__all__ = [
    "CODE_SUFFIXES",
    "HF_TITLE",
    "MAX_MEMBERS",
    "OTHER_WEIGHT_SUFFIXES",
    "PICKLE_SUFFIXES",
    "TOKENIZER_FILES",
    "HfArchive",
    "check_hf_file",
    "is_litter",
]

HF_TITLE = "Invalid Hugging Face model"
MAX_MEMBERS = 10_000
MAX_TENSORS = 1_000_000
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".dll", ".dylib")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
OTHER_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".keras", ".gguf")
TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
     "sentencepiece.bpe.model", "tokenizer.model"}
)  # fmt: skip
"""Any one of these at the folder's root means the upload brings its tokenizer."""
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


@dataclass(frozen=True)
class HfArchive:
    """What the check found: the folder inside the zip and its files.

    Attributes:
        root: ``""`` when config.json is at the zip's root, else ``"top/"``.
        members: the zip members to extract (files, litter left out), full names.
        config: config.json, parsed.
    """

    root: str
    members: tuple[str, ...]
    config: dict[str, Any]


def is_litter(name: str) -> bool:
    """Finder litter that zips of a folder often carry; ignored, never extracted."""
    return name.startswith("__MACOSX/") or name.rsplit("/", 1)[-1] == ".DS_Store"


def _bad(detail: str) -> Unsafe:
    return Unsafe(detail, title=HF_TITLE)


def _corrupt(reason: str) -> Unsafe:
    return Unsafe(
        f"the zip is corrupt or truncated ({reason}); upload the complete file",
        title="Corrupt model file",
    )


def no_folder(what: str = "the zip holds") -> Unsafe:
    """The refusal of a zip without a model folder (also used by format detection)."""
    return _bad(
        f"{what} no Hugging Face model folder: config.json must be at the zip's root or in "
        f"its single top folder. {HF_SAVE_HELP}"
    )


def check_member(info: zipfile.ZipInfo) -> None:
    """A member must be one of the folder's own plain files: no escape, no link, no code."""
    name = info.filename
    parts = name.rstrip("/").split("/")
    if (
        name.startswith("/")
        or "\\" in name
        or re.match(r"^[A-Za-z]:", name)
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise _bad(
            f"the zip member {name!r} has an absolute, empty or '..' path; a zip must only "
            "hold the model folder's own files"
        )
    if stat.S_ISLNK(info.external_attr >> 16):
        raise _bad(f"the zip member {name!r} is a symbolic link; zip the files themselves")
    check_not_encrypted(info, "the zip member", _bad)
    lower = parts[-1].lower()
    if lower.endswith(CODE_SUFFIXES):
        raise Unsafe(
            f"the model folder contains code ({name}). squish never runs code from an upload "
            "(trust_remote_code is always off): upload a model whose architecture is part of "
            "the transformers library, without .py files",
            title="Remote code refused",
        )
    if not info.is_dir() and lower.endswith(PICKLE_SUFFIXES):
        raise Unsafe(
            f"the model folder contains {name}, a pickled PyTorch file. It was NOT unpickled: "
            "squish never unpickles an upload, because unpickling can run arbitrary code. Save "
            "the weights as safetensors instead and leave out pytorch_model.bin / *.pt / *.pkl: "
            + HF_SAVE_HELP,
            title=PICKLE_TITLE,
        )
    if not info.is_dir() and lower.endswith(OTHER_WEIGHT_SUFFIXES):
        raise _bad(
            f"the model folder contains {name}, weights in a format other than safetensors "
            f"(TensorFlow, Flax or GGUF); squish loads PyTorch safetensors weights. {HF_SAVE_HELP}"
        )


def _root(names: set[str]) -> str:
    if "config.json" in names:
        return ""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        top = tops.pop() + "/"
        if top + "config.json" in names:
            return top
    raise no_folder()


def check_hf_file(path: Path) -> HfArchive:
    """Check a zipped Hugging Face model folder (see the module docstring).

    Raises:
        Unsafe: what is wrong and what to do instead.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise _bad(
            "an hf model is a zip of a Hugging Face model folder; this is not a zip file. "
            + HF_SAVE_HELP
        )
    size = path.stat().st_size
    with open_zip(path, _corrupt) as archive:
        infos = [i for i in archive.infolist() if not is_litter(i.filename)]
        if len(infos) > MAX_MEMBERS:
            raise _bad(f"the zip has more than {MAX_MEMBERS} members")
        for info in infos:
            check_member(info)
        files = [i for i in infos if not i.is_dir()]
        check_expansion(files, size, "the zip", _bad)
        prefix = _root({info.filename for info in files})
        check_crcs(archive, files, _corrupt)
        root = {info.filename[len(prefix) :]: info for info in files}

        config = load_json_member(archive, root["config.json"], _bad)
        if not isinstance(config, dict):
            raise _bad("the Hugging Face config.json is not a JSON object")
        for rel, info in root.items():
            if "/" in rel or not rel.endswith(".json"):
                continue
            doc = config if rel == "config.json" else load_json_member(archive, info, _bad)
            if isinstance(doc, dict) and "auto_map" in doc:
                raise Unsafe(
                    f"{rel} has an auto_map, which points transformers at custom model code. "
                    "squish never runs code from an upload (trust_remote_code is always off): "
                    "upload a model whose architecture is part of the transformers library",
                    title="Remote code refused",
                )
        _check_config(config)
        weights = [rel for rel in root if "/" not in rel and rel.endswith(".safetensors")]
        if not weights:
            raise _bad(
                f"the Hugging Face model folder has no *.safetensors weights. {HF_SAVE_HELP}"
            )
        for rel in weights:
            info = root[rel]

            def bad(detail: str, rel: str = rel) -> Unsafe:
                return _bad(f"{rel}: bad safetensors header: {detail}")

            with archive.open(info) as member:
                check_header(member, info.file_size, bad, MAX_TENSORS)
        if not any(rel in TOKENIZER_FILES for rel in root):
            raise _bad(
                "the Hugging Face model folder has no tokenizer files (tokenizer.json, "
                "vocab.txt, tokenizer_config.json ...); save them into the folder with "
                "`tokenizer.save_pretrained(folder)` before zipping it"
            )
    return HfArchive(prefix, tuple(info.filename for info in files), config)


def _check_config(config: dict[str, Any]) -> None:
    if "quantization_config" in config:
        raise _bad(
            "the Hugging Face config.json has a quantization_config: pre-quantized models are "
            "not supported; upload the floating-point model and let squish quantize it"
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not _IDENTIFIER.fullmatch(model_type.replace("-", "_")):
        raise _bad(
            'the Hugging Face config.json has no "model_type" (e.g. "bert"); save the model '
            "with save_pretrained, which writes it"
        )
    architectures = config.get("architectures")
    if (
        not isinstance(architectures, list)
        or not architectures
        or not all(isinstance(a, str) and _IDENTIFIER.fullmatch(a) for a in architectures)
    ):
        raise _bad(
            'the Hugging Face config.json has no "architectures" list naming a transformers '
            'class (e.g. ["BertForSequenceClassification"]); save the model with '
            "save_pretrained, which writes it"
        )
