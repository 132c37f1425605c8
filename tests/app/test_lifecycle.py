"""The job lifecycle and the reaper, driven directly, on SQLite and on PostgreSQL.

The worker's task functions run in this process; their messages go through the embedded
broker, and the tests read them back from it; webhooks go to a receiver on 127.0.0.1.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from tests.factories import tiny_mlp_onnx

QUICK_EVALUATE = {"batch_sizes": [1], "warmup": 0, "iterations": 1}


# --- helpers ----------------------------------------------------------------------------


class Receiver:
    """A webhook receiver on 127.0.0.1 that records each POST and answers `status`."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 204
        self.delay_s = 0.0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(receiver.delay_s)
                receiver.requests.append({"body": body, "user_agent": self.headers["User-Agent"]})
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def bodies(self) -> list[dict[str, Any]]:
        return [request["body"] for request in self.requests]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    hook.thread.start()
    try:
        yield hook
    finally:
        hook.server.shutdown()
        hook.server.server_close()
        hook.thread.join(timeout=5)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mlp_onnx(tmp_path_factory.mktemp("lifecycle") / "mlp.onnx", trained=False)


@pytest.fixture
def tenant(db: str) -> str:
    from app.db import session_scope
    from app.keys import get_or_create_tenant

    with session_scope() as session:
        return get_or_create_tenant(session, "alice").id


@pytest.fixture
def client(tenant: str) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.db import session_scope
    from app.keys import create_key
    from app.main import create_app

    with session_scope() as session:
        key = create_key(session, "alice")
    with TestClient(create_app(run_reaper=False)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {key}"
        yield test_client


def add_model(tenant_id: str, path: Path) -> str:
    """An uploaded model: its object in the store and its row."""
    from app.db import new_id, session_scope
    from app.files import object_key
    from app.orm import MLModel
    from app.storage import file_sha256, get_store
    from worker.contract import ModelFormat

    sha = file_sha256(path)
    key = object_key(tenant_id, sha)
    upload = path.with_name(f"{path.name}.upload")
    shutil.copyfile(path, upload)  # the store takes the file it is given
    get_store().put_file(upload, key, sha256=sha)
    model_id = new_id("mdl")
    with session_scope() as session:
        session.add(
            MLModel(
                id=model_id,
                tenant_id=tenant_id,
                name=path.name,
                format=ModelFormat.onnx,
                size_bytes=path.stat().st_size,
                sha256=sha,
                storage_key=key,
            )
        )
    return model_id


def create_job(tenant_id: str, model_id: str, **extra: Any) -> str:
    """A job as `POST /v1/jobs` creates it (normalized spec, queued, run message sent)."""
    from app.db import session_scope
    from app.jobs import service
    from app.jobs.schemas import JobCreate

    body = JobCreate.model_validate(
        {
            "model_id": model_id,
            "pipeline": [{"method": "quantize.dynamic", "params": {}}],
            "evaluate": QUICK_EVALUATE,
            **extra,
        }
    )
    with session_scope() as session:
        job, created = service.create_job(session, tenant_id, body, None)
        assert created
        return job.id


def job_row(job_id: str) -> Any:
    from app.db import session_scope
    from app.orm import Job

    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def events(job_id: str) -> list[str]:
    from app.db import session_scope
    from app.orm import JobEvent

    with session_scope() as session:
        return list(
            session.scalars(
                select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            )
        )


def set_job(job_id: str, **values: Any) -> None:
    from app.db import session_scope
    from app.orm import Job

    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def sent(queue_name: str = "cpu") -> list[tuple[str, str, str | None]]:
    """Take every message waiting in the embedded broker: (task, id, eta)."""
    from app.queue import get_celery

    messages = []
    with get_celery().connection_for_read() as conn:
        simple = conn.SimpleQueue(queue_name, no_ack=True)
        try:
            while True:
                message = simple.get_nowait()
                args = message.payload[0]
                messages.append((message.headers["task"], args[0], message.headers.get("eta")))
        except queue.Empty:
            pass
        finally:
            simple.close()
    return messages


def tasks_sent(task: str) -> list[str]:
    return [obj_id for name, obj_id, _eta in sent() if name == task]


def cancel(job_id: str) -> None:
    from app.db import session_scope
    from app.jobs import lifecycle

    with session_scope() as session:
        assert lifecycle.cancel(session, job_id)


def lapsed(seconds: float = 0.05) -> Any:
    """The settings with `requeue_after_s` short, once that much time has gone by."""
    from app.settings import get_settings

    time.sleep(seconds * 2)
    return get_settings().model_copy(update={"requeue_after_s": seconds})


class StoreWith:
    """The real object store with some operations replaced (the faults a test injects)."""

    def __init__(self, real: Any, **replaced: Any) -> None:
        self.real, self.replaced = real, replaced

    def __getattr__(self, name: str) -> Any:
        return self.replaced.get(name) or getattr(self.real, name)


def artifact_count(job_id: str) -> int:
    from app.db import session_scope
    from app.orm import Artifact

    with session_scope() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id)
            )
            or 0
        )


