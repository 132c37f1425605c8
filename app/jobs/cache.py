"""The result cache (DESIGN §11, §12): a job that would compute what a succeeded job of the
same tenant computed is answered at once with that job's artifacts and metrics.

The key (:func:`cache_key`) is the SHA-256 of the model's bytes (its sha256), each
dataset's and each referenced model's sha256 (in place of their ids, so the same file
uploaded again hits), the normalized spec without ``webhook_url`` and ``export`` (they
change where the result goes, not what it is), and :data:`ENGINE_VERSION`. Every job
stores its key, so a job that ran (``"cache": false`` included) answers the next one.

A cached job is created ``succeeded`` with ``cached_from`` naming its source; nothing is
sent to a worker (but its export, app/jobs/exports.py) and its events are one status
event, "served from cache". Its artifacts are its own rows pointing at the same stored
objects (objects are keyed by content and removed only when no row uses them,
:func:`app.files.delete_if_unused`), so deleting the source job, its model or its datasets
leaves them downloadable. Never crosses tenants: the lookup is by tenant, and objects are
stored per tenant.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import new_id, utcnow
from app.jobs import exports, lifecycle
from app.orm import Artifact, Dataset, Job, JobStatus, MLModel

CACHE_EPOCH = 1
"""Raise it when the engine's results change without a new squish version: every earlier
result stops answering."""


def _squish_version() -> str:
    try:
        return version("squish")
    except PackageNotFoundError:  # a source checkout that is not installed
        return "0+unknown"


ENGINE_VERSION = f"{_squish_version()}/cache-{CACHE_EPOCH}"
"""The engine version in the cache key: the squish release and :data:`CACHE_EPOCH`."""

NOT_IN_KEY = ("webhook_url", "export")


def _by_content(value: Any, hashes: dict[str, str]) -> Any:
    """``value`` with each id of ``hashes`` replaced by its file's sha256."""
    if isinstance(value, dict):
        return {_by_content(k, hashes): _by_content(v, hashes) for k, v in value.items()}
    if isinstance(value, list):
        return [_by_content(v, hashes) for v in value]
    if isinstance(value, str) and value in hashes:
        return f"sha256:{hashes[value]}"
    return value


def cache_key(session: Session, spec: dict[str, Any]) -> str:
    """The key of what a job with this normalized spec computes (see the module docstring)."""
    hashes: dict[str, str] = {}
    for model_id in [spec["model_id"], *spec.get("models", {})]:
        model = session.get(MLModel, model_id)
        if model is not None:
            hashes[model_id] = model.sha256
    for dataset_id in spec.get("datasets", {}).values():
        dataset = session.get(Dataset, dataset_id)
        if dataset is not None:
            hashes[dataset_id] = dataset.sha256
    material = {
        "engine": ENGINE_VERSION,
        "spec": _by_content({k: v for k, v in spec.items() if k not in NOT_IN_KEY}, hashes),
    }
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def find_source(session: Session, tenant_id: str, key: str) -> Job | None:
    """This tenant's latest succeeded job with this key, if any."""
    return session.scalar(
        select(Job)
        .where(
            Job.tenant_id == tenant_id,
            Job.cache_key == key,
            Job.status == JobStatus.succeeded,
        )
        .order_by(Job.finished_at.desc(), Job.id.desc())
        .limit(1)
    )


def answer(job: Job, source: Job) -> None:
    """Make the new (not yet added) job ``succeeded`` with the source's result."""
    now = utcnow()
    job.status = JobStatus.succeeded
    job.progress = 1.0
    job.metrics = source.metrics
    job.cached_from = source.id
    job.started_at = now
    job.finished_at = now
    job.enqueued_at = None


def record(session: Session, job: Job, source: Job) -> None:
    """The cached job's artifact rows (the source's objects), its event, its webhook and
    its export."""
    rows = session.scalars(select(Artifact).where(Artifact.job_id == source.id))
    for artifact in rows:
        prefix = f"{source.id}-"
        filename = artifact.filename
        if filename.startswith(prefix):  # "<job id>-model.onnx": named after this job
            filename = f"{job.id}-{filename[len(prefix) :]}"
        session.add(
            Artifact(
                id=new_id("art"),
                job_id=job.id,
                name=artifact.name,
                filename=filename,
                media_type=artifact.media_type,
                size_bytes=artifact.size_bytes,
                sha256=artifact.sha256,
                storage_key=artifact.storage_key,
            )
        )
    lifecycle.served_from_cache(session, job.id, source.id)
    # The export is where the result goes, not what it is: owed by this job too.
    exports.owe(session, job.id, job.spec, send_to=job.queue)
