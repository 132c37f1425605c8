"""The job spec as clients send it (DESIGN §5) and the job resource as they read it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from app.deps import Id, Text, refuse_nul
from worker.constraints import Constraints
from worker.contract import Device, ErrorCode, JobStatus, ModelFormat, RuntimeName
from worker.export import Export
from worker.schemas import Figures, PipelineMetrics, SearchMetrics, Violation
from worker.search.spec import SearchSpec
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
    pipeline: list[StepIn] | None = Field(
        None,
        min_length=1,
        max_length=20,
        description="The steps to run, in order; or give `search` instead.",
    )
    search: SearchSpec | None = Field(
        None,
        description=(
            "Instead of `pipeline`: find the recipe that best meets the objectives within "
            "the constraints (DESIGN §10)."
        ),
    )
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
    constraints: Constraints | None = Field(
        None,
        description=(
            "Bounds the pipeline's result must meet (a CI gate): a result that violates one "
            "fails the job with `constraints_unmet`, keeping its metrics and artifacts. A "
            "search takes them in `search.constraints`."
        ),
    )
    cache: StrictBool = Field(
        True,
        description=(
            "Answer from the result cache when this tenant already has a succeeded job with "
            "the same model bytes, datasets, normalized spec and engine version; false "
            "forces a fresh run."
        ),
    )
    export: Export | None = Field(
        None, description="Where to log the result once the job has succeeded (MLflow)."
    )

    @model_validator(mode="after")
    def _pipeline_or_search(self) -> JobCreate:
        if (self.pipeline is None) == (self.search is None):
            raise ValueError(
                "give exactly one of `pipeline` (the steps to run) and `search` (squish finds "
                "the steps)"
            )
        if self.search is not None and self.constraints is not None:
            raise ValueError(
                "a search's constraints decide which trial wins: give them in "
                "search.constraints, not at the top level"
            )
        if self.search is not None and (self.output_format or self.target.runtime):
            raise ValueError(
                "a search chooses the output format and runtime: restrict them with "
                "search.runtimes instead of output_format and target.runtime"
            )
        return self


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
    violations: list[Violation] | None = Field(
        None, description="`constraints_unmet`: each bound the result violates, and its figure."
    )


class SearchProgress(Figures):
    """A running search's `metrics`: its trials so far, before a chosen trial's figures."""

    search: SearchMetrics


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
    metrics: PipelineMetrics | SearchProgress | None = Field(
        description=(
            "What was measured, once the job has succeeded; a figure not measured is absent. "
            "A search's `metrics.search` is there while it runs."
        )
    )
    artifacts: list[ArtifactOut]
    cached_from: str | None = Field(
        None,
        description=(
            "Answered from the result cache: the id of the succeeded job whose artifacts and "
            "metrics this job took (nothing ran)."
        ),
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
