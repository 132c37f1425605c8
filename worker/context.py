"""How the engine reports progress and logs, and what a method handler is given."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from worker.contract import LogLevel

if TYPE_CHECKING:
    from worker.data import Dataset
    from worker.formats import LoadedModel
    from worker.schemas import LayerMetrics


class Reporter(Protocol):
    """Receives progress and log lines from the engine.

    ``progress`` takes the overall fraction of the job done (0..1) and may raise
    :class:`worker.errors.JobCancelled`; the engine calls it often, so a cancellation is
    honoured within seconds.
    """

    def progress(self, fraction: float, stage: str | None = None) -> None: ...

    def log(self, message: str, level: str = LogLevel.info, data: dict | None = None) -> None: ...


class NullReporter:
    """A reporter that drops everything (in-process use and tests)."""

    def progress(self, fraction: float, stage: str | None = None) -> None:
        return None

    def log(self, message: str, level: str = LogLevel.info, data: dict | None = None) -> None:
        return None


@dataclass
class RecordingReporter:
    """Keeps every progress call and log line, and forwards them to ``inner`` if given.

    The pipeline wraps the caller's reporter in one to write the log into the report.
    """

    inner: Reporter | None = None
    events: list[dict] = field(default_factory=list)
    logs: list[dict] = field(default_factory=list)

    def progress(self, fraction: float, stage: str | None = None) -> None:
        self.events.append({"fraction": fraction, "stage": stage})
        if self.inner is not None:
            self.inner.progress(fraction, stage)

    def log(self, message: str, level: str = LogLevel.info, data: dict | None = None) -> None:
        level = LogLevel(level)  # an unknown level fails here, loudly
        entry: dict = {"level": level.value, "message": message}
        if data:
            entry["data"] = data
        self.logs.append(entry)
        if self.inner is not None:
            self.inner.log(message, level, data)


@dataclass
class ScaledReporter:
    """Maps a sub-task's 0..1 progress into ``[start, end]`` of the overall progress."""

    inner: Reporter
    start: float
    end: float
    stage: str | None = None

    def progress(self, fraction: float, stage: str | None = None) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        self.inner.progress(self.start + (self.end - self.start) * fraction, self.stage or stage)

    def log(self, message: str, level: str = LogLevel.info, data: dict | None = None) -> None:
        self.inner.log(message, level, data)


@dataclass
class StepContext:
    """What a method handler gets besides the model and its params.

    Attributes:
        step: index of the step in the pipeline (0-based).
        method: the method's registered name.
        reporter: the job's reporter (overall progress).
        datasets: loaded datasets by role (``calibration``, ``train``, ``eval``).
        device: ``"cpu"`` or ``"gpu"``.
        work_dir: a scratch folder the handler may write to.
        progress_start / progress_end: the slice of overall progress this step owns.
        original: ``(path, format)`` of the model as uploaded; :meth:`load_original`
            loads a fresh copy (steps may have changed the pipeline's model in place).
        models: other uploaded models a step's params name (e.g. ``teacher_model_id``),
            by id: ``(local path, format)``; load one with :meth:`load_model`.
        layers: what the step did to each layer, by name (``metrics.steps[].layers``);
            handlers fill it with :func:`worker.layers.record_layers`.
    """

    step: int
    method: str
    reporter: Reporter
    datasets: dict[str, Dataset]
    device: str
    work_dir: Path
    progress_start: float = 0.0
    progress_end: float = 1.0
    original: tuple[Path, str] | None = None
    models: dict[str, tuple[Path, str]] = field(default_factory=dict)
    layers: dict[str, LayerMetrics] = field(default_factory=dict)

    def load_original(self) -> LoadedModel:
        """A fresh copy of the uploaded model (e.g. the default teacher for distillation)."""
        from worker.formats import load_model

        if self.original is None:
            raise RuntimeError("this step context was built without the original model")
        return load_model(*self.original)

    def load_model(self, model_id: str) -> LoadedModel:
        """Load another uploaded model named in this step's params (safely, like the input)."""
        from worker.errors import InvalidModelError
        from worker.formats import load_model

        if model_id not in self.models:
            raise InvalidModelError(
                f"model {model_id!r} was not fetched for this job", step=self.method
            )
        path, fmt = self.models[model_id]
        return load_model(path, fmt)

    def progress(self, fraction_of_step: float) -> None:
        """Report progress within this step; raises JobCancelled if the job was cancelled."""
        fraction_of_step = min(max(fraction_of_step, 0.0), 1.0)
        overall = self.progress_start + (self.progress_end - self.progress_start) * fraction_of_step
        self.reporter.progress(overall, self.method)

    def log(self, message: str, level: str = LogLevel.info, data: dict | None = None) -> None:
        self.reporter.log(message, level, data)
