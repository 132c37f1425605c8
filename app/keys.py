"""Tenants and API keys: keys are random, shown once, stored as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import new_id, session_scope
from app.orm import ApiKey, Tenant

KEY_PREFIX = "sq_"
DEFAULT_TENANT = "default"
_CACHE_TTL_S = 5.0


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant_name: str) -> str:
    """A new key for `tenant_name` (created if needed); the plaintext is returned once."""
    tenant = get_or_create_tenant(session, tenant_name)
    key = generate_key()
    session.add(
        ApiKey(id=new_id("key"), tenant_id=tenant.id, prefix=key[:10], key_hash=hash_key(key))
    )
    session.flush()
    return key


def register_key(session: Session, key: str, tenant_name: str = DEFAULT_TENANT) -> None:
    """Make an operator-chosen key (SQUISH_API_KEY) valid for `tenant_name`."""
    digest = hash_key(key)
    if session.scalar(select(ApiKey.id).where(ApiKey.key_hash == digest)) is not None:
        return
    tenant = get_or_create_tenant(session, tenant_name)
    session.add(ApiKey(id=new_id("key"), tenant_id=tenant.id, prefix=key[:10], key_hash=digest))
    session.flush()


def has_any_key(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is not None


class KeyCache:
    """Key hash → tenant id for a few seconds, so polling clients cost one query, not two."""

    def __init__(self, ttl_s: float = _CACHE_TTL_S) -> None:
        self._ttl = ttl_s
        self._items: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def cached(self, key: str) -> str | None:
        """The tenant of a key seen in the last few seconds, without touching the database."""
        hit = self._items.get(hash_key(key))
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    def tenant_for(self, key: str) -> str | None:
        """The key's tenant (cached for a few seconds), or None for an unknown/revoked key."""
        tenant_id = self.cached(key)
        if tenant_id is not None:
            return tenant_id
        digest = hash_key(key)
        with session_scope(read_only=True) as session:
            tenant_id = session.scalar(
                select(ApiKey.tenant_id).where(
                    ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)
                )
            )
        if tenant_id is not None:
            with self._lock:
                if len(self._items) > 10_000:
                    self._items.clear()
                self._items[digest] = (tenant_id, time.monotonic() + self._ttl)
        return tenant_id

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


key_cache = KeyCache()
