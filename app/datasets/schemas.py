"""The dataset resource as clients read it."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from worker.contract import DatasetFormat


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    format: DatasetFormat
    size_bytes: int
    sha256: str
    created_at: datetime
    info: dict[str, Any]
