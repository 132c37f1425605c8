"""Webhooks: POST a finished job to its `webhook_url`, signed, once, from their own task.

A job that becomes terminal with a `webhook_url` owes a delivery (app/jobs/lifecycle.py
stamps `webhook_next_at` and sends the delivery task after that commit). :func:`deliver`,
which the task runs, claims the delivery with a conditional UPDATE, so two messages for
one job POST once; POSTs; and records the outcome: delivered (`webhook_delivered_at`),
tried again later with backoff, or given up after :data:`MAX_ATTEMPTS` tries or
:data:`GIVE_UP_AFTER_S` after the job finished. The reaper re-sends a delivery whose
message was lost (a restart, a broker outage, a worker killed mid-delivery):
:func:`resend_due`. The claim, re-send and give-up rules are app/jobs/owed.py's, which
a job's export shares.

A worker killed after the POST but before recording it makes the delivery be tried again
once its claim lapses (:data:`CLAIM_S`): a receiver sees each job at least once, and twice
only after such a crash (with the same `webhook-id`, so it can tell).

Each POST is signed as Standard Webhooks are (`squish.webhooks`: `webhook-id`,
`webhook-timestamp`, `webhook-signature`) with the tenant's secrets
(app/webhook_secrets/service.py), and each attempt is recorded as a `WebhookDelivery` row
(`GET /v1/jobs/{id}/deliveries`). Before every attempt the URL is checked again
(app/netguard.py): a host that now resolves to a private address is not called, and the
attempt is recorded as `refused` and retried like a failure.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import httpx
from sqlalchemy import update
from sqlalchemy.orm import Session

from app import netguard
from app.db import session_scope, utcnow
from app.jobs import lifecycle, owed
from app.jobs.service import artifacts_of, to_out
from app.orm import Job, WebhookDelivery
from app.queue import DELIVER_WEBHOOK, send_after_commit
from app.settings import get_settings
from app.webhook_secrets.service import signing_secrets
from squish.webhooks import signature_headers
from worker.contract import LogLevel

log = logging.getLogger("squish.webhooks")

MAX_ATTEMPTS = 8
TIMEOUT_S = 5.0
CLAIM_S = 60.0
"""A claimed delivery not recorded within this is presumed dead and may be claimed again."""
BACKOFF_S = 5.0
CLOCK_SKEW_S = owed.CLOCK_SKEW_S
BACKOFF_MAX_S = 600.0
GIVE_UP_AFTER_S = 24 * 3600.0
USER_AGENT = "squish-webhook/1"
WEBHOOK = owed.Owed(
    Job.webhook_next_at, Job.webhook_delivered_at, Job.webhook_attempts, lifecycle.TERMINAL
)


class Delivery(StrEnum):
    """What one run of :func:`deliver` did."""

    delivered = "delivered"
    retrying = "retrying"
    given_up = "given_up"
    skipped = "skipped"
    """Nothing to do now: no webhook, already delivered, or another delivery holds it."""


class Outcome(StrEnum):
    """What one attempt (one `WebhookDelivery` row) came to."""

    delivered = "delivered"
    failed = "failed"
    refused = "refused"
    """The URL's host resolves to an address squish does not call: nothing was sent."""


@dataclass(frozen=True)
class _Claimed:
    url: str
    webhook_id: str
    event: str
    body: bytes
    secrets: list[str]
    attempt: int
    queue: str
    finished_at: datetime | None


@dataclass(frozen=True)
class _Attempt:
    outcome: Outcome
    status_code: int | None = None
    error: str | None = None
    duration_ms: float | None = None


def webhook_id_of(job_id: str) -> str:
    """The `webhook-id` of a job's delivery: one per job (one terminal event), on every try."""
    return "msg_" + job_id.removeprefix("job_")


def backoff_s(attempt: int) -> float:
    """Seconds to wait after the `attempt`-th failed try (1-based): 5, 10, 20, ... ≤ 10 min."""
    return min(BACKOFF_S * 2 ** (attempt - 1), BACKOFF_MAX_S)


def deliver(job_id: str) -> Delivery:
    """Run one delivery attempt of the job's webhook, if one is owed and due now."""
    with session_scope() as session:
        claimed = _claim(session, job_id)
    if claimed is None:
        return Delivery.skipped
    attempt = _attempt(claimed)
    with session_scope() as session:
        _record_attempt(session, job_id, claimed, attempt)
        if attempt.outcome is Outcome.delivered:
            _record_delivered(session, job_id, claimed, attempt.status_code)
            return Delivery.delivered
        assert attempt.error is not None
        return _record_failed(session, job_id, claimed, attempt.error)


def _claim(session: Session, job_id: str) -> _Claimed | None:
    attempt = WEBHOOK.claim(
        session, job_id, claim_s=CLAIM_S, max_attempts=MAX_ATTEMPTS, skew_s=CLOCK_SKEW_S
    )
    if attempt is None:
        return None
    job = session.get(Job, job_id)
    assert job is not None
    payload = to_out(job, artifacts_of(session, [job.id])[job.id]).model_dump(mode="json")
    event = f"job.{payload['status']}"
    return _Claimed(
        url=job.spec["webhook_url"],
        webhook_id=webhook_id_of(job.id),
        event=event,
        body=json.dumps({"event": event, "job": payload}, separators=(",", ":")).encode(),
        secrets=signing_secrets(session, job.tenant_id),
        attempt=attempt,
        queue=job.queue,
        finished_at=job.finished_at,
    )


