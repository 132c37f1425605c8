"""Liveness, readiness (database, storage, broker) and Prometheus metrics."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.db import get_engine
from app.errors import PROBLEM_JSON
from app.observability import REGISTRY
from app.queue import check_broker
from app.settings import get_settings
from app.storage import get_store

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


def _checks() -> dict[str, Any]:
    results: dict[str, Any] = {}

    def run(name: str, fn: Any) -> None:
        try:
            fn()
            results[name] = {"ok": True}
        except Exception as exc:
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}

    def database() -> None:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))

    run("database", database)
    run("storage", lambda: get_store().check())
    run("broker", lambda: check_broker(get_settings()))
    return results


@router.get("/readyz")
async def readyz() -> JSONResponse:
    """Readiness: the database, the object store and the broker all answer."""
    with anyio.fail_after(10):
        checks = await anyio.to_thread.run_sync(_checks)
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
    return JSONResponse(body, status_code=503, media_type=PROBLEM_JSON)


@router.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
