"""The webhook secret and the delivery log as clients read them (DESIGN §12)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class WebhookSecretOut(BaseModel):
    secret: str = Field(description="The signing secret, `whsec_<base64>` (Standard Webhooks).")
    created_at: datetime
    previous_expires_at: datetime | None = Field(
        None,
        description="After a rotation: when the secret it replaced stops signing deliveries.",
    )


class DeliveryOut(BaseModel):
    webhook_id: str = Field(description="The `webhook-id` header: the same on every retry.")
    event: str = Field(description="`job.succeeded`, `job.failed` or `job.cancelled`.")
    attempt: int = Field(description="1 for the first try.")
    outcome: str = Field(
        description="`delivered` (2xx), `failed`, or `refused` (private address: not sent)."
    )
    status_code: int | None = Field(description="The receiver's HTTP status, if it answered.")
    error: str | None = Field(description="Why the attempt did not deliver.")
    duration_ms: float | None = Field(description="From sending to the receiver's answer.")
    created_at: datetime


class DeliveryList(BaseModel):
    items: list[DeliveryOut]
