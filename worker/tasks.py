"""Celery tasks: thin adapters between the queue, the database and the engine.

`run_job` claims the job with a conditional UPDATE, fetches its files, runs the pipeline,
stores the artifacts and records the outcome. A heartbeat thread keeps the claim alive and
notices cancellation; the pipeline checks for it at every progress report, and a job that
does not stop within `cancel_grace_s` is stopped by ending this pool process.
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
from pathlib import Path
from typing import Any

from celery.signals import worker_process_init
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from app.db import new_id, reset_engine, session_scope
from app.files import delete_if_unused, object_key
from app.jobs import lifecycle, webhooks
from app.orm import Artifact, Dataset, Job, JobStatus, MLModel
from app.queue import INSPECT_MODEL, RUN_JOB, get_celery
from app.settings import get_settings
from app.storage import StorageError, get_store

log = logging.getLogger("squish.worker")
celery_app = get_celery()

MEDIA_TYPES = {
    "pt2": "application/zip",
    "onnx": "application/octet-stream",
    "hf": "application/zip",
    "json": "application/json",
}


@worker_process_init.connect
def _after_fork(**_kwargs: Any) -> None:
    # Connections must not cross a fork; warm the engine up so the first job starts fast.
    reset_engine()
    import worker.pipeline  # noqa: F401


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
        self._stage: str | None = None

    def cancelled(self) -> bool:
        return self.cancelled_event.is_set()

    def progress(self, fraction: float, stage: str | None = None) -> None:
        from worker.errors import JobCancelled

        if self.cancelled_event.is_set():
            raise JobCancelled("the job was cancelled")
        now = time.monotonic()
        stage_changed = stage is not None and stage != self._stage
        if not stage_changed and now - self._last_write < 0.5:
            return
        self._last_write = now
        fraction *= self.SCALE
        with session_scope() as session:
            ok = lifecycle.set_progress(session, self.job_id, self.token, fraction, stage)
            if ok and stage_changed:
                lifecycle.add_event(
                    session,
                    self.job_id,
                    "progress",
                    f"stage: {stage}",
                    data={"progress": round(fraction, 4), "stage": stage},
                )
            elif ok:
                lifecycle.add_event(
                    session,
                    self.job_id,
                    "progress",
                    f"{fraction:.0%}",
                    data={"progress": round(fraction, 4), "stage": self._stage},
                )
        if stage_changed:
            self._stage = stage
        if not ok:
            self.cancelled_event.set()
            raise JobCancelled("the job was cancelled or taken over by another worker")

    def log(self, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        with session_scope() as session:
            lifecycle.add_event(session, self.job_id, "log", message, level=level, data=data)


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


@celery_app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        if not lifecycle.claim(session, job_id, token):
            return "not-claimed"
    cancelled = threading.Event()
    heartbeat = Heartbeat(job_id, token, cancelled)
    heartbeat.start()
    try:
        outcome = _run_claimed(job_id, token, cancelled)
    finally:
        heartbeat.done.set()
    if outcome in {"succeeded", "failed"}:
        webhooks.deliver(job_id)
    return outcome


def _run_claimed(job_id: str, token: str, cancelled: threading.Event) -> str:
    from worker.errors import EngineError, JobCancelled
    from worker.pipeline import PipelineSpec, run_pipeline

    settings = get_settings()
    store = get_store()
    reporter = DbReporter(job_id, token, cancelled)
    work_dir = Path(tempfile.mkdtemp(prefix=f"squish-{job_id}-"))
    try:
        with session_scope() as session:
            job = session.get(Job, job_id)
            assert job is not None
            spec, tenant_id = job.spec, job.tenant_id
            model = session.get(MLModel, job.model_id) if job.model_id else None
            if model is None:
                lifecycle.finish(
                    session,
                    job_id,
                    token,
                    JobStatus.failed,
                    error={
                        "code": "model_deleted",
                        "message": "the job's model was deleted",
                        "step": None,
                    },
                )
                return "failed"
            model_key, model_format = model.storage_key, model.format
            dataset_rows = {
                role: session.get(Dataset, ds_id) for role, ds_id in spec["datasets"].items()
            }
        reporter.progress(0.0, "fetching")
        model_path = work_dir / f"input.{model_format}"
        store.get_to_file(model_key, model_path)
        dataset_paths: dict[str, Path] = {}
        for role, dataset in dataset_rows.items():
            if dataset is None:
                raise _Deterministic("dataset_deleted", f"the {role} dataset was deleted")
            path = work_dir / f"{role}.{dataset.format}"
            store.get_to_file(dataset.storage_key, path)
            dataset_paths[role] = path
        extra_models: dict[str, tuple[Path, str]] = {}
        for ref_id, ref_format in spec.get("models", {}).items():
            with session_scope() as session:
                referenced = session.get(MLModel, ref_id)
                ref_key = referenced.storage_key if referenced is not None else None
            if ref_key is None:
                raise _Deterministic(
                    "model_deleted", f"model {ref_id}, named in the pipeline, was deleted"
                )
            ref_path = work_dir / f"{ref_id}.{ref_format}"
            store.get_to_file(ref_key, ref_path)
            extra_models[ref_id] = (ref_path, ref_format)
        pipeline_spec = PipelineSpec(
            steps=[(step["method"], step["params"]) for step in spec["pipeline"]],
            output_format=spec["output_format"],
            device=spec["target"]["device"],
            batch_sizes=spec["evaluate"]["batch_sizes"],
            warmup=spec["evaluate"]["warmup"],
            iterations=spec["evaluate"]["iterations"],
            models=extra_models,
        )
        result = run_pipeline(
            model_path, model_format, pipeline_spec, dataset_paths, work_dir / "run", reporter
        )
        reporter.progress(1.0, "storing")
        artifacts = []
        for name, path, fmt in (
            ("model", result.artifact_path, result.artifact_format),
            ("report", result.report_path, "json"),
        ):
            sha, size = _sha256(path), path.stat().st_size
            key = object_key(tenant_id, sha)
            store.put_file(path, key, sha256=sha)
            artifacts.append(
                Artifact(
                    id=new_id("art"),
                    job_id=job_id,
                    name=name,
                    filename=f"{job_id}-{name}{path.suffix}",  # .pt2, .onnx, .zip (hf), .json
                    media_type=MEDIA_TYPES[fmt],
                    size_bytes=size,
                    sha256=sha,
                    storage_key=key,
                )
            )
        with session_scope() as session:
            if lifecycle.finish(
                session, job_id, token, JobStatus.succeeded, metrics=result.metrics
            ):
                session.add_all(artifacts)
                return "succeeded"
        with session_scope() as session:  # cancelled meanwhile: keep no orphaned objects
            for artifact in artifacts:
                delete_if_unused(session, store, artifact.storage_key)
        return "cancelled"
    except JobCancelled:
        return "cancelled"
    except (EngineError, _Deterministic) as exc:
        error = {"code": exc.code, "message": exc.message, "step": getattr(exc, "step", None)}
        with session_scope() as session:
            lifecycle.finish(session, job_id, token, JobStatus.failed, error=error)
        return "failed"
    except (StorageError, OperationalError) as exc:
        return _transient(job_id, token, f"{type(exc).__name__}: {exc}", settings.max_attempts)
    except Exception as exc:
        log.exception("job %s failed unexpectedly", job_id)
        error = {
            "code": "internal_error",
            "message": f"{type(exc).__name__}: {exc}"[:2000],
            "step": reporter._stage,
        }
        with session_scope() as session:
            lifecycle.finish(session, job_id, token, JobStatus.failed, error=error)
        return "failed"
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


class _Deterministic(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _transient(job_id: str, token: str, reason: str, max_attempts: int) -> str:
    """Storage or database trouble: try again on some worker, unless attempts are used up."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is not None and job.attempts < max_attempts:
            if lifecycle.release(session, job_id, token, reason):
                queue = job.queue
            else:
                return "lost"
        else:
            lifecycle.finish(
                session,
                job_id,
                token,
                JobStatus.failed,
                error={"code": "infrastructure", "message": reason, "step": None},
            )
            return "failed"
    get_celery().send_task(
        RUN_JOB, args=[job_id], queue=queue, countdown=2 ** (job.attempts if job else 1)
    )
    return "requeued"


@celery_app.task(name=INSPECT_MODEL, acks_late=True, ignore_result=True)
def inspect_model(model_id: str) -> str:
    from worker.errors import EngineError
    from worker.formats import inspect_model as inspect

    with session_scope() as session:
        model = session.get(MLModel, model_id)
        if model is None or model.inspection_status != "pending":
            return "skipped"
        key, fmt = model.storage_key, model.format
    with tempfile.TemporaryDirectory(prefix="squish-inspect-") as tmp:
        path = Path(tmp) / f"model.{fmt}"
        get_store().get_to_file(key, path)
        try:
            info: dict[str, Any] | None = inspect(path, fmt)
            values: dict[str, Any] = {
                "inspection_status": "ready",
                "info": info,
                "inspection_error": None,
            }
        except EngineError as exc:
            values = {"inspection_status": "failed", "inspection_error": exc.message}
    with session_scope() as session:
        session.execute(update(MLModel).where(MLModel.id == model_id).values(**values))
    return values["inspection_status"]
