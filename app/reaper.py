"""The reaper: the database is the truth, so it repairs what a lost worker or broker left.

- a running job whose heartbeat is older than `heartbeat_timeout_s` lost its worker:
  it is queued again (up to `max_attempts`) or failed with `worker_lost`;
- a job queued for longer than `requeue_after_s` may have lost its message: it is re-sent
  (a duplicate message is harmless, the claim is conditional);
- a model still `pending` inspection after `requeue_after_s` gets its message re-sent;
- a finished job whose webhook is owed but was neither delivered nor claimed for
  `requeue_after_s` (its message was lost) gets its delivery re-sent, until the delivery
  gives up (app/jobs/webhooks.py).

It runs in every API process; the conditional updates make concurrent reapers safe.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import or_, select, update

from app.db import session_scope, utcnow
from app.jobs import lifecycle, webhooks
from app.orm import Job, JobStatus, MLModel
from app.queue import DELIVER_WEBHOOK, INSPECT_MODEL, RUN_JOB, send
from app.settings import Settings
from worker.contract import Device, InspectionStatus

log = logging.getLogger("squish.reaper")


def sweep(settings: Settings) -> dict[str, int]:
    now = utcnow()
    to_send: list[tuple[str, str, str]] = []
    failed = 0
    with session_scope() as session:
        stale = lifecycle.stale_running(
            session, now - timedelta(seconds=settings.heartbeat_timeout_s)
        )
        for job in stale:
            queue = lifecycle.recover_lost(session, job, settings.max_attempts)
            if queue is None:
                failed += 1
            else:
                to_send.append((RUN_JOB, job.id, queue))
        cutoff = now - timedelta(seconds=settings.requeue_after_s)
        waiting = session.execute(
            select(Job.id, Job.queue).where(
                Job.status == JobStatus.queued,
                or_(Job.enqueued_at.is_(None), Job.enqueued_at < cutoff),
            )
        ).all()
        for job_id, queue in waiting:
            session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=now))
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
    for task, obj_id, queue in to_send:  # after the commit, never before
        send(task, obj_id, queue)
    if stale or waiting or hooks:
        log.info(
            "reaper: %d stale, %d re-sent, %d failed, %d webhooks re-sent",
            len(stale),
            len(waiting),
            failed,
            len(hooks),
        )
    return {"stale": len(stale), "resent": len(waiting), "failed": failed, "webhooks": len(hooks)}


class Reaper(threading.Thread):
    def __init__(self, settings: Settings) -> None:
        super().__init__(name="squish-reaper", daemon=True)
        self.settings = settings
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.settings.reaper_interval_s):
            try:
                sweep(self.settings)
            except Exception:
                log.exception("reaper sweep failed; retrying next interval")

    def stop(self) -> None:
        self._stop_event.set()
