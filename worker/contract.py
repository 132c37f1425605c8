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
    aoti = "aoti"
    """An AOTInductor package: compiled by the worker, never uploaded."""


class RuntimeName(StrEnum):
    """Where an artifact runs and is measured (``target.runtime``, DESIGN §9)."""

    torch = "torch"
    inductor = "inductor"
    """The AOTInductor runtime: ``torch._inductor.aoti_load_package``."""
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


class LayerStatus(StrEnum):
    """What a job did to one layer (``metrics.layers``)."""

    changed = "changed"
    kept = "kept"


class TrialStatus(StrEnum):
    """A search trial: ``queued`` → ``running`` → ``succeeded`` | ``failed`` (``cancelled``
    when the search stopped before it ran)."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class Objective(StrEnum):
    """What a search optimizes (``search.objectives``, DESIGN §10): ``latency`` (p50 at the
    first batch size) and ``size`` (bytes) are minimized, ``accuracy`` and ``fidelity``
    (cosine similarity) maximized."""

    latency = "latency"
    size = "size"
    accuracy = "accuracy"
    fidelity = "fidelity"

    @property
    def maximized(self) -> bool:
        return self in {Objective.accuracy, Objective.fidelity}


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
    constraints_unmet = "constraints_unmet"
    """The result (or every trial of a search) violates a constraint of the spec; the
    message names each one with the value measured, and the artifacts stay available."""


@dataclass(frozen=True)
class FormatFacts:
    """What squish knows about one model format.

    Attributes:
        format: the format.
        suffix: the file suffix of a model in this format (hf: a zipped folder).
        media_type: the media type of its download.
        runtime: the runtime an artifact in this format runs in.
        converts_to: the output formats a model in this format can be delivered as.
        upload: whether models may be uploaded in this format (aoti packages hold compiled
            code: squish makes them, never loads one it did not make).
        devices: the devices an artifact in this format can be made for.
    """

    format: ModelFormat
    suffix: str
    media_type: str
    runtime: RuntimeName
    converts_to: frozenset[ModelFormat] = frozenset()
    upload: bool = True
    devices: frozenset[Device] = frozenset({Device.cpu, Device.gpu})


FORMATS: dict[ModelFormat, FormatFacts] = {
    facts.format: facts
    for facts in (
        FormatFacts(
            ModelFormat.pt2,
            ".pt2",
            "application/zip",
            RuntimeName.torch,
            frozenset({ModelFormat.onnx, ModelFormat.aoti}),
        ),
        FormatFacts(ModelFormat.onnx, ".onnx", "application/octet-stream", RuntimeName.onnxruntime),
        FormatFacts(
            ModelFormat.hf,
            ".zip",
            "application/zip",
            RuntimeName.torch,
            frozenset({ModelFormat.onnx, ModelFormat.aoti}),
        ),
        # torch's packager insists on a name ending in .pt2 (a zip of the compiled library).
        FormatFacts(
            ModelFormat.aoti,
            ".aoti.pt2",
            "application/zip",
            RuntimeName.inductor,
            upload=False,
            devices=frozenset({Device.cpu}),
        ),
    )
}


class ArtifactName(StrEnum):
    """The artifacts of a succeeded job (``GET /v1/jobs/{id}/artifacts/{name}``)."""

    model = "model"
    """The compressed model, in ``output_format``."""
    report = "report"
    """JSON: the spec, the model's signature, the metrics and the log."""
    card = "card"
    """The compression card: one self-contained HTML page (identity, recipe, metrics, charts)."""


REPORT_MEDIA_TYPE = "application/json"
"""The media type of a job's ``report`` artifact (JSON: spec, metrics, log)."""

CARD_MEDIA_TYPE = "text/html"
"""The media type of a job's ``card`` artifact (served with ``charset=utf-8``)."""


def format_facts(fmt: str) -> FormatFacts:
    """The facts of ``fmt``; raises ValueError naming the known formats when it is none."""
    try:
        return FORMATS[ModelFormat(fmt)]
    except ValueError:
        known = ", ".join(FORMATS)
        raise ValueError(f"unknown model format {fmt!r}; supported: {known}") from None


def format_of_suffix(filename: str) -> ModelFormat | None:
    """The format a file name's suffix says (``.pt2``, ``.onnx``, ``.zip`` for hf,
    ``.aoti.pt2``), if any; the longest suffix that matches wins."""
    lowered = filename.lower()
    matching = [facts for facts in FORMATS.values() if lowered.endswith(facts.suffix)]
    return max(matching, key=lambda facts: len(facts.suffix)).format if matching else None


def upload_formats() -> tuple[str, ...]:
    """The formats a model may be uploaded in, in declaration order."""
    return tuple(str(fmt) for fmt, facts in FORMATS.items() if facts.upload)


def converts_into(output_format: str) -> tuple[str, ...]:
    """The formats whose models can be delivered as ``output_format``, besides itself."""
    return tuple(str(f) for f, facts in FORMATS.items() if output_format in facts.converts_to)


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
    sources = converts_into(output_format) if output_format in values(ModelFormat) else ()
    if sources:
        can += f"; {output_format} is made from {' or '.join(sources)} models"
    choices = [repr(fmt) for fmt in (input_format, *targets)]
    choice = (
        " or ".join(choices) if len(choices) < 3 else f"{', '.join(choices[:-1])} or {choices[-1]}"
    )
    return (
        f"output_format {output_format!r} cannot be produced from a {input_format} model "
        f"({can}); omit output_format or set it to {choice}"
    )


def values(enum: type[StrEnum]) -> tuple[str, ...]:
    """The values of a StrEnum, in declaration order (for messages and ``Literal``-like lists)."""
    return tuple(member.value for member in enum)
