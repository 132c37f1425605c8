"""The reaper: the database is the truth, so it repairs what a lost worker or broker left.

- a running job whose heartbeat is older than `heartbeat_timeout_s` lost its worker:
  it is queued again (up to `max_attempts`) or failed with `worker_lost`;
- a job queued for longer than `requeue_after_s` may have lost its message. It is re-sent
  only when the broker holds fewer messages on its queue than there are jobs waiting
  there (then the oldest, as many as are missing), and each job backs off: re-sent after
  `requeue_after_s`, then 2x, 4x ... up to 32x that since its last send (`job.resends`).
  Where the broker cannot count its messages, the backoff alone applies. A duplicate
  message is harmless (the claim is conditional) but it is load, so each re-send is
  counted in /metrics (`squish_reaper_resends_total`);
- a model still `pending` inspection after `requeue_after_s` gets its message re-sent;
- a search (app/search/trials.py): its job is kept alive while trials are queued or
  running; a trial whose worker stopped heart-beating is run once more, then failed; lost
  trial, step and finishing messages are re-sent;
- a finished job whose webhook is owed but was neither delivered nor claimed for
  `requeue_after_s` (its message was lost) gets its delivery re-sent, until the delivery
  gives up (app/jobs/webhooks.py);
- likewise a succeeded job whose export is owed but neither done nor claimed (its message
  was lost, or its worker died exporting and the claim lapsed): the export task is re-sent,
  until the export gives up (app/jobs/exports.py).

It runs in every API process; the conditional updates make concurrent reapers safe.
After an outage of its own database it judges no heartbeat for `heartbeat_timeout_s`:
the workers' heartbeats failed too, and need that long to show which are still alive.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from app.db import session_scope, utcnow
from app.errors import database_outage
from app.jobs import exports, lifecycle, webhooks
from app.observability import REAPER_RESENDS
from app.orm import Job, JobStatus, MLModel
from app.queue import DELIVER_WEBHOOK, EXPORT_JOB, INSPECT_MODEL, RUN_JOB, get_celery, send
from app.search import trials as searches
from app.settings import Settings
from worker.contract import Device, InspectionStatus

log = logging.getLogger("squish.reaper")

RESEND_BACKOFF_CAP = 32
"""A job's n-th re-send waits `requeue_after_s` x 2^n, at most x this, since the last."""


def broker_depths(queues: set[str]) -> dict[str, int] | None:
    """The messages waiting on each queue, as the broker counts them; None if it cannot.

    (Messages a worker has taken but not yet acknowledged, prefetched or scheduled with a
    countdown, are not counted: their jobs look short of a message, a few at most.)
    """
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            channel = conn.default_channel
            depths = {}
            for queue in queues:
                try:
                    declared = channel.queue_declare(queue=queue, passive=True)
                except conn.channel_errors:
                    depths[queue] = 0  # never declared, or emptied (Redis drops an empty list)
                else:
                    depths[queue] = int(declared.message_count)
            return depths
    except Exception:
        log.warning("reaper: could not count the broker's messages", exc_info=True)
        return None


def _due(enqueued_at: datetime | None, resends: int, now: datetime, settings: Settings) -> bool:
    if enqueued_at is None:
        return True
    wait = settings.requeue_after_s * min(2**resends, RESEND_BACKOFF_CAP)
    return now - enqueued_at >= timedelta(seconds=wait)


def _lost_jobs(
    session: Session, now: datetime, settings: Settings, sending: dict[str, int]
) -> list[tuple[str, str]]:
    """(id, queue) of the queued jobs whose message the broker seems to have lost, oldest
    first; ``sending`` counts per queue the run messages this sweep sends anyway."""
    cutoff = now - timedelta(seconds=settings.requeue_after_s)
    rows = session.execute(
        select(Job.id, Job.queue, Job.enqueued_at, Job.resends).where(
            Job.status == JobStatus.queued,
            or_(Job.enqueued_at.is_(None), Job.enqueued_at < cutoff),
        )
    ).all()
    due = sorted(
        (row for row in rows if _due(row.enqueued_at, row.resends, now, settings)),
        key=lambda row: (row.enqueued_at is not None, row.enqueued_at or now),
    )
    if not due:
        return []
    by_queue: dict[str, list[str]] = defaultdict(list)
    for row in due:
        by_queue[row.queue].append(row.id)
    depths = broker_depths(set(by_queue))
    if depths is None:
        return [(row.id, row.queue) for row in due]  # cannot tell: the backoff alone decides
    expected = dict(
        session.execute(
            select(Job.queue, func.count())
            .where(Job.status == JobStatus.queued, Job.queue.in_(by_queue))
            .group_by(Job.queue)
        ).all()
    )
    lost: list[tuple[str, str]] = []
    for queue, job_ids in by_queue.items():
        missing = expected.get(queue, 0) - depths.get(queue, 0) - sending.get(queue, 0)
        lost.extend((job_id, queue) for job_id in job_ids[: max(0, missing)])
    return lost


