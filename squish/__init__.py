"""squish: model compression as a service. This package is the Python SDK and the CLI::

    from squish import Client

    with Client() as client:
        job = client.create_job(model_id, [("quantize.dynamic", {"dtype": "int8"})])

It needs only httpx and click; the server (``app``) and the engine (``worker``) are
separate packages.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

# Set before the imports below: squish.client reads it for its User-Agent.
try:
    __version__ = _version("squish")
except PackageNotFoundError:  # running from a source checkout that is not installed
    __version__ = "0+unknown"

from squish.client import Client, RetryNotice
from squish.errors import (
    ApiError,
    BadRequest,
    ChecksumMismatch,
    Conflict,
    JobCancelled,
    JobError,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    ServerError,
    ServiceUnavailable,
    SquishError,
    TransportError,
    Unauthorized,
    ValidationFailed,
    WaitTimeout,
)

__all__ = [
    "ApiError",
    "BadRequest",
    "ChecksumMismatch",
    "Client",
    "Conflict",
    "JobCancelled",
    "JobError",
    "JobFailed",
    "NotFound",
    "PayloadTooLarge",
    "RetryNotice",
    "ServerError",
    "ServiceUnavailable",
    "SquishError",
    "TransportError",
    "Unauthorized",
    "ValidationFailed",
    "WaitTimeout",
    "__version__",
]
