"""Engine and session factory; sessions commit at the boundary (request or worker scope)."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import DateTime, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from app.errors import DATABASE
from app.settings import get_settings

CONNECT_TIMEOUT_S = 10
"""A server that does not answer at all fails a new connection after this long (503), not
after the operating system's TCP timeout of minutes; a `connect_timeout` in the URL wins."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """A sortable id: milliseconds since the epoch, then randomness (newest sorts last)."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _answered(*_args: Any) -> None:
    """A statement came back: the database is up (ends an outage the API was answering)."""
    DATABASE.ok()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in make_url(url).query:
            connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
        # No pre-ping: it costs a round trip per request; connections are recycled instead
        # (a connection that broke in an outage is invalidated on its first failed use).
        engine = create_engine(
            url, pool_size=10, max_overflow=20, pool_recycle=1800, connect_args=connect_args
        )
    event.listen(engine, "after_cursor_execute", _answered)
    return engine


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@lru_cache
def get_read_engine() -> Engine:
    """The engine in autocommit mode: a read costs one round trip, no BEGIN/COMMIT."""
    return get_engine().execution_options(isolation_level="AUTOCOMMIT")


@lru_cache
def get_read_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_read_engine(), expire_on_commit=False)


@contextmanager
def session_scope(*, read_only: bool = False) -> Iterator[Session]:
    """A unit of work: commit on success, roll back on error (`read_only`: autocommit reads)."""
    session = (get_read_sessionmaker() if read_only else get_sessionmaker())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def reset_engine() -> None:
    """Forget the cached engine (tests switch databases; workers re-create after fork)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()
    get_read_sessionmaker.cache_clear()
    get_read_engine.cache_clear()
