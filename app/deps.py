"""Request dependencies: a session that commits before the response, and the caller's tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import anyio
from fastapi import Depends, Header
from sqlalchemy.orm import Session

from app.db import session_scope
from app.errors import Unauthorized
from app.keys import key_cache
from app.settings import Settings, get_settings
from app.storage import ObjectStore, get_store


def get_session() -> Iterator[Session]:
    with session_scope() as session:
        yield session


# scope="function": the commit happens before the response is sent, so a client that
# reads what it just created never races the transaction.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def get_tenant(authorization: Annotated[str | None, Header()] = None) -> str:
    """The caller's tenant. Async: a recently seen key costs no thread hop and no query."""
    if not authorization:
        raise Unauthorized(
            "Send your API key as 'Authorization: Bearer <key>'.",
            title="Missing API key",
            headers=_CHALLENGE,
        )
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized(
            "Use the Bearer scheme: 'Authorization: Bearer <key>'.",
            title="Malformed Authorization header",
            headers=_CHALLENGE,
        )
    tenant_id = key_cache.cached(key) or await anyio.to_thread.run_sync(key_cache.tenant_for, key)
    if tenant_id is None:
        raise Unauthorized(
            "This API key is not valid (unknown or revoked); create one with 'squish keys create'.",
            title="Invalid API key",
            headers=_CHALLENGE,
        )
    return tenant_id


TenantDep = Annotated[str, Depends(get_tenant)]
