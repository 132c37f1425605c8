"""A search's state transitions, each a conditional UPDATE (as app/jobs/lifecycle.py for jobs).

Used by the search's tasks (worker/search_tasks.py) and the reaper. None of these commit.

- the step guard (:func:`begin_step` / :func:`end_step`): at most one step of a search asks
  the sampler for trials at a time; a step that died holding it is overtaken after
  :data:`STEP_LEASE_S`;
- a trial is claimed (queued → running) by one worker, heart-beats, and finishes once;
- the reaper's :func:`sweep` (through app/reaper.py) keeps a search's job alive while its
  trials are queued or running, retries once (then fails) a trial whose worker stopped
  heart-beating, re-sends lost trial messages, and sends a step to a search that has none
  in flight (a lost step message, or a deadline passed with nothing running).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.jobs import lifecycle
from app.observability import count_trials_with
from app.orm import Job, JobStatus, Search, SearchTrial
from app.queue import FINISH_SEARCH, RUN_TRIAL, SEARCH_STEP
from app.settings import Settings
from worker.contract import LogLevel, TrialStatus

STEP_LEASE_S = 120.0
"""A step (or the finishing task) holding the guard longer than this is taken to be dead."""
TRIAL_ATTEMPTS = 2
"""A trial whose worker dies is run once more, then marked failed (`worker_lost`)."""

ACTIVE = (TrialStatus.queued, TrialStatus.running)
DONE = (TrialStatus.succeeded, TrialStatus.failed, TrialStatus.cancelled)


class Phase:
    starting = "starting"
    trials = "trials"
    finishing = "finishing"
    done = "done"


def _changed(result: Any) -> bool:
    return bool(result.rowcount == 1)


def create(
    session: Session, job_id: str, token: str, deadline_at: datetime, inputs: dict[str, Any]
) -> Search:
    """The search row of a job just claimed (or the existing one, for a job claimed again)."""
    row = session.get(Search, job_id)
    if row is None:
        row = Search(
            job_id=job_id,
            token=token,
            phase=Phase.starting,
            deadline_at=deadline_at,
            inputs=inputs,
            steps=0,
        )
        session.add(row)
    else:
        row.token, row.inputs, row.phase = token, inputs, Phase.starting
    session.flush()
    return row


def begin_step(session: Session, job_id: str, *, phase: str = Phase.trials) -> bool:
    """Take the step guard of a search in ``phase``; False when another step holds it."""
    now = utcnow()
    result = session.execute(
        update(Search)
        .where(
            Search.job_id == job_id,
            Search.phase == phase,
            or_(
                Search.stepping_at.is_(None),
                Search.stepping_at < now - timedelta(seconds=STEP_LEASE_S),
            ),
        )
        .values(stepping_at=now, steps=Search.steps + 1)
    )
    return _changed(result)


def renew_step(session: Session, job_id: str) -> None:
    session.execute(update(Search).where(Search.job_id == job_id).values(stepping_at=utcnow()))


def end_step(session: Session, job_id: str) -> None:
    session.execute(update(Search).where(Search.job_id == job_id).values(stepping_at=None))


def set_phase(session: Session, job_id: str, phase: str, *, was: str | None = None) -> bool:
    stmt = update(Search).where(Search.job_id == job_id)
    if was is not None:
        stmt = stmt.where(Search.phase == was)
    values: dict[str, Any] = {"phase": phase}
    if phase == Phase.done:
        values["finished_at"] = utcnow()
    return _changed(session.execute(stmt.values(**values)))


def trials_of(session: Session, job_id: str) -> list[SearchTrial]:
    return list(
        session.scalars(
            select(SearchTrial).where(SearchTrial.job_id == job_id).order_by(SearchTrial.number)
        )
    )


def add_trial(
    session: Session,
    job_id: str,
    number: int,
    recipe: dict[str, Any],
    params: dict[str, Any],
    distributions: dict[str, str],
    queue: str,
) -> SearchTrial:
    """A queued trial; its message is sent after the commit."""
    trial = SearchTrial(
        job_id=job_id,
        number=number,
        status=TrialStatus.queued,
        recipe=recipe,
        params=params,
        distributions=distributions,
        attempts=0,
        enqueued_at=utcnow(),
    )
    session.add(trial)
    session.flush()
    return trial


def claim_trial(session: Session, trial_id: int, token: str) -> bool:
    """queued → running for this worker, while its job runs; False otherwise."""
    running = select(Job.id).where(Job.status == JobStatus.running)
    now = utcnow()
    result = session.execute(
        update(SearchTrial)
        .where(
            SearchTrial.id == trial_id,
            SearchTrial.status == TrialStatus.queued,
            SearchTrial.job_id.in_(running),
        )
        .values(
            status=TrialStatus.running,
            worker=token,
            attempts=SearchTrial.attempts + 1,
            started_at=now,
            heartbeat_at=now,
        )
    )
    return _changed(result)


def _owned(trial_id: int, token: str) -> Any:
    return (
        SearchTrial.id == trial_id,
        SearchTrial.status == TrialStatus.running,
        SearchTrial.worker == token,
    )


def trial_heartbeat(session: Session, trial_id: int, token: str) -> bool:
    """Still ours, and the job still running? False: stop (cancelled or taken over)."""
    row = session.execute(
        select(SearchTrial.job_id, Job.status)
        .join(Job, Job.id == SearchTrial.job_id)
        .where(SearchTrial.id == trial_id)
    ).one_or_none()
    if row is None or row.status != JobStatus.running:
        return False
    now = utcnow()
    result = session.execute(
        update(SearchTrial).where(*_owned(trial_id, token)).values(heartbeat_at=now)
    )
    if not _changed(result):
        return False
    session.execute(
        update(Job)
        .where(Job.id == row.job_id, Job.status == JobStatus.running)
        .values(heartbeat_at=now)
    )
    return True


def finish_trial(
    session: Session, trial_id: int, token: str | None, status: TrialStatus, **values: Any
) -> bool:
    """running (ours; any running or queued one when ``token`` is None) → ``status``."""
    guard: Sequence[Any] = (
        _owned(trial_id, token)
        if token is not None
        else (SearchTrial.id == trial_id, SearchTrial.status.in_(ACTIVE))
    )
    result = session.execute(
        update(SearchTrial).where(*guard).values(status=status, finished_at=utcnow(), **values)
    )
    return _changed(result)


def cancel_open_trials(session: Session, job_id: str) -> int:
    """Every queued or running trial → cancelled (their workers see it at the next heartbeat)."""
    result = session.execute(
        update(SearchTrial)
        .where(SearchTrial.job_id == job_id, SearchTrial.status.in_(ACTIVE))
        .values(status=TrialStatus.cancelled, finished_at=utcnow())
    )
    return int(getattr(result, "rowcount", 0) or 0)


def trial_event(
    session: Session,
    job_id: str,
    number: int,
    what: str,
    message: str,
    data: dict[str, Any] | None = None,
    level: LogLevel = LogLevel.info,
) -> None:
    """A `trial` event: `started`, `finished` (with its figures) or `failed` (with why)."""
    lifecycle.add_event(
        session,
        job_id,
        "trial",
        f"trial {number} {what}: {message}" if message else f"trial {number} {what}",
        level=level,
        data={"trial": number, "event": what, **(data or {})},
    )


def sweep(session: Session, now: datetime, settings: Settings) -> list[tuple[str, str, str]]:
    """The reaper's part for searches: (task, id, queue) messages to send after the commit."""
    to_send: list[tuple[str, str, str]] = []
    stale_before = now - timedelta(seconds=settings.heartbeat_timeout_s)
    resend_before = now - timedelta(seconds=settings.requeue_after_s)
    searches = session.execute(
        select(Search.job_id, Search.phase, Search.stepping_at, Search.deadline_at, Job.queue)
        .join(Job, Job.id == Search.job_id)
        .where(Job.status == JobStatus.running, Search.phase.in_((Phase.trials, Phase.finishing)))
    ).all()
    for search in searches:
        job_id, queue = search.job_id, search.queue
        trials = trials_of(session, job_id)
        for trial in trials:
            if trial.status == TrialStatus.running and (
                trial.heartbeat_at is None or trial.heartbeat_at < stale_before
            ):
                to_send += _recover_trial(session, trial, queue)
            elif trial.status == TrialStatus.queued and (
                trial.enqueued_at is None or trial.enqueued_at < resend_before
            ):
                trial.enqueued_at = now
                to_send.append((RUN_TRIAL, str(trial.id), queue))
        lease_over = search.stepping_at is None or search.stepping_at < now - timedelta(
            seconds=STEP_LEASE_S
        )
        active = any(t.status in ACTIVE for t in trials)
        if search.phase == Phase.trials and not active and lease_over:
            to_send.append((SEARCH_STEP, job_id, queue))  # a lost step, or the deadline passed
        elif search.phase == Phase.finishing and lease_over:
            to_send.append((FINISH_SEARCH, job_id, queue))
        # Trials waiting for a worker are not a dead job: keep its heartbeat fresh.
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.running)
            .values(heartbeat_at=now)
        )
    return to_send


