"""The FastAPI application: HTTP only; compression runs in Celery workers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from sqlalchemy.exc import IntegrityError

from app import health, methods, ui
from app.datasets.endpoints import router as datasets_router
from app.db import session_scope
from app.errors import document_problems, install_handlers
from app.jobs.endpoints import router as jobs_router
from app.keys import DEFAULT_TENANT, register_key
from app.models.endpoints import router as models_router
from app.observability import MetricsMiddleware, configure_logging
from app.reaper import Reaper
from app.settings import get_settings
from app.uploads import DrainRequestBody
from app.webhook_secrets.endpoints import router as webhooks_router


def _register_operator_key(key: str) -> None:
    """SQUISH_API_KEY works for the default tenant (several API processes may race here)."""
    try:
        with session_scope() as session:
            register_key(session, key, DEFAULT_TENANT)
    except IntegrityError:
        pass


def _operation_id(route: APIRoute) -> str:
    return route.name


def create_app(*, run_reaper: bool = True) -> FastAPI:
    settings = get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.api_key is not None:
            _register_operator_key(settings.api_key.get_secret_value())
        reaper = Reaper(settings) if run_reaper else None
        if reaper is not None:
            reaper.start()
        try:
            yield
        finally:
            if reaper is not None:
                reaper.stop()

    app = FastAPI(
        title="squish",
        version="0.1.0",
        summary="Model compression as a service: prune, distill and quantize over HTTP.",
        lifespan=lifespan,
        # operationId = the route's function name: `upload_model`, not
        # `upload_model_v1_models_post`, in a generated client.
        generate_unique_id_function=_operation_id,
    )
    install_handlers(app)
    app.add_middleware(MetricsMiddleware)
    # Outermost of ours: an early answer (401, 413, 503, ...) still reads the request body.
    app.add_middleware(DrainRequestBody)
    for router in (
        models_router,
        datasets_router,
        jobs_router,
        webhooks_router,
        methods.router,
        health.router,
    ):
        app.include_router(router)
    # The web dashboard: static files, no API route of its own (it calls /v1 like any client).
    app.mount(ui.MOUNT, ui.files(), name="ui")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_problems(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    logging.getLogger("squish").setLevel(logging.INFO)
    configure_logging(settings.log_format)
    return app
