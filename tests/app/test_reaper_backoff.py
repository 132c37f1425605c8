"""The reaper re-sends only what the broker lost, and backs off per job (app/reaper.py).

200 queued jobs whose messages the broker holds get no re-send, however long they wait;
what the broker lost is re-sent once, oldest first; where the broker cannot count, each
job's re-sends back off. On SQLite and PostgreSQL, with the folder broker and Redis.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from tests.conftest import REDIS_URL, port_open, require

# One xdist worker: shares the Redis database with e2e/test_service.
pytestmark = [pytest.mark.xdist_group("redis")]

JOBS = 200


@pytest.fixture(params=["folder", pytest.param("redis", marks=pytest.mark.services)])
def broker(
    request: pytest.FixtureRequest, db: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A broker with a queue of its own for this test; yields the queue's name."""
    from app.queue import get_celery
    from app.settings import get_settings

    queue = f"q-{secrets.token_hex(4)}"
    if request.param == "redis":
        require("Redis", port_open("127.0.0.1", 6379), REDIS_URL)
        monkeypatch.setenv("SQUISH_BROKER_URL", REDIS_URL)
        get_settings.cache_clear()
        get_celery.cache_clear()
    yield queue
    take_all(queue)


@pytest.fixture
def tenant(db: str) -> str:
    from app.db import session_scope
    from app.keys import get_or_create_tenant

    with session_scope() as session:
        return get_or_create_tenant(session, "alice").id


def queued_jobs(tenant_id: str, queue: str, n: int, *, age_s: float) -> list[str]:
    """`n` queued jobs on `queue`, last sent `age_s` ago (oldest first), their messages sent."""
    from app.db import new_id, session_scope, utcnow
    from app.orm import Job
    from app.queue import RUN_JOB, send

    now = utcnow()
    ids = [new_id("job") for _ in range(n)]
    with session_scope() as session:
        session.add_all(
            Job(
                id=job_id,
                tenant_id=tenant_id,
                spec={},
                queue=queue,
                enqueued_at=now - timedelta(seconds=age_s + n - i),
            )
            for i, job_id in enumerate(ids)
        )
    for job_id in ids:
        assert send(RUN_JOB, job_id, queue)
    return ids


def take_all(queue: str) -> list[str]:
    """Consume every message waiting on `queue`; their job ids."""
    import queue as queue_module

    from app.queue import get_celery

    taken = []
    with get_celery().connection_for_read() as conn:
        simple = conn.SimpleQueue(queue, no_ack=True)
        try:
            while True:
                taken.append(simple.get_nowait().payload[0][0])
        except queue_module.Empty:
            pass
        finally:
            simple.close()
    return taken


def settings(**overrides: Any) -> Any:
    from app.settings import get_settings

    return get_settings().model_copy(update={"requeue_after_s": 120.0, **overrides})


def resends_counted() -> float:
    from app.observability import REGISTRY
    from app.queue import RUN_JOB

    return REGISTRY.get_sample_value("squish_reaper_resends_total", {"task": RUN_JOB}) or 0.0


def rows(ids: list[str]) -> dict[str, tuple[int, datetime | None]]:
    from app.db import session_scope
    from app.orm import Job

    with session_scope() as session:
        found = session.execute(
            select(Job.id, Job.resends, Job.enqueued_at).where(Job.id.in_(ids))
        ).all()
    return {job_id: (resends, enqueued_at) for job_id, resends, enqueued_at in found}


class Clock:
    """The reaper's `utcnow`, moved by the test."""

    def __init__(self) -> None:
        from app.db import utcnow

        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


# --- a healthy broker ----------------------------------------------------------------


def test_200_queued_jobs_on_a_healthy_broker_get_no_resend(tenant: str, broker: str) -> None:
    from app.reaper import broker_depths, sweep

    ids = queued_jobs(tenant, broker, JOBS, age_s=3600)  # all long overdue
    assert broker_depths({broker}) == {broker: JOBS}
    before = resends_counted()
    per_sweep = [sweep(settings())["resent"] for _ in range(5)]
    assert per_sweep == [0] * 5
    assert resends_counted() == before
    assert {resends for resends, _ in rows(ids).values()} == {0}
    assert sorted(take_all(broker)) == sorted(ids)  # each message once, none added


