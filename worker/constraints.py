"""Constraints on a job's result (DESIGN §10, §12): the bounds, their check, their verdict.

The same names serve a pipeline job (a CI gate: the job fails ``constraints_unmet`` when
its result violates one) and a search (feasibility of each trial). Torch-free: the API
checks a spec's constraints with :func:`constraint_problems` and the engine judges a
result's metrics with :func:`violations`, so both read the bounds the same way.

Directions: ``accuracy_drop`` (absolute, 0.01 = one point, against the original measured
in the same run), ``latency_ms`` (p50 per batch size) and ``size_bytes`` are upper
bounds; ``cosine_similarity`` and ``speedup`` (per batch size) are lower bounds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker import schemas
from worker.contract import DatasetRole, ErrorCode
from worker.schemas import PipelineMetrics
from worker.spec import DatasetInfo, Loc, Problem

BATCH_KEY = re.compile(r"^batch_([1-9][0-9]*)$")


def batch_of(key: str) -> int:
    """``"batch_32"`` → 32; raises ValueError for any other key."""
    match = BATCH_KEY.match(key)
    if match is None:
        raise ValueError(f"{key!r} is not a batch size key: write 'batch_1', 'batch_32', ...")
    return int(match.group(1))


def _per_batch(value: dict[str, float] | None) -> dict[str, float] | None:
    if value is None:
        return None
    if not value:
        raise ValueError("give at least one batch size, e.g. {'batch_1': 2.0}, or leave it out")
    for key, bound in value.items():
        batch_of(key)
        if not bound > 0:
            raise ValueError(f"{key}: the bound must be greater than 0")
    return value


class Constraints(BaseModel):
    """Bounds the result must meet; each one left out is not checked.

    Example:
        ``{"accuracy_drop": 0.01, "latency_ms": {"batch_1": 0.5}, "speedup": {"batch_32": 1.5}}``
    """

    model_config = ConfigDict(extra="forbid")

    accuracy_drop: float | None = Field(
        None,
        ge=0,
        le=1,
        description=(
            "Largest allowed top-1 accuracy drop, absolute (0.01 = one point), against the "
            "original measured in the same run; needs a labelled eval dataset."
        ),
    )
    cosine_similarity: float | None = Field(
        None,
        ge=-1,
        le=1,
        description=(
            "Smallest allowed cosine similarity of the outputs to the original's on the eval "
            "dataset (fidelity.cosine_similarity); needs an eval dataset."
        ),
    )
    latency_ms: dict[str, float] | None = Field(
        None,
        description=(
            "Largest allowed p50 latency in ms, by batch size (`batch_1`, ...); each batch "
            "size must be one of evaluate.batch_sizes."
        ),
    )
    size_bytes: int | None = Field(None, ge=1, description="Largest allowed artifact size, bytes.")
    speedup: dict[str, float] | None = Field(
        None,
        description=(
            "Smallest allowed speedup (original p50 / compressed p50), by batch size "
            "(`batch_1`, ...); each batch size must be one of evaluate.batch_sizes."
        ),
    )

    _per_batch_bounds = field_validator("latency_ms", "speedup")(_per_batch)

    def is_empty(self) -> bool:
        return all(value is None for value in self.model_dump().values())


class Violation(schemas.Violation):
    """One bound the result does not meet (the fields are :class:`worker.schemas.Violation`'s,
    which search results type their violations with)."""

    def describe(self) -> str:
        """``"latency_ms.batch_1 ≤ 0.5: measured 0.71"``."""
        sign = "≥" if is_lower_bound(self.constraint) else "≤"
        got = "not measured" if self.measured is None else f"measured {_figure(self.measured)}"
        return f"{self.constraint} {sign} {_figure(self.bound)}: {got}"


def is_lower_bound(constraint: str) -> bool:
    return constraint.split(".", 1)[0] in ("cosine_similarity", "speedup")


def excess(constraint: str, bound: float, value: float) -> float:
    """How far ``value`` is past ``bound``, relative to the bound: <= 0 when met."""
    over = bound - value if is_lower_bound(constraint) else value - bound
    return over / max(abs(bound), 1e-12)


def _figure(value: float) -> str:
    return f"{value:.4g}"


def constraint_problems(
    constraints: Constraints,
    *,
    datasets: Mapping[str, DatasetInfo],
    batch_sizes: Sequence[int],
    loc: Loc = ("constraints",),
) -> list[Problem]:
    """Every reason these constraints cannot be judged for a job with these inputs."""
    problems: list[Problem] = []
    evaluation = datasets.get(DatasetRole.eval)
    unlabelled = evaluation is None or evaluation.has_labels is False
    if constraints.accuracy_drop is not None and unlabelled:
        problems.append(
            Problem(
                (*loc, "accuracy_drop"),
                "needs a labelled eval dataset (datasets.eval with labels) to measure "
                "accuracy; without labels, bound the outputs with cosine_similarity instead",
                ErrorCode.dataset_mismatch,
            )
        )
    if constraints.cosine_similarity is not None and evaluation is None:
        problems.append(
            Problem(
                (*loc, "cosine_similarity"),
                "needs an eval dataset (datasets.eval): fidelity is judged on real inputs",
                ErrorCode.dataset_mismatch,
            )
        )
    for name in ("latency_ms", "speedup"):
        bounds: dict[str, float] | None = getattr(constraints, name)
        for key in bounds or {}:
            if batch_of(key) not in batch_sizes:
                problems.append(
                    Problem(
                        (*loc, name, key),
                        f"batch size {batch_of(key)} is not measured: add it to "
                        f"evaluate.batch_sizes (now {list(batch_sizes)})",
                    )
                )
    return problems


def measured(constraint: str, metrics: PipelineMetrics) -> float | None:
    """The figure of ``metrics`` a constraint bounds (``latency_ms.batch_1``, ...)."""
    name, _, key = constraint.partition(".")
    if name == "accuracy_drop":
        before, after = metrics.original.accuracy, metrics.compressed.accuracy
        return None if before is None or after is None else before - after
    if name == "cosine_similarity":
        return None if metrics.fidelity is None else metrics.fidelity.cosine_similarity
    if name == "size_bytes":
        size = metrics.compressed.size_bytes
        return None if size is None else float(size)
    if name == "latency_ms":
        latency = (metrics.compressed.latency_ms or {}).get(key)
        return None if latency is None else latency.p50
    if name == "speedup":
        return (metrics.ratios.speedup or {}).get(key)
    raise ValueError(f"unknown constraint {constraint!r}")


def bounds(constraints: Constraints) -> dict[str, float]:
    """``{"accuracy_drop": 0.01, "latency_ms.batch_1": 0.5, ...}``: every bound, flat."""
    flat: dict[str, float] = {}
    for name, value in constraints.model_dump(exclude_none=True).items():
        if isinstance(value, dict):
            flat.update({f"{name}.{key}": float(bound) for key, bound in value.items()})
        else:
            flat[name] = float(value)
    return flat


def violations(constraints: Constraints, metrics: PipelineMetrics) -> list[Violation]:
    """The bounds ``metrics`` does not meet; a figure not measured violates its bound."""
    found: list[Violation] = []
    for constraint, bound in bounds(constraints).items():
        value = measured(constraint, metrics)
        if value is None:
            found.append(Violation(constraint=constraint, bound=bound))
            continue
        # A tiny tolerance: figures are stored rounded, and the bound is inclusive.
        slack = 1e-9 * max(1.0, abs(bound))
        ok = value >= bound - slack if is_lower_bound(constraint) else value <= bound + slack
        if not ok:
            found.append(Violation(constraint=constraint, bound=bound, measured=value))
    return found


def unmet_message(found: Sequence[Violation], *, subject: str = "the result") -> str:
    """The failed job's message: each violated constraint with the measured value."""
    return f"{subject} does not meet its constraints: " + "; ".join(v.describe() for v in found)


def as_dicts(found: Sequence[Violation]) -> list[dict[str, Any]]:
    return [v.model_dump() for v in found]
