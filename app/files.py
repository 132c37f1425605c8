"""Shared plumbing for uploaded files (models, datasets) and downloads with HTTP Range."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

import anyio
from fastapi import Header, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db import session_scope
from app.deps import check_text_fields
from app.errors import STORAGE, ApiError, RangeNotSatisfiable, problem_responses
from app.orm import Artifact, Dataset, MLModel
from app.settings import Settings
from app.sniff import Rejected
from app.storage import ObjectStore
from app.uploads import ReceivedForm, UploadError, receive_multipart

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")

RangeHeader = Annotated[
    str | None,
    Header(
        alias="Range",
        description="One byte range: `bytes=START-END`, `bytes=START-` or `bytes=-SUFFIX`.",
    ),
]
_BINARY = {"schema": {"type": "string", "format": "binary"}}


def upload_body(description: str, formats: Iterable[str]) -> dict[str, Any]:
    """`openapi_extra` of an upload route: the multipart form `receive_multipart` reads."""
    form = {
        "type": "object",
        "required": ["file"],
        "properties": {
            "file": {"type": "string", "format": "binary", "description": description},
            "name": {"type": "string", "description": "A name; default: the file's name."},
            "format": {
                "type": "string",
                "enum": list(formats),
                "description": "The file's format; default: recognized from its content.",
            },
        },
    }
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}


def upload_responses() -> dict[int | str, dict[str, Any]]:
    return problem_responses(400, 413, 415, 507)


def download_responses(media_types: Iterable[str]) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a download route: the file, a byte range of it, or an error."""
    content = {media_type: _BINARY for media_type in dict.fromkeys(media_types)}
    length = {"schema": {"type": "integer"}, "description": "Bytes in this response."}
    return {
        200: {
            "description": "The whole file.",
            "content": content,
            "headers": {
                "Accept-Ranges": {"schema": {"type": "string"}, "description": "`bytes`"},
                "Content-Length": length,
            },
        },
        206: {
            "description": "The byte range that `Range` asked for.",
            "content": content,
            "headers": {
                "Content-Range": {"schema": {"type": "string"}, "description": "`bytes A-B/SIZE`"},
                "Content-Length": length,
            },
        },
        **problem_responses(404, 416),
    }


@dataclass
class AcceptedFile:
    form: ReceivedForm
    format: str
    info: dict[str, Any] | None
    storage_key: str
    size: int
    sha256: str


def object_key(tenant_id: str, sha256: str) -> str:
    return f"tenants/{tenant_id}/{sha256}"


async def accept_upload(
    request: Request,
    tenant_id: str,
    settings: Settings,
    store: ObjectStore,
    check: Callable[[ReceivedForm], tuple[str, dict[str, Any] | None]],
) -> AcceptedFile:
    """Stream the multipart body to a temp file, check it, then move it into the store.

    All or nothing: on any failure the temp file is gone and nothing reached the store.
    """
    tmp_dir = settings.data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        form = await receive_multipart(
            request, tmp_dir=tmp_dir, max_bytes=settings.max_upload_bytes
        )
    except UploadError as exc:
        raise ApiError(exc.detail, title=exc.title, status=exc.status) from None
    if form.file is None:
        raise ApiError("Send the file as the multipart field 'file'.", title="Missing file")
    received = form.file
    try:
        check_text_fields(form.fields)
        try:
            fmt, info = await anyio.to_thread.run_sync(check, form)
        except Rejected as exc:
            raise ApiError(exc.detail, title=exc.title, status=exc.status) from None
        key = object_key(tenant_id, received.sha256)
        # A store that is down raises StorageUnavailable: 503, and nothing was stored.
        await anyio.to_thread.run_sync(
            partial(store.put_file, received.path, key, sha256=received.sha256)
        )
        STORAGE.ok()
    finally:
        received.path.unlink(missing_ok=True)
    return AcceptedFile(form, fmt, info, key, received.size, received.sha256)


def object_in_use(session: Session, key: str) -> bool:
    for table in (MLModel, Dataset, Artifact):
        count = session.scalar(
            select(func.count()).select_from(table).where(table.storage_key == key)
        )
        if count:
            return True
    return False


def delete_if_unused(session: Session, store: ObjectStore, key: str) -> None:
    """Call after the owning row was deleted (and flushed): drop the object if nothing else uses it."""
    if not object_in_use(session, key):
        store.delete(key)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One `bytes=a-b` range → (start, end inclusive); None for a full response."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None or (not match.group(1) and not match.group(2)):
        raise RangeNotSatisfiable(
            "Only one range of the form 'bytes=START-END', 'bytes=START-' or 'bytes=-SUFFIX' is supported.",
            headers={"Content-Range": f"bytes */{size}"},
        )
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    else:
        suffix = int(last)
        start, end = max(0, size - suffix), size - 1
    if start >= size or start > end:
        raise RangeNotSatisfiable(
            f"The range starts past the end of the {size}-byte file.",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end


def stream_object(
    range_header: str | None,
    store: ObjectStore,
    key: str,
    size: int,
    media_type: str,
    filename: str,
) -> StreamingResponse:
    """The object, or the byte range ``range_header`` asks for; opened before this returns,
    so a store that is down answers 503 rather than breaking the response."""
    span = parse_range(range_header, size)
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{filename}"',
    }
    if span is None:
        headers["Content-Length"] = str(size)
        chunks = store.iter_range(key, 0, None)
        STORAGE.ok()
        return StreamingResponse(chunks, media_type=media_type, headers=headers)
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    chunks = store.iter_range(key, start, end)
    STORAGE.ok()
    return StreamingResponse(chunks, status_code=206, media_type=media_type, headers=headers)


def insert_uploaded(row: MLModel | Dataset, store: ObjectStore) -> None:
    """Commit the row of a stored upload; if that fails, the object goes too (all or nothing)."""
    try:
        with session_scope() as session:
            session.add(row)
    except Exception:
        with session_scope() as session:
            delete_if_unused(session, store, row.storage_key)
        raise