def test_over_an_hour_of_sweeps_a_healthy_broker_gets_no_resend(
    tenant: str, broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app import reaper

    queued_jobs(tenant, broker, JOBS, age_s=0)
    clock = Clock()
    monkeypatch.setattr(reaper, "utcnow", clock)
    resent = []
    for _ in range(120):  # a sweep every 30 simulated seconds: one hour
        clock.advance(30)
        resent.append(reaper.sweep(settings())["resent"])
    assert sum(resent) == 0


# --- what the broker lost ----------------------------------------------------------------


def test_messages_the_broker_lost_are_resent_once_oldest_first(tenant: str, broker: str) -> None:
    from app.queue import RUN_JOB, send
    from app.reaper import sweep

    ids = queued_jobs(tenant, broker, JOBS, age_s=3600)
    take_all(broker)  # the broker lost every message (a Redis flush, a lost volume)
    for job_id in ids[50:]:  # ... and got 150 of them back
        send(RUN_JOB, job_id, broker)
    before = resends_counted()
    assert sweep(settings())["resent"] == 50
    assert resends_counted() == before + 50
    found = rows(ids)
    assert [found[job_id][0] for job_id in ids] == [1] * 50 + [0] * 150  # the oldest 50
    assert sweep(settings())["resent"] == 0  # each held once again
    assert sorted(take_all(broker)) == sorted(ids)


def test_a_job_queued_again_by_this_sweep_is_not_counted_lost(
    tenant: str, broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.db import session_scope, utcnow
    from app.orm import Job
    from app.reaper import sweep

    ids = queued_jobs(tenant, broker, 3, age_s=3600)
    with session_scope() as session:  # one of them is running on a worker that died
        session.execute(
            update(Job)
            .where(Job.id == ids[0])
            .values(status="running", worker="gone:1:x", heartbeat_at=utcnow() - timedelta(hours=1))
        )
    take_all(broker)
    for job_id in ids[1:]:
        from app.queue import RUN_JOB, send

        send(RUN_JOB, job_id, broker)
    result = sweep(settings())
    assert (result["stale"], result["resent"]) == (1, 0)
    assert sorted(take_all(broker)) == sorted(ids)


# --- no count from the broker: the backoff alone ------------------------------------------


def test_without_a_count_each_job_backs_off(
    tenant: str, broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app import reaper

    monkeypatch.setattr(reaper, "broker_depths", lambda queues: None)
    [job_id] = queued_jobs(tenant, broker, 1, age_s=0)
    clock = Clock()
    monkeypatch.setattr(reaper, "utcnow", clock)
    resent_at = []
    for second in range(0, 3600, 10):  # a sweep every 10 simulated seconds
        clock.now = clock.now + timedelta(seconds=10)
        if reaper.sweep(settings())["resent"]:
            resent_at.append(second + 10)
    # Sent at 0, then re-sent 120 s, 240 s, 480 s, 960 s after the last (the next, 1920 s
    # later, falls after the hour).
    assert resent_at == [120, 360, 840, 1800]
    assert rows([job_id])[job_id][0] == 4


def test_the_backoff_is_capped_and_starts_over_when_the_job_is_queued_again(
    tenant: str, broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app import reaper
    from app.db import session_scope
    from app.jobs import lifecycle
    from app.orm import Job

    monkeypatch.setattr(reaper, "broker_depths", lambda queues: None)
    [job_id] = queued_jobs(tenant, broker, 1, age_s=0)
    clock = Clock()
    monkeypatch.setattr(reaper, "utcnow", clock)
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(resends=40))
    clock.advance(120 * reaper.RESEND_BACKOFF_CAP - 10)
    assert reaper.sweep(settings())["resent"] == 0
    clock.advance(10)
    assert reaper.sweep(settings())["resent"] == 1
    # A worker takes it and gives it back (a transient failure): the backoff starts over.
    with session_scope() as session:
        assert lifecycle.claim(session, job_id, "w:1:x")
        assert lifecycle.release(session, job_id, "w:1:x", "storage blinked")
    assert rows([job_id])[job_id][0] == 0


def test_the_measured_resends_of_200_jobs_over_an_hour(
    tenant: str, broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load the reaper adds in an hour: with the broker's count, with the backoff alone."""
    from app import reaper

    queued_jobs(tenant, broker, JOBS, age_s=0)
    clock = Clock()
    monkeypatch.setattr(reaper, "utcnow", clock)
    counted = []
    for _ in range(360):  # a sweep every 10 simulated seconds
        clock.advance(10)
        counted.append(reaper.sweep(settings())["resent"])
    monkeypatch.setattr(reaper, "broker_depths", lambda queues: None)
    backoff_only = []
    for _ in range(360):
        clock.advance(10)
        backoff_only.append(reaper.sweep(settings())["resent"])
    print(f"re-sends of {JOBS} queued jobs in an hour: {sum(counted)} with the broker's count,"
          f" {sum(backoff_only)} with the backoff alone")  # fmt: skip
    # Before: every job every 120 s, 200 per sweep 30 times an hour (6,000 deliveries).
    assert sum(counted) == 0
    assert sum(backoff_only) == 4 * JOBS  # at 0, 240, 720 and 1680 s of the second hour


# --- the reaper after an outage of its database ---------------------------------------------


def test_after_a_database_outage_heartbeats_are_judged_only_once_workers_could_beat(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app import reaper

    calls: list[tuple[float, bool]] = []
    failing = threading.Event()
    failing.set()

    def fake_sweep(_settings: Any, *, judge_heartbeats: bool = True) -> dict[str, int]:
        calls.append((time.monotonic(), judge_heartbeats))
        if failing.is_set():
            locked = sqlite3.OperationalError("database is locked")
            raise OperationalError("SELECT 1", {}, locked) from locked  # as SQLAlchemy raises
        return {}

    monkeypatch.setattr(reaper, "sweep", fake_sweep)
    thread = reaper.Reaper(settings(reaper_interval_s=0.02, heartbeat_timeout_s=0.5))
    thread.start()
    try:
        time.sleep(0.3)
        failing.clear()
        back = time.monotonic()
        time.sleep(0.9)
    finally:
        thread.stop()
        thread.join(timeout=5)
    after = [(t - back, judged) for t, judged in calls if t > back + 0.03]
    assert after and all(not judged for t, judged in after if t < 0.4)
    assert any(judged for t, judged in after if t > 0.6)


def test_the_migration_is_reversible(db: str) -> None:
    from sqlalchemy import inspect

    from app.db import get_engine, reset_engine
    from app.migrate import downgrade, upgrade

    def job_columns() -> set[str]:
        reset_engine()
        return {column["name"] for column in inspect(get_engine()).get_columns("job")}

    assert "resends" in job_columns()
    downgrade(revision="0002")
    assert "resends" not in job_columns() and "webhook_next_at" in job_columns()
    upgrade()
    assert "resends" in job_columns()
