from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy import Enum as SqlEnum
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow
from worker.contract import JobStatus, values


class Job(Base):
    """A compression job. This row, not the broker, is the source of truth for its state."""

    __tablename__ = "job"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_job_idempotency"),
        Index("ix_job_tenant_cache_key", "tenant_id", "cache_key"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str | None] = mapped_column(
        ForeignKey("model.id", ondelete="SET NULL"), nullable=True, index=True
    )
    status: Mapped[JobStatus] = mapped_column(
        SqlEnum(
            JobStatus,
            native_enum=False,
            length=16,
            values_callable=values,
            validate_strings=True,
        ),
        default=JobStatus.queued,
        index=True,
    )
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    stage: Mapped[str | None] = mapped_column(String(100), nullable=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    queue: Mapped[str] = mapped_column(String(16), default="cpu")
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Times the reaper re-sent the message since the job was last queued (app/reaper.py
    # backs off on it); 0 again whenever the job is queued afresh.
    resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The result cache (app/jobs/cache.py): the key of what this job computes, and, for a
    # job answered from the cache, the id of the succeeded job whose result it took (kept
    # when that job is gone: the artifacts are this job's own rows).
    cache_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cached_from: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    webhook_delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Webhook delivery (app/jobs/webhooks.py): POSTs tried, and when the next may start;
    # NULL while none is owed (no webhook_url, not finished, delivered or given up).
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    webhook_next_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime(), nullable=True, index=True
    )
    # Export (`spec.export`, app/jobs/exports.py): owed by a succeeded job from its outcome's
    # transaction; claims made (each moves `export_next_at` on by the claim), when the next
    # may start (NULL: none owed or given up), and when it ended (exported, or refused).
    export_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    export_next_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime(), nullable=True, index=True
    )
    export_done_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
