"""The engine's exception tree.

Every failure the engine expects (a broken upload, data that does not fit the model, a
method that cannot apply, a cancelled job) is an :class:`EngineError` with a stable
``code``; the service renders it once, as the job's ``error``. Anything else is a bug.
"""

from __future__ import annotations

from typing import Any

from worker.contract import ErrorCode


class EngineError(Exception):
    """Base of the engine's expected failures.

    Attributes:
        code: stable, machine-readable name of the failure class.
        message: what went wrong and, where possible, what to change.
        step: the pipeline stage it happened in (``"load"``, a method name, ...), if known.
    """

    code: ErrorCode = ErrorCode.internal_error

    def __init__(self, message: str, *, step: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.step = step

    def __str__(self) -> str:
        return self.message if self.step is None else f"{self.step}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"code": str(self.code), "message": self.message, "step": self.step}


class InvalidModelError(EngineError):
    """The model file is broken, unsafe, or not in the format it claims."""

    code = ErrorCode.invalid_model


class DatasetMismatchError(EngineError):
    """A dataset is unreadable or does not fit the model's input signature."""

    code = ErrorCode.dataset_mismatch


class UnsupportedError(EngineError):
    """The request is well formed but this engine cannot do it (yet)."""

    code = ErrorCode.unsupported


class InvalidParamsError(EngineError):
    """A method's parameters are valid on their own but do not fit this model."""

    code = ErrorCode.invalid_params


class MethodFailedError(EngineError):
    """A method's library (torchao, ONNX Runtime, ...) failed on this model."""

    code = ErrorCode.method_failed


class ModelRunError(EngineError):
    """The model raised an error while running on the given inputs."""

    code = ErrorCode.model_run_failed


class JobCancelled(EngineError):
    """The job was cancelled; raised from a progress report so work stops promptly."""

    code = ErrorCode.cancelled


class ModelDeletedError(EngineError):
    """The model, or a model a step names, was deleted before the job ran."""

    code = ErrorCode.model_deleted


class DatasetDeletedError(EngineError):
    """A dataset the job names was deleted before the job ran."""

    code = ErrorCode.dataset_deleted


class WorkerLostError(EngineError):
    """Every attempt's worker died before finishing the job."""

    code = ErrorCode.worker_lost


class InfrastructureError(EngineError):
    """Storage or the database failed on every attempt."""

    code = ErrorCode.infrastructure


class ConstraintsUnmetError(EngineError):
    """The result violates a constraint of the spec (worker.constraints); the message names
    each one with the value measured, and the job keeps its metrics and artifacts."""

    code = ErrorCode.constraints_unmet

    def __init__(
        self,
        message: str,
        *,
        step: str | None = None,
        violations: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message, step=step)
        self.violations = violations

    def to_dict(self) -> dict[str, Any]:
        stored = super().to_dict()
        if self.violations is not None:
            stored["violations"] = self.violations
        return stored


class InternalError(EngineError):
    """A bug: anything the engine did not expect."""

    code = ErrorCode.internal_error


_BY_CODE: dict[ErrorCode, type[EngineError]] = {
    cls.code: cls
    for cls in (
        InvalidModelError,
        DatasetMismatchError,
        UnsupportedError,
        InvalidParamsError,
        MethodFailedError,
        ModelRunError,
        JobCancelled,
        ModelDeletedError,
        DatasetDeletedError,
        WorkerLostError,
        InfrastructureError,
        ConstraintsUnmetError,
        InternalError,
    )
}


def error_for(code: ErrorCode, message: str, *, step: str | None = None) -> EngineError:
    """The engine error of ``code``; every :class:`ErrorCode` has exactly one class."""
    return _BY_CODE[code](message, step=step)
