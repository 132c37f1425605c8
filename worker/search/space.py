"""The search space, built from the method registry (each method's ``search`` declaration).

A recipe is at most one step of each role, in this order: a structural step (pruning,
low-rank), a recovery step (distillation, fine-tuning; only after a structural step and
only with ``train`` data), a precision step (``quantize.*``, with an ``exclude`` set of the
layers the sensitivity analysis ranks most sensitive), and the output format (the runtime
the artifact runs in). Each method joins the space by declaring
:class:`worker.methods.base.Searchable` next to its params model; what fits this model's
format, the datasets given, the device and the spec's ``methods`` / ``runtimes`` is
decided by :func:`worker.spec.check_pipeline`, the same check a pipeline job gets, so a
recipe the space proposes is a pipeline the API would accept.

Torch-free and Optuna-independent except :meth:`Space.recipe`, which takes an Optuna trial
(``suggest_*``) and imports nothing itself. Parameter names in a study:
``output_format``, ``precision.<format>`` (the precision method for that output format,
or ``none``), ``structure`` (``none`` or a method; ``structure.alone`` when the precision
step is ``none``, so that a recipe always has a step), ``recovery``, and
``<method>.<param>`` / ``<method>.exclude`` (how many of the most sensitive layers stay
float) for the chosen methods' searched parameters.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any, Protocol

from pydantic import ValidationError

from worker.contract import FORMATS, Device, ErrorCode, ModelFormat, RuntimeName, values
from worker.methods import REGISTRY, UnknownMethodError, get_method
from worker.methods.base import Choice, Distribution, Method, SearchRole
from worker.schemas import LayerSensitivity
from worker.spec import (
    DatasetInfo,
    Loc,
    PipelineRequest,
    Problem,
    check_pipeline,
    describe,
    step_formats,
)

NONE = "none"
EXCLUDE_COUNTS = (0, 1, 2, 4, 8)
"""How many of the most sensitive layers a precision step may keep float."""
PREFERRED_FORMATS = (ModelFormat.onnx, ModelFormat.aoti)
"""The output formats a known-good recipe is tried in first: the runtimes whose int8 and
fp32 kernels are fastest on CPU workers (ONNX Runtime, then AOTInductor)."""
SENSITIVE_SHARE = 0.25
"""A layer is "sensitive" (kept float in the mixed-precision recipe) when its int8-only
output change (1 - cosine) is at least this share of the largest layer's, and not tiny."""
SENSITIVE_FLOOR = 1e-4

OUTPUT_FORMAT = "output_format"
STRUCTURE = "structure"
STRUCTURE_ALONE = "structure.alone"
RECOVERY = "recovery"


def precision_param(output_format: str) -> str:
    """The study parameter naming the precision method for ``output_format``."""
    return f"precision.{output_format}"


class SuggestingTrial(Protocol):
    """What :meth:`Space.recipe` asks of a trial: ``optuna.trial.BaseTrial``'s suggest calls."""

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...  # fmt: skip

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float: ...


