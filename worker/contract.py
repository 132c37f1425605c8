"""The names clients, the API and the engine share: enums and the table of format facts.

Standard library only, so that every process can import it: the API (which must not
import torch), the engine, and the client CLI (which may run without the server's
dependencies). Each fact here is written once; everything else looks it up.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ModelFormat(StrEnum):
    """The formats of an uploaded model and of an artifact (DESIGN §7, §9)."""

    pt2 = "pt2"
    onnx = "onnx"
    hf = "hf"


class RuntimeName(StrEnum):
    """Where an artifact runs and is measured (``target.runtime``, DESIGN §9)."""

    torch = "torch"
    onnxruntime = "onnxruntime"


class Device(StrEnum):
    """``target.device``: the queue a job is routed to and the device it is measured on."""

    cpu = "cpu"
    gpu = "gpu"


class DatasetRole(StrEnum):
    """What a dataset is for in a job (``datasets.<role>``)."""

    calibration = "calibration"
    train = "train"
    eval = "eval"


class DatasetFormat(StrEnum):
    npz = "npz"
    safetensors = "safetensors"
    jsonl = "jsonl"


class JobStatus(StrEnum):
    """``queued`` → ``running`` → ``succeeded`` | ``failed`` | ``cancelled``."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}


class InspectionStatus(StrEnum):
    """A model's inspection by a worker after its upload."""

    pending = "pending"
    ready = "ready"
    failed = "failed"


class LogLevel(StrEnum):
    """The level of a job's log event."""

    info = "info"
    warning = "warning"
    error = "error"


class ErrorCode(StrEnum):
    """``error.code`` of a failed job: stable names clients may branch on (README lists them)."""

    invalid_model = "invalid_model"
    """The model file is broken, unsafe, or not in the format it claims."""
    dataset_mismatch = "dataset_mismatch"
    """A dataset is unreadable or does not fit the model's input signature."""
    unsupported = "unsupported"
    """A well-formed request this engine cannot do for this model."""
    invalid_params = "invalid_params"
    """A method's parameters are valid on their own but do not fit this model."""
    method_failed = "method_failed"
    """The library a method wraps (torchao, ONNX Runtime, ...) failed on this model."""
    model_run_failed = "model_run_failed"
    """The model raised an error while running on the given inputs."""
    cancelled = "cancelled"
    """The job was cancelled."""
    model_deleted = "model_deleted"
    """The model (or a model a step names) was deleted before the job ran."""
    dataset_deleted = "dataset_deleted"
    """A dataset the job names was deleted before the job ran."""
    worker_lost = "worker_lost"
    """Every attempt's worker died (killed, out of memory) before finishing."""
    infrastructure = "infrastructure"
    """Storage or the database failed on every attempt."""
    internal_error = "internal_error"
    """A bug in squish; the worker's log has the traceback."""


@dataclass(frozen=True)
class FormatFacts:
    """What squish knows about one model format.

    Attributes:
        format: the format.
        suffix: the file suffix of a model in this format (hf: a zipped folder).
        media_type: the media type of its download.
        runtime: the runtime an artifact in this format runs in.
        converts_to: the output formats a model in this format can be delivered as.
    """

    format: ModelFormat
    suffix: str
    media_type: str
    runtime: RuntimeName
    converts_to: frozenset[ModelFormat] = frozenset()


FORMATS: dict[ModelFormat, FormatFacts] = {
    facts.format: facts
    for facts in (
        FormatFacts(
            ModelFormat.pt2,
            ".pt2",
            "application/zip",
            RuntimeName.torch,
            frozenset({ModelFormat.onnx}),
        ),
        FormatFacts(ModelFormat.onnx, ".onnx", "application/octet-stream", RuntimeName.onnxruntime),
        FormatFacts(
            ModelFormat.hf,
            ".zip",
            "application/zip",
            RuntimeName.torch,
            frozenset({ModelFormat.onnx}),
        ),
    )
}


def format_facts(fmt: str) -> FormatFacts:
    """The facts of ``fmt``; raises ValueError naming the known formats when it is none."""
    try:
        return FORMATS[ModelFormat(fmt)]
    except ValueError:
        known = ", ".join(FORMATS)
        raise ValueError(f"unknown model format {fmt!r}; supported: {known}") from None


def format_of_suffix(filename: str) -> ModelFormat | None:
    """The format a file name's suffix says (``.pt2``, ``.onnx``, ``.zip`` for hf), if any."""
    lowered = filename.lower()
    for facts in FORMATS.values():
        if lowered.endswith(facts.suffix):
            return facts.format
    return None


def conversion_problem(input_format: str, output_format: str) -> str | None:
    """Why a ``input_format`` model cannot be delivered as ``output_format``; None if it can."""
    input_format, output_format = str(input_format), str(output_format)
    source = format_facts(input_format)
    if output_format == input_format or output_format in source.converts_to:
        return None
    targets = sorted(str(target) for target in source.converts_to)
    can = (
        f"{input_format} models convert to {', '.join(targets)} only"
        if targets
        else f"{input_format} models are not converted"
    )
    return (
        f"output_format {output_format!r} cannot be produced from a {input_format} model "
        f"({can}); omit output_format or set it to {input_format!r}"
        + (f" or {targets[0]!r}" if targets else "")
    )


def values(enum: type[StrEnum]) -> tuple[str, ...]:
    """The values of a StrEnum, in declaration order (for messages and ``Literal``-like lists)."""
    return tuple(member.value for member in enum)
