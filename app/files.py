"""Shared plumbing for uploaded files (models, datasets) and downloads with HTTP Range."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db import session_scope
from app.errors import ApiError, RangeNotSatisfiable
from app.orm import Artifact, Dataset, MLModel
from app.settings import Settings
from app.sniff import Rejected
from app.storage import ObjectStore
from app.uploads import ReceivedForm, UploadError, receive_multipart

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


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
        try:
            fmt, info = await anyio.to_thread.run_sync(check, form)
        except Rejected as exc:
            raise ApiError(exc.detail, title=exc.title, status=exc.status) from None
        key = object_key(tenant_id, received.sha256)
        await anyio.to_thread.run_sync(
            partial(store.put_file, received.path, key, sha256=received.sha256)
        )
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
    request: Request, store: ObjectStore, key: str, size: int, media_type: str, filename: str
) -> StreamingResponse:
    span = parse_range(request.headers.get("range"), size)
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{filename}"',
    }
    if span is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(
            store.iter_range(key, 0, None), media_type=media_type, headers=headers
        )
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    return StreamingResponse(
        store.iter_range(key, start, end), status_code=206, media_type=media_type, headers=headers
    )


def insert_uploaded(row: MLModel | Dataset, store: ObjectStore) -> None:
    """Commit the row of a stored upload; if that fails, the object goes too (all or nothing)."""
    try:
        with session_scope() as session:
            session.add(row)
    except Exception:
        with session_scope() as session:
            delete_if_unused(session, store, row.storage_key)
        raise
