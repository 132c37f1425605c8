"""The model resource as clients read it."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from worker.contract import InspectionStatus, ModelFormat


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    format: ModelFormat
    size_bytes: int
    sha256: str
    created_at: datetime
    inspection_status: InspectionStatus
    inspection_error: str | None
    info: dict[str, Any] | None
