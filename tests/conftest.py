"""Shared fixtures: an isolated embedded configuration, API keys for two tenants, services."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

try:  # tiny models: one thread beats two fighting over two shared cores
    import torch

    torch.set_num_threads(1)
except ImportError:  # the client-only tests run without torch
    pass

pytest_plugins = ["tests.app.conftest_s3"]

IN_CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_URL = os.environ.get(
    "SQUISH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("SQUISH_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


# Tests that must not run beside each other on two xdist workers (``--dist loadgroup``) say
# so with a module-level ``pytest.mark.xdist_group``: those sharing the Redis database (the
# e2e fixtures flush it), the outage tests, and modules whose module fixture is an expensive
# AOTInductor compile. A mark added in pytest_collection_modifyitems comes too late: xdist
# has already read the marks into the node ids by then, and the groups were split.


def require(service: str, ok: bool, why: str = "") -> None:
    """A missing service skips locally, but fails in CI: it must never silently skip there."""
    if ok:
        return
    message = f"{service} is not reachable{': ' + why if why else ''}"
    if IN_CI:
        pytest.fail(message + " (CI=true: start the service, see the README)")
    pytest.skip(message)


def require_module(name: str) -> Any:
    """``import name``; a missing package skips locally, but fails in CI, like `require`."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        message = f"the package {name} is not installed ({exc})"
        if IN_CI:
            pytest.fail(message + " (CI=true: install the dev dependencies, see the README)")
        pytest.skip(message)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reset_caches() -> None:
    from app.db import reset_engine
    from app.keys import key_cache
    from app.queue import get_celery
    from app.settings import get_settings
    from app.storage import get_store

    get_settings.cache_clear()
    reset_engine()
    get_store.cache_clear()
    get_celery.cache_clear()
    key_cache.clear()


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """An in-process configuration on embedded defaults, migrated, with two tenants' keys."""
    for name in list(os.environ):
        if name.startswith("SQUISH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SQUISH_DATA_DIR", str(tmp_path / "data"))
    reset_caches()
    from app.db import session_scope
    from app.keys import create_key
    from app.migrate import upgrade

    upgrade()
    with session_scope() as session:
        keys = {"alice": create_key(session, "alice"), "bob": create_key(session, "bob")}
    yield keys
    reset_caches()


def _admin_postgres_url() -> str:
    """The shared server's maintenance database, as a libpq URL (for CREATE/DROP DATABASE)."""
    from sqlalchemy.engine import make_url

    url = make_url(POSTGRES_URL).set(drivername="postgresql", database="postgres")
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A throwaway database on the shared PostgreSQL server for this test run, migrated.

    Dropped at the end (WITH (FORCE): a test's stray connection must not keep it alive);
    the server itself is shared and left running.
    """
    from sqlalchemy.engine import make_url

    url = make_url(POSTGRES_URL)
    require("PostgreSQL", port_open(url.host or "127.0.0.1", url.port or 5432), POSTGRES_URL)
    import psycopg

    name = "squish_test_" + secrets.token_hex(4)
    with psycopg.connect(_admin_postgres_url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = url.set(database=name).render_as_string(hide_password=False)
    try:
        from app.migrate import upgrade

        upgrade(database_url)
        yield database_url
    finally:
        with psycopg.connect(_admin_postgres_url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _empty_tables() -> None:
    from sqlalchemy import text

    import app.orm  # noqa: F401  (registers every table)
    from app.db import Base, get_engine

    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    with get_engine().begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)],
)
def db(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The embedded configuration on an empty, migrated database: SQLite, then PostgreSQL.

    Yields the database URL; the broker and the object store are the embedded ones under
    `tmp_path`. The PostgreSQL database is shared by the run and emptied before each test.
    """
    for name in list(os.environ):
        if name.startswith("SQUISH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SQUISH_DATA_DIR", str(tmp_path / "data"))
    if request.param == "postgresql":
        monkeypatch.setenv("SQUISH_DATABASE_URL", request.getfixturevalue("postgres_database"))
    reset_caches()
    from app.migrate import upgrade
    from app.settings import get_settings

    if request.param == "postgresql":
        _empty_tables()
    else:
        upgrade()
    yield get_settings().database_url
    reset_caches()
