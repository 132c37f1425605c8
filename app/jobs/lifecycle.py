"""Job state transitions, each a conditional UPDATE so that racing parties cannot clobber.

Used by the API (create, cancel), the worker task (claim, progress, succeed, fail, release)
and the reaper (requeue, give up). None of these commit: the caller's unit of work does.
Every transition to a terminal state goes through :func:`_became_terminal`, which records
the status event and, for a job with a `webhook_url`, owes its webhook (the delivery task
is sent after the commit; see app/jobs/webhooks.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.orm import Job, JobEvent, JobStatus
from app.queue import DELIVER_WEBHOOK, send_after_commit
from worker.contract import LogLevel
from worker.errors import EngineError, WorkerLostError

ACTIVE = (JobStatus.queued, JobStatus.running)
TERMINAL = tuple(status for status in JobStatus if status.terminal)


def add_event(
    session: Session,
    job_id: str,
    kind: str,
    message: str,
    *,
    level: LogLevel = LogLevel.info,
    data: dict[str, Any] | None = None,
) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, level=level, message=message, data=data))


def _changed(result: Any) -> bool:
    return bool(result.rowcount == 1)


def claim(session: Session, job_id: str, token: str) -> bool:
    """queued → running for this worker, or False if someone else has it (or it is gone)."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(
            status=JobStatus.running,
            worker=token,
            attempts=Job.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            stage="starting",
        )
    )
    if not _changed(result):
        return False
    add_event(
        session,
        job_id,
        "status",
        JobStatus.running,
        data={"status": JobStatus.running, "worker": token},
    )
    return True


def _owned(job_id: str, token: str) -> Any:
    return (Job.id == job_id, Job.status == JobStatus.running, Job.worker == token)


def heartbeat(session: Session, job_id: str, token: str) -> bool:
    """Still ours and running? False means cancelled or handed to another worker: stop."""
    result = session.execute(
        update(Job).where(*_owned(job_id, token)).values(heartbeat_at=utcnow())
    )
    return _changed(result)


def set_progress(
    session: Session, job_id: str, token: str, progress: float, stage: str | None
) -> bool:
    values: dict[str, Any] = {"progress": max(0.0, min(1.0, progress)), "heartbeat_at": utcnow()}
    if stage is not None:
        values["stage"] = stage
    result = session.execute(update(Job).where(*_owned(job_id, token)).values(**values))
    return _changed(result)


def succeed(session: Session, job_id: str, token: str, metrics: dict[str, Any]) -> bool:
    """running (ours) → succeeded; False when the job was cancelled or taken over meanwhile."""
    result = session.execute(
        update(Job)
        .where(*_owned(job_id, token))
        .values(
            status=JobStatus.succeeded,
            finished_at=utcnow(),
            error=None,
            progress=1.0,
            stage=None,
            metrics=metrics,
        )
    )
    if not _changed(result):
        return False
    _became_terminal(session, job_id, JobStatus.succeeded)
    return True


def fail(
    session: Session,
    job_id: str,
    token: str,
    error: EngineError,
    *,
    metrics: dict[str, Any] | None = None,
) -> bool:
    """running (ours) → failed; False when the job was cancelled or taken over meanwhile.

    The stored error is `error.to_dict()`: every job error has that one shape. `metrics`
    are kept with a failure that has them (a result that violates its constraints).
    """
    return _fail(session, _owned(job_id, token), job_id, error, metrics=metrics)


def _fail(
    session: Session,
    guard: Any,
    job_id: str,
    error: EngineError,
    *,
    metrics: dict[str, Any] | None = None,
) -> bool:
    stored = error.to_dict()
    values: dict[str, Any] = {"status": JobStatus.failed, "finished_at": utcnow(), "error": stored}
    if metrics is not None:
        values["metrics"] = metrics
    result = session.execute(update(Job).where(*guard).values(**values))
    if not _changed(result):
        return False
    _became_terminal(session, job_id, JobStatus.failed, error=stored)
    return True


def release(session: Session, job_id: str, token: str, reason: str) -> bool:
    """running → queued (a transient failure on this worker); the attempt counts."""
    result = session.execute(
        update(Job)
        .where(*_owned(job_id, token))
        .values(status=JobStatus.queued, worker=None, stage=None, enqueued_at=utcnow(), resends=0)
    )
    if not _changed(result):
        return False
    add_event(
        session,
        job_id,
        "status",
        f"queued again: {reason}",
        level=LogLevel.warning,
        data={"status": JobStatus.queued, "reason": reason},
    )
    return True


def cancel(session: Session, job_id: str) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE))
        .values(status=JobStatus.cancelled, finished_at=utcnow())
    )
    if not _changed(result):
        return False
    _became_terminal(session, job_id, JobStatus.cancelled)
    return True


def stale_running(session: Session, older_than: datetime) -> list[Job]:
    return list(
        session.scalars(
            select(Job).where(Job.status == JobStatus.running, Job.heartbeat_at < older_than)
        )
    )


def recover_lost(session: Session, job: Job, max_attempts: int) -> str | None:
    """A running job whose worker stopped heart-beating: queue it again, or give up.

    Returns the queue to re-send to, or None when the job was failed (or moved on meanwhile).
    """
    guard = (Job.id == job.id, Job.status == JobStatus.running, Job.worker == job.worker)
    if job.attempts >= max_attempts:
        error = WorkerLostError(
            f"the worker running this job stopped responding {job.attempts} times; giving up",
            step=job.stage,
        )
        _fail(session, guard, job.id, error)
        return None
    result = session.execute(
        update(Job)
        .where(*guard)
        .values(status=JobStatus.queued, worker=None, stage=None, enqueued_at=utcnow(), resends=0)
    )
    if not _changed(result):
        return None
    add_event(
        session,
        job.id,
        "status",
        f"worker {job.worker} stopped responding; retrying (attempt {job.attempts + 1} of {max_attempts})",
        level=LogLevel.warning,
        data={"status": JobStatus.queued, "reason": "worker_lost"},
    )
    return job.queue


def served_from_cache(session: Session, job_id: str, source_id: str) -> None:
    """A job created ``succeeded`` from the result cache (app/jobs/cache.py): its one
    event, and its webhook owed like any finished job's."""
    _became_terminal(
        session,
        job_id,
        JobStatus.succeeded,
        note=f"served from cache: the result of {source_id}",
        data={"cached_from": source_id},
    )


def _became_terminal(
    session: Session,
    job_id: str,
    status: JobStatus,
    *,
    error: dict[str, Any] | None = None,
    note: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    message = status.value if error is None else f"{status.value}: {error['message']}"
    if note is not None:
        message += f": {note}"
    add_event(
        session,
        job_id,
        "status",
        message,
        level=LogLevel.error if status is JobStatus.failed else LogLevel.info,
        data={"status": status, "error": error, **(data or {})},
    )
    spec, queue = session.execute(select(Job.spec, Job.queue).where(Job.id == job_id)).one()
    if spec.get("webhook_url"):
        # Owed from now on: the task is sent after this commit, the reaper re-sends it if lost.
        session.execute(update(Job).where(Job.id == job_id).values(webhook_next_at=utcnow()))
        send_after_commit(session, DELIVER_WEBHOOK, job_id, queue)
