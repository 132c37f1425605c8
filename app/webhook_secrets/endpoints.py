"""Webhook signing secret (read, rotate) and a job's webhook delivery attempts."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from app.deps import JobId, SessionDep, TenantDep
from app.errors import problem_responses
from app.jobs.service import get_job
from app.orm import WebhookDelivery
from app.webhook_secrets import service
from app.webhook_secrets.schemas import DeliveryList, DeliveryOut, WebhookSecretOut

router = APIRouter(tags=["webhooks"])


@router.get("/v1/webhook-secret", response_model=WebhookSecretOut)
def get_webhook_secret(session: SessionDep, tenant_id: TenantDep) -> WebhookSecretOut:
    """The secret that signs this tenant's webhooks (created on first use)."""
    row = service.current_secret(session, tenant_id)
    return WebhookSecretOut(secret=row.secret, created_at=row.created_at)


@router.post(
    "/v1/webhook-secret/rotate", response_model=WebhookSecretOut, responses=problem_responses(409)
)
def rotate_webhook_secret(session: SessionDep, tenant_id: TenantDep) -> WebhookSecretOut:
    """A new signing secret; the previous one keeps signing beside it for 24 h."""
    row, previous_expires_at = service.rotate(session, tenant_id)
    return WebhookSecretOut(
        secret=row.secret, created_at=row.created_at, previous_expires_at=previous_expires_at
    )


@router.get(
    "/v1/jobs/{job_id}/deliveries", response_model=DeliveryList, responses=problem_responses(404)
)
def list_deliveries(job_id: JobId, session: SessionDep, tenant_id: TenantDep) -> DeliveryList:
    """Every attempt to deliver the job's webhook, oldest first."""
    get_job(session, tenant_id, job_id)
    rows = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.id)
    )
    return DeliveryList(
        items=[
            DeliveryOut(
                webhook_id=row.webhook_id,
                event=row.event,
                attempt=row.attempt,
                outcome=row.outcome,
                status_code=row.status_code,
                error=row.error,
                duration_ms=row.duration_ms,
                created_at=row.created_at,
            )
            for row in rows
        ]
    )
