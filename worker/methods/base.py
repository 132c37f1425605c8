"""The method registry's types. Torch-free: the API validates specs with these."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
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


@dataclass(frozen=True)
class Choice:
    """A searched parameter taking one of ``values`` (``Choice((True, False))``)."""

    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("a Choice needs at least one value")

    def contains(self, value: Any) -> bool:
        return value in self.values

    def grid(self) -> list[Any]:
        return list(self.values)

    def describe(self) -> dict[str, Any]:
        return {"values": list(self.values)}


@dataclass(frozen=True)
class Range:
    """A searched number in ``[low, high]``, on a grid of ``step`` when given, log-scaled if
    ``log``; ``integer`` for an int parameter (``Range(1, 10, step=1, integer=True)``)."""

    low: float
    high: float
    step: float | None = None
    log: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"Range: low ({self.low}) must be below high ({self.high})")
        if self.log and self.step is not None:
            raise ValueError("Range: a log-scaled range takes no step")

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step is None:
            return not self.integer or float(value).is_integer()
        steps = (value - self.low) / self.step
        return abs(steps - round(steps)) < 1e-6

    def grid(self) -> list[Any]:
        """The values a grid search tries: every step, else low, the geometric or
        arithmetic middle, and high."""
        if self.step is not None:
            count = round((self.high - self.low) / self.step)
            values = [self.low + i * self.step for i in range(count + 1)]
        elif self.log:
            values = [self.low, (self.low * self.high) ** 0.5, self.high]
        else:
            values = [self.low, (self.low + self.high) / 2, self.high]
        if self.integer:
            return sorted({round(v) for v in values})
        return [round(v, 10) for v in values]

    def describe(self) -> dict[str, Any]:
        return {
            "low": self.low,
            "high": self.high,
            "step": self.step,
            "log": self.log,
            "integer": self.integer,
        }


Distribution = Choice | Range


class SearchRole(StrEnum):
    """Where a searched method goes in a recipe: structural step, recovery, then precision."""

    structure = "structure"
    recovery = "recovery"
    precision = "precision"


@dataclass(frozen=True)
class Searchable:
    """How a search (``worker.search.space``) may use a method: declared next to its params.

    Attributes:
        role: its place in a recipe.
        params: the searched parameters and their distributions; the others keep the
            params model's defaults.
        defaults: the known-good values the search tries first, for the searched
            parameters that have no default in the params model (each inside its
            distribution).
        exclude: the method takes ``exclude``: the search may keep the layers the
            sensitivity analysis ranks most sensitive in float.
    """

    role: SearchRole
    params: Mapping[str, Distribution] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    exclude: bool = False

    def describe(self) -> dict[str, Any]:
        """`GET /v1/methods`' ``search``: where it goes and what a search varies."""
        return {
            "role": str(self.role),
            "params": {name: dist.describe() for name, dist in self.params.items()},
            "defaults": dict(self.defaults),
            "exclude": self.exclude,
        }


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
        search: how a search may use it (:class:`Searchable`); None: it is not searched.
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
    search: Searchable | None = None

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
            "search": None if self.search is None else self.search.describe(),
        }


class UnknownMethodError(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown method {name!r}; available methods: {', '.join(known)}")
        self.name = name
