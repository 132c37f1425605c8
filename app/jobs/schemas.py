"""The job spec as clients send it (DESIGN §5) and the job resource as they read it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from app.deps import Id, Text, refuse_nul
from worker.contract import Device, ErrorCode, JobStatus, ModelFormat, RuntimeName
from worker.schemas import PipelineMetrics
from worker.spec import MAX_BATCH_SIZE, MAX_BATCH_SIZES, MAX_ITERATIONS, MAX_WARMUP


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepIn(Strict):
    method: Text = Field(description="A method name from GET /v1/methods, e.g. 'prune.magnitude'.")
    # Stored with the spec: no NUL anywhere in it (model ids in it are checked as ids later).
    params: Annotated[dict[str, Any], AfterValidator(refuse_nul)] = Field(
        default_factory=dict, description="The method's parameters."
    )


class DatasetRefs(Strict):
    calibration: Id | None = Field(None, description="Dataset id used to calibrate.")
    train: Id | None = Field(None, description="Dataset id used to fine-tune or distill.")
    eval: Id | None = Field(None, description="Dataset id used to measure accuracy and fidelity.")


class Target(Strict):
    device: Device = Field(Device.cpu, description="Routes the job to the cpu or gpu queue.")
    runtime: RuntimeName | None = Field(
        None, description="Runtime the artifact is measured in; follows output_format when omitted."
    )


class Evaluate(Strict):
    batch_sizes: list[int] = Field(
        default_factory=lambda: [1],
        min_length=1,
        max_length=MAX_BATCH_SIZES,
        description="Batch sizes whose latency is measured.",
    )
    warmup: int = Field(3, ge=0, le=MAX_WARMUP, description="Untimed runs before timing.")
    iterations: int = Field(20, ge=1, le=MAX_ITERATIONS, description="Timed runs per batch size.")

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        if any(size < 1 or size > MAX_BATCH_SIZE for size in value):
            raise ValueError(f"each batch size must be between 1 and {MAX_BATCH_SIZE}")
        return sorted(set(value))


class JobCreate(Strict):
    model_id: Id
    pipeline: list[StepIn] = Field(min_length=1, max_length=20)
    datasets: DatasetRefs = Field(default_factory=DatasetRefs)
    target: Target = Field(default_factory=Target)
    output_format: ModelFormat | None = Field(
        None,
        description=(
            "Format of the compressed model; default: the model's. A pt2 or hf model can "
            "also be delivered as onnx (converted with torch.onnx.export) or aoti (compiled "
            "with AOTInductor for the worker's CPU, after every step)."
        ),
    )
    evaluate: Evaluate = Field(default_factory=Evaluate)
    webhook_url: AnyHttpUrl | None = None  # NUL in it is stored percent-encoded


class ArtifactOut(BaseModel):
    name: str
    filename: str
    media_type: str
    size_bytes: int
    sha256: str
    url: str


class JobError(BaseModel):
    code: ErrorCode
    message: str
    step: str | None = None


class JobOut(BaseModel):
    id: str
    model_id: str | None
    status: JobStatus
    progress: float
    stage: str | None
    queue: str
    attempts: int
    worker: str | None = Field(None, description="host:pid of the worker running the job.")
    spec: dict[str, Any]
    error: JobError | None
    metrics: PipelineMetrics | None = Field(
        description="What was measured, once the job has succeeded; a figure not measured is absent."
    )
    artifacts: list[ArtifactOut]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
