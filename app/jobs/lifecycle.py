"""Job state transitions, each a conditional UPDATE so that racing parties cannot clobber.

Used by the API (create, cancel), the worker task (claim, progress, finish) and the reaper
(requeue, give up). None of these commit: the caller's unit of work does.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.orm import Job, JobEvent, JobStatus

ACTIVE = (JobStatus.queued.value, JobStatus.running.value)


def add_event(
    session: Session,
    job_id: str,
    kind: str,
    message: str,
    *,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, level=level, message=message, data=data))


def claim(session: Session, job_id: str, token: str) -> bool:
    """queued → running for this worker, or False if someone else has it (or it is gone)."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued.value)
        .values(
            status=JobStatus.running.value,
            worker=token,
            attempts=Job.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            stage="starting",
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    add_event(session, job_id, "status", "running", data={"status": "running", "worker": token})
    return True


def _owned(job_id: str, token: str) -> Any:
    return (Job.id == job_id, Job.status == JobStatus.running.value, Job.worker == token)


def heartbeat(session: Session, job_id: str, token: str) -> bool:
    """Still ours and running? False means cancelled or handed to another worker: stop."""
    result = session.execute(
        update(Job).where(*_owned(job_id, token)).values(heartbeat_at=utcnow())
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def set_progress(
    session: Session, job_id: str, token: str, progress: float, stage: str | None
) -> bool:
    values: dict[str, Any] = {"progress": max(0.0, min(1.0, progress)), "heartbeat_at": utcnow()}
    if stage is not None:
        values["stage"] = stage
    result = session.execute(update(Job).where(*_owned(job_id, token)).values(**values))
    return result.rowcount == 1  # type: ignore[attr-defined]


def finish(
    session: Session,
    job_id: str,
    token: str,
    status: JobStatus,
    *,
    metrics: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> bool:
    values: dict[str, Any] = {"status": status.value, "finished_at": utcnow(), "error": error}
    if status is JobStatus.succeeded:
        values.update(progress=1.0, stage=None, metrics=metrics)
    result = session.execute(update(Job).where(*_owned(job_id, token)).values(**values))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    message = status.value if error is None else f"{status.value}: {error.get('message', '')}"
    add_event(
        session,
        job_id,
        "status",
        message,
        level="error" if status is JobStatus.failed else "info",
        data={"status": status.value, "error": error},
    )
    return True


def release(session: Session, job_id: str, token: str, reason: str) -> bool:
    """running → queued (a transient failure on this worker); the attempt counts."""
    result = session.execute(
        update(Job)
        .where(*_owned(job_id, token))
        .values(status=JobStatus.queued.value, worker=None, stage=None, enqueued_at=utcnow())
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    add_event(
        session,
        job_id,
        "status",
        f"queued again: {reason}",
        level="warning",
        data={"status": "queued", "reason": reason},
    )
    return True


def cancel(session: Session, job_id: str) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE))
        .values(status=JobStatus.cancelled.value, finished_at=utcnow())
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    add_event(session, job_id, "status", "cancelled", data={"status": "cancelled"})
    return True


def stale_running(session: Session, older_than: datetime) -> list[Job]:
    return list(
        session.scalars(
            select(Job).where(Job.status == JobStatus.running.value, Job.heartbeat_at < older_than)
        )
    )


def recover_lost(session: Session, job: Job, max_attempts: int) -> str | None:
    """A running job whose worker stopped heart-beating: queue it again, or give up.

    Returns the queue to re-send to, or None when the job was failed (or moved on meanwhile).
    """
    guard = (Job.id == job.id, Job.status == JobStatus.running.value, Job.worker == job.worker)
    if job.attempts < max_attempts:
        result = session.execute(
            update(Job)
            .where(*guard)
            .values(status=JobStatus.queued.value, worker=None, stage=None, enqueued_at=utcnow())
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            add_event(
                session,
                job.id,
                "status",
                f"worker {job.worker} stopped responding; retrying (attempt {job.attempts + 1} of {max_attempts})",
                level="warning",
                data={"status": "queued", "reason": "worker_lost"},
            )
            return job.queue
        return None
    error = {
        "code": "worker_lost",
        "message": f"the worker running this job stopped responding {job.attempts} times; giving up",
        "step": job.stage,
    }
    result = session.execute(
        update(Job)
        .where(*guard)
        .values(status=JobStatus.failed.value, finished_at=utcnow(), error=error)
    )
    if result.rowcount == 1:  # type: ignore[attr-defined]
        add_event(
            session,
            job.id,
            "status",
            f"failed: {error['message']}",
            level="error",
            data={"status": "failed", "error": error},
        )
    return None
