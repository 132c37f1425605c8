"""Job creation (spec validation, idempotency), reads and cancellation. Never commits."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import get_read_engine, new_id, utcnow
from app.errors import Conflict, NotFound, Unprocessable, describe
from app.jobs import cache, lifecycle
from app.jobs.schemas import ArtifactOut, JobCreate, JobOut
from app.netguard import submitted_webhook_url
from app.orm import Artifact, Dataset, Job, JobStatus, MLModel, SearchTrial
from app.queue import RUN_JOB, send_after_commit
from app.search.service import normalize_search
from app.settings import get_settings
from worker.constraints import constraint_problems
from worker.contract import DatasetFormat, InspectionStatus, TrialStatus
from worker.spec import DatasetInfo, PipelineRequest, SpecError, resolve_pipeline


def _error(loc: list[Any], msg: str) -> Unprocessable:
    errors = [{"loc": loc, "msg": msg, "type": "value_error"}]
    return Unprocessable(describe(errors), title="Invalid job spec", errors=errors)


def get_model(session: Session, tenant_id: str, model_id: str) -> MLModel:
    model = session.get(MLModel, model_id)
    if model is None or model.tenant_id != tenant_id:
        raise NotFound(f"No model {model_id!r}.")
    return model


def _layer_names(model: MLModel) -> list[str] | None:
    """The model's layers as its inspection listed them; None before inspection (or for a
    model inspected before layer names were recorded): ``exclude`` is then checked by the
    worker."""
    names = (model.info or {}).get("layer_names")
    return [str(name) for name in names] if isinstance(names, list) else None


def normalize_spec(session: Session, tenant_id: str, body: JobCreate) -> dict[str, Any]:
    """Resolve references and check the spec with the engine's own check; 422 says what to change."""
    model = get_model(session, tenant_id, body.model_id)
    if model.inspection_status == InspectionStatus.failed:
        raise _error(["model_id"], f"the model could not be loaded: {model.inspection_error}")

    datasets: dict[str, str] = {}
    infos: dict[str, DatasetInfo] = {}
    for role, dataset_id in body.datasets.model_dump().items():
        if dataset_id is None:
            continue
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.tenant_id != tenant_id:
            raise NotFound(f"No dataset {dataset_id!r} (datasets.{role}).")
        datasets[role] = dataset_id
        infos[role] = DatasetInfo(
            format=DatasetFormat(dataset.format), has_labels=(dataset.info or {}).get("has_labels")
        )
    if body.search is not None:
        spec = normalize_search(model, body, datasets, infos, _layer_names(model))
        return {
            **spec,
            "webhook_url": submitted_webhook_url(body.webhook_url),
            "export": _export(body),
        }

    assert body.pipeline is not None  # JobCreate holds one of pipeline and search
    request = PipelineRequest(
        model_format=model.format,
        steps=[(step.method, step.params) for step in body.pipeline],
        output_format=body.output_format,
        device=body.target.device,
        runtime=body.target.runtime,
        datasets=infos,
        batch_sizes=body.evaluate.batch_sizes,
        warmup=body.evaluate.warmup,
        iterations=body.evaluate.iterations,
        layer_names=_layer_names(model),
    )
    gate = (
        []
        if body.constraints is None
        else constraint_problems(
            body.constraints, datasets=infos, batch_sizes=body.evaluate.batch_sizes
        )
    )
    try:
        checked = resolve_pipeline(request)
        if gate:
            raise SpecError([])
    except SpecError as exc:
        refused = SpecError([*exc.problems, *gate])
        errors = [problem.to_dict() for problem in refused.problems]
        raise Unprocessable(str(refused), title="Invalid job spec", errors=errors) from None

    steps = []
    models: dict[str, str] = {}
    for index, step in enumerate(checked.steps):
        dumped = step.params.model_dump(mode="json")
        for ref in step.method.model_refs:
            ref_id = dumped.get(ref)
            if ref_id is None:
                continue
            referenced = session.get(MLModel, ref_id)
            if referenced is None or referenced.tenant_id != tenant_id:
                raise NotFound(f"No model {ref_id!r} (pipeline[{index}].params.{ref}).")
            if referenced.inspection_status == InspectionStatus.failed:
                raise _error(
                    ["pipeline", index, "params", ref],
                    f"model {ref_id} could not be loaded: {referenced.inspection_error}",
                )
            models[ref_id] = referenced.format
        steps.append({"method": step.method.name, "params": dumped})

    return {
        "model_id": model.id,
        "pipeline": steps,
        "datasets": datasets,
        "models": models,
        "target": {"device": body.target.device, "runtime": str(checked.runtime)},
        "output_format": str(checked.output_format),
        "evaluate": body.evaluate.model_dump(),
        "constraints": body.constraints.model_dump(exclude_none=True) if body.constraints else None,
        "webhook_url": submitted_webhook_url(body.webhook_url),  # 422 if refused
        "export": _export(body),
    }


def _export(body: JobCreate) -> dict[str, Any] | None:
    if body.export is None:
        return None
    if body.export.mlflow is not None:
        refusal = get_settings().mlflow_refusal(body.export.mlflow.tracking_uri)
        if refusal is not None:
            raise _error(["export", "mlflow", "tracking_uri"], refusal)
    return body.export.model_dump(exclude_none=True)


def request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def find_idempotent(session: Session, tenant_id: str, key: str, digest: str) -> Job | None:
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))
    if job is not None and job.request_hash != digest:
        raise Unprocessable(
            "This Idempotency-Key was already used with a different request body; use a new key.",
            title="Idempotency-Key reused",
        )
    return job


