"""The embedded backend: objects are files under a root folder."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from app.storage import (
    ObjectNotFound,
    ObjectStore,
    StorageError,
    StorageUnavailable,
    check_range,
    validate_key,
)

COPY_BUFFER = 8 << 20
# A network filesystem (NFS, SMB) that stopped answering, or a failing disk: an outage.
_OUTAGE_ERRNOS = {
    errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.ENOTCONN, errno.EHOSTDOWN,
    errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH, errno.ECONNREFUSED, errno.ECONNRESET,
}  # fmt: skip


def _failure(message: str, exc: OSError) -> StorageError:
    kind = StorageUnavailable if exc.errno in _OUTAGE_ERRNOS else StorageError
    return kind(f"{message}: {exc}")


class LocalObjectStore(ObjectStore):
    """Objects are files at ``root/<key>``; writes land under a temporary name, then rename."""

    def __init__(self, root: Path) -> None:
        if not root.is_absolute():
            raise ValueError(f"local storage root must be absolute, got {root}")
        self.root = root

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        """The file that holds ``key`` (which need not exist)."""
        return self.root.joinpath(*validate_key(key).split("/"))

    def put_file(self, path: Path, key: str, *, sha256: str | None = None) -> None:
        target = self.path_for(key)
        self._mkdir(target.parent)
        try:
            os.replace(path, target)
            return
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise _failure(f"cannot store {key!r} under {self.root}", exc) from exc
        # Another filesystem: copy beside the target, then rename atomically.
        with open(path, "rb") as src:
            self._write_atomically(target, src)
        os.unlink(path)

    def get_to_file(self, key: str, path: Path) -> None:
        with self._open(key) as src:
            self._write_atomically(path, src)

    def iter_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        f = self._open(key)
        try:
            start, stop = check_range(start, end, os.fstat(f.fileno()).st_size)
            f.seek(start)
        except BaseException:
            f.close()
            raise
        return _read_span(f, stop - start, chunk_size)

    def size(self, key: str) -> int:
        target = self.path_for(key)
        try:
            st = target.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(key)
        return st.st_size

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
            self.path_for(key).unlink()

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as exc:
            raise _failure(f"local object folder {self.root} is not writable", exc) from exc

    def _open(self, key: str) -> BinaryIO:
        try:
            return open(self.path_for(key), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise _failure(f"cannot read {key!r} under {self.root}", exc) from exc

    def _mkdir(self, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _failure(f"cannot create {folder}", exc) from exc

    def _write_atomically(self, target: Path, src: BinaryIO) -> None:
        """Copy ``src`` to a temporary file beside ``target``, then rename it into place."""
        self._mkdir(target.parent)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, COPY_BUFFER)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


def _read_span(f: BinaryIO, remaining: int, chunk_size: int) -> Iterator[bytes]:
    with f:
        while remaining > 0:
            chunk = f.read(min(chunk_size, remaining))
            if not chunk:
                raise StorageError("object shrank while it was being read")
            remaining -= len(chunk)
            yield chunk
