"""Request dependencies: a session that commits before the response, the caller's tenant,
and the shape every id and text input must have before it reaches the database."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import anyio
from fastapi import Depends, Path, Request, Security
from fastapi.security import HTTPBearer
from pydantic import AfterValidator, Field
from sqlalchemy.orm import Session

from app.db import session_scope
from app.errors import Unauthorized, Unprocessable
from app.keys import key_cache
from app.settings import Settings, get_settings
from app.storage import ObjectStore, get_store

# --- input that the database can store ------------------------------------------------------
# PostgreSQL refuses NUL in text (SQLite stores it), and an id longer than its column or with
# characters no id has cannot name anything: both are refused with 422 here, on every
# backend alike, instead of failing (or answering differently) in the database.

ID_MAX_CHARS = 40  # the String(40) of every id column
ID_PATTERN = rf"^[A-Za-z0-9_-]{{1,{ID_MAX_CHARS}}}$"
"""Every id this API hands out (``mdl_…``, ``ds_…``, ``job_…``) and every artifact name."""


def refuse_nul(value: Any) -> Any:
    """``value`` (a string, or JSON made of dicts and lists) if no string in it holds NUL."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text cannot contain NUL (\\u0000) characters")
    elif isinstance(value, dict):
        for key, item in value.items():
            refuse_nul(key)
            refuse_nul(item)
    elif isinstance(value, list | tuple):
        for item in value:
            refuse_nul(item)
    return value


Text = Annotated[str, AfterValidator(refuse_nul)]
"""Client text that is stored (names, layer names, URLs): no NUL."""
Id = Annotated[str, Field(pattern=ID_PATTERN, description="An id this API returned.")]


def _path_id(description: str) -> Any:
    return Path(pattern=ID_PATTERN, max_length=ID_MAX_CHARS, description=description)


ModelId = Annotated[str, _path_id("A model id (`mdl_…`).")]
DatasetId = Annotated[str, _path_id("A dataset id (`ds_…`).")]
JobId = Annotated[str, _path_id("A job id (`job_…`).")]
ArtifactName = Annotated[str, _path_id("An artifact name: `model`, `report` or `card`.")]


def check_text_fields(fields: dict[str, str]) -> None:
    """The text fields of a multipart form, refused like a JSON body's (422, `errors`)."""
    errors = [
        {"loc": ["body", name], "msg": "text cannot contain NUL (\\u0000) characters",
         "type": "value_error"}
        for name, value in fields.items()
        if "\x00" in value
    ]  # fmt: skip
    if errors:
        raise Unprocessable(
            "; ".join(f"{e['loc'][1]}: {e['msg']}" for e in errors),
            title="Invalid request",
            errors=errors,
        )


# --- sessions, settings, storage ------------------------------------------------------------


def get_session() -> Iterator[Session]:
    with session_scope() as session:
        yield session


# scope="function": the commit happens before the response is sent, so a client that
# reads what it just created never races the transaction.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]

# --- the caller -----------------------------------------------------------------------------

_CHALLENGE = {"WWW-Authenticate": "Bearer"}
# Declares the scheme in /openapi.json (generated clients send the key); the header itself
# is read below, so that each way of getting it wrong has its own message.
_BEARER = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


async def get_tenant(request: Request, _scheme: Annotated[Any, Security(_BEARER)] = None) -> str:
    """The caller's tenant. Async: a recently seen key costs no thread hop and no query."""
    authorization = request.headers.get("authorization")
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
