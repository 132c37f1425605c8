"""Celery tasks: thin adapters between the queue, the database and the engine.

`run_job` is five steps, one function each: :func:`claim` the job (a conditional UPDATE),
:func:`fetch_inputs`, :func:`run` the pipeline, :func:`store_outputs` (the model, the
report, and the compression card rendered once the model's sha256 is known; a card that
cannot be rendered is a warning event, not a failure), and :func:`record_outcome`. While the job is claimed a heartbeat thread keeps the claim alive
and notices cancellation; the pipeline checks for it at every progress report, and a job
that does not stop within `cancel_grace_s` is stopped by ending this pool process.

A failure is recorded one way: as an :class:`~worker.errors.EngineError`, stored as its
``to_dict()``. Storage or database trouble is transient: the job is queued again until
its attempts are used up, then fails as an ``InfrastructureError``; anything unexpected
fails as an ``InternalError``.

Outages of minutes do not waste work. While the object store is down, each download and
each artifact upload is retried in place, with backoff, for `storage_retry_s` (the
heartbeat keeps the job alive, a cancellation still stops it): a finished computation is
never redone because its upload failed once; an upload that never gets through fails the
job as ``infrastructure``, naming the outage. Progress and log writes skip a database that
is down, and the outcome is recorded once it is back (for up to `database_retry_s`).

Each job (or inspection) works in its own folder, ``squish-job-<id>-<pid>`` under
`work_dir`, locked (``flock``) by the process that uses it. The process removes it when
done; a folder whose process was killed (SIGKILL: no clean-up runs) is removed by the
sweep every worker runs at start and every `work_sweep_interval_s` (:func:`sweep_work_dirs`).

`deliver_webhook` makes one delivery attempt of a finished job's webhook
(app/jobs/webhooks.py); the transition that finishes a job sends it after its commit.
`export_job` logs a succeeded job where its ``export`` says, once (app/jobs/exports.py):
`run_job` calls it after recording the success, outside the job's heartbeat; a cached
job's, and one the reaper re-sends, arrive as tasks.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_ready,
)
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from app.db import new_id, reset_engine, session_scope
from app.errors import database_outage
from app.files import delete_if_unused, object_key
from app.jobs import exports, lifecycle, webhooks
from app.observability import JOB_ID, capture_warnings, format_handlers
from app.orm import Artifact, Dataset, Job, JobEvent, MLModel
from app.queue import (
    DELIVER_WEBHOOK,
    EXPORT_JOB,
    FINISH_SEARCH,
    INSPECT_MODEL,
    RUN_JOB,
    SEARCH_STEP,
    get_celery,
    send_after_commit,
)
from app.settings import Settings, get_settings
from app.storage import StorageError, StorageUnavailable, get_store
from worker.card import CardWarning, FileRef
from worker.constraints import Constraints, Violation, as_dicts, unmet_message, violations
from worker.contract import (
    CARD_MEDIA_TYPE,
    FORMATS,
    REPORT_MEDIA_TYPE,
    ArtifactName,
    InspectionStatus,
    LogLevel,
    ModelFormat,
)
from worker.errors import (
    ConstraintsUnmetError,
    DatasetDeletedError,
    EngineError,
    InfrastructureError,
    InternalError,
    JobCancelled,
    ModelDeletedError,
)
from worker.measurement import timing_lock

if TYPE_CHECKING:
    from worker.pipeline import PipelineResult

log = logging.getLogger("squish.worker")
celery_app = get_celery()
T = TypeVar("T")

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
    import matplotlib.figure  # noqa: F401  (the card's charts: its import is the slow part)

    import worker.pipeline  # noqa: F401


capture_warnings(get_settings().log_format)  # from the start, before Celery sets up logging


@after_setup_logger.connect
@after_setup_task_logger.connect
def _log_format(logger: logging.Logger, **_kwargs: Any) -> None:
    # SQUISH_LOG_FORMAT (text or json) for Celery's handlers, with the job id in a job.
    format_handlers(logger.handlers, get_settings().log_format)


_JOB_TASKS = (RUN_JOB, DELIVER_WEBHOOK, EXPORT_JOB, SEARCH_STEP, FINISH_SEARCH)
"""Tasks whose first argument is a job id (a trial's task sets it once it knows the job)."""
_job_tokens: dict[str, Any] = {}


@task_prerun.connect
def _enter_job(task_id: str, task: Any, args: Any = (), **_kwargs: Any) -> None:
    # Every line logged while a task runs for a job carries its id (app/observability.py).
    if task.name in _JOB_TASKS and args:
        _job_tokens[task_id] = JOB_ID.set(str(args[0]))


@task_postrun.connect
def _leave_job(task_id: str, **_kwargs: Any) -> None:
    token = _job_tokens.pop(task_id, None)
    if token is not None:
        JOB_ID.reset(token)


@worker_ready.connect
def _start_work_dir_sweeper(**_kwargs: Any) -> None:
    # In the main process (it needs no database): at start, then periodically.
    WorkDirSweeper(get_settings()).start()


@celery_app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Claim → fetch inputs → run → store outputs → record outcome."""
    job = claim(job_id)
    if job is None:
        return Outcome.not_claimed
    with job.held():
        try:
            inputs = fetch_inputs(job)
            if job.spec.get("search") is not None:
                # The search goes on in its own tasks (worker/search_tasks.py).
                return search_tasks.start(job, inputs)
            result = run(job, inputs)
            outputs = store_outputs(job, result, inputs)
        except Exception as exc:
            return record_outcome(job, exc)
        outputs.unmet = judge(job.spec, result)
        outcome = record_outcome(job, outputs)
    if outcome is Outcome.succeeded and exports.owes(job.spec):
        # Owed since that commit; exported here, past the heartbeat (the job is no longer
        # running): a lost export is re-sent by the reaper (app/jobs/exports.py).
        try:
            export_job(job.id)
        except Exception:
            log.exception("job %s: export not finished; the reaper sends it again", job.id)
    return outcome


@celery_app.task(name=DELIVER_WEBHOOK, acks_late=True, ignore_result=True)
def deliver_webhook(job_id: str) -> str:
    """One delivery attempt of a finished job's webhook; a failed one schedules the next."""
    return webhooks.deliver(job_id)


@celery_app.task(name=EXPORT_JOB, acks_late=True, ignore_result=True)
def export_job(job_id: str) -> str:
    """Log a succeeded job where its ``export`` says, from its stored artifacts, once: the
    export is claimed (app/jobs/exports.py), and done with its outcome's event.

    The task of a job answered from the result cache or re-sent by the reaper; a job that
    ran is exported by :func:`run_job` calling this after recording its success.
    """
    with session_scope() as session:
        if exports.claim(session, job_id) is None:
            return "skipped"  # not owed, ended already, or another worker holds it
        job = session.get(Job, job_id)
        assert job is not None
        spec, metrics = job.spec, job.metrics or {}
        stored = [
            (a.name, a.storage_key, a.filename)
            for a in session.scalars(select(Artifact).where(Artifact.job_id == job_id))
            if a.name in EXPORTED_ARTIFACTS
        ]
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    with WorkDir.make("job", job_id, token) as folder:
        ended = _export(job_id, spec, stored, folder.path, metrics)
    with session_scope() as session:  # the outcome's event and "done" together
        lifecycle.add_event(
            session, job_id, "log", ended.message, level=ended.level, data=ended.data
        )
        exports.done(session, job_id)
    return ended.outcome


# --- claim ------------------------------------------------------------------------------


class DbReporter:
    """Progress and log lines into the job's row and events, throttled; raises on cancel.

    The pipeline's 0..1 maps to 0..0.98: storing the artifacts is the last step. While the
    database is down, writes are skipped (the computation goes on; the heartbeat notices
    a cancellation once it is back).
    """

    SCALE = 0.98

    def __init__(self, job_id: str, token: str, cancelled: threading.Event) -> None:
        self.job_id = job_id
        self.token = token
        self.cancelled_event = cancelled
        self._last_write = 0.0
        self.stage: str | None = None
        self.database_down = False
        self.warnings: list[CardWarning] = []
        """This attempt's warnings, for the card when the database cannot list them."""

    def _write(self, write: Callable[[], T]) -> T | None:
        """One write to the job's row or events; None when the database is down."""
        try:
            result = write()
        except Exception as exc:
            if not database_outage(exc):
                raise
            if not self.database_down:
                self.database_down = True
                log.warning(
                    "job %s: database unavailable, progress not recorded: %s", self.job_id, exc
                )
            return None
        if self.database_down:
            self.database_down = False
            log.info("job %s: database back, recording progress again", self.job_id)
        return result

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

        def write() -> bool:
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
            return ok

        ok = self._write(write)
        if stage_changed:
            self.stage = stage
        if ok is False:
            self.cancelled_event.set()
            raise JobCancelled("the job was cancelled or taken over by another worker")

    def log(
        self, message: str, level: str = LogLevel.info, data: dict[str, Any] | None = None
    ) -> None:
        if level == LogLevel.warning:
            self.warnings.append(CardWarning(message, datetime.now(UTC)))

        def write() -> None:
            with session_scope() as session:
                lifecycle.add_event(
                    session, self.job_id, "log", message, level=LogLevel(level), data=data
                )

        self._write(write)


class Heartbeat(threading.Thread):
    """Stamps `heartbeat_at`; when the row says we no longer own a running job, signals stop."""

    def __init__(self, job_id: str, token: str, cancelled: threading.Event) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.job_id, self.token, self.cancelled = job_id, token, cancelled
        self.done = threading.Event()
        self.settings = get_settings()

    def run(self) -> None:
        JOB_ID.set(self.job_id)  # this thread's log lines carry the job id
        interval = min(self.settings.heartbeat_interval_s, 1.0)
        while not self.done.wait(interval):
            try:
                with session_scope() as session:
                    alive = lifecycle.heartbeat(session, self.job_id, self.token)
            except Exception as exc:
                if database_outage(exc):
                    continue  # the database is down; try again next tick
                raise
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
    """A job this worker owns: its row as claimed, the claim's token, a work folder."""

    id: str
    token: str
    tenant_id: str
    model_id: str | None
    spec: dict[str, Any]
    queue: str
    attempts: int
    folder: WorkDir
    cancelled: threading.Event
    reporter: DbReporter

    @property
    def work_dir(self) -> Path:
        return self.folder.path

    @contextmanager
    def held(self) -> Iterator[None]:
        """Heart-beat while the job runs here; remove the work folder after."""
        heartbeat = Heartbeat(self.id, self.token, self.cancelled)
        heartbeat.start()
        try:
            yield
        finally:
            heartbeat.done.set()
            self.folder.remove()


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
        folder=WorkDir.make("job", job_id, token),
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
    model_ref: FileRef | None = None
    """The uploaded model's identity (sha256, size, name), for the card."""
    dataset_refs: dict[str, FileRef] = field(default_factory=dict)
    """Each dataset's identity by role, for the card."""


def fetch_inputs(job: ClaimedJob) -> Inputs:
    """Download the model, the datasets and the models the steps name."""
    with session_scope() as session:
        model = session.get(MLModel, job.model_id) if job.model_id else None
        if model is None:
            raise ModelDeletedError("the job's model was deleted")
        model_key, model_format = model.storage_key, model.format
        model_ref = FileRef(model.sha256, model.size_bytes, str(model.format), model.name, model.id)
        datasets: dict[str, tuple[str, str]] = {}
        dataset_refs: dict[str, FileRef] = {}
        for role, dataset_id in job.spec["datasets"].items():
            dataset = session.get(Dataset, dataset_id)
            if dataset is None:
                raise DatasetDeletedError(f"the {role} dataset was deleted")
            datasets[role] = (dataset.storage_key, dataset.format)
            dataset_refs[role] = dataset_ref(dataset)
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
        try:
            waiting_out_storage(job, f"fetching {name}", lambda: store.get_to_file(key, path))
        except InfrastructureError as exc:
            # Nothing is computed yet: queue the job again (its attempts permitting).
            raise StorageUnavailable(exc.message) from exc
        return path

    return Inputs(
        model_path=fetch(model_key, f"input.{model_format}"),
        model_format=model_format,
        datasets={role: fetch(key, f"{role}.{fmt}") for role, (key, fmt) in datasets.items()},
        models={ref: (fetch(key, f"{ref}.{fmt}"), fmt) for ref, (key, fmt) in models.items()},
        model_ref=model_ref,
        dataset_refs=dataset_refs,
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
    """What a successful run leaves: stored objects (their rows not added yet), metrics,
    and the spec's constraints the result violates (the job then fails, keeping both)."""

    artifacts: list[Artifact]
    metrics: dict[str, Any]
    unmet: list[Violation] = field(default_factory=list)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def store_outputs(job: ClaimedJob, result: PipelineResult, inputs: Inputs) -> Outputs:
    """Put the model, the report and the card in the object store, keyed by content hash.

    The card is rendered once the model's sha256 is known; one that cannot be rendered (or
    stored) is a warning event and no card, never a failed job. On any other failure (a
    cancellation included) the objects already put are removed again.
    """
    job.reporter.progress(1.0, "storing")
    facts = FORMATS[ModelFormat(result.artifact_format)]
    files = (
        (ArtifactName.model, result.artifact_path, facts.media_type, facts.suffix),
        (ArtifactName.report, result.report_path, REPORT_MEDIA_TYPE, ".json"),
    )
    artifacts: list[Artifact] = []
    try:
        for name, path, media_type, suffix in files:
            artifacts.append(_store_artifact(job, name, path, media_type, suffix))
        card = _render_card(job, result, inputs, artifacts[0])
        if card is not None:
            try:
                artifacts.append(
                    _store_artifact(job, ArtifactName.card, card, CARD_MEDIA_TYPE, ".html")
                )
            except InfrastructureError as exc:
                job.reporter.log(f"compression card not stored: {exc.message}", LogLevel.warning)
    except BaseException:
        _discard(artifacts)
        raise
    return Outputs(artifacts, result.metrics)


def _store_artifact(
    job: ClaimedJob, name: str, path: Path, media_type: str, suffix: str
) -> Artifact:
    """One file in the object store (waiting out an outage); its row, not added yet."""
    if job.cancelled.is_set():
        raise JobCancelled("the job was cancelled")
    store = get_store()
    sha, size = _sha256(path), path.stat().st_size
    key = object_key(job.tenant_id, sha)
    # The computation is done: wait out a storage outage rather than redo it.
    waiting_out_storage(job, f"storing the {name}", lambda: store.put_file(path, key, sha256=sha))
    return Artifact(
        id=new_id("art"),
        job_id=job.id,
        name=str(name),
        filename=f"{job.id}-{name}{suffix}",  # .pt2, .aoti.pt2, .onnx, .zip, .json, .html
        media_type=media_type,
        size_bytes=size,
        sha256=sha,
        storage_key=key,
    )


def _render_card(
    job: ClaimedJob, result: PipelineResult, inputs: Inputs, model: Artifact
) -> Path | None:
    """``card.html`` in the work folder (:func:`worker.card.render_card`); None, with a
    warning event saying why, when it cannot be rendered."""
    from worker.card import render_card

    try:
        html = render_card(
            job_id=job.id,
            spec=job.spec,
            metrics=result.measured,
            model=inputs.model_ref or FileRef(sha256="unknown", format=inputs.model_format),
            artifact=FileRef(
                model.sha256, model.size_bytes, result.artifact_format, model.filename
            ),
            datasets=inputs.dataset_refs,
            warnings=_warnings(job),
        )
        path = job.work_dir / "card.html"
        path.write_text(html, encoding="utf-8")
    except Exception as exc:
        log.warning("job %s: the compression card could not be rendered", job.id, exc_info=True)
        job.reporter.log(
            f"compression card not rendered: {type(exc).__name__}: {exc}"[:2000], LogLevel.warning
        )
        return None
    return path


def _warnings(job: ClaimedJob) -> list[CardWarning]:
    """The job's warning events (every attempt's); this attempt's when the database is down."""
    found = warning_events(job.id)
    return list(job.reporter.warnings) if found is None else found


def warning_events(job_id: str) -> list[CardWarning] | None:
    """A job's warning events, for its card; None when the database is down."""
    try:
        with session_scope() as session:
            rows = session.execute(
                select(JobEvent.message, JobEvent.created_at)
                .where(JobEvent.job_id == job_id, JobEvent.level == LogLevel.warning)
                .order_by(JobEvent.id)
            ).all()
    except Exception as exc:
        if not database_outage(exc):
            raise
        return None
    return [CardWarning(message, at) for message, at in rows]


def dataset_ref(dataset: Dataset) -> FileRef:
    """What a card says of a dataset: its hash, size, format, name and id."""
    return FileRef(
        dataset.sha256, dataset.size_bytes, str(dataset.format), dataset.name, dataset.id
    )


# --- constraints and export -------------------------------------------------------------


def judge(spec: dict[str, Any], result: PipelineResult) -> list[Violation]:
    """The spec's constraints (a pipeline job's CI gate) that the result violates."""
    bounds = spec.get("constraints")
    if not bounds:
        return []
    return violations(Constraints.model_validate(bounds), result.measured)


EXPORTED = "exported to MLflow"
EXPORTED_ARTIFACTS = ("model", "report", "card")


@dataclass(frozen=True)
class ExportEnded:
    """How one export ended, and its event: a success, or a warning saying why not."""

    outcome: str
    """``exported`` or ``failed``"""
    message: str
    level: LogLevel
    data: dict[str, Any]


def _export(
    job_id: str,
    spec: dict[str, Any],
    stored: list[tuple[str, str, str]],
    folder: Path,
    metrics: dict[str, Any],
) -> ExportEnded:
    """One export (worker/export.py) of the ``(name, storage key, filename)`` artifacts,
    fetched into ``folder``."""
    from worker.export import Export, ExportFailed, export_to_mlflow

    config = Export.model_validate(spec["export"]).mlflow
    assert config is not None  # owed only with an mlflow export (app/jobs/exports.py)
    where = {"export": "mlflow", "tracking_uri": config.tracking_uri}

    def failed(why: object) -> ExportEnded:
        message = f"MLflow export failed (the job's result is not affected): {why}"
        return ExportEnded("failed", message, LogLevel.warning, where)

    refusal = get_settings().mlflow_refusal(config.tracking_uri)
    if refusal is not None:  # the operator's list changed since the job was submitted
        message = f"MLflow export not sent (the job's result is not affected): {refusal}"
        return ExportEnded("failed", message, LogLevel.warning, where)
    files: dict[str, Path] = {}
    try:
        for name, key, filename in stored:
            # Named as the job's work folder had them: model.onnx, report.json, card.html
            files[name] = folder / filename.removeprefix(f"{job_id}-")
            get_store().get_to_file(key, files[name])
    except StorageError as exc:
        return failed(exc)
    recipe = {k: v for k, v in spec.items() if k not in ("webhook_url", "export")}
    try:
        exported = export_to_mlflow(
            config, job_id=job_id, files=files, metrics=metrics, recipe=recipe
        )
    except ExportFailed as exc:
        return failed(exc)
    message = f"{EXPORTED}: run {exported.run_id} in experiment {config.experiment!r}"
    if exported.model_version is not None:
        message += f", {config.registered_model} version {exported.model_version}"
    return ExportEnded(
        "exported", message, LogLevel.info, {"export": "mlflow", **exported.to_json()}
    )


STORAGE_BACKOFF_S = (1.0, 15.0)
"""The first wait between two tries of a storage call, and the longest (it doubles)."""


def waiting_out_storage(job: ClaimedJob, what: str, call: Callable[[], T]) -> T:
    """``call()``, tried again while the object store is unavailable, for `storage_retry_s`.

    Each wait is a warning in the job's events. A cancellation ends the wait at once
    (JobCancelled); an outage that outlasts the budget is an InfrastructureError naming it.
    """
    budget = get_settings().storage_retry_s
    start = time.monotonic()
    delay = STORAGE_BACKOFF_S[0]
    while True:
        try:
            return call()
        except StorageUnavailable as exc:
            waited = time.monotonic() - start
            if waited + delay > budget:
                raise InfrastructureError(
                    f"object storage unavailable for {waited:.0f} s while {what}; "
                    f"gave up after SQUISH_STORAGE_RETRY_S={budget:g}: {exc}",
                    step=job.reporter.stage,
                ) from exc
            job.reporter.log(
                f"object storage unavailable while {what}; retrying in {delay:.0f} s ({exc})",
                level=LogLevel.warning,
                data={"retry_in_s": delay, "waited_s": round(waited, 1)},
            )
            if job.cancelled.wait(delay):
                raise JobCancelled("the job was cancelled") from exc
            delay = min(delay * 2, STORAGE_BACKOFF_S[1])


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
    if isinstance(outcome, TRANSIENT) or database_outage(outcome):
        return _record_transient(job, outcome)
    if isinstance(outcome, EngineError):
        return _record_failure(job, outcome)
    log.error("job %s failed unexpectedly", job.id, exc_info=outcome)
    message = f"{type(outcome).__name__}: {outcome}"[:2000]
    return _record_failure(job, InternalError(message, step=job.reporter.stage))


def waiting_out_database(job: ClaimedJob, call: Callable[[], T]) -> T:
    """``call()`` (one transaction), tried again while the database is down, for
    `database_retry_s`: the outcome of finished work is not given up for an outage."""
    budget = get_settings().database_retry_s
    start = time.monotonic()
    delay = 1.0
    while True:
        try:
            return call()
        except Exception as exc:
            waited = time.monotonic() - start
            if not database_outage(exc) or waited + delay > budget:
                raise
            log.warning(
                "job %s: database unavailable, recording the outcome again in %.0f s: %s",
                job.id, delay, exc,
            )  # fmt: skip
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def _record_success(job: ClaimedJob, outputs: Outputs) -> Outcome:
    """Succeeded; or, when the result violates its constraints, failed with the metrics and
    the artifacts kept (a CI gate: the user downloads what did not pass)."""
    unmet = outputs.unmet

    def commit() -> bool:
        with session_scope() as session:
            if unmet:
                error = ConstraintsUnmetError(
                    unmet_message(unmet), step="constraints", violations=as_dicts(unmet)
                )
                done = lifecycle.fail(session, job.id, job.token, error, metrics=outputs.metrics)
            else:
                done = lifecycle.succeed(session, job.id, job.token, outputs.metrics)
                if done:  # run_job exports it after this commit
                    exports.owe(session, job.id, job.spec, send_to=None)
            if done:
                session.add_all(outputs.artifacts)
                return True
        return False

    try:
        recorded = waiting_out_database(job, commit)
    except BaseException:
        _discard(outputs.artifacts)
        raise
    if recorded:
        return Outcome.failed if unmet else Outcome.succeeded
    _discard(outputs.artifacts)  # cancelled meanwhile: keep no orphaned objects
    return Outcome.cancelled


def _record_failure(job: ClaimedJob, error: EngineError) -> Outcome:
    def commit() -> bool:
        with session_scope() as session:
            return lifecycle.fail(session, job.id, job.token, error)

    return Outcome.failed if waiting_out_database(job, commit) else Outcome.lost


def _record_transient(job: ClaimedJob, exc: Exception) -> Outcome:
    """Try again on some worker, unless the attempts are used up."""
    reason = f"{type(exc).__name__}: {exc}"
    if job.attempts >= get_settings().max_attempts:
        return _record_failure(job, InfrastructureError(reason))

    def commit() -> bool:
        with session_scope() as session:
            if not lifecycle.release(session, job.id, job.token, reason):
                return False
            send_after_commit(session, RUN_JOB, job.id, job.queue, countdown=2**job.attempts)
        return True

    return Outcome.requeued if waiting_out_database(job, commit) else Outcome.lost


# --- inspection -------------------------------------------------------------------------


@celery_app.task(name=INSPECT_MODEL, acks_late=True, ignore_result=True)
def inspect_model(model_id: str) -> str:
    from worker.formats import inspect_model as inspect

    with session_scope() as session:
        model = session.get(MLModel, model_id)
        if model is None or model.inspection_status != InspectionStatus.pending:
            return "skipped"
        key, fmt = model.storage_key, model.format
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    with WorkDir.make("inspect", model_id, token) as folder:
        path = folder.path / f"model.{fmt}"
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


# --- work folders -----------------------------------------------------------------------

OWNER_FILE = ".owner"
WORK_DIR_NAME = re.compile(r"squish-(?P<kind>job|inspect)-(?P<id>[A-Za-z0-9_.-]+)-(?P<pid>[0-9]+)")
LOCKLESS_GRACE_S = 30.0
"""A folder without its owner file is being made right now, or its process died at once."""


class WorkDir:
    """``squish-<kind>-<id>-<pid>`` under `work_dir`, locked by the process that uses it.

    The lock (``flock`` on its owner file, which names the claim's ``host:pid:nonce``)
    is released by the kernel when the process dies, however it dies: a folder whose lock
    can be taken is nobody's any more, and :func:`sweep_work_dirs` removes it.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def make(cls, kind: str, obj_id: str, token: str) -> WorkDir:
        root = get_settings().work_dir
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # every process of this host times its models under one lock file in this root
        timing_lock.set_lock_dir(root)
        path = root / f"squish-{kind}-{obj_id}-{os.getpid()}"
        if not WORK_DIR_NAME.fullmatch(path.name):
            raise ValueError(f"not a work folder name: {path.name!r}")
        shutil.rmtree(path, ignore_errors=True)  # a dead process's with our pid: not ours
        path.mkdir(mode=0o700)
        fd = os.open(path / OWNER_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, token.encode())
        return cls(path, fd)

    def remove(self) -> None:
        """Remove the folder, then let go of its lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> WorkDir:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.remove()


def sweep_work_dirs(settings: Settings) -> list[Path]:
    """Remove the work folders on this host whose process is gone; returns those removed."""
    root = settings.work_dir
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        match = WORK_DIR_NAME.fullmatch(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        if _in_use(entry, int(match["pid"])):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
    if removed:
        log.info("removed %d work folders left by stopped processes: %s", len(removed),
                 ", ".join(p.name for p in removed))  # fmt: skip
    return removed


def _in_use(folder: Path, pid: int) -> bool:
    try:
        fd = os.open(folder / OWNER_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        # Never locked: its process is making it right now, or died before it could.
        young = time.time() - folder.stat().st_mtime < LOCKLESS_GRACE_S
        return young and _alive(pid)
    except NotADirectoryError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True  # its process holds the lock: it is working there
            raise
        host = os.read(fd, 512).decode(errors="replace").partition(":")[0]
        # Another machine's folder (a shared root): not this worker's to judge.
        return bool(host) and host != socket.gethostname()
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkDirSweeper(threading.Thread):
    """Sweeps the work folders at start, then every `work_sweep_interval_s`."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="squish-work-dir-sweeper", daemon=True)
        self.settings = settings
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            try:
                sweep_work_dirs(self.settings)
            except Exception:
                log.warning("work folder sweep failed; retrying next interval", exc_info=True)
            if self.stopped.wait(self.settings.work_sweep_interval_s):
                return


# The search's tasks register with this app; they use the helpers above.
from worker import search_tasks  # noqa: E402
