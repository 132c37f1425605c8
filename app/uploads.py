"""Streaming multipart/form-data uploads: the file part goes to disk as it arrives.

Starlette's ``request.form()`` spools the whole body before the route sees it.
``receive_multipart`` instead feeds ``request.stream()`` to python-multipart's
streaming parser and writes the file part to a temporary file in large batches,
hashing it on the way, so a multi-gigabyte upload costs a few MiB of memory.
Limits are enforced while the bytes arrive; on any error or disconnect the
temporary file is removed, so a broken upload leaves nothing behind.

``DrainRequestBody`` makes sure a client hears an early answer (401, 400, 413, ...): the
rest of the request body is read, up to a bound, before the answer goes out, so the
server does not close a connection with unread bytes (which reaches the client as a
reset instead of the answer).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "DRAIN_MAX_BYTES",
    "FORM_OVERHEAD_BYTES",
    "MAX_FIELD_BYTES",
    "DrainRequestBody",
    "ReceivedFile",
    "ReceivedForm",
    "UploadError",
    "receive_multipart",
]

FORM_OVERHEAD_BYTES = 64 * 1024
"""Allowance over ``max_bytes`` for boundaries, part headers and the small text fields."""
MAX_FIELD_BYTES = 4 * 1024
"""Largest accepted text field value (``name``, ``format``)."""
MAX_PARTS = 16
WRITE_BATCH_BYTES = 2 << 20
"""File bytes gathered before one write. The batch is hashed and written in a thread while
the event loop receives the next one: on a 2-core box this measured ~1.5x faster than
hashing and writing on the loop (benchmarks/upload.py); larger batches only cost memory."""
DRAIN_MAX_BYTES = 64 << 20
"""Unread request body that is drained before an early answer; past it (or past
``DRAIN_MAX_S``) the answer goes out with ``Connection: close``."""
DRAIN_MAX_S = 30.0
_MAX_FILENAME_CHARS = 255
_IOV_GROUP = 512  # os.writev takes at most IOV_MAX (1024 on Linux) buffers
PREALLOCATE_BYTES = 64 << 20


class UploadError(Exception):
    """A request body that cannot be accepted: ``status`` 400, 413 or 415 (the client's
    fault), or 507 when the server's disk is full."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail


@dataclass
class ReceivedFile:
    """The file part, complete on disk; the caller moves it into storage or deletes it."""

    path: Path
    filename: str | None
    size: int
    sha256: str


@dataclass
class ReceivedForm:
    fields: dict[str, str] = field(default_factory=dict)
    file: ReceivedFile | None = None


def _bad_request(detail: str) -> UploadError:
    return UploadError(400, "Malformed upload", detail)


def _too_large(max_bytes: int) -> UploadError:
    return UploadError(
        413,
        "Upload too large",
        f"the upload exceeds the limit of {max_bytes} bytes (SQUISH_MAX_UPLOAD_BYTES)",
    )


