"""The exceptions the squish SDK raises.

Every exception derives from `SquishError`, so ``except squish.SquishError`` catches
anything the client can raise::

    SquishError
    ├── TransportError          the server could not be reached (after retries)
    ├── ApiError                the server answered with an RFC 9457 problem
    │   ├── BadRequest          400
    │   ├── Unauthorized        401
    │   ├── NotFound            404
    │   ├── Conflict            409
    │   ├── PayloadTooLarge     413
    │   ├── ValidationFailed    422
    │   └── ServerError         5xx
    │       └── ServiceUnavailable  503: a part of the server is down; try again later
    ├── JobError                a job ended without succeeding (`Client.wait`)
    │   ├── JobFailed
    │   └── JobCancelled
    ├── WaitTimeout             `Client.wait` gave up before the job finished
    └── ChecksumMismatch        a download did not match its published sha256

``str()`` of an `ApiError` is written for a person at a terminal: the title, the
detail and one line per field error, e.g.::

    422 Unprocessable Content: the job spec is invalid
      - pipeline.0.params.amount: Input should be less than or equal to 1
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

__all__ = [
    "ApiError",
    "BadRequest",
    "ChecksumMismatch",
    "Conflict",
    "JobCancelled",
    "JobError",
    "JobFailed",
    "NotFound",
    "PayloadTooLarge",
    "ServerError",
    "ServiceUnavailable",
    "SquishError",
    "TransportError",
    "Unauthorized",
    "ValidationFailed",
    "WaitTimeout",
    "error_from_response",
]


class SquishError(Exception):
    """Base class of every exception raised by the squish SDK."""


class TransportError(SquishError):
    """The request could not be completed: connection refused, reset, timed out.

    Raised after the client's retries are spent; ``__cause__`` holds the httpx error.
    """


class ApiError(SquishError):
    """The server refused the request with an HTTP error status.

    Attributes:
        status: the HTTP status code.
        title: the problem's short summary (``"Not Found"``).
        detail: what went wrong with this request, in words; may be empty.
        errors: field-level problems, each ``{"loc": [...], "msg": str}``.
        problem: the whole problem document as the server sent it.
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        errors: Sequence[Mapping[str, Any]] | None = None,
        problem: Mapping[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail or ""
        self.errors: list[dict[str, Any]] = [dict(e) for e in errors or ()]
        self.problem: dict[str, Any] = dict(problem or {})
        super().__init__(str(self))

    def __str__(self) -> str:
        items = []
        for error in self.errors:
            where = format_loc(error.get("loc"))
            msg = str(error.get("msg", ""))
            items.append(f"{where}: {msg}" if where else msg)
        head = f"{self.status} {self.title}"
        # A detail that only lists the field errors again is left to the list below.
        repeats_items = bool(items) and all(item in self.detail for item in items)
        if self.detail and self.detail != self.title and not repeats_items:
            head += f": {self.detail}"
        return "\n".join([head, *(f"  - {item}" for item in items)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, title={self.title!r}, detail={self.detail!r})"


class BadRequest(ApiError):
    """400: the request is malformed (a bad cursor, a broken multipart body)."""


class Unauthorized(ApiError):
    """401: no API key, or an unknown one. Set ``SQUISH_API_KEY``."""


class NotFound(ApiError):
    """404: no such resource, or one that belongs to another tenant."""


class Conflict(ApiError):
    """409: the resource is not in a state that allows this (cancel a finished job)."""


class PayloadTooLarge(ApiError):
    """413: the upload is over the server's ``SQUISH_MAX_UPLOAD_BYTES``."""


class ValidationFailed(ApiError):
    """422: the request is well-formed but asks for something impossible; see ``errors``."""


class ServerError(ApiError):
    """5xx: the server failed. Requests safe to repeat were retried before this was raised."""


class ServiceUnavailable(ServerError):
    """503: a part the server depends on (its database, its object storage) is down.

    The client retried for ``Client(retry_for=...)`` seconds before raising this.

    Attributes:
        retry_after: the seconds the server asked to wait (its ``Retry-After``), if any.
    """

    def __init__(self, *args: Any, retry_after: float | None = None, **kwargs: Any) -> None:
        self.retry_after = retry_after
        super().__init__(*args, **kwargs)


class JobError(SquishError):
    """A job reached a terminal state other than ``succeeded``.

    Attributes:
        job: the job resource as last read.
    """

    def __init__(self, job: Mapping[str, Any]) -> None:
        self.job: dict[str, Any] = dict(job)
        super().__init__(str(self))

    def __str__(self) -> str:
        job_id = self.job.get("id", "?")
        status = self.job.get("status", "?")
        error = self.job.get("error") or {}
        text = f"job {job_id} {status}"
        if error:
            code = error.get("code")
            message = error.get("message")
            step = error.get("step")
            if code:
                text += f": {code}"
            if message:
                text += f": {message}"
            if step is not None:
                text += f" (step {step})"
        return text


class JobFailed(JobError):
    """The job failed; ``job["error"]`` has its ``code``, ``message`` and ``step``."""


class JobCancelled(JobError):
    """The job was cancelled before it finished."""


class WaitTimeout(SquishError):
    """`Client.wait` reached its timeout while the job was still queued or running.

    Attributes:
        job: the job resource as last read (the job keeps running on the server).
        timeout: the timeout in seconds.
    """

    def __init__(self, job: Mapping[str, Any], timeout: float) -> None:
        self.job: dict[str, Any] = dict(job)
        self.timeout = timeout
        super().__init__(
            f"job {self.job.get('id', '?')} still {self.job.get('status', '?')} after "
            f"{timeout:g} s; it keeps running on the server"
        )


class ChecksumMismatch(SquishError):
    """A downloaded file's sha256 differs from the one the server published.

    The partial download is deleted, so a retry starts from scratch.
    """

    def __init__(self, path: str, expected: str, actual: str) -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(f"{path}: sha256 {actual} does not match the published {expected}")


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationFailed,
}


def format_loc(loc: Any) -> str:
    """``["body", "pipeline", 0, "params", "amount"]`` -> ``"pipeline.0.params.amount"``."""
    if loc is None:
        return ""
    if isinstance(loc, str):
        return loc
    parts = [str(p) for p in loc]
    # "body" is where FastAPI found the field, not part of the name a user wrote.
    if len(parts) > 1 and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts)


def error_from_response(response: httpx.Response) -> ApiError:
    """Build the `ApiError` subclass for an error response (the body must be read)."""
    status = response.status_code
    problem: dict[str, Any] = {}
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        problem = body
    title = str(problem.get("title") or response.reason_phrase or f"HTTP {status}")
    detail = problem.get("detail")
    if detail is None and not problem:
        detail = response.text.strip()[:500] or None
    elif detail is not None and not isinstance(detail, str):
        # Tolerate FastAPI's default {"detail": [...]} shape from a misbehaving proxy/app.
        detail = str(detail)
    errors = problem.get("errors")
    if not isinstance(errors, list):
        errors = []
    errors = [e if isinstance(e, dict) else {"loc": [], "msg": str(e)} for e in errors]
    if status == 503:
        return ServiceUnavailable(
            status,
            title,
            detail,
            errors,
            problem,
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
        )
    cls = ServerError if status >= 500 else _BY_STATUS.get(status, ApiError)
    return cls(status, title, detail, errors, problem)


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header (delay-seconds or an HTTP-date) as seconds from now."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
