"""The worker waits out outages of minutes instead of wasting finished work (worker/tasks.py).

The job runs through the real task in this process (tiny ONNX model, real engine); the
object store or the database fails on demand in front of the real one. On SQLite and
PostgreSQL.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from tests.app.test_lifecycle import (
    StoreWith,
    add_model,
    artifact_count,
    cancel,
    create_job,
    events,
    job_row,
    sent,
    tasks_sent,
)
from tests.factories import tiny_mlp_onnx


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mlp_onnx(tmp_path_factory.mktemp("outages") / "mlp.onnx", trained=False)


@pytest.fixture
def tenant(db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    from app.db import session_scope
    from app.keys import get_or_create_tenant
    from app.settings import get_settings
    from worker import tasks

    monkeypatch.setenv("SQUISH_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setattr(tasks, "STORAGE_BACKOFF_S", (0.05, 0.4))
    get_settings.cache_clear()
    with session_scope() as session:
        return get_or_create_tenant(session, "alice").id


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The engine runs of this test (one entry per `run_pipeline` call)."""
    from worker import pipeline

    calls: list[str] = []
    real = pipeline.run_pipeline

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_pipeline", counted)
    yield calls


def settings_with(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    from app.settings import get_settings

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()


def outage() -> Exception:
    from app.storage import StorageUnavailable

    return StorageUnavailable("upload to s3://bucket failed: Could not connect to the endpoint URL")


def failing_first(n: int, real: Callable[..., Any], seen: list[float]) -> Callable[..., Any]:
    """`real`, except that its first `n` calls fail with a storage outage."""

    def call(*args: Any, **kwargs: Any) -> Any:
        seen.append(time.monotonic())
        if len(seen) <= n:
            raise outage()
        return real(*args, **kwargs)

    return call


def database_down() -> Exception:
    locked = sqlite3.OperationalError("database is locked")
    error = OperationalError("UPDATE job", {}, locked)
    error.__cause__ = locked  # as SQLAlchemy raises it
    return error


# --- storing the artifacts ---------------------------------------------------------------


def test_an_artifact_upload_that_fails_is_retried_and_the_job_is_not_recomputed(
    tenant: str, onnx_model: Path, runs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.storage import get_store
    from worker import tasks

    store = get_store()
    puts: list[float] = []
    monkeypatch.setattr(
        tasks,
        "get_store",
        lambda: StoreWith(store, put_file=failing_first(4, store.put_file, puts)),
    )
    job_id = create_job(tenant, add_model(tenant, onnx_model))
    sent()
    assert tasks.run_job(job_id) == "succeeded"
    job = job_row(job_id)
    assert (job.status, job.attempts) == ("succeeded", 1)
    assert len(runs) == 1  # computed once
    # the model (after 4 tries), the report, the card
    assert len(puts) == 4 + 3 and artifact_count(job_id) == 3
    warnings = [e for e in events(job_id) if e.startswith("object storage unavailable")]
    assert len(warnings) == 4
    assert warnings[0].startswith("object storage unavailable while storing the model; retrying in")
    assert tasks_sent("squish.run_job") == []


def test_the_heartbeat_keeps_the_job_alive_while_storage_is_down(
    tenant: str, onnx_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.reaper import sweep
    from app.settings import get_settings
    from app.storage import get_store
    from worker import tasks

    settings_with(monkeypatch, SQUISH_HEARTBEAT_TIMEOUT_S="1.5", SQUISH_HEARTBEAT_INTERVAL_S="0.2")
    store = get_store()
    job_id = create_job(tenant, add_model(tenant, onnx_model))
    beats: list[Any] = []
    stale: list[int] = []
    start: list[float] = []

    def put_file(path: Path, key: str, *, sha256: str | None = None) -> None:
        start.append(start[0] if start else time.monotonic())
        beats.append(job_row(job_id).heartbeat_at)
        stale.append(sweep(get_settings())["stale"])
        if time.monotonic() - start[0] < 3.0:  # down for 3 s, twice the heartbeat timeout
            raise outage()
        store.put_file(path, key, sha256=sha256)

    monkeypatch.setattr(tasks, "get_store", lambda: StoreWith(store, put_file=put_file))
    assert tasks.run_job(job_id) == "succeeded"
    assert job_row(job_id).attempts == 1
    assert sum(stale) == 0
    assert beats[-1] > beats[0]


def test_cancelling_a_job_that_waits_for_storage_stops_it_at_once(
    tenant: str, onnx_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.storage import get_store
    from worker import tasks

    monkeypatch.setattr(tasks, "STORAGE_BACKOFF_S", (0.5, 30.0))  # long waits
    store = get_store()
    tries: list[float] = []
    job_id = create_job(tenant, add_model(tenant, onnx_model))

    def put_file(path: Path, key: str, *, sha256: str | None = None) -> None:
        tries.append(time.monotonic())
        if len(tries) == 3:  # the user cancels during the third wait (of 2 s)
            threading.Timer(0.3, cancel, args=(job_id,)).start()
        raise outage()

    monkeypatch.setattr(tasks, "get_store", lambda: StoreWith(store, put_file=put_file))
    started = time.monotonic()
    assert tasks.run_job(job_id) == "cancelled"
    assert time.monotonic() - tries[-1] < 1.5  # it did not sit out the wait
    assert len(tries) == 3 and time.monotonic() - started < 20
    assert job_row(job_id).status == "cancelled" and artifact_count(job_id) == 0


def test_an_outage_longer_than_the_budget_fails_the_job_as_infrastructure(
    tenant: str, onnx_model: Path, runs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.storage import get_store
    from worker import tasks

    settings_with(monkeypatch, SQUISH_STORAGE_RETRY_S="1")
    store = get_store()
    puts: list[float] = []
    monkeypatch.setattr(
        tasks,
        "get_store",
        lambda: StoreWith(store, put_file=failing_first(1000, store.put_file, puts)),
    )
    job_id = create_job(tenant, add_model(tenant, onnx_model))
    sent()
    assert tasks.run_job(job_id) == "failed"
    job = job_row(job_id)
    assert job.error["code"] == "infrastructure"
    message = job.error["message"]
    assert message.startswith("object storage unavailable for ")
    assert "while storing the model" in message and "SQUISH_STORAGE_RETRY_S=1" in message
    assert "Could not connect to the endpoint URL" in message
    assert 0.5 <= puts[-1] - puts[0] <= 1.5 and len(runs) == 1
    assert tasks_sent("squish.run_job") == []  # failed, not queued to be computed again
    assert artifact_count(job_id) == 0


def test_a_storage_error_that_is_not_an_outage_is_not_waited_for(
    tenant: str, onnx_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.storage import StorageError, get_store
    from worker import tasks

    store = get_store()
    puts: list[str] = []

    def denied(path: Path, key: str, *, sha256: str | None = None) -> None:
        puts.append(key)
        raise StorageError("access to bucket 'squish' denied")

    monkeypatch.setattr(tasks, "get_store", lambda: StoreWith(store, put_file=denied))
    job_id = create_job(tenant, add_model(tenant, onnx_model))
    assert tasks.run_job(job_id) == "requeued"  # as before: another attempt, elsewhere
    assert len(puts) == 1


# --- fetching the inputs -------------------------------------------------------------------


def test_a_download_that_fails_is_retried_in_place(
    tenant: str, onnx_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.storage import get_store
    from worker import tasks

    store = get_store()
    gets: list[float] = []
    monkeypatch.setattr(
        tasks,
        "get_store",
        lambda: StoreWith(store, get_to_file=failing_first(3, store.get_to_file, gets)),
    )
    job_id = create_job(tenant, add_model(tenant, onnx_model))
    assert tasks.run_job(job_id) == "succeeded"
    assert job_row(job_id).attempts == 1 and len(gets) == 4
    assert any(
        e.startswith("object storage unavailable while fetching input.onnx") for e in events(job_id)
    )


def test_a_download_that_never_gets_through_queues_the_job_again(
    tenant: str, onnx_model: Path, runs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.storage import get_store
    from worker import tasks

    settings_with(monkeypatch, SQUISH_STORAGE_RETRY_S="0.5")
    store = get_store()
    gets: list[float] = []
    monkeypatch.setattr(
        tasks,
        "get_store",
        lambda: StoreWith(store, get_to_file=failing_first(1000, store.get_to_file, gets)),
    )
    job_id = create_job(tenant, add_model(tenant, onnx_model))
    sent()
    assert tasks.run_job(job_id) == "requeued"  # nothing computed yet: another attempt
    assert runs == [] and len(gets) > 1
    assert any(
        "queued again: StorageUnavailable: object storage unavailable" in e for e in events(job_id)
    )
    assert tasks_sent("squish.run_job") == [job_id]


# --- the database ----------------------------------------------------------------------------


def test_progress_writes_skip_a_database_that_is_down_and_the_job_goes_on(
    tenant: str, onnx_model: Path, runs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.jobs import lifecycle
    from worker import tasks

    real = lifecycle.set_progress
    down = {"writes": 0}

    def set_progress(*args: Any, **kwargs: Any) -> bool:
        if args[-1] not in (None, "fetching", "storing"):  # down while the engine runs
            down["writes"] += 1
            raise database_down()
        return real(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "set_progress", set_progress)
    job_id = create_job(tenant, add_model(tenant, onnx_model))
    assert tasks.run_job(job_id) == "succeeded"
    assert down["writes"] >= 1 and len(runs) == 1 and job_row(job_id).attempts == 1


def test_the_outcome_is_recorded_once_the_database_is_back(
    tenant: str, onnx_model: Path, runs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.jobs import lifecycle
    from worker import tasks

    real = lifecycle.succeed
    tries: list[float] = []

    def succeed(*args: Any, **kwargs: Any) -> bool:
        tries.append(time.monotonic())
        if len(tries) <= 2:
            raise database_down()
        return real(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "succeed", succeed)
    job_id = create_job(tenant, add_model(tenant, onnx_model))
    assert tasks.run_job(job_id) == "succeeded"
    assert len(tries) == 3 and len(runs) == 1
    assert job_row(job_id).status == "succeeded" and artifact_count(job_id) == 3


def test_a_database_that_stays_down_past_the_budget_leaves_the_job_to_the_reaper(
    tenant: str, onnx_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.jobs import lifecycle
    from app.storage import get_store
    from worker import tasks

    settings_with(monkeypatch, SQUISH_DATABASE_RETRY_S="1.5")
    put: list[str] = []
    store = get_store()

    def put_file(path: Path, key: str, *, sha256: str | None = None) -> None:
        store.put_file(path, key, sha256=sha256)
        put.append(key)

    def succeed(*args: Any, **kwargs: Any) -> bool:
        raise database_down()

    monkeypatch.setattr(tasks, "get_store", lambda: StoreWith(store, put_file=put_file))
    monkeypatch.setattr(lifecycle, "succeed", succeed)
    job_id = create_job(tenant, add_model(tenant, onnx_model))
    with pytest.raises(OperationalError):
        tasks.run_job(job_id)
    # Still running (its heartbeat will go stale: the reaper queues it again); no object
    # of this attempt is left behind.
    assert job_row(job_id).status == "running"
    assert put and not any(store.exists(key) for key in put)