def _decode_header_value(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _clean_filename(raw: str) -> str | None:
    """The last path component, without control characters; None if nothing is left."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return name[:_MAX_FILENAME_CHARS] or None


def _writev_all(fd: int, views: list[memoryview]) -> None:
    for first in range(0, len(views), _IOV_GROUP):
        group = views[first : first + _IOV_GROUP]
        while group:
            written = os.writev(fd, group)
            done = 0
            while done < len(group) and written >= len(group[done]):
                written -= len(group[done])
                done += 1
            group = group[done:]
            if written:
                group[0] = group[0][written:]


class _SpoolFile:
    """The temporary file of the file part; ``write_batch`` runs in a worker thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.digest = hashlib.sha256()
        self.offset = 0
        self.allocated = 0
        self.preallocate = True

    def write_batch(self, views: list[memoryview]) -> None:
        """Hash and write one batch (hashlib and the writes release the GIL)."""
        for view in views:
            self.digest.update(view)
        size = sum(len(view) for view in views)
        if self.preallocate and self.offset + size > self.allocated:
            # Allocating disk in 64 MiB extents just ahead of the data cost 0.15 s of kernel
            # time per GiB on ext4 here, against 0.23-1.4 s when each write allocates; at
            # most one step is reserved beyond what the client has actually sent.
            step = max(PREALLOCATE_BYTES, self.offset + size - self.allocated)
            try:
                os.posix_fallocate(self.fd, self.allocated, step)
                self.allocated += step
            except OSError:
                # Unsupported here, or no room for a whole step: plain writes from now on
                # (they raise ENOSPC themselves if the data really does not fit).
                self.preallocate = False
        _writev_all(self.fd, views)
        self.offset += size

    def close(self) -> None:
        """Drop the preallocated tail, then close."""
        try:
            if self.allocated > self.offset:
                os.ftruncate(self.fd, self.offset)
        finally:
            os.close(self.fd)


# Threads start on first use; each upload has at most one write in flight.
_WRITER = ThreadPoolExecutor(
    max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="squish-upload"
)


class _FormReceiver:
    """python-multipart callbacks plus the state of one upload."""

    def __init__(self, tmp_dir: Path, max_bytes: int, file_field: str) -> None:
        self.tmp_dir = tmp_dir
        self.max_bytes = max_bytes
        self.file_field = file_field
        self.fields: dict[str, str] = {}
        self.ended = False
        self.parts = 0
        # The part being parsed.
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._kind: str | None = None  # "file" | "field"
        self._field_name = ""
        self._field_value = bytearray()
        # The file part.
        self.file_seen = False
        self.file_done = False
        self.filename: str | None = None
        self.path: Path | None = None
        self._spool: _SpoolFile | None = None
        self.size = 0
        self._batch: list[memoryview] = []
        self._batch_bytes = 0
        self._write: Future[None] | None = None

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    # --- parser callbacks -------------------------------------------------------------
    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise _bad_request(f"too many form parts (at most {MAX_PARTS})")
        self._headers = {}
        self._kind = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_name.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get("content-disposition"))
        if disposition != b"form-data" or b"name" not in params:
            raise _bad_request(
                "every part needs a 'Content-Disposition: form-data; name=...' header"
            )
        name = _decode_header_value(params[b"name"])
        if name == self.file_field:
            if self.file_seen:
                raise _bad_request(f"send exactly one file part named {self.file_field!r}")
            self.file_seen = True
            self._kind = "file"
            raw_filename = params.get(b"filename")
            self.filename = (
                _clean_filename(_decode_header_value(raw_filename)) if raw_filename else None
            )
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-", suffix=".part")
            self._spool, self.path = _SpoolFile(fd), Path(tmp_name)
        elif b"filename" in params:
            raise _bad_request(
                f"unexpected file part {name!r}: send the file as the multipart field "
                f"{self.file_field!r}"
            )
        else:
            if name in self.fields:
                raise _bad_request(f"form field {name!r} was sent more than once")
            self._kind = "field"
            self._field_name = name
            self._field_value.clear()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._kind == "file":
            self.size += end - start
            if self.size > self.max_bytes:
                raise _too_large(self.max_bytes)
            self._batch.append(memoryview(data)[start:end])
            self._batch_bytes += end - start
        elif self._kind == "field":
            if len(self._field_value) + (end - start) > MAX_FIELD_BYTES:
                raise _bad_request(
                    f"form field {self._field_name!r} is longer than {MAX_FIELD_BYTES} bytes"
                )
            self._field_value += data[start:end]

    def on_part_end(self) -> None:
        if self._kind == "file":
            self.file_done = True
        elif self._kind == "field":
            try:
                self.fields[self._field_name] = self._field_value.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad_request(f"form field {self._field_name!r} is not UTF-8 text") from None
        self._kind = None

    def on_end(self) -> None:
        self.ended = True

    # --- file output ------------------------------------------------------------------
    async def flush(self, *, force: bool = False) -> None:
        """Hand the gathered bytes to a thread; at most one batch is in flight."""
        if self._batch_bytes < WRITE_BATCH_BYTES and not (force and self._batch):
            return
        await self._wait_for_write()
        assert self._spool is not None
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        self._write = _WRITER.submit(self._spool.write_batch, batch)

    async def _wait_for_write(self) -> None:
        if self._write is not None:
            # The thread's own future (not an asyncio wrapper) is kept: if this await is
            # cancelled, discard() still sees the write as running.
            await asyncio.wrap_future(self._write)
            self._write = None

    async def finish(self) -> ReceivedFile:
        await self.flush(force=True)
        await self._wait_for_write()
        assert self._spool is not None and self.path is not None
        spool, self._spool = self._spool, None
        spool.close()
        return ReceivedFile(
            path=self.path, filename=self.filename, size=self.size, sha256=spool.digest.hexdigest()
        )

    def discard(self) -> None:
        """Remove the temporary file; if a write is still running, once it is done."""
        spool, path, self._spool, self.path = self._spool, self.path, None, None
        self._batch = []

        def remove(_: object = None) -> None:
            if spool is not None:
                os.close(spool.fd)
            if path is not None:
                path.unlink(missing_ok=True)

        if self._write is not None and not self._write.done():
            # Closing the descriptor under a running write could let it hit a reused one.
            self._write.add_done_callback(remove)
        else:
            remove()
        self._write = None