@dataclass
class Recipe:
    """One candidate: pipeline steps (``(method, params)``) and the artifact's format."""

    steps: list[tuple[str, dict[str, Any]]]
    output_format: str

    @property
    def runtime(self) -> RuntimeName:
        return FORMATS[ModelFormat(self.output_format)].runtime

    @property
    def pipeline(self) -> list[dict[str, Any]]:
        """The steps as a job's ``pipeline``."""
        return [{"method": name, "params": dict(params)} for name, params in self.steps]

    def to_json(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "output_format": str(self.output_format)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Recipe:
        steps = [(str(s["method"]), dict(s.get("params") or {})) for s in data["pipeline"]]
        return cls(steps=steps, output_format=str(data["output_format"]))

    def key(self) -> str:
        """sha256 of the canonical JSON: equal recipes have equal keys."""
        return _digest(self.to_json())

    def prefixes(self, model_format: str) -> list[tuple[str, list[tuple[str, dict[str, Any]]]]]:
        """``(key, steps[:k])`` for each leading run of steps that works on the model in its
        own format (before any conversion), shortest first: the models another recipe
        with the same leading steps can start from. The key does not depend on the output
        format (the conversion comes after these steps)."""
        methods = [get_method(name) for name, _ in self.steps]
        formats = step_formats(model_format, self.output_format, methods)
        found = []
        for k in range(1, len(self.steps) + 1):
            if formats[k - 1] != model_format:
                break
            head = [(name, dict(params)) for name, params in self.steps[:k]]
            key = _digest({"model_format": str(model_format), "pipeline": _pipeline(head)})
            found.append((key, head))
        return found


def _pipeline(steps: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    return [{"method": name, "params": dict(params)} for name, params in steps]


def _digest(data: Any) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Space:
    """The recipes a search may try for one model, its datasets and its device.

    Attributes:
        model_format: the uploaded model's format.
        output_formats: the artifact formats, in preference order for known-good recipes.
        structure / recovery: the methods of those roles that fit.
        precision: by output format, the precision methods that fit.
        ranking: layer names, most sensitive first (from the sensitivity analysis).
    """

    model_format: str
    output_formats: tuple[str, ...]
    structure: tuple[str, ...]
    recovery: tuple[str, ...]
    precision: Mapping[str, tuple[str, ...]]
    ranking: tuple[str, ...] = ()
    layer_names: tuple[str, ...] | None = field(default=None, compare=False)

    @property
    def exclude_counts(self) -> tuple[int, ...]:
        return tuple(k for k in EXCLUDE_COUNTS if k <= len(self.ranking))

    def with_sensitivity(self, sensitivity: Mapping[str, LayerSensitivity] | None) -> Space:
        """This space with ``exclude`` sets drawn from the sensitivity ranking."""
        return replace(self, ranking=tuple(ranking(sensitivity or {})))

    def describe(self) -> dict[str, Any]:
        return {
            "output_formats": list(self.output_formats),
            "structure": list(self.structure),
            "recovery": list(self.recovery),
            "precision": {fmt: list(names) for fmt, names in self.precision.items()},
            "exclude_counts": list(self.exclude_counts),
        }

    # -- the recipe of a trial -------------------------------------------------------

    def recipe(self, trial: SuggestingTrial) -> Recipe:
        """The recipe an Optuna trial's suggestions make (define-by-run)."""
        fmt = str(trial.suggest_categorical(OUTPUT_FORMAT, list(self.output_formats)))
        steps: list[tuple[str, dict[str, Any]]] = []
        precision = str(trial.suggest_categorical(precision_param(fmt), self._precision(fmt)))
        structure_choices = self._structure(alone=precision == NONE)
        structure = NONE
        if structure_choices:
            name = STRUCTURE_ALONE if precision == NONE else STRUCTURE
            structure = str(trial.suggest_categorical(name, structure_choices))
        own = self.model_format
        if structure != NONE:
            steps.append((structure, _suggest_params(trial, structure, own)))
            if self.recovery:
                recovery = str(trial.suggest_categorical(RECOVERY, [NONE, *self.recovery]))
                if recovery != NONE:
                    steps.append((recovery, _suggest_params(trial, recovery, own)))
        if precision != NONE:
            params = _suggest_params(trial, precision, self._receives(precision, fmt))
            if self._excludes(precision, fmt):
                counts = list(self.exclude_counts)
                keep = int(trial.suggest_categorical(f"{precision}.exclude", counts))
                if keep:
                    params["exclude"] = list(self.ranking[:keep])
            steps.append((precision, params))
        return Recipe(steps=steps, output_format=fmt)

    def _excludes(self, method_name: str, fmt: str) -> bool:
        """Whether a precision step of this method for output ``fmt`` takes ``exclude`` sets:
        it declares ``exclude``, the ranking is known, and the step runs on the model in its
        own format (the ranking names its layers; a converted model's are other names)."""
        searchable = get_method(method_name).search
        if not (searchable and searchable.exclude and self.exclude_counts):
            return False
        return self._receives(method_name, fmt) == self.model_format

    def _receives(self, method_name: str, fmt: str) -> str:
        """The format of the model a trailing step of this method gets, for output ``fmt``."""
        return step_formats(self.model_format, fmt, [get_method(method_name)])[0]

    def _precision(self, fmt: str) -> list[str]:
        names = list(self.precision.get(fmt, ()))
        return [NONE, *names] if self.structure else names

    def _structure(self, *, alone: bool) -> list[str]:
        return (
            list(self.structure) if alone else ([NONE, *self.structure] if self.structure else [])
        )

    # -- what Optuna is told up front --------------------------------------------------

    def known_good(self, sensitivity: Mapping[str, LayerSensitivity] | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """Parameter dicts for ``study.enqueue_trial``, in the order to try them: the
        sensitivity-derived mixed-precision recipe, then each precision method's default,
        then each structural method's default (each in its preferred output format).

        ``sensitivity`` must be the analysis this space was made ``with_sensitivity`` of
        (the exclude counts the study knows come from it).
        """
        if sensitivity is not None and tuple(ranking(sensitivity)) != self.ranking:
            raise ValueError("known_good: call with_sensitivity(sensitivity) on the space first")
        space = self
        found: list[dict[str, Any]] = []
        mixed = space._mixed_precision(sensitivity or {})
        if mixed is not None:
            found.append(mixed)
        for name in _unique(n for fmt in self.output_formats for n in self.precision[fmt]):
            fmt = next(f for f in self.output_formats if name in self.precision[f])
            params: dict[str, Any] = {OUTPUT_FORMAT: fmt, precision_param(fmt): name}
            params.update(_defaults(name, self._receives(name, fmt)))
            if self.structure:
                params[STRUCTURE] = NONE
            if space._excludes(name, fmt):
                params[f"{name}.exclude"] = 0
            found.append(params)
        fmt = self.output_formats[0]
        for name in self.structure:
            params = {OUTPUT_FORMAT: fmt, precision_param(fmt): NONE, STRUCTURE_ALONE: name}
            params.update(_defaults(name, self.model_format))
            if self.recovery:
                params[RECOVERY] = NONE
            found.append(params)
        return [dict(p) for p in {json.dumps(p, sort_keys=True): p for p in found}.values()]

    def _mixed_precision(self, sensitivity: Mapping[str, LayerSensitivity]) -> dict[str, Any] | None:  # fmt: skip
        """The int8 recipe that keeps the sensitive layers float, when the analysis found any."""
        sensitive = sensitive_layers(sensitivity)
        counts = [k for k in self.exclude_counts if k]
        if not sensitive or not counts:
            return None
        keep = max([k for k in counts if k <= len(sensitive)] or [counts[0]])
        for fmt in self.output_formats:
            for name in ("quantize.static", "quantize.dynamic", "quantize.weight_only"):
                if name in self.precision.get(fmt, ()) and self._excludes(name, fmt):
                    params: dict[str, Any] = {OUTPUT_FORMAT: fmt, precision_param(fmt): name}
                    params.update(_defaults(name, self._receives(name, fmt)))
                    params[f"{name}.exclude"] = keep
                    if self.structure:
                        params[STRUCTURE] = NONE
                    return params
        return None

    def grid(self) -> dict[str, list[Any]]:
        """Every study parameter with the values a grid search tries (``GridSampler``)."""
        grid: dict[str, list[Any]] = {OUTPUT_FORMAT: list(self.output_formats)}
        steps = {(name, self.model_format) for name in (*self.structure, *self.recovery)}
        for fmt in self.output_formats:
            grid[precision_param(fmt)] = self._precision(fmt)
            steps |= {(name, self._receives(name, fmt)) for name in self.precision[fmt]}
            for name in self.precision[fmt]:
                if self._excludes(name, fmt):
                    grid[f"{name}.exclude"] = list(self.exclude_counts)
        if self.structure:
            grid[STRUCTURE] = self._structure(alone=False)
            grid[STRUCTURE_ALONE] = self._structure(alone=True)
        if self.recovery and self.structure:
            grid[RECOVERY] = [NONE, *self.recovery]
        for name, fmt in sorted(steps):
            for study_name, dist in searched_params(name, fmt).values():
                grid[study_name] = dist.grid()
        return grid


def _unique(names: Any) -> list[str]:
    return list(dict.fromkeys(names))


@cache
def searched_params(method_name: str, fmt: str) -> dict[str, tuple[str, Distribution]]:
    """By param: its study name and distribution for a step that gets a ``fmt`` model.

    A Choice value the params model refuses for ``fmt`` (``per_channel=false`` on pt2) is
    left out; the param is then named ``<method>.<param>@<fmt>``, since one study name
    must keep one distribution.
    """
    method = get_method(method_name)
    searchable = method.search
    assert searchable is not None
    found: dict[str, tuple[str, Distribution]] = {}
    for param, dist in searchable.params.items():
        name = f"{method_name}.{param}"
        if isinstance(dist, Choice):
            kept = tuple(v for v in dist.values if _valid(method, {param: v}, fmt))
            if kept and kept != dist.values:
                dist, name = Choice(kept), f"{name}@{fmt}"
        found[param] = (name, dist)
    return found


def _valid(method: Method, params: dict[str, Any], fmt: str) -> bool:
    assert method.search is not None
    try:
        method.validate_params({**method.search.defaults, **params}, fmt)
    except ValidationError:
        return False
    return True


def _suggest_params(trial: SuggestingTrial, method_name: str, fmt: str) -> dict[str, Any]:
    return {
        param: _suggest(trial, name, dist)
        for param, (name, dist) in searched_params(method_name, fmt).items()
    }


def _suggest(trial: SuggestingTrial, name: str, dist: Distribution) -> Any:
    if isinstance(dist, Choice):
        return trial.suggest_categorical(name, list(dist.values))
    if dist.integer:
        step = int(dist.step or 1)
        return trial.suggest_int(name, int(dist.low), int(dist.high), step=step, log=dist.log)
    value = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return round(value, 6)


def _defaults(name: str, fmt: str) -> dict[str, Any]:
    """The study parameters of a method's known-good (default) params, for a ``fmt`` model."""
    method = get_method(name)
    searchable = method.search
    assert searchable is not None
    found = {}
    for param, (study_name, dist) in searched_params(name, fmt).items():
        if param in searchable.defaults:
            value = searchable.defaults[param]
        else:
            value = method.params.model_fields[param].default
        found[study_name] = value
        assert dist.contains(value), f"{name}.{param}: default {value!r} outside {dist}"
    return found


def default_params(method: Method) -> dict[str, Any]:
    """A searched method's known-good params: its declared defaults (the params model
    supplies the rest)."""
    assert method.search is not None
    return dict(method.search.defaults)


def ranking(sensitivity: Mapping[str, LayerSensitivity]) -> list[str]:
    """Layer names, the one whose int8-only weights change the output most first."""
    scored = [(s.quantized_cosine, name) for name, s in sensitivity.items() if s.quantized_cosine is not None]  # fmt: skip
    return [name for _, name in sorted(scored)]


def sensitive_layers(sensitivity: Mapping[str, LayerSensitivity]) -> list[str]:
    """The layers the mixed-precision recipe keeps float, most sensitive first."""
    drops = {n: 1.0 - s.quantized_cosine for n, s in sensitivity.items() if s.quantized_cosine is not None}  # fmt: skip
    if not drops:
        return []
    top = max(drops.values())
    limit = max(SENSITIVE_FLOOR, SENSITIVE_SHARE * top)
    return [n for n in ranking(sensitivity) if drops[n] >= limit]


# -- building the space ------------------------------------------------------------------


@dataclass
class _Built:
    space: Space | None
    problems: list[Problem]


def build_space(
    model_format: str,
    datasets: Mapping[str, DatasetInfo],
    device: str = Device.cpu,
    methods: Sequence[str] | None = None,
    runtimes: Sequence[str] | None = None,
    layer_names: Sequence[str] | None = None,
) -> Space:
    """The space for this model, data and device, restricted to ``methods`` / ``runtimes``.

    Raises:
        SpaceError: with every problem (:func:`space_problems`) when it cannot be built.
    """
    built = _build(model_format, datasets, device, methods, runtimes, layer_names, ("search",))
    if built.problems or built.space is None:
        raise SpaceError(built.problems)
    return built.space


def space_problems(
    model_format: str,
    datasets: Mapping[str, DatasetInfo],
    device: str = Device.cpu,
    methods: Sequence[str] | None = None,
    runtimes: Sequence[str] | None = None,
    layer_names: Sequence[str] | None = None,
    loc: Loc = ("search",),
) -> list[Problem]:
    """Every reason the space is empty or a ``methods`` / ``runtimes`` entry cannot be used
    (for the 422 at ``POST /v1/jobs``); empty when the search can run."""
    return _build(model_format, datasets, device, methods, runtimes, layer_names, loc).problems


class SpaceError(Exception):
    """The space cannot be built; ``problems`` says every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(describe(problems))
        self.problems = problems


def _build(
    model_format: str,
    datasets: Mapping[str, DatasetInfo],
    device: str,
    methods: Sequence[str] | None,
    runtimes: Sequence[str] | None,
    layer_names: Sequence[str] | None,
    loc: Loc,
) -> _Built:
    problems: list[Problem] = []
    if model_format not in values(ModelFormat) or not FORMATS[ModelFormat(model_format)].upload:
        msg = f"cannot search a {model_format!r} model"
        return _Built(None, [Problem((*loc,), msg)])
    formats = _output_formats(model_format, device)
    if runtimes is not None:
        wanted = []
        for index, runtime in enumerate(runtimes):
            reachable = [f for f in formats if FORMATS[ModelFormat(f)].runtime == runtime]
            if runtime not in values(RuntimeName):
                known = ", ".join(values(RuntimeName))
                problems.append(Problem((*loc, "runtimes", index), f"unknown runtime {runtime!r}; use {known}"))  # fmt: skip
            elif not reachable:
                problems.append(Problem((*loc, "runtimes", index), _runtime_problem(runtime, model_format, device)))  # fmt: skip
            wanted += reachable
        formats = [f for f in formats if f in wanted]

    searched = [m for m in REGISTRY.values() if m.search is not None]
    if methods is not None:
        chosen = []
        for index, name in enumerate(methods):
            where = (*loc, "methods", index)
            try:
                method = get_method(name)
            except UnknownMethodError as exc:
                problems.append(Problem(where, str(exc)))
                continue
            if method.search is None:
                names = ", ".join(sorted(m.name for m in searched))
                problems.append(Problem(where, f"{name} is not searched (its parameters have no search declaration); searched methods: {names}"))  # fmt: skip
                continue
            unfit = _unfit(method, model_format, datasets, device, formats, layer_names)
            if unfit is not None:
                why, code = unfit
                msg = f"{name} cannot be searched for this model: {why}"
                problems.append(Problem(where, msg, code))
                continue
            chosen.append(method)
        searched = chosen
    if problems:
        return _Built(None, problems)

    def fits(method: Method, fmt: str) -> bool:
        return not _check(method, model_format, fmt, datasets, device, layer_names)

    by_role = {role: [m for m in searched if m.search and m.search.role == role] for role in SearchRole}  # fmt: skip
    structure = tuple(m.name for m in by_role[SearchRole.structure] if fits(m, model_format))
    recovery = tuple(m.name for m in by_role[SearchRole.recovery] if fits(m, model_format))
    if not structure:
        recovery = ()
    precision = {
        fmt: tuple(m.name for m in by_role[SearchRole.precision] if fits(m, fmt)) for fmt in formats
    }
    usable = [f for f in formats if precision[f] or structure]
    if not usable:
        reasons = _empty_reasons(searched, model_format, datasets, device, formats, layer_names)
        return _Built(None, [Problem((*loc,), "no recipe fits this model, its datasets and the target: " + reasons)])  # fmt: skip
    ordered = [f for f in PREFERRED_FORMATS if f in usable] + [f for f in usable if f not in PREFERRED_FORMATS]  # fmt: skip
    space = Space(
        model_format=str(model_format),
        output_formats=tuple(str(f) for f in ordered),
        structure=structure,
        recovery=recovery,
        precision={str(f): precision[f] for f in ordered},
        layer_names=tuple(layer_names) if layer_names is not None else None,
    )
    return _Built(space, [])


def _output_formats(model_format: str, device: str) -> list[str]:
    facts = FORMATS[ModelFormat(model_format)]
    candidates = [ModelFormat(model_format), *sorted(facts.converts_to)]
    return [str(f) for f in candidates if device in FORMATS[f].devices]


def _runtime_problem(runtime: str, model_format: str, device: str) -> str:
    makers = [f for f, facts in FORMATS.items() if facts.runtime == runtime]
    made = ", ".join(f"{f} ({', '.join(sorted(FORMATS[f].devices))})" for f in makers)
    return (
        f"runtime {runtime!r} is not reachable from a {model_format} model on a {device} "
        f"worker (it runs artifacts in {made}; a {model_format} model can be delivered as "
        f"{', '.join(_output_formats(model_format, device))})"
    )


def _check(
    method: Method,
    model_format: str,
    output_format: str,
    datasets: Mapping[str, DatasetInfo],
    device: str,
    layer_names: Sequence[str] | None,
) -> list[Problem]:
    """The pipeline check of this method alone, with its known-good params."""
    request = PipelineRequest(
        model_format=model_format,
        steps=[(method.name, default_params(method))],
        output_format=output_format,
        device=device,
        datasets=datasets,
        layer_names=layer_names,
    )
    return check_pipeline(request)


def _unfit(
    method: Method,
    model_format: str,
    datasets: Mapping[str, DatasetInfo],
    device: str,
    formats: Sequence[str],
    layer_names: Sequence[str] | None,
) -> tuple[str, ErrorCode] | None:
    """Why ``method`` fits none of the output formats (the first format's reasons)."""
    assert method.search is not None
    candidates = formats if method.search.role == SearchRole.precision else [model_format]
    first: list[Problem] | None = None
    for fmt in candidates:
        found = _check(method, model_format, fmt, datasets, device, layer_names)
        if not found:
            return None
        first = first or found
    if first is None:
        return "no output format is left for it (see runtimes)", ErrorCode.unsupported
    return "; ".join(_reason(p) for p in first), first[0].code


def _reason(problem: Problem) -> str:
    where = ".".join(str(p) for p in problem.loc if not isinstance(p, int) and p != "pipeline")
    return f"{where}: {problem.msg}" if where and where not in ("method",) else problem.msg


def _empty_reasons(
    searched: Sequence[Method],
    model_format: str,
    datasets: Mapping[str, DatasetInfo],
    device: str,
    formats: Sequence[str],
    layer_names: Sequence[str] | None,
) -> str:
    if not formats:
        return "no output format is left (see runtimes)"
    if not searched:
        return "no method is searched"
    parts = []
    for method in searched:
        unfit = _unfit(method, model_format, datasets, device, formats, layer_names)
        if unfit is not None:
            parts.append(f"{method.name}: {unfit[0]}")
    return "; ".join(parts)
