"""Celery tasks: thin adapters between the queue, the database and the engine.

`run_job` is five steps, one function each: :func:`claim` the job (a conditional UPDATE),
:func:`fetch_inputs`, :func:`run` the pipeline, :func:`store_outputs`, and
:func:`record_outcome`. While the job is claimed a heartbeat thread keeps the claim alive
and notices cancellation; the pipeline checks for it at every progress report, and a job
that does not stop within `cancel_grace_s` is stopped by ending this pool process.

A failure is recorded one way: as an :class:`~worker.errors.EngineError`, stored as its
``to_dict()``. Storage or database trouble is transient: the job is queued again until
its attempts are used up, then fails as an ``InfrastructureError``; anything unexpected
fails as an ``InternalError``.

`deliver_webhook` makes one delivery attempt of a finished job's webhook
(app/jobs/webhooks.py); the transition that finishes a job sends it after its commit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery.signals import worker_process_init
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from app.db import new_id, reset_engine, session_scope
from app.files import delete_if_unused, object_key
from app.jobs import lifecycle, webhooks
from app.orm import Artifact, Dataset, Job, MLModel
from app.queue import DELIVER_WEBHOOK, INSPECT_MODEL, RUN_JOB, get_celery, send_after_commit
from app.settings import get_settings
from app.storage import StorageError, get_store
from worker.contract import FORMATS, InspectionStatus, LogLevel, ModelFormat
from worker.errors import (
    DatasetDeletedError,
    EngineError,
    InfrastructureError,
    InternalError,
    JobCancelled,
    ModelDeletedError,
)

if TYPE_CHECKING:
    from worker.pipeline import PipelineResult

log = logging.getLogger("squish.worker")
celery_app = get_celery()

REPORT_MEDIA_TYPE = "application/json"
TRANSIENT = (StorageError, OperationalError)
"""Failures of this worker's surroundings, not of the job: worth another attempt."""


class Outcome(StrEnum):
    """What one run of `run_job` did (its task result, for logs)."""

    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    requeued = "requeued"
    lost = "lost"
    """The job stopped being ours (cancelled, or taken over) before the outcome was recorded."""
    not_claimed = "not-claimed"


@worker_process_init.connect
def _after_fork(**_kwargs: Any) -> None:
    # Connections must not cross a fork; warm the engine up so the first job starts fast.
    reset_engine()
    import worker.pipeline  # noqa: F401


@celery_app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Claim → fetch inputs → run → store outputs → record outcome."""
    job = claim(job_id)
    if job is None:
        return Outcome.not_claimed
    with job.held():
        try:
            inputs = fetch_inputs(job)
            result = run(job, inputs)
            outputs = store_outputs(job, result)
        except Exception as exc:
            return record_outcome(job, exc)
        return record_outcome(job, outputs)


@celery_app.task(name=DELIVER_WEBHOOK, acks_late=True, ignore_result=True)
def deliver_webhook(job_id: str) -> str:
    """One delivery attempt of a finished job's webhook; a failed one schedules the next."""
    return webhooks.deliver(job_id)


# --- claim ------------------------------------------------------------------------------


class DbReporter:
    """Progress and log lines into the job's row and events, throttled; raises on cancel.

    The pipeline's 0..1 maps to 0..0.98: storing the artifacts is the last step.
    """

    SCALE = 0.98

    def __init__(self, job_id: str, token: str, cancelled: threading.Event) -> None:
        self.job_id = job_id
        self.token = token
        self.cancelled_event = cancelled
        self._last_write = 0.0
        self.stage: str | None = None

    def cancelled(self) -> bool:
        return self.cancelled_event.is_set()

    def progress(self, fraction: float, stage: str | None = None) -> None:
        if self.cancelled_event.is_set():
            raise JobCancelled("the job was cancelled")
        now = time.monotonic()
        stage_changed = stage is not None and stage != self.stage
        if not stage_changed and now - self._last_write < 0.5:
            return
        self._last_write = now
        fraction *= self.SCALE
        with session_scope() as session:
            ok = lifecycle.set_progress(session, self.job_id, self.token, fraction, stage)
            if ok:
                lifecycle.add_event(
                    session,
                    self.job_id,
                    "progress",
                    f"stage: {stage}" if stage_changed else f"{fraction:.0%}",
                    data={
                        "progress": round(fraction, 4),
                        "stage": stage if stage_changed else self.stage,
                    },
                )
        if stage_changed:
            self.stage = stage
        if not ok:
            self.cancelled_event.set()
            raise JobCancelled("the job was cancelled or taken over by another worker")

    def log(
        self, message: str, level: str = LogLevel.info, data: dict[str, Any] | None = None
    ) -> None:
        with session_scope() as session:
            lifecycle.add_event(
                session, self.job_id, "log", message, level=LogLevel(level), data=data
            )


class Heartbeat(threading.Thread):
    """Stamps `heartbeat_at`; when the row says we no longer own a running job, signals stop."""

    def __init__(self, job_id: str, token: str, cancelled: threading.Event) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.job_id, self.token, self.cancelled = job_id, token, cancelled
        self.done = threading.Event()
        self.settings = get_settings()

    def run(self) -> None:
        interval = min(self.settings.heartbeat_interval_s, 1.0)
        while not self.done.wait(interval):
            try:
                with session_scope() as session:
                    alive = lifecycle.heartbeat(session, self.job_id, self.token)
            except OperationalError:
                continue  # the database blinked; try again next tick
            if not alive:
                self.cancelled.set()
                break
        if self.cancelled.is_set() and not self.done.wait(self.settings.cancel_grace_s):
            # The pipeline did not reach a cancellation point in time: end this pool process.
            log.warning(
                "job %s did not stop within %.0fs of cancellation; exiting",
                self.job_id,
                self.settings.cancel_grace_s,
            )
            os._exit(3)


@dataclass
class ClaimedJob:
    """A job this worker owns: its row as claimed, the claim's token, a scratch folder."""

    id: str
    token: str
    tenant_id: str
    model_id: str | None
    spec: dict[str, Any]
    queue: str
    attempts: int
    work_dir: Path
    cancelled: threading.Event
    reporter: DbReporter

    @contextmanager
    def held(self) -> Iterator[None]:
        """Heart-beat while the job runs here; remove the scratch folder after."""
        heartbeat = Heartbeat(self.id, self.token, self.cancelled)
        heartbeat.start()
        try:
            yield
        finally:
            heartbeat.done.set()
            shutil.rmtree(self.work_dir, ignore_errors=True)


def claim(job_id: str) -> ClaimedJob | None:
    """queued → running for this worker; None when another worker has it (or it is gone)."""
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        if not lifecycle.claim(session, job_id, token):
            return None
        row = session.get(Job, job_id)
        assert row is not None
        tenant_id, model_id, spec = row.tenant_id, row.model_id, row.spec
        queue, attempts = row.queue, row.attempts
    cancelled = threading.Event()
    return ClaimedJob(
        id=job_id,
        token=token,
        tenant_id=tenant_id,
        model_id=model_id,
        spec=spec,
        queue=queue,
        attempts=attempts,
        work_dir=Path(tempfile.mkdtemp(prefix=f"squish-{job_id}-")),
        cancelled=cancelled,
        reporter=DbReporter(job_id, token, cancelled),
    )


# --- fetch inputs -----------------------------------------------------------------------


@dataclass
class Inputs:
    """The job's files in its scratch folder."""

    model_path: Path
    model_format: str
    datasets: dict[str, Path]
    models: dict[str, tuple[Path, str]]
    """Models the steps' params name, by id: (path, format)."""


def fetch_inputs(job: ClaimedJob) -> Inputs:
    """Download the model, the datasets and the models the steps name."""
    with session_scope() as session:
        model = session.get(MLModel, job.model_id) if job.model_id else None
        if model is None:
            raise ModelDeletedError("the job's model was deleted")
        model_key, model_format = model.storage_key, model.format
        datasets: dict[str, tuple[str, str]] = {}
        for role, dataset_id in job.spec["datasets"].items():
            dataset = session.get(Dataset, dataset_id)
            if dataset is None:
                raise DatasetDeletedError(f"the {role} dataset was deleted")
            datasets[role] = (dataset.storage_key, dataset.format)
        models: dict[str, tuple[str, str]] = {}
        for ref_id, ref_format in job.spec.get("models", {}).items():
            referenced = session.get(MLModel, ref_id)
            if referenced is None:
                raise ModelDeletedError(f"model {ref_id}, named in the pipeline, was deleted")
            models[ref_id] = (referenced.storage_key, ref_format)
    job.reporter.progress(0.0, "fetching")
    store = get_store()

    def fetch(key: str, name: str) -> Path:
        path = job.work_dir / name
        store.get_to_file(key, path)
        return path

    return Inputs(
        model_path=fetch(model_key, f"input.{model_format}"),
        model_format=model_format,
        datasets={role: fetch(key, f"{role}.{fmt}") for role, (key, fmt) in datasets.items()},
        models={ref: (fetch(key, f"{ref}.{fmt}"), fmt) for ref, (key, fmt) in models.items()},
    )


# --- run --------------------------------------------------------------------------------


def run(job: ClaimedJob, inputs: Inputs) -> PipelineResult:
    """The engine, on the spec as the API normalized it."""
    from worker.pipeline import PipelineSpec, run_pipeline

    spec = job.spec
    pipeline = PipelineSpec(
        steps=[(step["method"], step["params"]) for step in spec["pipeline"]],
        output_format=spec["output_format"],
        device=spec["target"]["device"],
        batch_sizes=spec["evaluate"]["batch_sizes"],
        warmup=spec["evaluate"]["warmup"],
        iterations=spec["evaluate"]["iterations"],
        models=inputs.models,
    )
    return run_pipeline(
        inputs.model_path,
        inputs.model_format,
        pipeline,
        inputs.datasets,
        job.work_dir / "run",
        job.reporter,
    )


