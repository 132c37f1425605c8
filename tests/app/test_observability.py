"""Operations: the job figures of /metrics, read from the database (SQLite and PostgreSQL),
and log lines (text or JSON) that carry the job id, in the API and in a real Celery worker."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.app.test_lifecycle import add_model, create_job


@pytest.fixture
def tenant(db: str) -> str:
    from app.db import session_scope
    from app.keys import get_or_create_tenant

    with session_scope() as session:
        return get_or_create_tenant(session, "alice").id


def add_job(tenant_id: str, status: str, spec: dict[str, Any], **values: Any) -> str:
    from app.db import new_id, session_scope
    from app.orm import Job

    job_id = new_id("job")
    with session_scope() as session:
        session.add(Job(id=job_id, tenant_id=tenant_id, status=status, spec=spec, **values))
    return job_id


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_job_queue_trial_and_webhook_figures_come_from_the_database(
    tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from app import observability
    from app.db import session_scope, utcnow
    from app.main import create_app
    from app.orm import WebhookDelivery

    monkeypatch.setattr(observability, "SNAPSHOT_TTL_S", 0.0)
    monkeypatch.setattr(observability, "_trial_sources", [])
    observability.count_trials_with(lambda _session: {"succeeded": 3, "failed": 1})
    observability.count_trials_with(lambda _session: {"succeeded": 2})

    now = utcnow()

    def ran(seconds: float) -> dict[str, Any]:
        return {"started_at": now - timedelta(seconds=seconds), "finished_at": now}

    def steps(*methods: str) -> dict[str, Any]:
        return {"pipeline": [{"method": m, "params": {}} for m in methods]}

    both = steps("prune.magnitude", "quantize.dynamic", "prune.magnitude")
    add_job(tenant, "succeeded", both, queue="cpu", **ran(3))
    error = {"code": "method_failed", "message": "torchao failed", "step": "quantize.dynamic"}
    failed = add_job(
        tenant, "failed", steps("quantize.dynamic"), queue="gpu", error=error, **ran(42)
    )
    search = {"search": {"objectives": ["size"], "budget": {"max_trials": 4}}}
    add_job(tenant, "succeeded", search, queue="cpu", **ran(100))
    add_job(tenant, "cancelled", both, queue="cpu", finished_at=now)  # never started
    for _ in range(2):
        add_job(tenant, "queued", both, queue="cpu")
    with session_scope() as session:
        for attempt, outcome in enumerate(("failed", "refused", "delivered", "delivered"), 1):
            session.add(
                WebhookDelivery(
                    job_id=failed,
                    webhook_id="msg_x",
                    event="job.failed",
                    attempt=attempt,
                    outcome=outcome,
                )
            )

    with TestClient(create_app(run_reaper=False)) as client:
        answer = client.get("/metrics")
    assert answer.status_code == 200
    got = samples(answer.text)

    def value(name: str, **labels: str) -> float | None:
        return got.get((name, frozenset(labels.items())))

    assert value("squish_jobs_created_total") == 6
    assert value("squish_jobs_finished_total", status="succeeded", error_code="") == 2
    assert value("squish_jobs_finished_total", status="failed", error_code="method_failed") == 1
    assert value("squish_jobs_finished_total", status="cancelled", error_code="") == 1
    assert value("squish_jobs", status="queued") == 2
    assert value("squish_queue_depth", queue="cpu") == 2
    assert value("squish_queue_depth", queue="gpu") == 0

    # Durations: under each method a pipeline uses (once per job), a search under "search".
    hist = "squish_job_duration_seconds"
    assert value(f"{hist}_count", method="prune.magnitude", queue="cpu") == 1
    assert value(f"{hist}_count", method="quantize.dynamic", queue="cpu") == 1
    assert value(f"{hist}_count", method="quantize.dynamic", queue="gpu") == 1
    assert value(f"{hist}_count", method="search", queue="cpu") == 1
    assert value(f"{hist}_sum", method="quantize.dynamic", queue="gpu") == pytest.approx(
        42, abs=0.1
    )
    assert value(f"{hist}_bucket", method="quantize.dynamic", queue="gpu", le="30.0") == 0
    assert value(f"{hist}_bucket", method="quantize.dynamic", queue="gpu", le="60.0") == 1
    assert value(f"{hist}_bucket", method="prune.magnitude", queue="cpu", le="5.0") == 1
    assert value(f"{hist}_bucket", method="search", queue="cpu", le="+Inf") == 1
    assert value(f"{hist}_bucket", method="search", queue="cpu", le="60.0") == 0

    assert value("squish_search_trials_total", status="succeeded") == 5
    assert value("squish_search_trials_total", status="failed") == 1
    assert value("squish_webhook_deliveries_total", outcome="delivered") == 2
    assert value("squish_webhook_deliveries_total", outcome="failed") == 1
    assert value("squish_webhook_deliveries_total", outcome="refused") == 1
    assert value("squish_metrics_snapshot_age_seconds") is not None


def test_a_scrape_while_the_database_is_down_serves_the_last_figures(
    tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app import observability

    monkeypatch.setattr(observability, "SNAPSHOT_TTL_S", 0.0)
    add_job(tenant, "queued", {"pipeline": []}, queue="cpu")
    collector = observability.JobCollector()
    first = collector.snapshot()
    assert first is not None and first.created == 1

    def down(*_args: Any, **_kwargs: Any) -> Any:
        raise ConnectionError("database unavailable")

    monkeypatch.setattr(observability, "_take_snapshot", down)
    assert collector.snapshot() is first  # the last figures, not an empty scrape or an error
    families = {family.name: family for family in collector.collect()}
    assert families["squish_jobs_created"].samples[0].value == 1


# --- logs -------------------------------------------------------------------------------


def test_json_log_lines_in_the_api_carry_the_job_id(
    embedded: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.observability import configure_logging
    from app.settings import get_settings

    monkeypatch.setenv("SQUISH_LOG_FORMAT", "json")
    get_settings.cache_clear()
    app = create_app(run_reaper=False)
    probe = logging.getLogger("squish.probe")

    @app.get("/v1/jobs/{job_id}/probe")
    def log_a_line(job_id: str) -> dict[str, str]:
        probe.warning("looking at %s", job_id)
        return {}

    try:
        with TestClient(app) as client:
            capsys.readouterr()
            client.get("/v1/jobs/job_0123abcd/probe")
            probe.warning("outside any job")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    finally:
        configure_logging("text")
    mine = [line for line in lines if line["logger"] == "squish.probe"]
    assert [(line["message"], line["job_id"]) for line in mine] == [
        ("looking at job_0123abcd", "job_0123abcd"),
        ("outside any job", None),
    ]
    assert mine[0]["level"] == "warning" and mine[0]["time"].endswith("+00:00")


def test_text_lines_name_the_job_too() -> None:
    from app.observability import TextFormatter, job_context

    record = logging.LogRecord("squish.worker", logging.INFO, __file__, 1, "step %s", ("x",), None)
    with job_context("job_42"):
        line = TextFormatter().format(record)
    assert "squish.worker [job_42]: step x" in line
    outside = logging.LogRecord("squish.worker", logging.INFO, __file__, 1, "idle", (), None)
    assert "squish.worker: idle" in TextFormatter().format(outside)


@pytest.fixture
def worker_log(
    embedded: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, Any]]:
    """A real Celery worker (prefork) on the embedded broker, writing JSON lines."""
    from app.commands import worker_argv
    from app.settings import get_settings

    monkeypatch.setenv("SQUISH_LOG_FORMAT", "json")
    get_settings.cache_clear()
    settings = get_settings()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQUISH_")}
    env |= {
        "SQUISH_DATA_DIR": str(settings.data_dir),
        "SQUISH_LOG_FORMAT": "json",
        "SQUISH_WORK_DIR": str(tmp_path / "work"),
        "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1",
    }
    log_file = tmp_path / "worker.log"
    with log_file.open("wb") as out:
        process = subprocess.Popen(
            worker_argv("cpu", 1, "json-logs@%h"),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield log_file, process
    finally:
        # Its job is over: the worker and its pool process are killed at once (a warm
        # shutdown takes seconds and is tested elsewhere).
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_json_log_lines_of_a_worker_carry_the_job_id(
    embedded: dict[str, str], worker_log: tuple[Path, Any], tmp_path: Path
) -> None:
    from app.db import session_scope
    from app.keys import get_or_create_tenant
    from app.orm import Job

    log_file, process = worker_log
    with session_scope() as session:
        tenant_id = get_or_create_tenant(session, "alice").id
    blob = tmp_path / "broken.onnx"
    blob.write_bytes(b"not an onnx model")  # fails fast in the worker: invalid_model
    job_id = create_job(tenant_id, add_model(tenant_id, blob))

    deadline = time.monotonic() + 120
    done = ""
    while time.monotonic() < deadline and process.poll() is None:
        with session_scope() as session:
            job = session.get(Job, job_id)
            assert job is not None
            status = job.status
        text = log_file.read_text(errors="replace")
        done = next((line for line in text.splitlines() if "succeeded in" in line), "")
        if status in ("failed", "succeeded") and done:
            break
        time.sleep(0.3)
    assert status == "failed", log_file.read_text(errors="replace")[-3000:]
    assert done, log_file.read_text(errors="replace")[-3000:]

    lines = []
    for raw in log_file.read_text(errors="replace").splitlines():
        assert raw.startswith("{"), f"not a JSON line: {raw!r}"
        lines.append(json.loads(raw))
    # The pool process's lines while the task ran (its end included) carry the job's id;
    # the main process's, which run no job, carry none.
    ran = [line for line in lines if "squish.run_job[" in line["message"]]
    ended = [line for line in ran if "succeeded in" in line["message"]]
    assert ended and all(line["process"] != "MainProcess" for line in ended), ran
    assert all(line["job_id"] == job_id for line in ended), ended
    main = [line for line in lines if line["process"] == "MainProcess"]
    assert main and all(line["job_id"] is None for line in main)
    assert {line["level"] for line in lines} <= {"debug", "info", "warning", "error", "critical"}