def _attempt(claimed: _Claimed) -> _Attempt:
    """Check the URL again, then POST the signed body (unless refused)."""
    try:
        addresses = netguard.check_url(
            claimed.url, allow_private=bool(get_settings().webhook_allow_private)
        )
    except netguard.UrlRefused as exc:
        return _Attempt(Outcome.refused, error=f"not sent: {exc}")
    # Connect to the address just checked, not to whatever DNS answers next.
    target = netguard.pin(claimed.url, addresses[0]) if addresses else None
    headers = {
        "User-Agent": USER_AGENT,
        "Content-Type": "application/json",
        **signature_headers(claimed.secrets, claimed.webhook_id, int(time.time()), claimed.body),
    }
    start = time.perf_counter()
    try:
        response = _send(claimed.url, claimed.body, headers, target)
    except httpx.HTTPError as exc:
        duration_ms = (time.perf_counter() - start) * 1000
        return _Attempt(
            Outcome.failed, error=f"{type(exc).__name__}: {exc}", duration_ms=duration_ms
        )
    duration_ms = (time.perf_counter() - start) * 1000
    if response.status_code < 300:
        return _Attempt(Outcome.delivered, response.status_code, duration_ms=duration_ms)
    return _Attempt(
        Outcome.failed,
        response.status_code,
        error=f"HTTP {response.status_code}",
        duration_ms=duration_ms,
    )


def _send(
    url: str, body: bytes, headers: dict[str, str], target: netguard.Pinned | None
) -> httpx.Response:
    """POST `body`; to `target`'s address when given. No redirects: a redirect could lead
    to an address the check would refuse."""
    extensions: dict[str, Any] = {}
    if target is not None:
        url = target.url
        if target.host:
            headers = {**headers, "Host": target.host}
        if target.sni_hostname:
            extensions["sni_hostname"] = target.sni_hostname
    with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False) as client:
        request = client.build_request(
            "POST", url, content=body, headers=headers, extensions=extensions
        )
        return client.send(request)


def _record_attempt(session: Session, job_id: str, claimed: _Claimed, attempt: _Attempt) -> None:
    session.add(
        WebhookDelivery(
            job_id=job_id,
            webhook_id=claimed.webhook_id,
            event=claimed.event,
            attempt=claimed.attempt,
            outcome=attempt.outcome,
            status_code=attempt.status_code,
            error=attempt.error[:2000] if attempt.error else None,
            duration_ms=round(attempt.duration_ms, 3) if attempt.duration_ms is not None else None,
        )
    )


def _record_delivered(
    session: Session, job_id: str, claimed: _Claimed, status_code: int | None
) -> None:
    WEBHOOK.done(session, job_id)
    lifecycle.add_event(
        session, job_id, "log", f"webhook delivered to {claimed.url} ({status_code})"
    )


def _record_failed(session: Session, job_id: str, claimed: _Claimed, problem: str) -> Delivery:
    now = utcnow()
    wait = backoff_s(claimed.attempt)
    late = owed.past_give_up(claimed.finished_at, now, GIVE_UP_AFTER_S, wait)
    if claimed.attempt >= MAX_ATTEMPTS or late:
        why = f"failed after {claimed.attempt} tries: {problem}"
        if not WEBHOOK.give_up(
            session, _still_ours(job_id, claimed), job_id, _giving_up(claimed.url, why)
        ):
            return Delivery.skipped
        log.warning("webhook for %s given up: %s", job_id, problem)
        return Delivery.given_up
    result = session.execute(
        update(Job)
        .where(*_still_ours(job_id, claimed))
        .values(webhook_next_at=now + timedelta(seconds=wait))
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return Delivery.skipped  # our claim lapsed and a later try owns the delivery now
    lifecycle.add_event(
        session,
        job_id,
        "log",
        f"webhook to {claimed.url} failed (try {claimed.attempt} of {MAX_ATTEMPTS}): "
        f"{problem}; trying again in {wait:.0f}s",
        level=LogLevel.warning,
    )
    send_after_commit(session, DELIVER_WEBHOOK, job_id, claimed.queue, countdown=wait)
    return Delivery.retrying


def _still_ours(job_id: str, claimed: _Claimed) -> tuple[Any, ...]:
    """No later try has claimed the delivery since ours, and it is not delivered."""
    return (
        Job.id == job_id,
        Job.webhook_delivered_at.is_(None),
        Job.webhook_attempts == claimed.attempt,
    )


def _giving_up(url: str, why: str) -> str:
    return f"webhook to {url} {why}; giving up"


def resend_due(session: Session, resend_after_s: float) -> list[tuple[str, str]]:
    """Owed deliveries whose message seems lost (app/jobs/owed.py), as `(job_id, queue)`
    to send after the caller's commit; a delivery past :data:`GIVE_UP_AFTER_S` (or whose
    last try's worker died) is given up instead."""
    return WEBHOOK.resend_due(
        session,
        resend_after_s,
        max_attempts=MAX_ATTEMPTS,
        give_up_after_s=GIVE_UP_AFTER_S,
        gave_up=lambda spec, when: _giving_up(spec["webhook_url"], f"was not delivered {when}"),
    )
