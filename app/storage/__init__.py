"""Object storage: one interface, a local folder backend and an S3-compatible backend.

Objects are whole files addressed by a key such as ``models/ab/ab12…``. The API
streams uploads to a temporary file and hands the finished file to ``put_file``;
downloads stream with ``iter_range``; workers copy objects to local files with
``get_to_file``. Nothing here holds a whole object in memory.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from app.settings import get_settings

__all__ = [
    "ObjectNotFound",
    "ObjectStore",
    "StorageError",
    "StorageUnavailable",
    "StoredObject",
    "file_sha256",
    "get_store",
    "store_from_url",
    "validate_key",
]

HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredObject:
    """What a service records about an object it stored (the key is content-addressed)."""

    key: str
    size: int
    sha256: str


class StorageError(Exception):
    """The object store is unavailable or misconfigured."""


class StorageUnavailable(StorageError):
    """The object store cannot be reached right now (connection refused or reset, a
    timeout, a 5xx or SlowDown answer): an outage to wait out and retry, not a bug or a
    misconfiguration. The API answers it with 503 and ``Retry-After``."""


class ObjectNotFound(StorageError):
    """No object under this key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no object under key {key!r}")
        self.key = key


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ValueError.

    Keys are '/'-separated relative paths: no empty, '.' or '..' segments, no
    leading '/', no backslashes or NUL bytes, so that a key can never name a file
    outside the local root (or an odd S3 key).
    """
    if not isinstance(key, str) or not key:
        raise ValueError("object key must be a non-empty string")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"invalid object key {key!r}: must be a relative '/'-separated path")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"invalid object key {key!r}: empty, '.' or '..' segment")
    return key


def check_range(start: int, end: int | None, size: int) -> tuple[int, int]:
    """Clamp an inclusive byte range to an object of ``size`` bytes; ValueError if unsatisfiable.

    Returns ``(start, stop)`` with ``stop`` exclusive. ``(0, None)`` on an empty
    object is the one satisfiable range that yields no bytes.
    """
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid byte range {start}-{end if end is not None else ''}")
    if size == 0 and start == 0 and end is None:
        return 0, 0
    if start >= size:
        raise ValueError(f"byte range starts at {start}, beyond the object's {size} bytes")
    stop = size if end is None else min(end + 1, size)
    return start, stop


def file_sha256(path: Path) -> str:
    """The hex sha256 of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ObjectStore(ABC):
    """Whole-file objects under relative keys (see ``validate_key``)."""

    @abstractmethod
    def put_file(self, path: Path, key: str, *, sha256: str | None = None) -> None:
        """Store the finished local file ``path`` under ``key``, taking ownership of it.

        On success ``path`` no longer exists (the local backend moves it; the S3
        backend uploads it, multipart for large files, then removes it). Storing the
        same content under an existing key is a no-op success. ``sha256`` (hex), when
        the caller already knows it, saves re-hashing the file.
        """

    @abstractmethod
    def get_to_file(self, key: str, path: Path) -> None:
        """Stream the object to the local file ``path`` (replaced atomically); ObjectNotFound if missing."""

    @abstractmethod
    def iter_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        """Stream bytes ``start``..``end`` (inclusive; ``None`` = to the last byte).

        The object is opened before this returns, so a missing key raises
        ObjectNotFound here, not on the first ``next()``. ``end`` past the last byte
        is clamped; a range that starts past the end raises ValueError.
        """

    @abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes; ObjectNotFound if missing."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing key is fine."""

    @abstractmethod
    def check(self) -> None:
        """Readiness probe: raise StorageError with a reason if the store cannot be used."""


def store_from_url(
    url: str, *, endpoint_url: str | None = None, region: str = "us-east-1"
) -> ObjectStore:
    """Build a store from ``file:///abs/path`` or ``s3://bucket/prefix``; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"storage URL {url!r}: file URLs must be file:///absolute/path")
        root = Path(unquote(parts.path))
        if not root.is_absolute() or parts.query or parts.fragment:
            raise ValueError(f"storage URL {url!r}: file URLs must be file:///absolute/path")
        from app.storage.local import LocalObjectStore

        return LocalObjectStore(root)
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not bucket or parts.query or parts.fragment:
            raise ValueError(f"storage URL {url!r}: expected s3://bucket/prefix")
        prefix = str(PurePosixPath(unquote(parts.path))).strip("/")
        if prefix in ("", "."):
            prefix = ""
        else:
            validate_key(prefix)
        from app.storage.s3 import S3ObjectStore

        return S3ObjectStore(bucket, prefix, endpoint_url=endpoint_url, region=region)
    raise ValueError(
        f"unsupported storage URL {url!r}: use file:///absolute/path or s3://bucket/prefix"
    )


@lru_cache
def get_store() -> ObjectStore:
    """The configured store (``SQUISH_STORAGE_URL``), built once per process."""
    settings = get_settings()
    return store_from_url(
        settings.storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
    )
