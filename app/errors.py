"""The API's error tree, rendered once as RFC 9457 problem+json.

Expected failures are `ApiError`s. A dependency that is down (the database, the object
store) is told apart from a bug here, once per dependency (`database_outage`,
`storage_outage`), and answered 503 with `Retry-After` on every endpoint; each outage is
logged once when it starts, then reminded about at most once a minute, then "recovered".
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.storage import StorageError, StorageUnavailable

log = logging.getLogger("squish.api")

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_S = 5
"""What a 503 asks clients to wait before retrying (the `Retry-After` header, seconds)."""


class ApiError(Exception):
    """An expected failure with a status and a message that says what to change."""

    status: int = 400
    title: str = "Bad request"
    type: str = "about:blank"

    def __init__(
        self,
        detail: str,
        *,
        title: str | None = None,
        status: int | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if title is not None:
            self.title = title
        if status is not None:
            self.status = status
        self.errors = errors
        self.headers = headers


class Unauthorized(ApiError):
    status = 401
    title = "Unauthorized"


class NotFound(ApiError):
    status = 404
    title = "Not found"


class Conflict(ApiError):
    status = 409
    title = "Conflict"


class PayloadTooLarge(ApiError):
    status = 413
    title = "Payload too large"


class UnsupportedMediaType(ApiError):
    status = 415
    title = "Unsupported media type"


class RangeNotSatisfiable(ApiError):
    status = 416
    title = "Range not satisfiable"


class Unprocessable(ApiError):
    status = 422
    title = "Unprocessable content"


class ServiceUnavailable(ApiError):
    status = 503
    title = "Service unavailable"


# --- dependency outages ------------------------------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen and len(seen) < 16:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


# SQLite's own outages: another process holds the lock past busy_timeout, the disk fails.
_SQLITE_OUTAGE = ("database is locked", "database is busy", "disk i/o error", "unable to open")


def database_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be used right now: connection refused or
    reset, a timeout, the pool exhausted, the server shutting down or overloaded, a
    serialization failure. Not an integrity or data error, which retrying does not fix."""
    # Only a driver that was imported can have raised; a lookup costs nothing.
    psycopg = sys.modules.get("psycopg")
    for err in _chain(exc):
        if isinstance(err, sa_exc.TimeoutError | sa_exc.DisconnectionError):
            return True  # the pool waited pool_timeout for a connection; a dead connection
        if isinstance(err, sa_exc.DBAPIError):
            if err.connection_invalidated:
                return True
            if isinstance(err, sa_exc.IntegrityError | sa_exc.DataError | sa_exc.ProgrammingError):
                return False
        if psycopg is not None and isinstance(
            err, psycopg.OperationalError | psycopg.InterfaceError
        ):
            # Connection failures, admin shutdown, too many connections, query cancelled by
            # a timeout, deadlock/serialization failures: all OperationalError in psycopg.
            return True
        if isinstance(err, sqlite3.OperationalError):
            return any(words in str(err).lower() for words in _SQLITE_OUTAGE)
    return False


def storage_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the object store cannot be reached right now. The backends
    classify their own errors (`app.storage.s3.outage`, errno for the local folder) into
    `StorageUnavailable`; a missing object or a denied access is not an outage."""
    return any(isinstance(err, StorageUnavailable) for err in _chain(exc))


class Outage:
    """One dependency's outage, logged once: the first failure (with its error), then at
    most one reminder a minute with the count of failed requests, then "recovered"."""

    def __init__(self, part: str, *, remind_s: float = 60.0) -> None:
        self.part = part
        self.remind_s = remind_s
        self.down_since: float | None = None
        self.failures = 0  # requests failed during the current outage
        self.total_failures = 0
        self.outages = 0
        self._reminded_at = 0.0
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self.failures += 1
            self.total_failures += 1
            if self.down_since is None:
                self.down_since = self._reminded_at = now
                self.outages += 1
                log.error(
                    "%s unavailable: answering 503 until it is back (%s: %s)",
                    self.part, type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "",
                )  # fmt: skip
            elif now - self._reminded_at >= self.remind_s:
                self._reminded_at = now
                log.error(
                    "%s still unavailable after %.0f s: %d requests answered 503",
                    self.part, now - self.down_since, self.failures,
                )  # fmt: skip

    def ok(self) -> None:
        """The dependency just answered; ends an outage, if one was on."""
        if self.down_since is None:  # the hot path: no lock
            return
        with self._lock:
            if self.down_since is None:
                return
            log.warning(
                "%s recovered after %.1f s: %d requests were answered 503",
                self.part, time.monotonic() - self.down_since, self.failures,
            )  # fmt: skip
            self.down_since = None
            self.failures = 0


DATABASE = Outage("database")
STORAGE = Outage("object storage")
OUTAGES = (DATABASE, STORAGE)


def outage_of(exc: BaseException) -> Outage | None:
    """The dependency whose outage ``exc`` reports, or None for any other error."""
    if database_outage(exc):
        return DATABASE
    if storage_outage(exc):
        return STORAGE
    return None


def unavailable_detail(outage: Outage) -> str:
    return f"{outage.part} unavailable; retry in {RETRY_AFTER_S} s"


# --- rendering ------------------------------------------------------------------------------


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    instance: str | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def validation_errors(raw: list[Any]) -> list[dict[str, Any]]:
    """Pydantic's error list reduced to what a client needs: where, and what is wrong."""
    out = []
    for err in raw:
        loc = [part for part in err.get("loc", ()) if part != "body"]
        out.append({"loc": loc, "msg": err.get("msg", ""), "type": err.get("type", "")})
    return out


