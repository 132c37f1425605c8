"""Server-Sent Events for a job: stored events first, then new ones until it finishes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from sqlalchemy import select

from app.db import session_scope
from app.orm import Job, JobEvent, JobStatus

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


def stream(job_id: str, after: int, *, max_seconds: float = 24 * 3600) -> Iterator[str]:
    last_sent = time.monotonic()
    deadline = last_sent + max_seconds
    yield "retry: 1000\n\n"
    while time.monotonic() < deadline:
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
