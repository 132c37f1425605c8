"""Cursor pagination over time-sortable ids, newest first."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel
from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.deps import ID_PATTERN
from app.errors import Unprocessable

T = TypeVar("T")
MAX_LIMIT = 200
_CURSOR_MAX_CHARS = 64  # the base64 of the longest id
_ID = re.compile(ID_PATTERN)

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page.")]
Cursor = Annotated[
    str | None,
    Query(max_length=_CURSOR_MAX_CHARS, description="`next_cursor` of the previous page."),
]


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = base64.urlsafe_b64decode(padded.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        value = ""
    if not value or "_" not in value or _ID.fullmatch(value) is None:
        raise Unprocessable(
            "The cursor is not one this API returned; pass 'next_cursor' from the previous page.",
            title="Invalid cursor",
            errors=[{"loc": ["query", "cursor"], "msg": "invalid cursor", "type": "value_error"}],
        )
    return value


def paginate(
    session: Session,
    stmt: Select[Any],
    id_column: InstrumentedAttribute[str],
    *,
    limit: int,
    cursor: str | None,
) -> tuple[list[Any], str | None]:
    if cursor:
        stmt = stmt.where(id_column < decode_cursor(cursor))
    rows = list(session.scalars(stmt.order_by(id_column.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (encode_cursor(rows[-1].id) if more and rows else None)
