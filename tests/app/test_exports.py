"""A succeeded job's export is owed from its outcome's commit and made once (app/jobs/exports.py):
the reaper re-sends one whose message was lost, leaves a claimed one alone until its claim
lapses, never touches a done one, and gives one up past its bounds. On SQLite and PostgreSQL;
the tracking server is a fake `export_to_mlflow` (tests/e2e/test_mlflow.py has the real one).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.app.test_lifecycle import (
    add_model,
    create_job,
    events,
    job_row,
    lapsed,
    sent,
    set_job,
    tasks_sent,
)
from tests.factories import tiny_mlp_onnx

EXPORT = {"mlflow": {"tracking_uri": "http://mlflow.invalid:5000", "experiment": "digits"}}


class Killed(BaseException):
    """The worker dies (SIGKILL: nothing after it runs)."""


class Tracking:
    """A fake `worker.export.export_to_mlflow`: counts the runs logged, or raises `fault`."""

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.fault: BaseException | None = None

    def __call__(self, config: Any, *, job_id: str, **_kwargs: Any) -> Any:
        from worker.export import ExportResult

        if self.fault is not None:
            raise self.fault
        self.runs.append(job_id)
        return ExportResult(f"run-{len(self.runs)}", "1", "mlflow-artifacts:/1")


@pytest.fixture
def tracking(monkeypatch: pytest.MonkeyPatch) -> Tracking:
    from worker import export

    fake = Tracking()
    monkeypatch.setattr(export, "export_to_mlflow", fake)
    return fake


@pytest.fixture
def tenant(db: str) -> str:
    from app.db import session_scope
    from app.keys import get_or_create_tenant

    with session_scope() as session:
        return get_or_create_tenant(session, "alice").id


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mlp_onnx(tmp_path_factory.mktemp("exports") / "mlp.onnx", trained=False)


def succeeded(tenant_id: str, tmp_path: Path, **extra: Any) -> str:
    """A job whose worker recorded its success (as `run_job` does) and then died: the
    export is owed, and nobody is exporting it."""
    from app.db import session_scope
    from app.jobs import exports, lifecycle

    blob = tmp_path / "model.onnx"
    blob.write_bytes(b"not run here")
    job_id = create_job(tenant_id, add_model(tenant_id, blob), **extra)
    with session_scope() as session:
        assert lifecycle.claim(session, job_id, "worker-1")
        assert lifecycle.succeed(session, job_id, "worker-1", {"compressed": {"size_bytes": 1}})
        exports.owe(session, job_id, job_row(job_id).spec, send_to=None)
    sent()
    return job_id


def export_events(job_id: str) -> list[str]:
    return [e for e in events(job_id) if "MLflow" in e]


def test_an_export_whose_message_was_lost_is_resent_by_a_sweep_exactly_once(
    tenant: str, tmp_path: Path, tracking: Tracking
) -> None:
    from app.observability import REAPER_RESENDS
    from app.queue import EXPORT_JOB
    from app.reaper import sweep
    from app.settings import get_settings
    from worker import tasks

    job_id = succeeded(tenant, tmp_path, export=EXPORT)
    assert job_row(job_id).export_next_at is not None and job_row(job_id).export_attempts == 0
    assert sweep(get_settings())["exports"] == 0  # not overdue yet
    counted = REAPER_RESENDS.labels(EXPORT_JOB)._value.get()
    assert sweep(lapsed())["exports"] == 1
    assert REAPER_RESENDS.labels(EXPORT_JOB)._value.get() == counted + 1
    assert tasks_sent(EXPORT_JOB) == [job_id]
    assert sweep(get_settings())["exports"] == 0  # re-sent once per interval, not per sweep
    assert tasks.export_job(job_id) == "exported"
    assert sweep(lapsed())["exports"] == 0 and tasks_sent(EXPORT_JOB) == []
    assert tasks.export_job(job_id) == "skipped"  # a repeated message: once
    assert tracking.runs == [job_id]
    job = job_row(job_id)
    assert job.export_done_at is not None and job.export_next_at is None
    assert job.export_attempts == 1
    assert export_events(job_id) == ["exported to MLflow: run run-1 in experiment 'digits'"]


def test_a_claimed_export_is_not_resent_until_its_claim_lapses(
    tenant: str, tmp_path: Path, tracking: Tracking, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.jobs import exports
    from app.queue import EXPORT_JOB
    from app.reaper import sweep
    from worker import tasks

    job_id = succeeded(tenant, tmp_path, export=EXPORT)
    monkeypatch.setattr(exports, "CLAIM_S", 0.3)
    monkeypatch.setattr(exports, "CLOCK_SKEW_S", 0.0)  # one clock in this test
    tracking.fault = Killed()  # the worker dies mid-export, its claim held
    with pytest.raises(Killed):
        tasks.export_job(job_id)
    tracking.fault = None
    assert sweep(lapsed(0.05))["exports"] == 0  # claimed: being exported, not lost
    assert tasks.export_job(job_id) == "skipped"  # nor taken by a second message
    assert sweep(lapsed(0.5))["exports"] == 1  # ... until the claim lapsed
    assert tasks_sent(EXPORT_JOB) == [job_id]
    assert tasks.export_job(job_id) == "exported"
    assert tracking.runs == [job_id] and job_row(job_id).export_attempts == 2


def test_a_refused_export_is_done_and_never_resent(
    tenant: str, tmp_path: Path, tracking: Tracking
) -> None:
    from app.queue import EXPORT_JOB
    from app.reaper import sweep
    from worker import tasks
    from worker.export import ExportFailed

    job_id = succeeded(tenant, tmp_path, export=EXPORT)
    tracking.fault = ExportFailed("MLflow at http://mlflow.invalid:5000: ConnectionError: down")
    assert tasks.export_job(job_id) == "failed"
    [warning] = export_events(job_id)
    assert warning.startswith("MLflow export failed (the job's result is not affected)")
    assert job_row(job_id).export_done_at is not None and job_row(job_id).status == "succeeded"
    tracking.fault = None
    assert sweep(lapsed())["exports"] == 0 and tasks_sent(EXPORT_JOB) == []
    assert tasks.export_job(job_id) == "skipped"
    assert tracking.runs == [] and len(export_events(job_id)) == 1


@pytest.mark.parametrize("bound", ["time", "tries"])
def test_an_export_past_its_give_up_bound_is_given_up_with_an_event(
    bound: str, tenant: str, tmp_path: Path, tracking: Tracking
) -> None:
    from app.db import utcnow
    from app.jobs import exports
    from app.queue import EXPORT_JOB
    from app.reaper import sweep
    from worker import tasks

    job_id = succeeded(tenant, tmp_path, export=EXPORT)
    if bound == "time":
        long_ago = utcnow() - timedelta(seconds=exports.GIVE_UP_AFTER_S + 60)
        set_job(job_id, finished_at=long_ago, export_next_at=long_ago)
        says = "not done in time; giving up"
    else:  # every try's worker died, the last claim lapsed
        set_job(job_id, export_attempts=exports.MAX_ATTEMPTS)
        says = f"not done after {exports.MAX_ATTEMPTS} tries; giving up"
    assert sweep(lapsed())["exports"] == 0 and tasks_sent(EXPORT_JOB) == []
    job = job_row(job_id)
    assert job.export_next_at is None and job.export_done_at is None
    [event] = export_events(job_id)
    assert says in event and "http://mlflow.invalid:5000" in event
    assert sweep(lapsed())["exports"] == 0  # once
    assert tasks.export_job(job_id) == "skipped" and tracking.runs == []
    assert len(export_events(job_id)) == 1


def test_a_job_without_export_owes_none(tenant: str, tmp_path: Path, tracking: Tracking) -> None:
    from app.reaper import sweep
    from worker import tasks

    job_id = succeeded(tenant, tmp_path)
    assert job_row(job_id).export_next_at is None
    assert sweep(lapsed())["exports"] == 0
    assert tasks.export_job(job_id) == "skipped" and tracking.runs == []


def test_a_run_job_exports_after_its_commit_and_a_worker_dying_there_loses_nothing(
    tenant: str, onnx_model: Path, tracking: Tracking, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.queue import EXPORT_JOB
    from app.reaper import sweep
    from worker import tasks

    model_id = add_model(tenant, onnx_model)
    job_id = create_job(tenant, model_id, export=EXPORT, cache=False)
    assert tasks.run_job(job_id) == "succeeded"
    job = job_row(job_id)
    assert job.status == "succeeded" and job.export_done_at is not None
    assert tracking.runs == [job_id] and sweep(lapsed())["exports"] == 0

    # The worker dies right after recording the success, before its export started.
    job_id = create_job(tenant, model_id, export=EXPORT, cache=False)
    real = tasks.export_job

    def killed(_job_id: str) -> str:
        raise Killed

    with monkeypatch.context() as patched:
        patched.setattr(tasks, "export_job", killed)
        with pytest.raises(Killed):
            tasks.run_job(job_id)
    assert job_row(job_id).status == "succeeded" and job_row(job_id).export_done_at is None
    sent()
    assert sweep(lapsed())["exports"] == 1 and tasks_sent(EXPORT_JOB) == [job_id]
    assert real(job_id) == "exported" and tracking.runs[-1] == job_id


def test_the_migration_is_reversible(db: str) -> None:
    from sqlalchemy import inspect

    from app.db import get_engine, reset_engine
    from app.migrate import downgrade, upgrade

    columns = {"export_attempts", "export_next_at", "export_done_at"}

    def job_columns() -> set[str]:
        reset_engine()
        return {column["name"] for column in inspect(get_engine()).get_columns("job")}

    assert columns <= job_columns()
    downgrade(revision="0006")
    assert not columns & job_columns() and "webhook_next_at" in job_columns()
    upgrade()
    assert columns <= job_columns()
