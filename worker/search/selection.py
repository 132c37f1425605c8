"""Choosing among a search's trials: Pareto set, best trial, verdict, held-out verification.

DESIGN §10 and §12 say what each means.

Trials are ``metrics.search.trials`` entries (dicts, or :class:`worker.schemas.SearchTrial`
models). Only succeeded trials with every objective measured are ranked. Feasibility is
:func:`worker.constraints.violations`' verdict, the one a pipeline job's constraints get.
:func:`verify_holdout` imports torch (lazily); the rest is torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from worker.constraints import Constraints, bounds, excess, measured, violations
from worker.context import Reporter, ScaledReporter
from worker.contract import Objective, TrialStatus
from worker.schemas import (
    Fidelity,
    HoldoutFigures,
    Interval,
    Latency,
    ModelMetrics,
    PipelineMetrics,
    Ratios,
    SearchTrial,
    Unmet,
)

Z95 = 1.959963984540054
PAIRED_ROUNDS = 5
PAIRED_WARMUP = 2
PAIRED_ITERATIONS = 10
UNMEASURED = math.inf
"""How far from its bound a figure that was not measured counts (never nearest)."""

TrialLike = Mapping[str, Any] | SearchTrial


def _entry(trial: TrialLike) -> dict[str, Any]:
    return trial.to_json() if isinstance(trial, SearchTrial) else dict(trial)


def _ranked(trials: Sequence[TrialLike], objectives: Sequence[str]) -> list[tuple[int, list[float]]]:  # fmt: skip
    """``(number, values)`` of the succeeded trials with every objective, signed so that
    smaller is better."""
    found = []
    for trial in map(_entry, trials):
        values = trial.get("objectives") or {}
        if trial.get("status") != TrialStatus.succeeded:
            continue
        if any(values.get(str(o)) is None for o in objectives):
            continue
        signed = [
            -float(values[str(o)]) if Objective(o).maximized else float(values[str(o)])
            for o in objectives
        ]
        found.append((int(trial["number"]), signed))
    return found


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def pareto(trials: Sequence[TrialLike], objectives: Sequence[str]) -> list[int]:
    """Numbers of the succeeded trials that no other succeeded trial dominates, a feasible
    trial dominating every infeasible one: while any trial meets the constraints, the front
    of those that do; otherwise the front of them all."""
    entries = [_entry(t) for t in trials]
    feasible = [t for t in entries if t.get("feasible")]
    ranked = _ranked(feasible or entries, objectives)
    return sorted(
        number
        for number, values in ranked
        if not any(_dominates(other, values) for n, other in ranked if n != number)
    )


Repeated = tuple[float, float, float]
"""``(value, low, high)`` of a figure measured in repeated rounds (smaller is better)."""


def choose(
    trials: Sequence[TrialLike],
    objectives: Sequence[str],
    first: Mapping[int, Repeated] | None = None,
) -> int | None:
    """The best trial (DESIGN §12): of the feasible trials, the Pareto one best on the first
    objective, then the next (ties: the lower number); None when none is feasible.

    ``first``, by trial number, replaces the first objective's figure with a repeated
    measurement (:func:`held_out_latency`), and only the trials it names are candidates.
    A trial whose ``[low, high]`` reaches the best one's is tied with it on that objective,
    and the next objective decides between them: a latency difference inside the rounds'
    spread does not choose the model, its size does.
    """
    feasible = [t for t in trials if _entry(t).get("feasible")]
    ranked = _ranked(feasible, objectives)
    if not ranked:
        return None
    front = set(pareto(feasible, objectives))
    candidates = [(values, number) for number, values in ranked if number in front]
    if first is None:
        return min(candidates)[1]
    measured = [(first[n], values, n) for values, n in candidates if n in first]
    if not measured:
        return None
    best = min(measured, key=lambda c: (c[0][0], c[1], c[2]))
    tied = [c for c in measured if c[0][1] <= best[0][2]]
    return min(tied, key=lambda c: (c[1][1:], c[0][0], c[2]))[2]


def held_out_latency(trial: TrialLike, batch: int) -> Repeated | None:
    """A verified trial's latency at ``batch`` relative to the original's, from its held-out
    paired rounds: ``1 / speedup`` with the spread of the per-round speedups. Relative, so
    that trials verified one after another compare whatever the machine did in between."""
    figures = (_entry(trial).get("holdout") or {}).get("latency") or {}
    paired = figures.get(f"batch_{batch}")
    if not paired or not paired.get("speedup"):
        return None
    low, high = paired.get("speedup_range") or [paired["speedup"]] * 2
    if not low or not high:
        return None
    return 1.0 / float(paired["speedup"]), 1.0 / float(high), 1.0 / float(low)


def _metrics(trial: Mapping[str, Any]) -> PipelineMetrics | None:
    if trial.get("status") != TrialStatus.succeeded or not trial.get("metrics"):
        return None
    return PipelineMetrics.model_validate(trial["metrics"])


def _distance(constraint: str, bound: float, value: float | None) -> float:
    """How far ``value`` is past the bound, relative to it (<= 0: met)."""
    return UNMEASURED if value is None else excess(constraint, bound, value)


def closest(trials: Sequence[TrialLike], constraints: Constraints) -> tuple[int | None, list[Unmet]]:  # fmt: skip
    """When no trial is feasible: the trial nearest to meeting every constraint (smallest sum
    of relative excesses), and what is unmet.

    ``unmet`` lists each constraint that no trial met, with the value nearest its bound any
    trial measured; when each was met by some trial but never all by one, it lists those
    the nearest trial misses, with that trial's values.
    """
    flat = bounds(constraints)
    measured_by: list[tuple[int, dict[str, float | None]]] = []
    for trial in map(_entry, trials):
        metrics = _metrics(trial)
        if metrics is not None:
            values = {c: measured(c, metrics) for c in flat}
            measured_by.append((int(trial["number"]), values))
    if not measured_by:
        return None, [Unmet(constraint=c, bound=b) for c, b in flat.items()]

    def excess(values: Mapping[str, float | None]) -> float:
        return sum(max(0.0, _distance(c, b, values[c])) for c, b in flat.items())

    nearest, nearest_values = min(measured_by, key=lambda item: (excess(item[1]), item[0]))
    unmet = []
    for constraint, bound in flat.items():
        scored = [
            (_distance(constraint, bound, values[constraint]), number, values[constraint])
            for number, values in measured_by
        ]
        distance, number, value = min(scored, key=lambda s: (s[0], s[1]))
        if distance > 1e-9:
            unmet.append(Unmet(constraint=constraint, bound=bound, closest=value, trial=number))
    if not unmet:
        for constraint, bound in flat.items():
            value = nearest_values[constraint]
            if _distance(constraint, bound, value) > 1e-9:
                unmet.append(Unmet(constraint=constraint, bound=bound, closest=value, trial=nearest))  # fmt: skip
    for item in unmet:
        if item.closest is None:
            item.trial = None
    return nearest, unmet


# -- intervals ---------------------------------------------------------------------------


def wilson_interval(successes: int, n: int) -> list[float]:
    """The Wilson score 95 % interval of a proportion ``successes / n``."""
    if n <= 0:
        return [0.0, 1.0]
    p = successes / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    return [max(0.0, centre - half), min(1.0, centre + half)]


def mean_interval(values: Sequence[float], low: float = -1.0, high: float = 1.0) -> list[float]:
    """The normal-approximation 95 % interval of a mean, clipped to ``[low, high]``."""
    n = len(values)
    if n == 0:
        return [low, high]
    mean = sum(values) / n
    if n == 1:
        return [mean, mean]
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = Z95 * math.sqrt(variance / n)
    return [max(low, mean - half), min(high, mean + half)]


# -- the held-out verification -------------------------------------------------------------


def verify_holdout(
    original: tuple[Path, str],
    candidate: tuple[Path, str],
    holdout: Path,
    datasets: Mapping[str, Path],
    constraints: Constraints,
    batch_sizes: Sequence[int],
    device: str,
    work_dir: Path,
    reporter: Reporter,
) -> HoldoutFigures:
    """A candidate's figures on the held-out split, against the original measured in the same
    run: accuracy of both (labelled data), output cosine, each with ``n`` and a 95 %
    interval; latency in :data:`PAIRED_ROUNDS` alternating rounds against the original
    (median and spread of the speedup); and the constraints judged on these figures.

    ``datasets`` are the job's other datasets (not used for the figures; kept so the
    verification can tokenize as the trials did). Raises EngineError when the held-out
    data does not fit the model or a model fails to run.
    """
    import numpy as np

    from worker.data import fit_dataset, load_dataset
    from worker.errors import UnsupportedError
    from worker.formats import Runtime
    from worker.measurement.fidelity import (
        FIDELITY_BATCH,
        accuracy,
        compare_outputs,
        is_token_output,
        pool_token_outputs,
        sample_cosines,
    )
    from worker.measurement.latency import paired_latency, runnable_batch_sizes
    from worker.measurement.runs import run_loaded
    from worker.measurement.size import file_size

    del datasets, work_dir  # the held-out split is all the figures need
    reporter.progress(0.0, "verify_holdout")
    before = Runtime(Path(original[0]), original[1], device)
    after = Runtime(Path(candidate[0]), candidate[1], device)
    data = load_dataset(Path(holdout), before.model)
    feeds = fit_dataset(before.model, "eval", data)
    reference = run_loaded(before, feeds, FIDELITY_BATCH, reporter=ScaledReporter(reporter, 0.0, 0.15))  # fmt: skip
    outputs = run_loaded(after, feeds, FIDELITY_BATCH, reporter=ScaledReporter(reporter, 0.15, 0.3))  # fmt: skip
    n = data.num_samples
    figures = HoldoutFigures(n=n)
    pooled_ref, pooled_out = (
        pool_token_outputs(reference, feeds),
        pool_token_outputs(outputs, feeds),
    )
    fidelity: Fidelity | None = None
    try:
        cosines = sample_cosines(pooled_ref, pooled_out)
        fidelity = compare_outputs(pooled_ref, pooled_out)
    except ValueError as exc:
        reporter.log(f"held-out fidelity not measured: {exc}", "warning")
    else:
        values = [float(c) for c in cosines]
        figures.cosine_similarity = Interval(
            value=float(np.mean(values)), n=len(values), ci95=mean_interval(values)
        )
        if is_token_output(reference[0], feeds):
            fidelity.top1_agreement = None
    accuracies: dict[str, float | None] = {"original": None, "compressed": None}
    if data.labels is not None:
        try:
            accuracies = {
                "original": accuracy(reference, data.labels),
                "compressed": accuracy(outputs, data.labels),
            }
        except UnsupportedError as exc:
            reporter.log(f"held-out accuracy not measured: {exc.message}", "warning")
        else:
            for name, field in (("original", "original_accuracy"), ("compressed", "accuracy")):
                value = accuracies[name]
                assert value is not None
                hits = round(value * n)
                setattr(figures, field, Interval(value=value, n=n, ci95=wilson_interval(hits, n)))
            figures.accuracy_drop = accuracies["original"] - accuracies["compressed"]  # type: ignore[operator]
    constrained = figures.accuracy if figures.accuracy is not None else figures.cosine_similarity
    figures.ci95 = constrained.ci95 if constrained is not None else None

    sizes = sorted(
        set(runnable_batch_sizes(before.model, list(batch_sizes), reporter))
        & set(runnable_batch_sizes(after.model, list(batch_sizes), reporter))
    )
    paired = paired_latency(
        before, after, feeds, sizes, rounds=PAIRED_ROUNDS, warmup=PAIRED_WARMUP,
        iterations=PAIRED_ITERATIONS, reporter=ScaledReporter(reporter, 0.3, 1.0),
    )  # fmt: skip
    figures.latency = paired or None

    def model_metrics(path: Path, which: str, p50: str) -> ModelMetrics:
        latency = {k: _p50_only(getattr(v, p50)) for k, v in paired.items()}
        return ModelMetrics(
            size_bytes=file_size(Path(path)), accuracy=accuracies[which], latency_ms=latency or None
        )

    judged = PipelineMetrics(
        original=model_metrics(original[0], "original", "original_p50"),
        compressed=model_metrics(candidate[0], "compressed", "compressed_p50"),
        fidelity=fidelity,
        ratios=Ratios(speedup={k: v.speedup for k, v in paired.items()} or None),
    )
    found = violations(constraints, judged)
    figures.violations = [v.model_copy() for v in found]
    figures.feasible = not found
    reporter.progress(1.0, "verify_holdout")
    return figures


def _p50_only(p50: float) -> Latency:
    # The constraints read p50 only; the paired figures publish their own summary.
    return Latency(p50=p50, p95=p50, mean=p50)
