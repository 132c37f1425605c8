"""Selection: Pareto set, the best trial, the closest one when none is feasible, intervals,
and the held-out verification of a candidate against the original."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import factories
from worker.constraints import Constraints
from worker.context import NullReporter
from worker.data import load_dataset
from worker.errors import EngineError
from worker.search.selection import (
    choose,
    closest,
    held_out_latency,
    mean_interval,
    pareto,
    verify_holdout,
    wilson_interval,
)
from worker.search.splits import split_eval


def _trial(number: int, latency: float, size: float, *, feasible: bool = True,
           status: str = "succeeded", accuracy: float = 0.95) -> dict[str, Any]:  # fmt: skip
    return {
        "number": number,
        "status": status,
        "objectives": {"latency": latency, "size": size, "accuracy": accuracy},
        "feasible": feasible,
        "metrics": {
            "original": {"size_bytes": 1000, "accuracy": 0.96, "latency_ms": {
                "batch_1": {"p50": 2.0, "p95": 2.0, "mean": 2.0}}},
            "compressed": {"size_bytes": int(size), "accuracy": accuracy, "latency_ms": {
                "batch_1": {"p50": latency, "p95": latency, "mean": latency}}},
            "ratios": {"speedup": {"batch_1": 2.0 / latency}},
        },
    }  # fmt: skip


TRIALS = [
    _trial(0, 1.0, 500),
    _trial(1, 0.5, 800),  # fastest
    _trial(2, 1.2, 900),  # dominated by 0
    _trial(3, 0.4, 300, feasible=False),  # dominates all, infeasible
    _trial(4, 0.5, 700),  # as fast as 1, smaller: dominates 1
    {"number": 5, "status": "failed", "error": {"code": "method_failed", "message": "x"}},
]


def test_pareto_and_choice() -> None:
    # a feasible trial dominates every infeasible one: 3, faster and smaller, is not on the
    # front while trials meet the constraints; when none does, the front is of them all
    assert pareto(TRIALS, ["latency", "size"]) == [0, 4]
    assert pareto([{**t, "feasible": False} for t in TRIALS], ["latency", "size"]) == [3]
    # the best is feasible, Pareto among the feasible, best on latency, then size
    assert choose(TRIALS, ["latency", "size"]) == 4
    assert choose(TRIALS, ["size", "latency"]) == 0
    # accuracy is maximized
    better = [_trial(0, 1.0, 500, accuracy=0.9), _trial(1, 1.0, 500, accuracy=0.93)]
    assert choose(better, ["accuracy"]) == 1
    assert choose([{**t, "feasible": False} for t in TRIALS], ["latency"]) is None


def test_a_latency_difference_inside_the_held_out_rounds_spread_lets_size_decide() -> None:
    def verified(number: int, latency: float, size: float, speedup: float, spread: float) -> dict:
        paired = {"original_p50": 1.0, "compressed_p50": 1 / speedup, "speedup": speedup,
                  "speedup_range": [speedup - spread, speedup + spread], "rounds": 5}  # fmt: skip
        return {**_trial(number, latency, size), "holdout": {"latency": {"batch_1": paired}}}

    trials = [
        verified(0, 1.0, 500, 10.0, 2.0),  # fastest on the search split and held out
        verified(1, 1.1, 300, 9.5, 1.5),  # within the spread of 0's rounds, smaller
        verified(2, 2.0, 100, 4.0, 0.2),  # smallest, clearly slower
    ]
    first = {t["number"]: held_out_latency(t, 1) for t in trials}
    assert first[1] == pytest.approx((1 / 9.5, 1 / 11.0, 1 / 8.0))
    assert choose(trials, ["latency", "size"]) == 0  # the search split alone
    assert choose(trials, ["latency", "size"], first) == 1
    assert choose(trials, ["latency"], first) == 0  # no next objective: the faster one
    narrow = [verified(0, 1.0, 500, 10.0, 0.1), verified(1, 1.1, 300, 9.5, 0.1)]
    assert choose(narrow, ["latency", "size"], {t["number"]: held_out_latency(t, 1) for t in narrow}) == 0  # fmt: skip
    assert held_out_latency(_trial(3, 1.0, 1), 1) is None  # not verified


def test_closest_names_each_unmet_constraint_with_the_nearest_value() -> None:
    constraints = Constraints(latency_ms={"batch_1": 0.3}, size_bytes=600, accuracy_drop=0.02)
    nearest, unmet = closest(TRIALS, constraints)
    assert nearest == 3  # latency 0.4 (a third over) and size met
    assert [(u.constraint, u.closest, u.trial) for u in unmet] == [("latency_ms.batch_1", 0.4, 3)]
    # each met by some trial, never all by one: the nearest trial's misses
    nearest, unmet = closest(TRIALS, Constraints(latency_ms={"batch_1": 0.45}, size_bytes=400))
    assert nearest == 3
    assert unmet == [] or all(u.trial == nearest for u in unmet)
    nothing, unmet = closest(TRIALS[-1:], Constraints(size_bytes=10))
    assert nothing is None and unmet[0].closest is None


def test_intervals() -> None:
    low, high = wilson_interval(90, 100)
    assert 0.82 < low < 0.84 and 0.94 < high < 0.95
    assert wilson_interval(100, 100)[1] == 1.0
    assert mean_interval([0.99, 0.99]) == [0.99, 0.99]
    low, high = mean_interval([0.9, 1.0, 0.95, 0.97])
    assert low < 0.955 < high <= 1.0


def test_verify_holdout_against_the_original(files: dict[str, Path], tmp_path: Path) -> None:
    _, holdout = split_eval(files["eval"], 0.3, seed=0, out_dir=tmp_path / "splits")
    figures = verify_holdout(
        (files["pt2"], "pt2"), (files["onnx"], "onnx"), holdout, {},
        Constraints(accuracy_drop=0.01, cosine_similarity=0.999, speedup={"batch_1": 100.0}),
        [1], "cpu", tmp_path, NullReporter(),
    )  # fmt: skip
    assert figures.n == load_dataset(holdout).num_samples
    assert figures.accuracy is not None and figures.original_accuracy is not None
    assert figures.accuracy.n == figures.n
    assert figures.accuracy.ci95[0] <= figures.accuracy.value <= figures.accuracy.ci95[1]
    assert figures.ci95 == figures.accuracy.ci95
    assert abs(figures.accuracy_drop or 0.0) < 0.02  # the same network in another runtime
    assert figures.cosine_similarity is not None and figures.cosine_similarity.value > 0.9999
    paired = figures.latency["batch_1"] if figures.latency else None
    assert paired is not None and paired.rounds == 5
    assert paired.speedup_range[0] <= paired.speedup <= paired.speedup_range[1]
    # a 100x speedup is not what converting to ONNX gives: the one violation
    assert [v.constraint for v in figures.violations or []] == ["speedup.batch_1"]
    assert figures.feasible is False


def test_verify_holdout_needs_matching_data(files: dict[str, Path], tmp_path: Path) -> None:
    wrong = factories.write_npz(tmp_path / "wrong.npz", np.zeros((40, 3), np.float32))
    with pytest.raises(EngineError):
        verify_holdout((files["pt2"], "pt2"), (files["onnx"], "onnx"), wrong, {}, Constraints(),
                       [1], "cpu", tmp_path, NullReporter())  # fmt: skip


def test_when_the_held_out_split_refutes_the_front_the_next_front_is_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import search_tasks
    from worker.schemas import HoldoutFigures, Violation
    from worker.search import selection
    from worker.search.spec import SearchSpec

    class Store:
        def get_to_file(self, key: str, path: Path) -> None:
            path.write_bytes(key.encode())

    verified: list[str] = []

    def verify(original: Any, candidate: tuple[Path, str], *args: Any) -> HoldoutFigures:
        verified.append(candidate[0].read_text())
        refuted = candidate[0].read_text() == "trial-2"  # 2, the front's only trial, fails
        violations = [Violation(constraint="accuracy_drop", bound=0.01, measured=0.05)]
        return HoldoutFigures(n=50, feasible=not refuted, violations=violations if refuted else [])

    monkeypatch.setattr(search_tasks, "get_store", Store)
    monkeypatch.setattr(selection, "verify_holdout", verify)
    table = [_trial(0, 1.0, 500), _trial(1, 0.6, 800), _trial(2, 0.4, 400)]
    artifacts = {t["number"]: {"format": "onnx", "model": {"key": f"trial-{t['number']}"}} for t in table}  # fmt: skip
    spec = SearchSpec.model_validate({"constraints": {"accuracy_drop": 0.01}})
    job_spec = {"evaluate": {"batch_sizes": [1]}, "target": {"device": "cpu"}}
    verdict = search_tasks.decide(
        table, spec, job_spec, artifacts, {"key": "holdout", "suffix": ".npz"},
        ("model", "onnx"), tmp_path, NullReporter(),
    )  # fmt: skip
    assert verified == ["trial-2", "trial-0", "trial-1"]  # 2's front, then {0, 1}
    assert verdict.met and verdict.best == 1 and verdict.pareto == [0, 1]
    assert table[2]["holdout"]["feasible"] is False  # 2's figures stay in its entry
