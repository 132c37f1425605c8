"""The method registry's types. Torch-free: the API validates specs with these."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationInfo

from worker.contract import DatasetRole

if TYPE_CHECKING:
    from worker.context import StepContext
    from worker.formats import LoadedModel


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def context_format(info: ValidationInfo) -> str | None:
    """The model format a step's params are validated for (``Method.validate_params``)."""
    context = info.context
    return context.get("format") if isinstance(context, dict) else None


@dataclass(frozen=True)
class DataNeed:
    """Data a step cannot run without: a dataset of one of ``roles``, labelled if asked.

    ``DataNeed(("train", "calibration"), labelled=True, why="…")`` reads "a train or
    calibration dataset with labels"; :func:`worker.spec.check_pipeline` checks it at
    ``POST /v1/jobs`` (from the dataset's inspection) and in the engine (once loaded).
    """

    roles: tuple[DatasetRole, ...]
    labelled: bool = False
    why: str = ""


Handler = Callable[["LoadedModel", Any, "StepContext"], "LoadedModel"]
NeedsFor = Callable[[Any], Iterable["DataNeed | str"]]


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
        datasets_for: ``(validated params) -> roles or DataNeeds`` that a step needs
            because of its params (e.g. ``prune.magnitude`` with ``steps > 1`` fine-tunes on
            ``train``); :meth:`needs` adds them to ``datasets_required``.
        post_conversion: with an ``output_format`` the model converts to, a trailing
            run of such steps gets the converted model (ONNX Runtime quantization), see
            :func:`worker.spec.step_formats`.
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
    datasets_for: NeedsFor | None = None
    post_conversion: bool = False

    def needs(self, params: MethodParams) -> list[DataNeed]:
        """The data a step with these (validated) params cannot run without."""
        extra = self.datasets_for(params) if self.datasets_for is not None else ()
        needs = [DataNeed((DatasetRole(role),)) for role in sorted(self.datasets_required)]
        for need in extra:
            if isinstance(need, DataNeed):
                needs.append(need)
            elif need not in self.datasets_required:
                needs.append(DataNeed((DatasetRole(need),)))
        return needs

    def requires(self, params: MethodParams) -> frozenset[str]:
        """Dataset roles each of which a step with these params cannot run without."""
        return frozenset(n.roles[0] for n in self.needs(params) if len(n.roles) == 1)

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
