"""Compression jobs: create, poll, list, cancel, follow events, download artifacts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select

from app.deps import ArtifactName, JobId, SessionDep, StoreDep, TenantDep
from app.errors import NotFound, Unprocessable, problem_responses
from app.files import RangeHeader, download_responses, stream_object
from app.jobs import events, service
from app.jobs.schemas import JobCreate, JobOut
from app.orm import Artifact, Job, JobStatus
from app.pagination import Cursor, Limit, Page, paginate
from worker.contract import CARD_MEDIA_TYPE, FORMATS, REPORT_MEDIA_TYPE

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_EVENT_ID = 2**63 - 1  # the BIGINT of job_event.id
_EVENT_STREAM = {
    "description": (
        "Server-Sent Events: `status`, `progress` and `log` events, each with an `id`; the "
        "stream ends after the job's terminal status. A stream that has to end early (the "
        "database went away) ends with an `error` event whose data is a problem."
    ),
    "content": {
        "text/event-stream": {
            # Before OpenAPI 3.2 the schema of an event stream describes one event.
            "schema": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "description": "The event id (Last-Event-ID)."},
                    "event": {
                        "type": "string",
                        "description": "`status`, `progress`, `log`, or `error` (the last).",
                    },
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "description": "`{id, kind, level, message, data, created_at}`.",
                    },
                    "retry": {"type": "integer", "description": "Reconnect after (ms)."},
                },
            }
        }
    },
}


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    responses={
        200: {"model": JobOut, "description": "The job this `Idempotency-Key` created before."},
        202: {"headers": {"Location": {"schema": {"type": "string"}, "description": "The job."}}},
        **problem_responses(404),
    },
)
def create_job(
    body: JobCreate,
    session: SessionDep,
    tenant_id: TenantDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=200,
            pattern=r"^[\x20-\x7e]+$",
            description="Retrying with the same key and body returns the same job.",
        ),
    ] = None,
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
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[JobOut]:
    """List jobs, newest first, optionally only those with `status`."""
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    rows, next_cursor = paginate(session, stmt, Job.id, limit=limit, cursor=cursor)
    artifacts = service.artifacts_of(session, [j.id for j in rows])
    trials = service.live_trials(session, rows)
    items = [service.to_out(j, artifacts[j.id], trials.get(j.id)) for j in rows]
    return Page(items=items, next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=problem_responses(404))
def get_job(job_id: JobId, tenant_id: TenantDep) -> Response:
    """Poll a job: status, progress, stage, metrics and artifacts."""
    # The polling hot path: one thread hop, one autocommit query, serialized once.
    return Response(
        service.poll_job(tenant_id, job_id).model_dump_json(), media_type="application/json"
    )


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    responses=problem_responses(404, 409),
)
def cancel_job(job_id: JobId, session: SessionDep, tenant_id: TenantDep) -> JobOut:
    """Cancel a queued or running job (a running one stops within seconds); 409 if finished."""
    # The webhook, if any, is delivered by its own task, sent once this commits.
    job = service.cancel_job(session, tenant_id, job_id)
    return service.to_out(job, [])


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: _EVENT_STREAM, **problem_responses(404)},
)
def job_events(
    job_id: JobId,
    session: SessionDep,
    tenant_id: TenantDep,
    last_event_id: Annotated[
        str | None, Header(max_length=20, description="Resume after this event id.")
    ] = None,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_EVENT_ID, description="Start after this event id.")
    ] = None,
) -> StreamingResponse:
    """Progress, status and log events as Server-Sent Events; ends when the job finishes."""
    # Every input is checked before the stream starts: a 422 now, not a broken stream later.
    start = after or 0
    if last_event_id:
        try:
            start = int(last_event_id)
        except ValueError:
            start = -1
        if not 0 <= start <= MAX_EVENT_ID:
            raise Unprocessable(
                "Last-Event-ID must be an event id this stream sent.",
                errors=[
                    {"loc": ["header", "Last-Event-ID"], "msg": "not an event id",
                     "type": "value_error"}
                ],
            )  # fmt: skip
    service.get_job(session, tenant_id, job_id)
    return StreamingResponse(
        events.stream(job_id, start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=StreamingResponse,
    responses=download_responses(
        [*(facts.media_type for facts in FORMATS.values()), REPORT_MEDIA_TYPE, CARD_MEDIA_TYPE]
    ),
)
def download_artifact(
    job_id: JobId,
    name: ArtifactName,
    session: SessionDep,
    tenant_id: TenantDep,
    store: StoreDep,
    range_header: RangeHeader = None,
) -> Response:
    """Download an artifact (`model`, `report`, `card`); HTTP Range supported."""
    service.get_job(session, tenant_id, job_id)
    artifact = session.scalar(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)
    )
    if artifact is None:
        raise NotFound(f"The job has no artifact {name!r} (yet).")
    return stream_object(
        range_header,
        store,
        artifact.storage_key,
        artifact.size_bytes,
        artifact.media_type,
        artifact.filename,
    )
