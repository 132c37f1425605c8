"""Datasets for calibration, training and evaluation: upload, list, read, download, delete."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from app.datasets.schemas import DatasetOut
from app.db import new_id
from app.deps import DatasetId, SessionDep, SettingsDep, StoreDep, TenantDep
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
from app.orm import Dataset, Job
from app.pagination import Cursor, Limit, Page, paginate
from app.sniff import check_dataset_file
from app.uploads import ReceivedForm
from worker.contract import DatasetFormat, values

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def _get(session: SessionDep, tenant_id: str, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise NotFound(f"No dataset {dataset_id!r}.")
    return dataset


def _check(form: ReceivedForm) -> tuple[str, dict[str, Any]]:
    assert form.file is not None
    return check_dataset_file(form.file.path, form.file.filename, form.fields.get("format") or None)


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    responses={**upload_responses(), **problem_responses(422)},
    openapi_extra=upload_body("The data: .npz, .safetensors or .jsonl.", values(DatasetFormat)),
)
async def upload_dataset(
    request: Request, tenant_id: TenantDep, settings: SettingsDep, store: StoreDep
) -> DatasetOut:
    """Upload a dataset: `.npz`/`.safetensors` with `inputs` (or named inputs) and optional `labels`."""
    accepted = await accept_upload(request, tenant_id, settings, store, _check)
    name = accepted.form.fields.get("name") or accepted.form.file.filename or "dataset"  # type: ignore[union-attr]
    dataset = Dataset(
        id=new_id("ds"),
        tenant_id=tenant_id,
        name=name[:200],
        format=accepted.format,
        size_bytes=accepted.size,
        sha256=accepted.sha256,
        storage_key=accepted.storage_key,
        info=accepted.info or {},
    )
    await anyio.to_thread.run_sync(insert_uploaded, dataset, store)
    return DatasetOut.model_validate(dataset)


@router.get("", response_model=Page[DatasetOut])
def list_datasets(
    session: SessionDep, tenant_id: TenantDep, limit: Limit = 50, cursor: Cursor = None
) -> Page[DatasetOut]:
    """List datasets, newest first; follow `next_cursor` for the next page."""
    stmt = select(Dataset).where(Dataset.tenant_id == tenant_id)
    rows, next_cursor = paginate(session, stmt, Dataset.id, limit=limit, cursor=cursor)
    return Page(items=[DatasetOut.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetOut, responses=problem_responses(404))
def get_dataset(dataset_id: DatasetId, session: SessionDep, tenant_id: TenantDep) -> DatasetOut:
    """Read a dataset and what its arrays are."""
    return DatasetOut.model_validate(_get(session, tenant_id, dataset_id))


@router.get(
    "/{dataset_id}/content",
    response_class=StreamingResponse,
    responses=download_responses(["application/octet-stream"]),
)
def download_dataset(
    dataset_id: DatasetId,
    session: SessionDep,
    tenant_id: TenantDep,
    store: StoreDep,
    range_header: RangeHeader = None,
) -> StreamingResponse:
    """Download the uploaded file (HTTP Range supported)."""
    dataset = _get(session, tenant_id, dataset_id)
    filename = f"{dataset.id}.{dataset.format}"
    return stream_object(
        range_header,
        store,
        dataset.storage_key,
        dataset.size_bytes,
        "application/octet-stream",
        filename,
    )


@router.delete("/{dataset_id}", status_code=204, responses=problem_responses(404, 409))
def delete_dataset(
    dataset_id: DatasetId, session: SessionDep, tenant_id: TenantDep, store: StoreDep
) -> Response:
    """Delete a dataset and its file; refused while a queued or running job uses it."""
    dataset = _get(session, tenant_id, dataset_id)
    active_jobs = session.scalars(
        select(Job.spec).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE))
    )
    if any(dataset.id in (spec.get("datasets") or {}).values() for spec in active_jobs):
        raise Conflict("A queued or running job uses this dataset; cancel it first.")
    key = dataset.storage_key
    session.delete(dataset)
    session.flush()
    delete_if_unused(session, store, key)
    return Response(status_code=204)
