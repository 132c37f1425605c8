"""The engine's exception tree.

Every failure the engine expects (a broken upload, data that does not fit the model, a
method that cannot apply, a cancelled job) is an :class:`EngineError` with a stable
``code``; the service renders it once, as the job's ``error``. Anything else is a bug.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's expected failures.

    Attributes:
        code: stable, machine-readable name of the failure class.
        message: what went wrong and, where possible, what to change.
        step: the pipeline stage it happened in (``"load"``, a method name, ...), if known.
    """

    code: str = "engine_error"

    def __init__(self, message: str, *, step: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.step = step

    def __str__(self) -> str:
        return self.message if self.step is None else f"{self.step}: {self.message}"

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "step": self.step}


class InvalidModelError(EngineError):
    """The model file is broken, unsafe, or not in the format it claims."""

    code = "invalid_model"


class DatasetMismatchError(EngineError):
    """A dataset is unreadable or does not fit the model's input signature."""

    code = "dataset_mismatch"


class UnsupportedError(EngineError):
    """The request is well formed but this engine cannot do it (yet)."""

    code = "unsupported"


class InvalidParamsError(EngineError):
    """A method's parameters are valid on their own but do not fit this model."""

    code = "invalid_params"


class MethodFailedError(EngineError):
    """A method's library (torchao, ONNX Runtime, ...) failed on this model."""

    code = "method_failed"


class ModelRunError(EngineError):
    """The model raised an error while running on the given inputs."""

    code = "model_run_failed"


class JobCancelled(EngineError):
    """The job was cancelled; raised from a progress report so work stops promptly."""

    code = "cancelled"