async def receive_multipart(
    request: Request, *, tmp_dir: Path, max_bytes: int, file_field: str = "file"
) -> ReceivedForm:
    """Parse a multipart/form-data body as it arrives; exactly one part named ``file_field``.

    Raises UploadError: 415 when the body is not multipart/form-data, 413 when it
    is larger than ``max_bytes`` (checked against Content-Length first, then counted
    as it streams), 400 for a malformed body, a missing or repeated file part, an
    oversized text field, or a client that went away mid-upload. The file lands in
    ``tmp_dir``; put ``tmp_dir`` on the object store's filesystem so that storing it
    is a rename.
    """
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise UploadError(
            415,
            "Unsupported media type",
            f"send a multipart/form-data body with the file in the field {file_field!r} "
            f"(e.g. curl -F {file_field}=@model.pt2), not {content_type.decode('latin-1') or 'no content type'}",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise _bad_request("the multipart/form-data content type has no boundary parameter")

    body_limit = max_bytes + FORM_OVERHEAD_BYTES
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_length = int(declared)
        except ValueError:
            raise _bad_request("invalid Content-Length header") from None
        if declared_length > body_limit:
            raise _too_large(max_bytes)

    receiver = _FormReceiver(tmp_dir, max_bytes, file_field)
    try:
        parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
    except FormParserError as exc:  # e.g. a boundary longer than the parser's 256 bytes
        raise _bad_request(f"invalid multipart boundary: {exc}") from None
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise _too_large(max_bytes)
            if receiver.ended:
                continue  # epilogue after the closing boundary
            try:
                parser.write(chunk)
            except FormParserError as exc:
                raise _bad_request(f"malformed multipart body: {exc}") from None
            await receiver.flush()
        if not receiver.ended:
            raise _bad_request("the multipart body ended before its closing boundary")
        if not receiver.file_seen or not receiver.file_done:
            raise _bad_request(
                f"no file part: send the file (the model or dataset) as the multipart form "
                f"field {file_field!r}, e.g. curl -F {file_field}=@model.pt2"
            )
        received_file = await receiver.finish()
    except ClientDisconnect:
        receiver.discard()
        raise UploadError(
            400, "Upload incomplete", "the client disconnected before the upload finished"
        ) from None
    except OSError as exc:
        receiver.discard()
        if exc.errno != errno.ENOSPC:
            raise
        raise UploadError(
            507, "Insufficient storage", "the server has no disk space left for this upload"
        ) from None
    except BaseException:
        receiver.discard()
        raise
    return ReceivedForm(fields=receiver.fields, file=received_file)


def _declared_body(scope: Scope) -> int | None:
    """The request's declared body length: 0 for none, None when chunked (unknown)."""
    length = 0
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
        elif name == b"transfer-encoding":
            return None
    return length


class DrainRequestBody:
    """Pure ASGI: before the response starts, read what the app left of the request body
    (at most ``max_bytes``, ``max_s``); past either bound, or for a declared body larger
    than ``max_bytes``, answer with ``Connection: close`` without reading on."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int = DRAIN_MAX_BYTES, max_s: float = DRAIN_MAX_S
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_s = max_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _declared_body(scope) if scope["type"] == "http" else 0
        if declared == 0:
            await self.app(scope, receive, send)
            return
        done = False  # the whole body was received (or the client left)

        async def tracked_receive() -> Message:
            nonlocal done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        async def drain() -> bool:
            if declared is not None and declared > self.max_bytes:
                return False
            drained = 0
            with anyio.move_on_after(self.max_s):
                while not done and drained <= self.max_bytes:
                    drained += len((await tracked_receive()).get("body", b""))
            return done

        started = False

        async def draining_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not done and not await drain():
                    headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, tracked_receive, draining_send)
        except Exception:
            # Answered (500) by the outermost middleware, which does not pass through here.
            if not started and not done:
                await drain()
            raise