def create_job(
    session: Session, tenant_id: str, body: JobCreate, idempotency_key: str | None
) -> tuple[Job, bool]:
    """The job row, and whether it is new. The run message is sent after the commit."""
    digest = request_hash(body)
    if idempotency_key:
        existing = find_idempotent(session, tenant_id, idempotency_key, digest)
        if existing is not None:
            return existing, False
    spec = normalize_spec(session, tenant_id, body)
    queue = spec["target"]["device"]
    key = cache.cache_key(session, spec)
    source = cache.find_source(session, tenant_id, key) if body.cache else None
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        model_id=spec["model_id"],
        status=JobStatus.queued.value,
        spec=spec,
        queue=queue,
        idempotency_key=idempotency_key,
        request_hash=digest,
        enqueued_at=utcnow(),
        cache_key=key,
    )
    if source is not None:
        cache.answer(job, source)
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:
        # Another request with the same Idempotency-Key won the race.
        if idempotency_key:
            existing = find_idempotent(session, tenant_id, idempotency_key, digest)
            if existing is not None:
                return existing, False
        raise
    if source is not None:
        cache.record(session, job, source)  # nothing to run
        return job, True
    lifecycle.add_event(session, job.id, "status", f"queued on {queue}", data={"status": "queued"})
    send_after_commit(session, RUN_JOB, job.id, queue)
    return job, True


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"No job {job_id!r}.")
    return job


_JOB = Job.__table__
_ARTIFACT = Artifact.__table__
_ARTIFACT_FIELDS = ("name", "filename", "media_type", "size_bytes", "sha256")


def poll_job(tenant_id: str, job_id: str) -> JobOut:
    """`GET /v1/jobs/{id}`, the polling hot path: one autocommit Core query, no ORM objects."""
    stmt = (
        select(_JOB, *[_ARTIFACT.c[f].label(f"artifact_{f}") for f in _ARTIFACT_FIELDS])
        .select_from(_JOB.outerjoin(_ARTIFACT, _ARTIFACT.c.job_id == _JOB.c.id))
        .where(_JOB.c.id == job_id, _JOB.c.tenant_id == tenant_id)
        .order_by(_ARTIFACT.c.name)
    )
    with get_read_engine().connect() as conn:
        rows = conn.execute(stmt).all()
        if not rows:
            raise NotFound(f"No job {job_id!r}.")
        job = cast(Job, rows[0])
        trials = live_trials(conn, [job])
    artifacts = [
        SimpleNamespace(**{f: getattr(row, f"artifact_{f}") for f in _ARTIFACT_FIELDS})
        for row in rows
        if row.artifact_name is not None
    ]
    return to_out(job, cast(list[Artifact], artifacts), trials.get(job.id))


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = get_job(session, tenant_id, job_id)
    if not lifecycle.cancel(session, job_id):
        session.refresh(job)
        raise Conflict(
            f"The job has already {job.status}; only queued or running jobs can be cancelled."
        )
    session.refresh(job)
    return job


def artifacts_of(session: Session, job_ids: list[str]) -> dict[str, list[Artifact]]:
    out: dict[str, list[Artifact]] = {job_id: [] for job_id in job_ids}
    if job_ids:
        rows = session.scalars(
            select(Artifact).where(Artifact.job_id.in_(job_ids)).order_by(Artifact.name)
        )
        for artifact in rows:
            out[artifact.job_id].append(artifact)
    return out


def live_trials(conn: Connection | Session, jobs: Sequence[Job]) -> dict[str, set[int]]:
    """The numbers of each running search's trials that a worker has claimed, from the
    trials' own rows.

    The job's published ``metrics.search.trials`` is written at each search step, so a
    trial claimed since still reads ``queued`` there; :func:`to_out` shows it ``running``.
    A trial finished since keeps its published status until the step its end sends
    publishes it with its figures.
    """
    ids = [j.id for j in jobs if j.status == JobStatus.running and "search" in (j.metrics or {})]
    out: dict[str, set[int]] = {job_id: set() for job_id in ids}
    if ids:
        stmt = select(SearchTrial.job_id, SearchTrial.number).where(
            SearchTrial.job_id.in_(ids), SearchTrial.status == TrialStatus.running
        )
        for job_id, number in conn.execute(stmt):
            out[job_id].add(number)
    return out


def _live_metrics(metrics: dict[str, Any] | None, running: set[int] | None) -> Any:
    if not running or metrics is None or "search" not in metrics:
        return metrics
    search = metrics["search"]
    table = [
        {**t, "status": str(TrialStatus.running)}
        if t.get("status") == TrialStatus.queued and t["number"] in running
        else t
        for t in search.get("trials") or []
    ]
    return {**metrics, "search": {**search, "trials": table}}


def to_out(job: Job, artifacts: list[Artifact], trials: set[int] | None = None) -> JobOut:
    """The job as the API shows it; ``trials``: a running search's claimed trials
    (:func:`live_trials`)."""
    return JobOut(
        id=job.id,
        model_id=job.model_id,
        status=job.status,
        progress=job.progress,
        stage=job.stage,
        queue=job.queue,
        attempts=job.attempts,
        worker=job.worker if job.status == JobStatus.running.value else None,
        spec=job.spec,
        error=job.error,  # type: ignore[arg-type]
        metrics=_live_metrics(job.metrics, trials),
        artifacts=[
            ArtifactOut(
                name=a.name,
                filename=a.filename,
                media_type=a.media_type,
                size_bytes=a.size_bytes,
                sha256=a.sha256,
                url=f"/v1/jobs/{job.id}/artifacts/{a.name}",
            )
            for a in artifacts
        ],
        cached_from=job.cached_from,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )
