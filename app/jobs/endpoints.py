"""Compression jobs: create, poll, list, cancel, follow events, download artifacts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select

from app.deps import SessionDep, StoreDep, TenantDep
from app.errors import NotFound, Unprocessable
from app.files import stream_object
from app.jobs import events, service
from app.jobs.schemas import JobCreate, JobOut
from app.orm import Artifact, Job, JobStatus
from app.pagination import MAX_LIMIT, Page, paginate

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobOut)
def create_job(
    body: JobCreate,
    session: SessionDep,
    tenant_id: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    """Create a job; 202 with its `Location`. A repeated `Idempotency-Key` returns the same job."""
    job, created = service.create_job(session, tenant_id, body, idempotency_key)
    out = service.to_out(job, service.artifacts_of(session, [job.id])[job.id])
    return JSONResponse(
        out.model_dump(mode="json"),
        status_code=202 if created else 200,
        headers={"Location": f"/v1/jobs/{job.id}"},
    )


@router.get("", response_model=Page[JobOut])
def list_jobs(
    session: SessionDep,
    tenant_id: TenantDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
) -> Page[JobOut]:
    """List jobs, newest first, optionally only those with `status`."""
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    rows, next_cursor = paginate(session, stmt, Job.id, limit=limit, cursor=cursor)
    artifacts = service.artifacts_of(session, [j.id for j in rows])
    return Page(items=[service.to_out(j, artifacts[j.id]) for j in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, tenant_id: TenantDep) -> Response:
    """Poll a job: status, progress, stage, metrics and artifacts."""
    # The polling hot path: one thread hop, one autocommit query, serialized once.
    return Response(
        service.poll_job(tenant_id, job_id).model_dump_json(), media_type="application/json"
    )


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel_job(job_id: str, session: SessionDep, tenant_id: TenantDep) -> JobOut:
    """Cancel a queued or running job (a running one stops within seconds); 409 if finished."""
    # The webhook, if any, is delivered by its own task, sent once this commits.
    job = service.cancel_job(session, tenant_id, job_id)
    return service.to_out(job, [])


@router.get("/{job_id}/events")
def job_events(
    job_id: str,
    session: SessionDep,
    tenant_id: TenantDep,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[int | None, Query(ge=0)] = None,
) -> StreamingResponse:
    """Progress, status and log events as Server-Sent Events; ends when the job finishes."""
    service.get_job(session, tenant_id, job_id)
    start = after or 0
    if last_event_id:
        try:
            start = int(last_event_id)
        except ValueError:
            raise Unprocessable("Last-Event-ID must be an event id this stream sent.") from None
    return StreamingResponse(
        events.stream(job_id, start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/{job_id}/artifacts/{name}")
def download_artifact(
    job_id: str,
    name: str,
    request: Request,
    session: SessionDep,
    tenant_id: TenantDep,
    store: StoreDep,
) -> Response:
    """Download an artifact (`model`, `report`); HTTP Range supported."""
    service.get_job(session, tenant_id, job_id)
    artifact = session.scalar(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)
    )
    if artifact is None:
        raise NotFound(f"The job has no artifact {name!r} (yet).")
    return stream_object(
        request,
        store,
        artifact.storage_key,
        artifact.size_bytes,
        artifact.media_type,
        artifact.filename,
    )
