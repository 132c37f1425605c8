"""A succeeded job's export (`spec.export`: MLflow, worker/export.py), owed like a webhook.

The transaction that records a job's success owes its export (:func:`owe`): a job that
ran is exported by its worker right after that commit, a job answered from the result
cache by the `squish.export_job` task sent after it (worker/tasks.py `export_job`, both).
Either claims the export (app/jobs/owed.py), so two messages for one job export it once at
a time, and marks it done when it ended: exported, or failed with its warning event (a
tracking server that is down or refuses is an answer, not tried again). The reaper re-sends
an export whose message was lost, or whose worker died mid-export once its claim of
:data:`CLAIM_S` lapsed (then the run may be logged twice: at least once, not exactly once);
it gives up after :data:`MAX_ATTEMPTS` claims or :data:`GIVE_UP_AFTER_S` after the job
finished, with a warning event.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.jobs.owed import CLOCK_SKEW_S, Owed
from app.orm import Job, JobStatus
from app.queue import EXPORT_JOB, send_after_commit

MAX_ATTEMPTS = 3
"""Claims of one export: a worker that dies exporting (out of memory, killed) is not the
tracking server's answer, so the export is tried again, this often in all."""
CLAIM_S = 1800.0
"""A claimed export not ended within this is presumed dead and may be claimed again. The
MLflow client gives up on a call after about 2 minutes (worker/export.py HTTP_DEFAULTS);
uploading a large model takes longer."""
GIVE_UP_AFTER_S = 24 * 3600.0
EXPORT = Owed(Job.export_next_at, Job.export_done_at, Job.export_attempts, (JobStatus.succeeded,))


def owes(spec: dict[str, Any]) -> bool:
    """Does a job of this spec owe an export once it succeeds?"""
    return bool((spec.get("export") or {}).get("mlflow"))


def owe(session: Session, job_id: str, spec: dict[str, Any], *, send_to: str | None) -> bool:
    """The export of a job that succeeds in this transaction, if its spec has one, owed
    from now on; with `send_to`, its task is sent to that queue after the commit (None:
    the caller exports it itself after the commit)."""
    if not owes(spec):
        return False
    EXPORT.owe(session, job_id)
    if send_to is not None:
        send_after_commit(session, EXPORT_JOB, job_id, send_to)
    return True


def claim(session: Session, job_id: str) -> int | None:
    """This try's number, the export held for :data:`CLAIM_S`; None: nothing to do now."""
    return EXPORT.claim(
        session, job_id, claim_s=CLAIM_S, max_attempts=MAX_ATTEMPTS, skew_s=CLOCK_SKEW_S
    )


def done(session: Session, job_id: str) -> None:
    """The export ended (exported, or failed with its event): never tried again."""
    EXPORT.done(session, job_id)


def resend_due(session: Session, resend_after_s: float) -> list[tuple[str, str]]:
    """Owed exports whose message seems lost (app/jobs/owed.py), as `(job_id, queue)` to
    send after the caller's commit; the ones out of time or tries are given up instead."""
    return EXPORT.resend_due(
        session,
        resend_after_s,
        max_attempts=MAX_ATTEMPTS,
        give_up_after_s=GIVE_UP_AFTER_S,
        gave_up=lambda spec, when: (
            f"MLflow export to {spec['export']['mlflow']['tracking_uri']} not done {when}; "
            "giving up (the job's result is not affected)"
        ),
    )