def _recover_trial(session: Session, trial: SearchTrial, queue: str) -> list[tuple[str, str, str]]:
    """A running trial whose worker stopped heart-beating: run it once more, or fail it."""
    guard = (
        SearchTrial.id == trial.id,
        SearchTrial.status == TrialStatus.running,
        SearchTrial.worker == trial.worker,
    )
    if trial.attempts >= TRIAL_ATTEMPTS:
        error = {
            "code": "worker_lost",
            "message": f"the worker running this trial stopped responding {trial.attempts} "
            "times; the search goes on without it",
        }
        result = session.execute(
            update(SearchTrial)
            .where(*guard)
            .values(status=TrialStatus.failed, finished_at=utcnow(), error=error)
        )
        if _changed(result):
            trial_event(
                session,
                trial.job_id,
                trial.number,
                "failed",
                error["message"],
                data={"error": error},
                level=LogLevel.warning,
            )
            return [(SEARCH_STEP, trial.job_id, queue)]
        return []
    worker = trial.worker  # the UPDATE below clears it on the loaded row too
    result = session.execute(
        update(SearchTrial)
        .where(*guard)
        .values(status=TrialStatus.queued, worker=None, enqueued_at=utcnow())
    )
    if not _changed(result):
        return []
    trial_event(
        session,
        trial.job_id,
        trial.number,
        "retried",
        f"worker {worker} stopped responding; running it again",
        level=LogLevel.warning,
    )
    return [(RUN_TRIAL, str(trial.id), queue)]


def open_trials(session: Session, job_id: str) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(SearchTrial)
            .where(SearchTrial.job_id == job_id, SearchTrial.status.in_(ACTIVE))
        )
        or 0
    )


@count_trials_with
def trials_by_status(session: Session) -> dict[str, int]:
    """`squish_search_trials_total{status}`: every trial recorded, by status."""
    rows = session.execute(
        select(SearchTrial.status, func.count()).group_by(SearchTrial.status)
    ).all()
    return {str(status): int(count) for status, count in rows}
