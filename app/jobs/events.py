"""Server-Sent Events for a job: stored events first, then new ones until it finishes.

A stream that cannot go on (the database went away mid-stream) ends with a final
``error`` event whose data is a problem (``status`` 503 and ``retry_after`` for an
outage), never with a cut connection; a client reconnects with ``Last-Event-ID``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select

from app.db import session_scope
from app.errors import RETRY_AFTER_S, outage_of, unavailable_detail
from app.orm import Job, JobEvent, JobStatus

log = logging.getLogger("squish.api")

POLL_S = 0.25
KEEPALIVE_S = 15.0


def _format(event: JobEvent) -> str:
    payload = {
        "id": event.id,
        "kind": event.kind,
        "level": event.level,
        "message": event.message,
        "data": event.data,
        "created_at": event.created_at.isoformat(),
    }
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(payload)}\n\n"


def error_event(exc: BaseException, job_id: str) -> str:
    """The last event of a stream that has to end early (no ``id``: resuming repeats nothing)."""
    outage = outage_of(exc)
    body: dict[str, Any]
    if outage is not None:
        outage.failed(exc)
        body = {"status": 503, "title": "Service unavailable", "detail": unavailable_detail(outage)}
        body["retry_after"] = RETRY_AFTER_S
    else:
        log.error("event stream of job %s failed", job_id, exc_info=exc)
        body = {"status": 500, "title": "Internal error", "detail": "the event stream failed"}
    payload = {"kind": "error", "level": "error", "message": body["detail"], "data": body}
    return f"event: error\ndata: {json.dumps(payload)}\n\n"


def _read(job_id: str, after: int) -> tuple[list[JobEvent], str | None]:
    with session_scope() as session:
        events = list(
            session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.id > after)
                .order_by(JobEvent.id)
                .limit(500)
            )
        )
        status = session.scalar(select(Job.status).where(Job.id == job_id))
    return events, status


def stream(job_id: str, after: int, *, max_seconds: float = 24 * 3600) -> Iterator[str]:
    last_sent = time.monotonic()
    deadline = last_sent + max_seconds
    yield "retry: 1000\n\n"
    while time.monotonic() < deadline:
        try:
            events, status = _read(job_id, after)
        except Exception as exc:
            yield error_event(exc, job_id)
            return
        for event in events:
            after = event.id
            yield _format(event)
        if events:
            last_sent = time.monotonic()
            if len(events) == 500:
                continue
        if status is None or JobStatus(status).terminal:
            return
        if time.monotonic() - last_sent > KEEPALIVE_S:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"
        time.sleep(POLL_S)