def describe(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def unavailable(outage: Outage, exc: BaseException, *, instance: str | None = None) -> JSONResponse:
    """503 naming the part that is down; the outage is logged once, not per request."""
    outage.failed(exc)
    return problem(
        503,
        "Service unavailable",
        unavailable_detail(outage),
        headers={"Retry-After": str(RETRY_AFTER_S)},
        instance=instance,
    )


def _unexpected_response(request: Request, exc: Exception) -> JSONResponse:
    outage = outage_of(exc)
    if outage is not None:
        return unavailable(outage, exc, instance=request.url.path)
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, "Internal error", "An unexpected error occurred; it has been logged.")


# --- OpenAPI --------------------------------------------------------------------------------


class FieldError(BaseModel):
    loc: list[str | int] = Field(
        description="Where: `path`, `query`, `header` or the body field, then the nested keys."
    )
    msg: str = Field(description="What is wrong there.")
    type: str = Field(description="A machine-readable kind, e.g. `missing`, `value_error`.")


class Problem(BaseModel):
    """An error, as RFC 9457 problem details (`application/problem+json`)."""

    type: str = Field("about:blank", description="Always `about:blank`: `status` says it.")
    title: str = Field(description="A short summary of the kind of problem.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What went wrong and what to change.")
    instance: str | None = Field(None, description="The request path.")
    errors: list[FieldError] | None = Field(None, description="Each invalid field (422).")


_RESPONSE_DESCRIPTIONS = {
    400: "Malformed request body: not JSON, or a multipart form the parser refuses",
    401: "Missing, malformed or invalid API key",
    404: "No such resource (or it belongs to another tenant)",
    409: "The resource's state does not allow this",
    413: "The upload is larger than SQUISH_MAX_UPLOAD_BYTES",
    415: "Not multipart/form-data, or a file that is not a supported format",
    416: "The Range does not overlap the file (`Content-Range: bytes */SIZE`)",
    422: "Invalid input; `errors` lists each problem",
    503: "A dependency is down; `detail` names it; retry after `Retry-After` seconds",
    507: "The server has no disk space left for the upload",
}
_RESPONSE_HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Bearer`"}},
    416: {"Content-Range": {"schema": {"type": "string"}, "description": "`bytes */SIZE`"}},
    503: {
        "Retry-After": {
            "schema": {"type": "integer"},
            "description": "Seconds to wait before retrying.",
        }
    },
}
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def problem_response(status: int) -> dict[str, Any]:
    """The OpenAPI entry of an error answer: problem+json, with its headers."""
    entry: dict[str, Any] = {
        "description": _RESPONSE_DESCRIPTIONS[status],
        "content": {PROBLEM_JSON: {"schema": _PROBLEM_REF}},
    }
    if status in _RESPONSE_HEADERS:
        entry["headers"] = _RESPONSE_HEADERS[status]
    return entry


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the errors it answers beyond those every route shares
    (401 when it needs a key, 422 when it takes input, 503: `document_problems` adds them)."""
    return {status: problem_response(status) for status in statuses}


def document_problems(document: dict[str, Any]) -> dict[str, Any]:
    """Every operation's errors as problem+json: 422 replaces FastAPI's own validation
    schema, and the errors every route shares are declared on each that can answer them."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    problem_schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(problem_schema.pop("$defs", {}))
    schemas["Problem"] = problem_schema
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            takes_input = bool(operation.get("parameters") or operation.get("requestBody"))
            takes_json = "application/json" in operation.get("requestBody", {}).get("content", {})
            shared = [(400, takes_json), (422, takes_input or "422" in responses)]
            shared += [(401, bool(operation.get("security"))), (503, path.startswith("/v1/"))]
            for status, applies in shared:
                if applies:
                    responses[str(status)] = problem_response(status)
    used = str(document.get("paths"))
    for name in ("HTTPValidationError", "ValidationError"):
        if f"/{name}'" not in used:
            schemas.pop(name, None)
    return document


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return problem(
            exc.status,
            exc.title,
            exc.detail,
            errors=exc.errors,
            headers=exc.headers,
            instance=request.url.path,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(list(exc.errors()))
        return problem(
            422, "Invalid request", describe(errors), errors=errors, instance=request.url.path
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {
            400: "Bad request",
            404: "Not found",
            405: "Method not allowed",
            401: "Unauthorized",
        }
        return problem(
            exc.status_code,
            titles.get(exc.status_code, "Error"),
            str(exc.detail),
            headers=getattr(exc, "headers", None),
            instance=request.url.path,
        )

    # Registered by class, these are answered inside the app (the catch-all below is
    # answered by Starlette's outermost middleware, which logs every one again).
    @app.exception_handler(sa_exc.SQLAlchemyError)
    async def _database(request: Request, exc: sa_exc.SQLAlchemyError) -> JSONResponse:
        return _unexpected_response(request, exc)

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: StorageError) -> JSONResponse:
        return _unexpected_response(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _unexpected_response(request, exc)
