"""POST the finished job to its `webhook_url`, a few tries, and record what happened."""

from __future__ import annotations

import logging
import time

import httpx
from sqlalchemy import update

from app.db import session_scope, utcnow
from app.jobs import lifecycle
from app.jobs.service import artifacts_of, to_out
from app.orm import Job

log = logging.getLogger("squish.webhooks")

ATTEMPTS = 3
TIMEOUT_S = 5.0


def deliver(job_id: str) -> bool:
    """Deliver once per job (the `webhook_delivered_at` stamp makes this idempotent)."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or not job.spec.get("webhook_url") or job.webhook_delivered_at is not None:
            return False
        url = job.spec["webhook_url"]
        payload = to_out(job, artifacts_of(session, [job.id])[job.id]).model_dump(mode="json")
    body = {"event": f"job.{payload['status']}", "job": payload}
    last = ""
    for attempt in range(ATTEMPTS):
        try:
            response = httpx.post(
                url, json=body, timeout=TIMEOUT_S, headers={"User-Agent": "squish-webhook/1"}
            )
            if response.status_code < 300:
                with session_scope() as session:
                    session.execute(
                        update(Job).where(Job.id == job_id).values(webhook_delivered_at=utcnow())
                    )
                    lifecycle.add_event(
                        session,
                        job_id,
                        "log",
                        f"webhook delivered to {url} ({response.status_code})",
                    )
                return True
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5 * 2**attempt)
    with session_scope() as session:
        lifecycle.add_event(
            session,
            job_id,
            "log",
            f"webhook to {url} failed after {ATTEMPTS} tries: {last}",
            level="warning",
        )
    log.warning("webhook for %s failed: %s", job_id, last)
    return False
