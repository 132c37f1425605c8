"""A tenant's webhook signing secrets: created on first use, rotated with a 24 h overlap.

The current secret has no `expires_at`; rotating stamps it to expire
:data:`ROTATION_OVERLAP_S` from now and creates a new current one. Until a rotated secret
expires, every delivery is signed with it too (Standard Webhooks allows several
signatures), so receivers can switch to the new secret at their own pace. Never commits.
"""

from __future__ import annotations

import base64
import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import new_id, utcnow
from app.errors import Conflict
from app.orm import WebhookSecret
from squish.webhooks import SECRET_PREFIX

ROTATION_OVERLAP_S = 24 * 3600.0
KEY_BYTES = 32


def generate() -> str:
    """A new secret: ``whsec_`` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def _current(session: Session, tenant_id: str) -> WebhookSecret | None:
    return session.scalar(
        select(WebhookSecret).where(
            WebhookSecret.tenant_id == tenant_id, WebhookSecret.expires_at.is_(None)
        )
    )


def _create(session: Session, tenant_id: str) -> WebhookSecret | None:
    """A new current secret, or None when another transaction made one first."""
    row = WebhookSecret(id=new_id("whs"), tenant_id=tenant_id, secret=generate())
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        return None
    return row


def current_secret(session: Session, tenant_id: str) -> WebhookSecret:
    """The tenant's current secret, created on first use (racing creators agree on one)."""
    row = _current(session, tenant_id)
    if row is None:
        row = _create(session, tenant_id) or _current(session, tenant_id)
    if row is None:  # pragma: no cover - the winner's row is committed before our retry
        raise Conflict("The webhook secret is being created by another request; try again.")
    return row


def rotate(session: Session, tenant_id: str) -> tuple[WebhookSecret, datetime | None]:
    """A new current secret, and when the one it replaces stops verifying (None: none did)."""
    now = utcnow()
    session.execute(
        delete(WebhookSecret).where(
            WebhookSecret.tenant_id == tenant_id, WebhookSecret.expires_at <= now
        )
    )
    old = _current(session, tenant_id)
    expires_at = None
    if old is not None:
        expires_at = now + timedelta(seconds=ROTATION_OVERLAP_S)
        result = session.execute(
            update(WebhookSecret)
            .where(WebhookSecret.id == old.id, WebhookSecret.expires_at.is_(None))
            .values(expires_at=expires_at)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise Conflict("The webhook secret was rotated by another request just now.")
    new = _create(session, tenant_id)
    if new is None:
        raise Conflict("The webhook secret was rotated by another request just now.")
    return new, expires_at


def signing_secrets(session: Session, tenant_id: str) -> list[str]:
    """Every secret a delivery is signed with now: the current one, then unexpired old ones."""
    current = current_secret(session, tenant_id)
    older = session.scalars(
        select(WebhookSecret.secret)
        .where(
            WebhookSecret.tenant_id == tenant_id,
            WebhookSecret.expires_at > utcnow(),
        )
        .order_by(WebhookSecret.created_at.desc())
    )
    return [current.secret, *older]
