"""Constraints: the spec check and the verdict on measured metrics (worker/constraints.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from worker.constraints import Constraints, constraint_problems, unmet_message, violations
from worker.schemas import PipelineMetrics
from worker.spec import DatasetInfo


def metrics(**compressed: object) -> PipelineMetrics:
    return PipelineMetrics.model_validate(
        {
            "original": {"size_bytes": 1000, "accuracy": 0.97, "latency_ms": _lat(1.0)},
            "compressed": {"size_bytes": 200, "accuracy": 0.955, "latency_ms": _lat(0.4)}
            | compressed,
            "fidelity": {"cosine_similarity": 0.995, "mse": 0.1, "max_abs_error": 0.2},
            "ratios": {"size": 5.0, "speedup": {"batch_1": 2.5}},
        }
    )


def _lat(p50: float) -> dict[str, dict[str, float]]:
    return {"batch_1": {"p50": p50, "p95": p50 * 1.2, "mean": p50}}


def test_met_constraints_give_no_violation() -> None:
    bounds = Constraints(
        accuracy_drop=0.02,
        cosine_similarity=0.99,
        latency_ms={"batch_1": 0.5},
        size_bytes=200,
        speedup={"batch_1": 2.5},
    )
    assert violations(bounds, metrics()) == []


def test_each_violation_names_the_bound_and_the_measured_value() -> None:
    bounds = Constraints(accuracy_drop=0.01, latency_ms={"batch_1": 0.3}, speedup={"batch_1": 3})
    found = violations(bounds, metrics())
    assert [(v.constraint, v.bound) for v in found] == [
        ("accuracy_drop", 0.01),
        ("latency_ms.batch_1", 0.3),
        ("speedup.batch_1", 3.0),
    ]
    assert found[0].measured == pytest.approx(0.015)
    message = unmet_message(found)
    assert "accuracy_drop ≤ 0.01: measured 0.015" in message
    assert "speedup.batch_1 ≥ 3: measured 2.5" in message


def test_a_figure_not_measured_violates_its_bound() -> None:
    found = violations(Constraints(latency_ms={"batch_32": 1.0}), metrics())
    assert found[0].constraint == "latency_ms.batch_32" and found[0].measured is None
    assert "not measured" in found[0].describe()


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValidationError, match="batch size key"):
        Constraints(latency_ms={"b1": 1.0})
    with pytest.raises(ValidationError, match="greater than 0"):
        Constraints(speedup={"batch_1": 0})
    with pytest.raises(ValidationError):
        Constraints(accuracy_drop=2)
    with pytest.raises(ValidationError):
        Constraints.model_validate({"accuracy": 0.9})


def test_problems_name_missing_data_and_unmeasured_batch_sizes() -> None:
    bounds = Constraints(accuracy_drop=0.01, latency_ms={"batch_32": 1.0})
    problems = constraint_problems(
        bounds, datasets={"eval": DatasetInfo(has_labels=False)}, batch_sizes=[1]
    )
    assert [p.loc for p in problems] == [
        ("constraints", "accuracy_drop"),
        ("constraints", "latency_ms", "batch_32"),
    ]
    assert "cosine_similarity" in problems[0].msg
    assert "evaluate.batch_sizes" in problems[1].msg
    assert constraint_problems(Constraints(cosine_similarity=0.9), datasets={}, batch_sizes=[1])
    assert not constraint_problems(
        bounds, datasets={"eval": DatasetInfo(has_labels=True)}, batch_sizes=[1, 32]
    )
