"""export.mlflow against a real `mlflow server` (SQLite backend, a free 127.0.0.1 port):
a succeeded job's artifacts, flattened metrics and recipe in one run, the model registered;
a tracking server that is down fails only the export; a cached job is exported too."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.conftest import free_port, require_module
from tests.factories import digits_npz, tiny_mlp_onnx

QUICK = {"batch_sizes": [1], "warmup": 0, "iterations": 1}


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_module("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    log = (root / "server.log").open("wb")
    server = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
        # Its background job runner (scorers, trace archival) is not under test and slows
        # the first answer by minutes on a busy machine.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not start in 180 s"
            time.sleep(0.3)
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mlflow-files")
    return {
        "model": tiny_mlp_onnx(root / "mlp.onnx", trained=False),
        "eval": digits_npz(root / "eval.npz"),
    }


@pytest.fixture
def alice(embedded: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    from app.main import create_app

    # A server that is down is given up on at once (the worker's default retries for ~7 s).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with TestClient(create_app(run_reaper=False)) as client:
        client.headers["Authorization"] = f"Bearer {embedded['alice']}"
        yield client


def upload(client: TestClient, path: Path, kind: str) -> str:
    with path.open("rb") as fh:
        answer = client.post(f"/v1/{kind}", files={"file": (path.name, fh)})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def submit(client: TestClient, files: dict[str, Path], export: Any, **extra: Any) -> Any:
    body = {
        "model_id": upload(client, files["model"], "models"),
        "pipeline": [{"method": "quantize.dynamic", "params": {"per_channel": False}}],
        "datasets": {"eval": upload(client, files["eval"], "datasets")},
        "evaluate": QUICK,
        "export": export,
        **extra,
    }
    return client.post("/v1/jobs", json=body)


def log_events(job_id: str) -> list[dict[str, Any]]:
    from app.db import session_scope
    from app.orm import JobEvent

    with session_scope() as session:
        rows = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "log")
        )
        return [{"level": e.level, "message": e.message, "data": e.data} for e in rows]


def exported_run(job_id: str) -> dict[str, Any]:
    logged = log_events(job_id)
    found = [e for e in logged if e["message"].startswith("exported to MLflow")]
    assert len(found) == 1, [e["message"] for e in logged]
    return dict(found[0]["data"])


def test_a_succeeded_job_is_logged_into_an_mlflow_run_and_registered(
    alice: TestClient, files: dict[str, Path], tracking_uri: str
) -> None:
    from mlflow.tracking import MlflowClient

    from worker import tasks

    export = {
        "mlflow": {
            "tracking_uri": tracking_uri,
            "experiment": "digits",
            "registered_model": "digits-int8",
        }
    }
    job = submit(alice, files, export).json()
    assert tasks.run_job(job["id"]) == "succeeded"
    done = alice.get(f"/v1/jobs/{job['id']}").json()
    exported = exported_run(job["id"])
    mlflow = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = mlflow.get_run(exported["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["squish.job_id"] == job["id"]
    assert mlflow.get_experiment(run.info.experiment_id).name == "digits"
    metrics = done["metrics"]
    logged = run.data.metrics
    assert logged["compressed.size_bytes"] == metrics["compressed"]["size_bytes"]
    assert logged["steps.0.size_bytes"] == metrics["steps"][0]["size_bytes"]
    p50 = metrics["compressed"]["latency_ms"]["batch_1"]["p50"]
    assert logged["compressed.latency_ms.batch_1.p50"] == pytest.approx(p50)
    assert logged["fidelity.cosine_similarity"] == pytest.approx(
        metrics["fidelity"]["cosine_similarity"]
    )
    params = run.data.params
    assert params["pipeline.0.method"] == "quantize.dynamic"
    assert params["pipeline.0.params.per_channel"] == "false"
    assert params["output_format"] == "onnx" and "webhook_url" not in params
    stored = {a["name"] for a in done["artifacts"]}
    assert {a.path for a in mlflow.list_artifacts(run.info.run_id)} == stored
    (model_file,) = mlflow.list_artifacts(run.info.run_id, "model")
    assert model_file.file_size == next(
        a["size_bytes"] for a in done["artifacts"] if a["name"] == "model"
    )
    version = mlflow.get_model_version("digits-int8", exported["model_version"])
    assert version.run_id == run.info.run_id and version.source.endswith(model_file.path)

    # The same job again is answered from the cache, and exported like one that ran.
    cached = submit(alice, files, export).json()
    assert cached["status"] == "succeeded" and cached["cached_from"] == job["id"]
    assert tasks.export_job(cached["id"]) == "exported"
    assert tasks.export_job(cached["id"]) == "skipped"  # a repeated message: once
    again = mlflow.get_run(exported_run(cached["id"])["run_id"])
    assert again.data.tags["squish.job_id"] == cached["id"]
    assert again.data.metrics == logged
    assert exported_run(cached["id"])["model_version"] == str(int(exported["model_version"]) + 1)


def test_a_tracking_server_that_is_down_fails_only_the_export(
    alice: TestClient, files: dict[str, Path]
) -> None:
    from worker import tasks

    down = f"http://127.0.0.1:{free_port()}"
    job = submit(alice, files, {"mlflow": {"tracking_uri": down}}, cache=False).json()
    assert tasks.run_job(job["id"]) == "succeeded"
    done = alice.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and {"model", "report"} <= {
        a["name"] for a in done["artifacts"]
    }
    (warning,) = [e for e in log_events(job["id"]) if "MLflow" in e["message"]]
    assert warning["level"] == "warning"
    assert warning["message"].startswith("MLflow export failed (the job's result is not affected)")
    assert down in warning["message"] and warning["data"]["tracking_uri"] == down


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("ftp://mlflow.internal", "http(s) URL"),
        ("databricks", "http(s) URL"),
        ("mlflow.internal:5000", "'mlflow.internal' is not supported"),
        ("http://", "has no host"),
        ("http://user:secret@mlflow.internal", "no credentials"),
        ("file:relative/mlruns", "absolute path"),
        ("http://mlflow.internal:port", "not a URI"),
    ],
)
def test_a_malformed_tracking_uri_is_422_at_submission(
    alice: TestClient, files: dict[str, Path], uri: str, says: str
) -> None:
    answer = submit(alice, files, {"mlflow": {"tracking_uri": uri}})
    assert answer.status_code == 422, answer.text
    (error,) = answer.json()["errors"]
    assert error["loc"][-3:] == ["export", "mlflow", "tracking_uri"]
    assert says in error["msg"]


def test_only_the_tracking_uris_the_operator_lists_are_taken(
    alice: TestClient, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.settings import get_settings

    monkeypatch.setenv(
        "SQUISH_MLFLOW_TRACKING_URIS", "http://mlflow.internal:5000/team, file:///srv/mlruns"
    )
    get_settings.cache_clear()
    for uri in ("http://mlflow.internal:5000/team-b", "http://mlflow.internal.evil:5000/team",
                "https://mlflow.internal:5000/team", "file:///etc"):  # fmt: skip
        answer = submit(alice, files, {"mlflow": {"tracking_uri": uri}})
        assert answer.status_code == 422, uri
        (error,) = answer.json()["errors"]
        assert error["loc"][-3:] == ["export", "mlflow", "tracking_uri"]
        assert (
            "SQUISH_MLFLOW_TRACKING_URIS" in error["msg"] and "mlflow.internal:5000" in error["msg"]
        )
    from worker.export import tracking_uri_refusal

    allowed = get_settings().mlflow_tracking_uris
    assert tracking_uri_refusal("http://mlflow.internal:5000/team/x", allowed, False) is None
    assert tracking_uri_refusal("file:///srv/mlruns/digits", allowed, False) is None
    # Production with no list: nothing; embedded with no list: anything.
    assert tracking_uri_refusal("http://mlflow.internal:5000", [], False) is not None
    assert tracking_uri_refusal("http://mlflow.internal:5000", [], True) is None