# --- store outputs ----------------------------------------------------------------------


@dataclass
class Outputs:
    """What a successful run leaves: stored objects (their rows not added yet), metrics."""

    artifacts: list[Artifact]
    metrics: dict[str, Any]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def store_outputs(job: ClaimedJob, result: PipelineResult) -> Outputs:
    """Put the model and the report in the object store, keyed by content hash.

    On any failure (a cancellation included) the objects already put are removed again.
    """
    job.reporter.progress(1.0, "storing")
    store = get_store()
    files = (
        ("model", result.artifact_path, FORMATS[ModelFormat(result.artifact_format)].media_type),
        ("report", result.report_path, REPORT_MEDIA_TYPE),
    )
    artifacts: list[Artifact] = []
    try:
        for name, path, media_type in files:
            if job.cancelled.is_set():
                raise JobCancelled("the job was cancelled")
            sha, size = _sha256(path), path.stat().st_size
            key = object_key(job.tenant_id, sha)
            store.put_file(path, key, sha256=sha)
            artifacts.append(
                Artifact(
                    id=new_id("art"),
                    job_id=job.id,
                    name=name,
                    filename=f"{job.id}-{name}{path.suffix}",  # .pt2, .onnx, .zip (hf), .json
                    media_type=media_type,
                    size_bytes=size,
                    sha256=sha,
                    storage_key=key,
                )
            )
    except BaseException:
        _discard(artifacts)
        raise
    return Outputs(artifacts, result.metrics)


def _discard(artifacts: list[Artifact]) -> None:
    """Remove the objects of artifacts that will not be recorded (unless another row uses them)."""
    if not artifacts:
        return
    try:
        with session_scope() as session:
            for artifact in artifacts:
                delete_if_unused(session, get_store(), artifact.storage_key)
    except Exception:  # the failure being handled matters more than this clean-up
        log.warning("could not remove the objects of job %s", artifacts[0].job_id, exc_info=True)


# --- record outcome ---------------------------------------------------------------------


def record_outcome(job: ClaimedJob, outcome: Outputs | Exception) -> Outcome:
    """Succeeded with the outputs, or failed (or queued again) because of the exception."""
    if isinstance(outcome, Outputs):
        return _record_success(job, outcome)
    if isinstance(outcome, JobCancelled):
        return Outcome.cancelled  # the row says so already
    if isinstance(outcome, TRANSIENT):
        return _record_transient(job, outcome)
    if isinstance(outcome, EngineError):
        return _record_failure(job, outcome)
    log.error("job %s failed unexpectedly", job.id, exc_info=outcome)
    message = f"{type(outcome).__name__}: {outcome}"[:2000]
    return _record_failure(job, InternalError(message, step=job.reporter.stage))


def _record_success(job: ClaimedJob, outputs: Outputs) -> Outcome:
    try:
        with session_scope() as session:
            if lifecycle.succeed(session, job.id, job.token, outputs.metrics):
                session.add_all(outputs.artifacts)
                return Outcome.succeeded
    except BaseException:
        _discard(outputs.artifacts)
        raise
    _discard(outputs.artifacts)  # cancelled meanwhile: keep no orphaned objects
    return Outcome.cancelled


def _record_failure(job: ClaimedJob, error: EngineError) -> Outcome:
    with session_scope() as session:
        recorded = lifecycle.fail(session, job.id, job.token, error)
    return Outcome.failed if recorded else Outcome.lost


def _record_transient(job: ClaimedJob, exc: Exception) -> Outcome:
    """Try again on some worker, unless the attempts are used up."""
    reason = f"{type(exc).__name__}: {exc}"
    if job.attempts >= get_settings().max_attempts:
        return _record_failure(job, InfrastructureError(reason))
    with session_scope() as session:
        if not lifecycle.release(session, job.id, job.token, reason):
            return Outcome.lost
        send_after_commit(session, RUN_JOB, job.id, job.queue, countdown=2**job.attempts)
    return Outcome.requeued


# --- inspection -------------------------------------------------------------------------


@celery_app.task(name=INSPECT_MODEL, acks_late=True, ignore_result=True)
def inspect_model(model_id: str) -> str:
    from worker.formats import inspect_model as inspect

    with session_scope() as session:
        model = session.get(MLModel, model_id)
        if model is None or model.inspection_status != InspectionStatus.pending:
            return "skipped"
        key, fmt = model.storage_key, model.format
    with tempfile.TemporaryDirectory(prefix="squish-inspect-") as tmp:
        path = Path(tmp) / f"model.{fmt}"
        get_store().get_to_file(key, path)
        try:
            info: dict[str, Any] | None = inspect(path, fmt)
            values: dict[str, Any] = {
                "inspection_status": InspectionStatus.ready,
                "info": info,
                "inspection_error": None,
            }
        except EngineError as exc:
            values = {"inspection_status": InspectionStatus.failed, "inspection_error": exc.message}
    with session_scope() as session:
        session.execute(update(MLModel).where(MLModel.id == model_id).values(**values))
    return str(values["inspection_status"])
