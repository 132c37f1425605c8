"""The ``search`` of a job spec (DESIGN §10): its model and its check, torch-free.

``POST /v1/jobs`` validates a search with :class:`SearchSpec` and answers 422 with every
:class:`~worker.spec.Problem` that :func:`check_search` finds: constraints that need data
not given (through :func:`worker.constraints.constraint_problems`), objectives that cannot
be measured, and a search space that is empty for this model, data and device (through
:func:`worker.search.space.space_problems`). The worker reads the stored spec back with
the same model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.constraints import Constraints, constraint_problems
from worker.contract import DatasetRole, ErrorCode, Objective, RuntimeName
from worker.spec import DatasetInfo, Loc, Problem

MAX_TRIALS = 500
MAX_PARALLEL_TRIALS = 64
MIN_SECONDS = 10
MAX_SECONDS = 7 * 24 * 3600


class Strategy(StrEnum):
    """The Optuna sampler that proposes trials."""

    tpe = "tpe"
    """Multi-objective TPE (Optuna's TPESampler)."""
    nsga2 = "nsga2"
    """The NSGA-II genetic algorithm."""
    random = "random"
    grid = "grid"
    """Every point of the space in turn (ranges in their steps), until the budget ends."""


class Budget(BaseModel):
    """When a search stops: whichever of `max_trials` and `max_seconds` comes first."""

    model_config = ConfigDict(extra="forbid")

    max_trials: int = Field(
        24,
        ge=1,
        le=MAX_TRIALS,
        description="Trials to run at most (a retried trial counts once).",
    )
    max_seconds: int = Field(
        3600,
        ge=MIN_SECONDS,
        le=MAX_SECONDS,
        description=(
            "Wall-clock seconds from the start of the search (sensitivity analysis included) "
            "after which no trial starts; trials still running are stopped, and the search "
            "ends with the best so far."
        ),
    )
    parallel_trials: int = Field(
        2,
        ge=1,
        le=MAX_PARALLEL_TRIALS,
        description=(
            "Trials queued or running at once; as many run in parallel as there are free "
            "workers on the target queue."
        ),
    )


class SearchSpec(BaseModel):
    """A search instead of a pipeline: squish finds the recipe (DESIGN §10).

    Example:
        ``{"objectives": ["latency", "size"], "constraints": {"accuracy_drop": 0.01},
        "budget": {"max_trials": 24, "parallel_trials": 4}, "strategy": "tpe", "seed": 0}``
    """

    model_config = ConfigDict(extra="forbid")

    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective.latency, Objective.size],
        min_length=1,
        max_length=3,
        description=(
            "1 to 3 distinct objectives, the first one deciding the best trial: `latency` "
            "(p50 at the first batch size) and `size` (bytes) are minimized, `accuracy` and "
            "`fidelity` (cosine similarity to the original) maximized."
        ),
    )
    constraints: Constraints = Field(
        default_factory=Constraints,
        description="Bounds a trial must meet to be feasible; the same names as a pipeline's.",
    )
    methods: list[str] | None = Field(
        None,
        min_length=1,
        max_length=50,
        description="Restrict the space to these methods (names from GET /v1/methods).",
    )
    runtimes: list[RuntimeName] | None = Field(
        None,
        min_length=1,
        description="Restrict the artifact's runtime to these (`torch`, `inductor`, `onnxruntime`).",
    )
    budget: Budget = Field(default_factory=Budget)
    strategy: Strategy = Field(Strategy.tpe, description="How trials are proposed.")
    seed: int | None = Field(
        None, ge=0, le=2**31 - 1, description="Makes the proposals reproducible."
    )
    holdout_fraction: float = Field(
        0.3,
        ge=0.1,
        le=0.5,
        description=(
            "Share of the eval dataset held out: trials are ranked on the rest, and the "
            "constraints of the Pareto set are verified on the held-out part only."
        ),
    )

    @field_validator("objectives")
    @classmethod
    def _distinct(cls, value: list[Objective]) -> list[Objective]:
        if len(set(value)) != len(value):
            raise ValueError("each objective may be named once")
        return value

    @field_validator("methods")
    @classmethod
    def _distinct_methods(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("each method may be named once")
        return value

    @field_validator("runtimes")
    @classmethod
    def _distinct_runtimes(cls, value: list[RuntimeName] | None) -> list[RuntimeName] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("each runtime may be named once")
        return value


def check_search(
    search: SearchSpec,
    *,
    model_format: str,
    datasets: Mapping[str, DatasetInfo],
    device: str,
    batch_sizes: Sequence[int],
    layer_names: Sequence[str] | None = None,
    loc: Loc = ("search",),
) -> list[Problem]:
    """Every reason this search cannot run on this model with these datasets; empty if it can."""
    from worker.search.space import space_problems

    problems: list[Problem] = []
    evaluation = datasets.get(DatasetRole.eval)
    if evaluation is None:
        problems.append(
            Problem(
                ("datasets", "eval"),
                "a search needs an eval dataset: trials are ranked on one part of it and the "
                "constraints verified on another, held-out part",
                ErrorCode.dataset_mismatch,
            )
        )
    elif Objective.accuracy in search.objectives and evaluation.has_labels is False:
        problems.append(
            Problem(
                (*loc, "objectives"),
                "accuracy needs a labelled eval dataset (datasets.eval with labels); without "
                "labels, use the objective fidelity instead",
                ErrorCode.dataset_mismatch,
            )
        )
    problems += constraint_problems(
        search.constraints, datasets=datasets, batch_sizes=batch_sizes, loc=(*loc, "constraints")
    )
    problems += space_problems(
        model_format,
        datasets,
        device,
        search.methods,
        [str(r) for r in search.runtimes] if search.runtimes is not None else None,
        layer_names,
        loc=loc,
    )
    return problems