# --- claim ------------------------------------------------------------------------------


def test_two_workers_racing_for_one_claim_exactly_one_wins(tenant: str, tmp_path: Path) -> None:
    from worker import tasks

    blob = tmp_path / "model.onnx"
    blob.write_bytes(b"not run here")
    model_id = add_model(tenant, blob)
    for _ in range(10):
        job_id = create_job(tenant, model_id)
        start = threading.Barrier(2)
        won: list[Any] = []

        def worker(
            job_id: str = job_id, start: threading.Barrier = start, won: list[Any] = won
        ) -> None:
            start.wait(timeout=10)
            won.append(tasks.claim(job_id))

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        winners = [claimed for claimed in won if claimed is not None]
        assert len(won) == 2 and len(winners) == 1, won
        shutil.rmtree(winners[0].work_dir)
        job = job_row(job_id)
        assert job.status == "running" and job.attempts == 1
        assert job.worker == winners[0].token
        assert events(job_id).count("running") == 1


# --- the reaper: lost workers -----------------------------------------------------------


def test_a_job_whose_worker_keeps_dying_fails_with_worker_lost(
    tenant: str, tmp_path: Path, receiver: Receiver
) -> None:
    from app.db import session_scope, utcnow
    from app.jobs import lifecycle
    from app.queue import DELIVER_WEBHOOK, RUN_JOB
    from app.reaper import sweep
    from app.settings import get_settings

    settings = get_settings()
    blob = tmp_path / "model.onnx"
    blob.write_bytes(b"not run here")
    job_id = create_job(tenant, add_model(tenant, blob), webhook_url=receiver.url)
    assert tasks_sent(RUN_JOB) == [job_id]
    for attempt in range(1, settings.max_attempts + 1):
        with session_scope() as session:  # a worker claims the job, then is SIGKILLed
            assert lifecycle.claim(session, job_id, f"worker-{attempt}")
            lifecycle.set_progress(session, job_id, f"worker-{attempt}", 0.3, "quantize.dynamic")
        set_job(job_id, heartbeat_at=utcnow() - timedelta(hours=1))
        assert sweep(settings)["stale"] == 1
        if attempt < settings.max_attempts:
            assert job_row(job_id).status == "queued"
            assert tasks_sent(RUN_JOB) == [job_id]
    job = job_row(job_id)
    assert job.status == "failed" and job.attempts == settings.max_attempts
    assert job.error == {
        "code": "worker_lost",
        "message": f"the worker running this job stopped responding {settings.max_attempts} "
        "times; giving up",
        "step": "quantize.dynamic",
    }
    assert sum("stopped responding; retrying" in e for e in events(job_id)) == 2
    # Failed by the reaper, the job still owes its webhook: sent after the reaper's commit.
    assert tasks_sent(DELIVER_WEBHOOK) == [job_id]
    assert sweep(settings) == {"stale": 0, "resent": 0, "failed": 0, "webhooks": 0, "exports": 0}


# --- the task: transient failures, cancellation, success --------------------------------


