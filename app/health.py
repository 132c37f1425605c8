"""Liveness, readiness (database, storage, broker) and Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.db import get_engine
from app.errors import PROBLEM_JSON, RETRY_AFTER_S, STORAGE, problem_response
from app.observability import REGISTRY
from app.queue import check_broker
from app.settings import get_settings
from app.storage import get_store

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 10.0
"""A check that has not answered by then counts as failed (its thread is left to finish)."""


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


def _database() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


def _storage() -> None:
    get_store().check()
    STORAGE.ok()


def _broker() -> None:
    check_broker(get_settings())


_CHECKS: dict[str, Callable[[], None]] = {
    "database": _database,
    "storage": _storage,
    "broker": _broker,
}


def _run(fn: Callable[[], None]) -> dict[str, Any]:
    try:
        fn()
        return {"ok": True}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


async def _checks() -> dict[str, Any]:
    """Every check at once, each given CHECK_TIMEOUT_S."""
    results: dict[str, Any] = {}

    async def check(name: str, fn: Callable[[], None]) -> None:
        results[name] = {"ok": False, "error": f"no answer in {CHECK_TIMEOUT_S:g} s"}
        with anyio.move_on_after(CHECK_TIMEOUT_S):
            results[name] = await anyio.to_thread.run_sync(_run, fn, abandon_on_cancel=True)

    async with anyio.create_task_group() as group:
        for name, fn in _CHECKS.items():
            group.start_soon(check, name, fn)
    return {name: results[name] for name in _CHECKS}


_READY = {
    "description": "Every dependency answers.",
    "content": {"application/json": {"schema": {"type": "object"}}},
}


@router.get("/readyz", responses={200: _READY, 503: problem_response(503)})
async def readyz() -> JSONResponse:
    """Readiness: the database, the object store and the broker all answer."""
    checks = await _checks()
    if all(c["ok"] for c in checks.values()):
        return JSONResponse({"status": "ok", "checks": checks})
    failing = ", ".join(f"{name} ({c['error']})" for name, c in checks.items() if not c["ok"])
    body = {
        "type": "about:blank",
        "title": "Not ready",
        "status": 503,
        "detail": f"Unavailable: {failing}",
        "checks": checks,
    }
    return JSONResponse(
        body,
        status_code=503,
        media_type=PROBLEM_JSON,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}
    },
)
def metrics() -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
