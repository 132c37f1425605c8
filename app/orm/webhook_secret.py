"""A tenant's webhook signing secret: the current one, and rotated ones still verifying."""

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class WebhookSecret(Base):
    """`expires_at` is NULL for the tenant's current secret (one at most, by a partial
    unique index); a rotated secret keeps signing, beside the new one, until it expires."""

    __tablename__ = "webhook_secret"
    __table_args__ = (
        Index(
            "uq_webhook_secret_current",
            "tenant_id",
            unique=True,
            sqlite_where=text("expires_at IS NULL"),
            postgresql_where=text("expires_at IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), index=True)
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