def sweep(settings: Settings, *, judge_heartbeats: bool = True) -> dict[str, int]:
    now = utcnow()
    to_send: list[tuple[str, str, str]] = []
    failed = 0
    stale: list[Job] = []
    with session_scope() as session:
        # First: a search whose trials are queued or running keeps its job's heartbeat.
        to_send.extend(searches.sweep(session, now, settings))
        if judge_heartbeats:
            stale = lifecycle.stale_running(
                session, now - timedelta(seconds=settings.heartbeat_timeout_s)
            )
        sending: dict[str, int] = defaultdict(int)
        for job in stale:
            queue = lifecycle.recover_lost(session, job, settings.max_attempts)
            if queue is None:
                failed += 1
            else:
                to_send.append((RUN_JOB, job.id, queue))
                sending[queue] += 1
        cutoff = now - timedelta(seconds=settings.requeue_after_s)
        waiting = _lost_jobs(session, now, settings, sending)
        for job_id, queue in waiting:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.queued)
                .values(enqueued_at=now, resends=Job.resends + 1)
            )
            to_send.append((RUN_JOB, job_id, queue))
        pending = session.scalars(
            select(MLModel.id).where(
                MLModel.inspection_status == InspectionStatus.pending,
                or_(MLModel.inspection_sent_at.is_(None), MLModel.inspection_sent_at < cutoff),
            )
        ).all()
        if pending:
            session.execute(
                update(MLModel).where(MLModel.id.in_(pending)).values(inspection_sent_at=now)
            )
        to_send.extend((INSPECT_MODEL, model_id, Device.cpu) for model_id in pending)
        hooks = webhooks.resend_due(session, settings.requeue_after_s)
        to_send.extend((DELIVER_WEBHOOK, job_id, queue) for job_id, queue in hooks)
        owed = exports.resend_due(session, settings.requeue_after_s)
        to_send.extend((EXPORT_JOB, job_id, queue) for job_id, queue in owed)
    for task, obj_id, queue in to_send:  # after the commit, never before
        send(task, obj_id, queue)
    if waiting:
        REAPER_RESENDS.labels(RUN_JOB).inc(len(waiting))
    if pending:
        REAPER_RESENDS.labels(INSPECT_MODEL).inc(len(pending))
    if hooks:
        REAPER_RESENDS.labels(DELIVER_WEBHOOK).inc(len(hooks))
    if owed:
        REAPER_RESENDS.labels(EXPORT_JOB).inc(len(owed))
    if stale or waiting or hooks or owed:
        log.info(
            "reaper: %d stale, %d re-sent, %d failed, %d webhooks re-sent, %d exports re-sent",
            len(stale),
            len(waiting),
            failed,
            len(hooks),
            len(owed),
        )
    return {
        "stale": len(stale),
        "resent": len(waiting),
        "failed": failed,
        "webhooks": len(hooks),
        "exports": len(owed),
    }


class Reaper(threading.Thread):
    def __init__(self, settings: Settings) -> None:
        super().__init__(name="squish-reaper", daemon=True)
        self.settings = settings
        self._stop_event = threading.Event()

    def run(self) -> None:
        database_down = False
        judge_after = 0.0  # monotonic time from which heartbeats are judged again
        while not self._stop_event.wait(self.settings.reaper_interval_s):
            try:
                sweep(self.settings, judge_heartbeats=time.monotonic() >= judge_after)
            except Exception as exc:
                if not database_outage(exc):
                    log.exception("reaper sweep failed; retrying next interval")
                    continue
                if not database_down:  # once per outage, not once per sweep
                    log.warning("reaper: database unavailable; sweeping again when it is back")
                database_down = True
                judge_after = time.monotonic() + self.settings.heartbeat_timeout_s
                continue
            if database_down:
                database_down = False
                log.info(
                    "reaper: database back; judging heartbeats again in %.0f s",
                    self.settings.heartbeat_timeout_s,
                )

    def stop(self) -> None:
        self._stop_event.set()
