"""Rules shared by the zip-based formats (pt2 archives, hf folders, npz datasets)."""

from __future__ import annotations

import json
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from worker.safety import Unsafe

MiB = 1 << 20
READ_CHUNK = MiB
MAX_JSON_MEMBER_BYTES = 256 * MiB
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError)


def is_zip(path: Path, head: bytes) -> bool:
    return head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or zipfile.is_zipfile(path)


def open_zip(path: Path, corrupt: Callable[[str], Unsafe]) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except ZIP_ERRORS as exc:
        raise corrupt(str(exc)) from None


def check_expansion(
    infos: Iterable[zipfile.ZipInfo], size: int, what: str, bad: Callable[[str], Unsafe]
) -> None:
    """Refuse a zip bomb: members may expand to 16 times the file plus 64 MiB, no more."""
    total = sum(info.file_size for info in infos)
    if total > 16 * size + 64 * MiB:
        raise bad(f"{what} expands to {total} bytes from {size}; refusing a zip bomb")


def check_not_encrypted(info: zipfile.ZipInfo, what: str, bad: Callable[[str], Unsafe]) -> None:
    if info.flag_bits & 0x1:
        raise bad(f"{what} {info.filename!r} is encrypted")


def check_crcs(
    archive: zipfile.ZipFile, infos: Iterable[zipfile.ZipInfo], corrupt: Callable[[str], Unsafe]
) -> None:
    """Read every member to its end in chunks: zipfile verifies each CRC-32 at EOF."""
    for info in infos:
        try:
            with archive.open(info) as member:
                while member.read(READ_CHUNK):
                    pass
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
            raise corrupt(f"{info.filename}: {exc}") from None


def read_small(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The first bytes of a marker entry (``archive_format``…), stripped; never the whole entry."""
    with archive.open(info) as member:
        return member.read(64).strip()


def load_json_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, bad: Callable[[str], Unsafe]
) -> Any:
    if info.file_size > MAX_JSON_MEMBER_BYTES:
        raise bad(f"{info.filename} is larger than {MAX_JSON_MEMBER_BYTES} bytes")
    try:
        with archive.open(info) as member:
            return json.load(member)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"{info.filename} is not valid JSON: {exc}") from None
