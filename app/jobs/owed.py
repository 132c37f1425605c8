"""Work a finished job owes after its outcome (its webhook, its export): one claim, one
re-send and one give-up rule for all of it.

The transaction that records a job's outcome owes the work (:meth:`Owed.owe` stamps its
`next_at`). The task that does it claims it with a conditional UPDATE (owed, due, not
done, tries left) that moves `next_at` on by the claim's length and counts the try, so two
messages for one job do it once at a time (:meth:`Owed.claim`), and marks it done when it
ended (:meth:`Owed.done`). The reaper re-sends work whose message seems lost: due for
`requeue_after_s` and not claimed, or claimed by a worker whose claim lapsed; work past its
deadline or out of tries is given up instead, with a warning event (:meth:`Owed.resend_due`).

app/jobs/webhooks.py and app/jobs/exports.py say what the work is, and their limits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.db import utcnow
from app.jobs import lifecycle
from app.orm import Job, JobStatus
from worker.contract import LogLevel

CLOCK_SKEW_S = 2.0
"""Hosts' clocks may differ this much: work due by the API's clock is due by a worker's.
Less than the shortest backoff and claim, so neither is cut short by it."""


def past_give_up(
    finished_at: datetime | None, now: datetime, give_up_after_s: float, wait: float = 0.0
) -> bool:
    """Is ``now + wait`` more than `give_up_after_s` after the job finished?"""
    if finished_at is None:
        return False
    return now + timedelta(seconds=wait) > finished_at + timedelta(seconds=give_up_after_s)


def _one_row(result: Any) -> bool:
    """Did the conditional UPDATE change the job's row?"""
    return bool(result.rowcount == 1)


@dataclass(frozen=True)
class Owed:
    """The `job` columns that track one kind of owed work, and the statuses that owe it."""

    next_at: InstrumentedAttribute[datetime | None]
    """When the next try may start; NULL while none is owed (not yet, done, or given up)."""
    done_at: InstrumentedAttribute[datetime | None]
    attempts: InstrumentedAttribute[int]
    """Claims made: the tries started."""
    statuses: tuple[JobStatus, ...]

    def owe(self, session: Session, job_id: str) -> None:
        """Owed from now on (in the transaction that records the job's outcome)."""
        session.execute(update(Job).where(Job.id == job_id).values({self.next_at: utcnow()}))

    def claim(
        self,
        session: Session,
        job_id: str,
        *,
        claim_s: float,
        max_attempts: int,
        skew_s: float,
    ) -> int | None:
        """This try's number (1-based), the work held for `claim_s`; None when it is not
        owed, not due (by a clock up to `skew_s` ahead), done, out of tries, or held."""
        now = utcnow()
        result = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.status.in_(self.statuses),
                self.done_at.is_(None),
                self.next_at <= now + timedelta(seconds=skew_s),
                self.attempts < max_attempts,
            )
            .values(
                {self.next_at: now + timedelta(seconds=claim_s), self.attempts: self.attempts + 1}
            )
        )
        if not _one_row(result):
            return None
        return int(session.scalars(select(self.attempts).where(Job.id == job_id)).one())

    def done(self, session: Session, job_id: str) -> None:
        """Ended: never tried or re-sent again."""
        session.execute(
            update(Job).where(Job.id == job_id).values({self.done_at: utcnow(), self.next_at: None})
        )

    def give_up(self, session: Session, guard: tuple[Any, ...], job_id: str, message: str) -> bool:
        """No more tries, and a warning event that says so; False when ``guard`` no longer
        holds (another try moved the work on meanwhile)."""
        if not _one_row(session.execute(update(Job).where(*guard).values({self.next_at: None}))):
            return False
        lifecycle.add_event(session, job_id, "log", message, level=LogLevel.warning)
        return True

    def resend_due(
        self,
        session: Session,
        resend_after_s: float,
        *,
        max_attempts: int,
        give_up_after_s: float,
        gave_up: Callable[[dict[str, Any], str], str],
    ) -> list[tuple[str, str]]:
        """Owed work whose message seems lost: due for `resend_after_s` and not claimed, or
        claimed by a worker whose claim lapsed.

        Each is marked re-sent (due now again, so it is not picked before another interval)
        and returned as `(job_id, queue)` for the caller to send after its commit. Work past
        `give_up_after_s` since the job finished, or whose `max_attempts` tries all lapsed,
        is given up instead: ``gave_up(spec, "in time" | "after N tries")`` is the event.
        """
        now = utcnow()
        lapsed = (
            self.next_at < now - timedelta(seconds=resend_after_s),
            self.done_at.is_(None),
            Job.status.in_(self.statuses),
        )
        rows = session.execute(
            select(Job.id, Job.queue, Job.finished_at, Job.spec, self.attempts).where(*lapsed)
        ).all()
        due: list[tuple[str, str]] = []
        for job_id, queue, finished_at, spec, attempts in rows:
            # Guarded by the same condition: a try that claimed it meanwhile keeps its claim.
            guard = (Job.id == job_id, *lapsed)
            if past_give_up(finished_at, now, give_up_after_s):
                self.give_up(session, guard, job_id, gave_up(spec, "in time"))
            elif attempts >= max_attempts:  # the last try's worker died: no claim can follow
                self.give_up(session, guard, job_id, gave_up(spec, f"after {attempts} tries"))
            elif _one_row(session.execute(update(Job).where(*guard).values({self.next_at: now}))):
                due.append((job_id, queue))
        return due
