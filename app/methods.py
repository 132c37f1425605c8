"""`GET /v1/methods`: every registered method with the JSON Schema of its parameters."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.deps import TenantDep
from worker.methods import all_methods

router = APIRouter(prefix="/v1/methods", tags=["methods"])


@router.get("")
def list_methods(_tenant_id: TenantDep) -> dict[str, list[dict[str, Any]]]:
    """Every method a job pipeline can use, with the formats, data and devices it needs."""
    return {"items": [method.describe() for method in all_methods()]}
