"""The method registry's types. Torch-free: the API validates specs with these."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from worker.context import StepContext
    from worker.formats import LoadedModel


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Handler = Callable[["LoadedModel", Any, "StepContext"], "LoadedModel"]


@dataclass(frozen=True)
class Method:
    """A registered compression method.

    Attributes:
        name: the name a job spec uses, e.g. ``"prune.magnitude"``.
        summary: one line for `GET /v1/methods`.
        params: the pydantic model of its parameters (its JSON Schema is published).
        formats: model formats it accepts as input (``pt2``, ``onnx``).
        datasets_required: dataset roles it cannot run without.
        datasets_optional: dataset roles it uses when given.
        devices: ``cpu`` and/or ``gpu``.
        handler: ``(model, params, ctx) -> model``; imports torch lazily.
        model_refs: names of params fields that hold the id of another uploaded model
            (e.g. ``teacher_model_id``); the API checks them and the worker fetches them.
        datasets_for: ``(validated params) -> dataset roles`` that a step needs because of
            its params (e.g. ``prune.magnitude`` with ``steps > 1`` fine-tunes on
            ``train``); :meth:`requires` adds them to ``datasets_required``.
    """

    name: str
    summary: str
    params: type[MethodParams]
    formats: frozenset[str]
    handler: Handler
    datasets_required: frozenset[str] = frozenset()
    datasets_optional: frozenset[str] = frozenset()
    devices: frozenset[str] = frozenset({"cpu", "gpu"})
    model_refs: tuple[str, ...] = ()
    datasets_for: Callable[[Any], frozenset[str]] | None = None

    def requires(self, params: MethodParams) -> frozenset[str]:
        """Dataset roles a step with these (validated) params cannot run without."""
        extra = self.datasets_for(params) if self.datasets_for is not None else frozenset()
        return self.datasets_required | extra

    def validate_params(self, params: Mapping[str, Any], fmt: str | None = None) -> MethodParams:
        """Validate a step's params; with ``fmt``, also refuse what that format's backend lacks.

        The format reaches the params model's validators as pydantic validation context
        (``info.context["format"]``). Raises ``pydantic.ValidationError``.
        """
        context = {"format": fmt} if fmt is not None else None
        return self.params.model_validate(dict(params), context=context)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "formats": sorted(self.formats),
            "datasets_required": sorted(self.datasets_required),
            "datasets_optional": sorted(self.datasets_optional),
            "devices": sorted(self.devices),
            "params_schema": self.params.model_json_schema(),
        }


class UnknownMethodError(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown method {name!r}; available methods: {', '.join(known)}")
        self.name = name
