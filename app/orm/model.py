from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, String, Text
from sqlalchemy import Enum as SqlEnum
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow
from worker.contract import InspectionStatus, ModelFormat, values


class MLModel(Base):
    """An uploaded model file; `info` is filled in by a worker's inspection."""

    __tablename__ = "model"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[ModelFormat] = mapped_column(
        SqlEnum(ModelFormat, native_enum=False, length=16, values_callable=values)
    )
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(300))
    inspection_status: Mapped[InspectionStatus] = mapped_column(
        SqlEnum(InspectionStatus, native_enum=False, length=16, values_callable=values),
        default=InspectionStatus.pending,
    )
    inspection_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    inspection_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    info: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