@pytest.mark.parametrize("fault", ["storage", "database"])
def test_a_transient_error_queues_the_job_again_until_attempts_run_out(
    fault: str, tenant: str, onnx_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.queue import RUN_JOB
    from app.settings import get_settings
    from app.storage import StorageError, get_store
    from worker import tasks

    def unreachable(key: str, path: Path) -> None:
        if fault == "storage":
            raise StorageError("the bucket is unreachable")
        raise OperationalError("SELECT 1", {}, Exception("the server closed the connection"))

    monkeypatch.setattr(tasks, "get_store", lambda: StoreWith(get_store(), get_to_file=unreachable))
    job_id = create_job(tenant, add_model(tenant, onnx_model))
    sent()
    assert tasks.run_job(job_id) == "requeued"
    job = job_row(job_id)
    assert (job.status, job.attempts, job.worker, job.stage) == ("queued", 1, None, None)
    reason = "StorageError: the bucket is unreachable" if fault == "storage" else "OperationalError"
    assert any(e.startswith(f"queued again: {reason}") for e in events(job_id))
    [(task, obj_id, eta)] = sent()
    assert (task, obj_id) == (RUN_JOB, job_id) and eta is not None  # retried after a backoff

    # The last attempt fails the job, with the reason, as an infrastructure error.
    set_job(job_id, attempts=get_settings().max_attempts - 1)
    assert tasks.run_job(job_id) == "failed"
    job = job_row(job_id)
    assert job.status == "failed" and job.error["code"] == "infrastructure"
    assert job.error["message"].startswith(reason) and job.error["step"] is None
    assert tasks_sent(RUN_JOB) == []


def test_a_deleted_dataset_fails_the_job_with_dataset_deleted(
    tenant: str, onnx_model: Path
) -> None:
    from app.db import session_scope
    from app.orm import Job
    from worker import tasks

    job_id = create_job(tenant, add_model(tenant, onnx_model))
    with session_scope() as session:  # as if deleted between the API's check and the run
        job = session.get(Job, job_id)
        assert job is not None
        job.spec = {**job.spec, "datasets": {"eval": "ds_gone"}}
    assert tasks.run_job(job_id) == "failed"
    assert job_row(job_id).error == {
        "code": "dataset_deleted",
        "message": "the eval dataset was deleted",
        "step": None,
    }


@pytest.mark.parametrize("during", ["model", "report"])
def test_cancel_during_artifact_upload_leaves_no_orphan(
    during: str,
    tenant: str,
    onnx_model: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.queue import DELIVER_WEBHOOK
    from app.storage import get_store
    from worker import tasks

    store = get_store()
    put: list[str] = []
    job_id = create_job(tenant, add_model(tenant, onnx_model), webhook_url=receiver.url)

    def put_file(path: Path, key: str, *, sha256: str | None = None) -> None:
        if path.suffix == (".json" if during == "report" else ".onnx"):
            cancel(job_id)  # the user cancels while this upload is under way
        store.put_file(path, key, sha256=sha256)
        put.append(key)

    monkeypatch.setattr(tasks, "get_store", lambda: StoreWith(store, put_file=put_file))
    sent()
    assert tasks.run_job(job_id) == "cancelled"
    assert job_row(job_id).status == "cancelled"
    assert artifact_count(job_id) == 0
    assert put and not any(store.exists(key) for key in put)
    # The cancellation owes the webhook (once); the worker sent none of its own.
    assert tasks_sent(DELIVER_WEBHOOK) == [job_id]
    assert tasks.deliver_webhook(job_id) == "delivered"
    assert [body["event"] for body in receiver.bodies()] == ["job.cancelled"]


def test_a_succeeded_job_sends_its_webhook_after_the_commit(
    tenant: str, onnx_model: Path, receiver: Receiver
) -> None:
    from app.queue import DELIVER_WEBHOOK
    from app.storage import get_store
    from worker import tasks

    job_id = create_job(tenant, add_model(tenant, onnx_model), webhook_url=receiver.url)
    sent()
    assert tasks.run_job(job_id) == "succeeded"
    job = job_row(job_id)
    assert job.status == "succeeded" and job.progress == 1.0 and job.metrics["compressed"]
    assert receiver.requests == []  # not from inside the worker's slot
    assert tasks_sent(DELIVER_WEBHOOK) == [job_id]
    assert tasks.deliver_webhook(job_id) == "delivered"
    [request] = receiver.requests
    assert request["user_agent"] == "squish-webhook/1"
    assert request["body"]["event"] == "job.succeeded"
    payload = request["body"]["job"]
    assert payload["id"] == job_id and payload["status"] == "succeeded"
    artifacts = {a["name"]: a for a in payload["artifacts"]}
    assert artifacts["model"]["media_type"] == "application/octet-stream"
    assert artifacts["report"]["media_type"] == "application/json"
    assert artifacts["model"]["filename"] == f"{job_id}-model.onnx"  # the format's own suffix
    assert artifacts["report"]["filename"] == f"{job_id}-report.json"
    assert all(get_store().exists(f"tenants/{tenant}/{a['sha256']}") for a in artifacts.values())
    assert job_row(job_id).webhook_delivered_at is not None


# --- webhooks ---------------------------------------------------------------------------


def test_the_webhook_is_posted_once_when_its_task_runs_twice(
    tenant: str, tmp_path: Path, receiver: Receiver, client: Any
) -> None:
    from app.queue import DELIVER_WEBHOOK
    from worker import tasks

    blob = tmp_path / "model.onnx"
    blob.write_bytes(b"not run here")
    model_id = add_model(tenant, blob)
    first, second = (create_job(tenant, model_id, webhook_url=receiver.url) for _ in range(2))
    sent()
    for job_id in (first, second):
        response = client.post(f"/v1/jobs/{job_id}/cancel")
        assert response.status_code == 202, response.text
    assert receiver.requests == []  # the API delivers nothing itself
    assert sorted(tasks_sent(DELIVER_WEBHOOK)) == sorted([first, second])

    # The same message delivered twice, one after the other.
    assert [tasks.deliver_webhook(first), tasks.deliver_webhook(first)] == [
        "delivered",
        "skipped",
    ]
    # ... and twice at once, while the receiver takes its time.
    receiver.delay_s = 0.5
    outcomes: list[str] = []
    threads = [
        threading.Thread(target=lambda: outcomes.append(tasks.deliver_webhook(second)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["delivered", "skipped"]
    assert [(b["event"], b["job"]["id"]) for b in receiver.bodies()] == [
        ("job.cancelled", first),
        ("job.cancelled", second),
    ]
    assert job_row(first).webhook_attempts == 1 and job_row(second).webhook_attempts == 1


def test_a_webhook_lost_in_a_restart_is_resent_by_the_reaper(
    tenant: str, tmp_path: Path, receiver: Receiver
) -> None:
    from app.queue import DELIVER_WEBHOOK
    from app.reaper import sweep
    from app.settings import get_settings
    from worker import tasks

    blob = tmp_path / "model.onnx"
    blob.write_bytes(b"not run here")
    job_id = create_job(tenant, add_model(tenant, blob), webhook_url=receiver.url)
    cancel(job_id)
    assert tasks_sent(DELIVER_WEBHOOK) == [job_id]  # ... and lost: the broker restarted
    assert sweep(get_settings())["webhooks"] == 0  # not overdue yet
    assert sweep(lapsed())["webhooks"] == 1
    assert tasks_sent(DELIVER_WEBHOOK) == [job_id]
    assert sweep(get_settings())["webhooks"] == 0  # re-sent once per interval, not per sweep
    assert tasks.deliver_webhook(job_id) == "delivered"
    assert sweep(lapsed())["webhooks"] == 0
    assert tasks_sent(DELIVER_WEBHOOK) == []
    assert tasks.deliver_webhook(job_id) == "skipped"
    assert [b["event"] for b in receiver.bodies()] == ["job.cancelled"]


def test_a_webhook_whose_worker_died_mid_delivery_is_delivered_once_its_claim_lapses(
    tenant: str, tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.jobs import webhooks
    from app.queue import DELIVER_WEBHOOK
    from app.reaper import sweep
    from worker import tasks

    class Killed(BaseException):
        pass

    def killed(*_args: Any, **_kwargs: Any) -> None:
        raise Killed

    blob = tmp_path / "model.onnx"
    blob.write_bytes(b"not run here")
    job_id = create_job(tenant, add_model(tenant, blob), webhook_url=receiver.url)
    cancel(job_id)
    sent()
    monkeypatch.setattr(webhooks, "CLAIM_S", 0.2)
    monkeypatch.setattr(webhooks, "CLOCK_SKEW_S", 0.0)  # one clock in this test
    with monkeypatch.context() as patched:  # the worker dies after claiming, before the POST
        patched.setattr(webhooks, "_send", killed)
        with pytest.raises(Killed):
            tasks.deliver_webhook(job_id)
    assert tasks.deliver_webhook(job_id) == "skipped"  # the claim still holds
    assert sweep(lapsed(0.5))["webhooks"] == 1
    assert tasks_sent(DELIVER_WEBHOOK) == [job_id]
    assert tasks.deliver_webhook(job_id) == "delivered"
    assert len(receiver.requests) == 1 and job_row(job_id).webhook_attempts == 2


def test_a_failing_webhook_is_retried_with_backoff_then_given_up(
    tenant: str, tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.db import utcnow
    from app.jobs import webhooks
    from app.queue import DELIVER_WEBHOOK
    from app.reaper import sweep
    from worker import tasks

    monkeypatch.setattr(webhooks, "MAX_ATTEMPTS", 3)
    receiver.status = 500
    blob = tmp_path / "model.onnx"
    blob.write_bytes(b"not run here")
    job_id = create_job(tenant, add_model(tenant, blob), webhook_url=receiver.url)
    cancel(job_id)
    sent()
    for attempt in (1, 2):
        before = utcnow()
        assert tasks.deliver_webhook(job_id) == "retrying"
        [(task, obj_id, eta)] = sent()
        assert (task, obj_id) == (DELIVER_WEBHOOK, job_id) and eta is not None
        due = job_row(job_id).webhook_next_at
        assert due >= before + timedelta(seconds=webhooks.backoff_s(attempt))
        assert tasks.deliver_webhook(job_id) == "skipped"  # not before its backoff
        set_job(job_id, webhook_next_at=utcnow())  # ... which has now gone by
    assert tasks.deliver_webhook(job_id) == "given_up"
    job = job_row(job_id)
    assert job.webhook_next_at is None and job.webhook_delivered_at is None
    assert job.webhook_attempts == 3 and len(receiver.requests) == 3
    assert any("failed after 3 tries: HTTP 500; giving up" in e for e in events(job_id))
    assert sweep(lapsed())["webhooks"] == 0 and tasks_sent(DELIVER_WEBHOOK) == []
    assert tasks.deliver_webhook(job_id) == "skipped"
    assert webhooks.backoff_s(1) < webhooks.backoff_s(2) < webhooks.backoff_s(30)
    assert webhooks.backoff_s(30) == webhooks.BACKOFF_MAX_S


def test_the_reaper_gives_up_a_webhook_nobody_delivered_in_time(
    tenant: str, tmp_path: Path, receiver: Receiver
) -> None:
    from app.db import utcnow
    from app.jobs import webhooks
    from app.queue import DELIVER_WEBHOOK
    from app.reaper import sweep

    blob = tmp_path / "model.onnx"
    blob.write_bytes(b"not run here")
    job_id = create_job(tenant, add_model(tenant, blob), webhook_url=receiver.url)
    cancel(job_id)
    sent()
    long_ago = utcnow() - timedelta(seconds=webhooks.GIVE_UP_AFTER_S + 60)
    set_job(job_id, finished_at=long_ago, webhook_next_at=long_ago)
    assert sweep(lapsed())["webhooks"] == 0 and tasks_sent(DELIVER_WEBHOOK) == []
    assert job_row(job_id).webhook_next_at is None
    assert any("was not delivered in time; giving up" in e for e in events(job_id))
    assert receiver.requests == []


def test_a_delivery_due_by_a_clock_slightly_ahead_is_due_on_the_worker(
    tenant: str, tmp_path: Path, receiver: Receiver
) -> None:
    from app.db import utcnow
    from worker import tasks

    blob = tmp_path / "model.onnx"
    blob.write_bytes(b"not run here")
    job_id = create_job(tenant, add_model(tenant, blob), webhook_url=receiver.url)
    cancel(job_id)
    set_job(job_id, webhook_next_at=utcnow() + timedelta(seconds=1))  # the API's clock is ahead
    assert tasks.deliver_webhook(job_id) == "delivered"
    assert len(receiver.requests) == 1


def test_a_job_without_webhook_url_owes_no_delivery(tenant: str, tmp_path: Path) -> None:
    from app.queue import DELIVER_WEBHOOK
    from app.reaper import sweep
    from worker import tasks

    blob = tmp_path / "model.onnx"
    blob.write_bytes(b"not run here")
    job_id = create_job(tenant, add_model(tenant, blob))
    cancel(job_id)
    assert tasks_sent(DELIVER_WEBHOOK) == []
    assert job_row(job_id).webhook_next_at is None
    assert sweep(lapsed())["webhooks"] == 0
    assert tasks.deliver_webhook(job_id) == "skipped"


def test_the_migration_is_reversible(db: str) -> None:
    from sqlalchemy import inspect

    from app.db import get_engine, reset_engine
    from app.migrate import downgrade, upgrade

    def job_columns() -> set[str]:
        reset_engine()
        return {column["name"] for column in inspect(get_engine()).get_columns("job")}

    assert {"webhook_attempts", "webhook_next_at"} <= job_columns()
    downgrade(revision="0001")
    assert not {"webhook_attempts", "webhook_next_at"} & job_columns()
    upgrade()
    assert {"webhook_attempts", "webhook_next_at"} <= job_columns()
