"""The one typed configuration of squish, read from `SQUISH_*` environment variables."""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

GiB = 1024**3


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SQUISH_", extra="ignore")

    data_dir: Path = Field(Path(".squish"), description="Where embedded state lives.")
    database_url: str = Field("", description="SQLAlchemy URL; default SQLite under data_dir.")
    broker_url: str = Field("", description="Celery broker; default a server-less folder broker.")
    storage_url: str = Field("", description="file://PATH or s3://bucket/prefix.")
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    api_key: SecretStr | None = None
    max_upload_bytes: Annotated[int, Field(gt=0)] = 4 * GiB

    # Job lifecycle.
    heartbeat_interval_s: Annotated[float, Field(gt=0)] = 2.0
    heartbeat_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    max_attempts: Annotated[int, Field(ge=1)] = 3
    requeue_after_s: Annotated[float, Field(gt=0)] = 120.0
    reaper_interval_s: Annotated[float, Field(gt=0)] = 2.0
    cancel_grace_s: Annotated[float, Field(gt=0)] = 5.0
    broker_poll_interval_s: Annotated[float, Field(gt=0)] = 0.05

    # Outages the worker waits out instead of failing (or recomputing) the job.
    storage_retry_s: Annotated[float, Field(ge=0)] = 300.0
    """How long one download or artifact upload is retried while the object store is down."""
    database_retry_s: Annotated[float, Field(ge=0)] = 120.0
    """How long a worker retries recording a finished job's outcome while the database is down."""

    # Work folders: one per job (or inspection) under one root, removed by the worker
    # that made it, or by a later sweep once that process is gone (killed).
    work_dir: Path = Field(
        default_factory=lambda: Path(tempfile.gettempdir()) / "squish-work",
        description="The root of the work folders (default: squish-work in the temp dir).",
    )
    work_sweep_interval_s: Annotated[float, Field(gt=0)] = 60.0

    # Embedded runner.
    worker_concurrency: Annotated[int, Field(ge=1)] = 1
    worker_queues: str = "cpu"

    # Webhooks and operations.
    webhook_allow_private: bool | None = Field(
        None,
        description=(
            "POST webhooks to private, loopback, link-local, multicast and reserved addresses; "
            "default: on only in embedded mode (the folder broker), off otherwise."
        ),
    )
    mlflow_tracking_uris: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "MLflow tracking URIs a job's export.mlflow may name (a URI matches one with the "
            "same scheme, host and port and a path under it); empty: any in embedded mode, "
            "none otherwise (the worker sends its own MLflow credentials to that server)."
        ),
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text, or json: one JSON object per line (with job_id in a job)."
    )

    @field_validator("mlflow_tracking_uris", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        # SQUISH_MLFLOW_TRACKING_URIS=http://mlflow-a:5000,http://mlflow-b:5000
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_key")
    @classmethod
    def _no_placeholder_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value().strip()
        if (
            secret.lower() in {"", "changeme", "change-me", "secret", "changethis"}
            or len(secret) < 16
        ):
            raise ValueError("SQUISH_API_KEY must be a real secret of at least 16 characters")
        return value

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        data = self.data_dir.resolve()
        self.data_dir = data
        if not self.database_url:
            self.database_url = f"sqlite:///{data / 'squish.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if not self.storage_url:
            self.storage_url = f"file://{data / 'objects'}"
        self.work_dir = self.work_dir.resolve()
        if self.webhook_allow_private is None:
            self.webhook_allow_private = self.embedded_broker
        return self

    def mlflow_refusal(self, uri: str) -> str | None:
        """Why a job may not log to this tracking URI here; None: it may."""
        from worker.export import tracking_uri_refusal

        return tracking_uri_refusal(uri, self.mlflow_tracking_uris, self.embedded_broker)

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
