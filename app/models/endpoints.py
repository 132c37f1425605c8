"""Uploaded models: upload, list, read, download, delete."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from app.db import new_id, utcnow
from app.deps import ModelId, SessionDep, SettingsDep, StoreDep, TenantDep
from app.errors import Conflict, NotFound, problem_responses
from app.files import (
    RangeHeader,
    accept_upload,
    delete_if_unused,
    download_responses,
    insert_uploaded,
    stream_object,
    upload_body,
    upload_responses,
)
from app.jobs.lifecycle import ACTIVE
from app.models.schemas import ModelOut
from app.orm import Job, MLModel
from app.pagination import Cursor, Limit, Page, paginate
from app.queue import INSPECT_MODEL, send
from app.sniff import check_model_file
from app.uploads import ReceivedForm
from worker.contract import FORMATS, InspectionStatus, ModelFormat, format_facts, values

router = APIRouter(prefix="/v1/models", tags=["models"])


def _get(session: SessionDep, tenant_id: str, model_id: str) -> MLModel:
    model = session.get(MLModel, model_id)
    if model is None or model.tenant_id != tenant_id:
        raise NotFound(f"No model {model_id!r}.")
    return model


def _check(form: ReceivedForm) -> tuple[str, None]:
    assert form.file is not None
    fmt = check_model_file(form.file.path, form.fields.get("format") or None, form.file.filename)
    return fmt, None


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    responses={**upload_responses(), **problem_responses(422)},
    openapi_extra=upload_body(
        "The model file: .pt2, .onnx or a zipped hf folder.", values(ModelFormat)
    ),
)
async def upload_model(
    request: Request, tenant_id: TenantDep, settings: SettingsDep, store: StoreDep
) -> ModelOut:
    """Upload a model (multipart field `file`; optional `name`, `format`: pt2, onnx or hf)."""
    accepted = await accept_upload(request, tenant_id, settings, store, _check)
    name = accepted.form.fields.get("name") or accepted.form.file.filename or "model"  # type: ignore[union-attr]
    model = MLModel(
        id=new_id("mdl"),
        tenant_id=tenant_id,
        name=name[:200],
        format=accepted.format,
        size_bytes=accepted.size,
        sha256=accepted.sha256,
        storage_key=accepted.storage_key,
        inspection_status=InspectionStatus.pending,
        inspection_sent_at=utcnow(),
    )
    await anyio.to_thread.run_sync(insert_uploaded, model, store)
    send(INSPECT_MODEL, model.id, "cpu")
    return ModelOut.model_validate(model)


@router.get("", response_model=Page[ModelOut])
def list_models(
    session: SessionDep, tenant_id: TenantDep, limit: Limit = 50, cursor: Cursor = None
) -> Page[ModelOut]:
    """List models, newest first; follow `next_cursor` for the next page."""
    stmt = select(MLModel).where(MLModel.tenant_id == tenant_id)
    rows, next_cursor = paginate(session, stmt, MLModel.id, limit=limit, cursor=cursor)
    return Page(items=[ModelOut.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{model_id}", response_model=ModelOut, responses=problem_responses(404))
def get_model(model_id: ModelId, session: SessionDep, tenant_id: TenantDep) -> ModelOut:
    """Read a model, with `info` once a worker has inspected it."""
    return ModelOut.model_validate(_get(session, tenant_id, model_id))


@router.get(
    "/{model_id}/content",
    response_class=StreamingResponse,
    responses=download_responses(facts.media_type for facts in FORMATS.values()),
)
def download_model(
    model_id: ModelId,
    session: SessionDep,
    tenant_id: TenantDep,
    store: StoreDep,
    range_header: RangeHeader = None,
) -> StreamingResponse:
    """Download the uploaded file (HTTP Range supported)."""
    model = _get(session, tenant_id, model_id)
    facts = format_facts(model.format)
    filename = f"{model.id}{facts.suffix}"
    return stream_object(
        range_header, store, model.storage_key, model.size_bytes, facts.media_type, filename
    )


@router.delete("/{model_id}", status_code=204, responses=problem_responses(404, 409))
def delete_model(
    model_id: ModelId, session: SessionDep, tenant_id: TenantDep, store: StoreDep
) -> Response:
    """Delete a model and its file; refused while a queued or running job uses it."""
    model = _get(session, tenant_id, model_id)
    active_jobs = session.execute(
        select(Job.model_id, Job.spec).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE))
    ).all()
    active = sum(
        1
        for job_model, spec in active_jobs
        if job_model == model.id or model.id in spec.get("models", {})
    )
    if active:
        raise Conflict(f"{active} queued or running job(s) use this model; cancel them first.")
    key = model.storage_key
    session.delete(model)
    session.flush()
    delete_if_unused(session, store, key)
    return Response(status_code=204)
