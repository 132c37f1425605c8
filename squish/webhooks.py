"""Verify squish's webhooks (Standard Webhooks signatures); standard library only.

squish signs every webhook it POSTs as `Standard Webhooks <https://www.standardwebhooks.com>`_
do: three headers, ``webhook-id`` (the same on every retry of one delivery),
``webhook-timestamp`` (Unix seconds) and ``webhook-signature``: ``v1,<base64 HMAC-SHA256>``
of ``"{id}.{timestamp}.{body}"`` keyed with the tenant's secret (``whsec_<base64 key>``,
from ``GET /v1/webhook-secret``). While a rotated secret still verifies (24 h), the header
carries one signature per secret, separated by spaces; any one of them that matches is enough.

A receiver::

    from squish.webhooks import WebhookVerificationError, verify

    @app.post("/squish-hook")
    async def hook(request: Request) -> Response:
        body = await request.body()  # the raw bytes: re-encoded JSON would not verify
        try:
            event = verify(SECRET, request.headers, body)
        except WebhookVerificationError:
            return Response(status_code=400)
        ...  # event["event"] is "job.succeeded", "job.failed" or "job.cancelled"
        return Response(status_code=204)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "SECRET_PREFIX",
    "TOLERANCE_S",
    "WebhookVerificationError",
    "sign",
    "signature_headers",
    "verify",
]

SECRET_PREFIX = "whsec_"
TOLERANCE_S = 5 * 60
"""A message whose timestamp is further than this from the receiver's clock is refused
(a replayed old message, or a clock that is far off)."""


class WebhookVerificationError(Exception):
    """The message cannot be trusted: a header is missing or malformed, its timestamp is
    outside the tolerance, or no signature matches the secret (tampered, or another secret).

    ``str()`` says which, for a receiver's log; answer the request 400 either way.
    """


def _key(secret: str) -> bytes:
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise WebhookVerificationError(
            f"the secret is not {SECRET_PREFIX}<base64>: copy it from GET /v1/webhook-secret"
        ) from None
    if not key:
        raise WebhookVerificationError("the secret is empty")
    return key


def _as_bytes(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else bytes(body)


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes | str) -> str:
    """The signature of one message under one secret: ``v1,<base64 HMAC-SHA256>``."""
    signed = f"{webhook_id}.{timestamp}.".encode() + _as_bytes(body)
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(
    secrets: Iterable[str], webhook_id: str, timestamp: int, body: bytes | str
) -> dict[str, str]:
    """The three headers of a message signed with each of ``secrets`` (at least one)."""
    signatures = [sign(secret, webhook_id, timestamp, body) for secret in secrets]
    if not signatures:
        raise ValueError("at least one secret is needed to sign")
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signatures),
    }


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:  # a plain dict with other capitalization
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    if not value:
        raise WebhookVerificationError(f"the {name} header is missing")
    return value


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance_s: float = TOLERANCE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a webhook's signature and timestamp; return its JSON body.

    Args:
        secret: the tenant's signing secret, ``whsec_…`` (``GET /v1/webhook-secret``).
        headers: the request's headers (any mapping; names are matched without case).
        body: the request body exactly as received (bytes, or str decoded as UTF-8).
        tolerance_s: how far the message's timestamp may be from ``now`` (5 minutes).
        now: the receiver's clock in Unix seconds (default ``time.time()``).

    Raises:
        WebhookVerificationError: a header is missing or malformed, the timestamp is
            outside the tolerance, no signature in ``webhook-signature`` matches, or the
            signed body is not JSON.

    Example::

        event = verify(os.environ["SQUISH_WEBHOOK_SECRET"], request.headers, request.body)
        print(event["event"], event["job"]["id"])
    """
    webhook_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    offered = _header(headers, "webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp {stamp!r} is not Unix seconds") from None
    clock = time.time() if now is None else now
    if abs(clock - timestamp) > tolerance_s:
        raise WebhookVerificationError(
            f"webhook-timestamp is {clock - timestamp:+.0f} s from this clock, more than "
            f"{tolerance_s:.0f} s: a replayed message, or a clock that is off"
        )
    expected = sign(secret, webhook_id, timestamp, body).partition(",")[2]
    for candidate in offered.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected.encode()):
            break
    else:
        raise WebhookVerificationError(
            "no signature matches this secret: the message was changed, or it was signed "
            "with another secret (rotated more than 24 h ago, or another tenant's)"
        )
    try:
        parsed = json.loads(_as_bytes(body))
    except ValueError:
        raise WebhookVerificationError("the signed body is not JSON") from None
    if not isinstance(parsed, dict):
        raise WebhookVerificationError("the signed body is not a JSON object")
    return parsed
