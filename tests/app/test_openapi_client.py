"""A client generated from the running app's /openapi.json by openapi-python-client, used
unmodified, does the whole flow: upload a model and a dataset, create a job, poll it to
the end (the real worker task runs it in this process) and download the artifact."""

from __future__ import annotations

import hashlib
import importlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.factories import digits_npz, tiny_mlp_onnx

PACKAGE = "squish_generated_client"


@pytest.fixture
def served(embedded: dict[str, str]) -> Iterator[str]:
    from app.main import create_app
    from tests.squish.service import serving

    with serving(create_app(run_reaper=False)) as url:
        yield url


@pytest.fixture
def generated(served: str, tmp_path: Path) -> Iterator[ModuleType]:
    """The package openapi-python-client generates from the served document, imported."""
    document = tmp_path / "openapi.json"
    document.write_text(httpx.get(f"{served}/openapi.json").text)
    config = tmp_path / "config.yml"
    config.write_text("post_hooks: []\n")  # no formatter run on the generated code
    done = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(document),
         "--config", str(config), "--meta", "none", "--output-path", str(tmp_path / PACKAGE)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # The generator warns about each part of the document it cannot turn into code.
    assert "warning" not in output.lower(), output
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def _api(package: ModuleType, name: str) -> Any:
    return importlib.import_module(f"{package.__name__}.{name}")


def _run_jobs(stop: threading.Event, errors: list[BaseException]) -> None:
    """The worker's task on every queued job, as a worker consuming the queue would."""
    from sqlalchemy import select

    from app.db import get_read_engine
    from app.orm import Job, JobStatus
    from worker.tasks import run_job

    query = select(Job.id).where(Job.status == JobStatus.queued).limit(1)
    try:
        while not stop.is_set():
            with get_read_engine().connect() as conn:
                job_id = conn.scalar(query)
            if job_id is None:
                stop.wait(0.05)
                continue
            run_job(job_id)
    except BaseException as exc:
        errors.append(exc)


def test_a_generated_client_runs_the_whole_flow_unmodified(
    generated: ModuleType, served: str, embedded: dict[str, str], tmp_path: Path
) -> None:
    models = _api(generated, "models")
    types = _api(generated, "types")
    upload_model = _api(generated, "api.models.upload_model")
    upload_dataset = _api(generated, "api.datasets.upload_dataset")
    create_job = _api(generated, "api.jobs.create_job")
    get_job = _api(generated, "api.jobs.get_job")
    download_artifact = _api(generated, "api.jobs.download_artifact")
    download_model = _api(generated, "api.models.download_model")
    get_model = _api(generated, "api.models.get_model")

    client = generated.AuthenticatedClient(base_url=served, token=embedded["alice"], timeout=60)
    model_path = tiny_mlp_onnx(tmp_path / "mlp.onnx")
    data_path = digits_npz(tmp_path / "digits.npz")

    with model_path.open("rb") as fh:
        body = models.UploadModelBody(
            file=types.File(payload=fh, file_name="mlp.onnx"),
            name="digits mlp",
            format_=models.UploadModelBodyFormat.ONNX,
        )
        model = upload_model.sync(client=client, body=body)
    assert isinstance(model, models.ModelOut), model
    assert model.name == "digits mlp" and model.format_ == models.ModelFormat.ONNX
    assert model.sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()

    with data_path.open("rb") as fh:
        body = models.UploadDatasetBody(file=types.File(payload=fh, file_name="digits.npz"))
        dataset = upload_dataset.sync(client=client, body=body)
    assert isinstance(dataset, models.DatasetOut), dataset

    missing = get_model.sync("mdl_0000000000000000000000000000", client=client)
    assert isinstance(missing, models.Problem) and missing.status == 404, missing
    ranged = download_model.sync(model.id, client=client, range_="bytes=0-9")
    assert isinstance(ranged, types.File)
    assert ranged.payload.read() == model_path.read_bytes()[:10]

    spec = models.JobCreate.from_dict(
        {
            "model_id": model.id,
            "pipeline": [{"method": "prune.magnitude", "params": {"amount": 0.5}}],
            "datasets": {"eval": dataset.id},
            "evaluate": {"batch_sizes": [1], "warmup": 0, "iterations": 2},
        }
    )
    created = create_job.sync_detailed(client=client, body=spec, idempotency_key="flow-1")
    assert created.status_code == 202, created.content
    job = created.parsed
    assert isinstance(job, models.JobOut) and job.status == models.JobStatus.QUEUED
    assert created.headers["location"] == f"/v1/jobs/{job.id}"

    stop, errors = threading.Event(), []  # type: ignore[var-annotated]
    worker = threading.Thread(target=_run_jobs, args=(stop, errors), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 240
        seen = []
        while time.monotonic() < deadline:
            job = get_job.sync(job.id, client=client)
            assert isinstance(job, models.JobOut), job
            seen.append(job.status)
            if job.status in (
                models.JobStatus.SUCCEEDED, models.JobStatus.FAILED, models.JobStatus.CANCELLED
            ):  # fmt: skip
                break
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not errors, errors
    assert job.status == models.JobStatus.SUCCEEDED, (job.status, job.error)
    # The typed metrics parse into the generated models.
    assert isinstance(job.metrics, models.PipelineMetrics)
    assert job.metrics.compressed.size_bytes > 0
    artifacts = {a.name: a for a in job.artifacts}
    assert set(artifacts) >= {"model", "report"}

    downloaded = download_artifact.sync(job.id, "model", client=client)
    assert isinstance(downloaded, types.File), downloaded
    content = downloaded.payload.read()
    assert hashlib.sha256(content).hexdigest() == artifacts["model"].sha256
    assert len(content) == artifacts["model"].size_bytes

    report = download_artifact.sync(job.id, "report", client=client)
    assert isinstance(report, types.File)
    assert json.loads(report.payload.read())  # the report is JSON, delivered as a file

    again = create_job.sync_detailed(client=client, body=spec, idempotency_key="flow-1")
    assert again.status_code == 200 and again.parsed.id == job.id
