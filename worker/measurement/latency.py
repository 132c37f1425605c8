"""Latency: timed runs per batch size, summarized as percentiles."""

from __future__ import annotations

import time

import numpy as np

from worker.context import Reporter
from worker.formats import LoadedModel, Runtime
from worker.measurement.runs import PROGRESS_EVERY_S, make_batch
from worker.measurement.timing_lock import timing
from worker.schemas import Latency, PairedLatency


def runnable_batch_sizes(
    model: LoadedModel, batch_sizes: list[int], reporter: Reporter
) -> list[int]:
    """The batch sizes the model can run; logs the ones skipped."""
    static = model.static_batch
    sizes = sorted(set(batch_sizes))
    if static is None:
        return sizes
    runnable = [b for b in sizes if b == static]
    skipped = [b for b in sizes if b != static]
    if skipped:
        reporter.log(
            f"latency not measured for batch sizes {skipped}: the model's batch dimension "
            f"is static ({static})",
            "warning",
        )
    if not runnable:
        reporter.log(f"latency measured at the model's static batch size {static} instead")
        runnable = [static]
    return runnable


def measure_latency(
    runtime: Runtime,
    inputs: dict[str, np.ndarray],
    sizes: list[int],
    warmup: int,
    iterations: int,
    reporter: Reporter,
    span: tuple[float, float],
) -> dict[str, Latency]:
    """``{"batch_<b>": Latency}`` for each of ``sizes``, progress spread over ``span``."""
    start, end = span
    latency: dict[str, Latency] = {}
    for i, batch in enumerate(sizes):
        share = (
            start + (end - start) * i / len(sizes),
            start + (end - start) * (i + 1) / len(sizes),
        )
        feeds = make_batch(inputs, batch)
        latency[f"batch_{batch}"] = time_runs(runtime, feeds, warmup, iterations, reporter, share)
    return latency


def time_runs(
    runtime: Runtime,
    feeds: dict[str, np.ndarray],
    warmup: int,
    iterations: int,
    reporter: Reporter,
    span: tuple[float, float],
) -> Latency:
    """``warmup`` untimed calls, then ``iterations`` timed ones: p50, p95 and mean in ms.

    Holds the host's timing lock for the runtime's device (:mod:`.timing_lock`): no other
    measurement on this machine runs at the same time.
    """
    start, end = span
    with timing(getattr(runtime, "device", "cpu"), reporter, start):
        last = time.monotonic()
        for _ in range(warmup):
            runtime(feeds)
        times = []
        for i in range(max(1, iterations)):
            t0 = time.perf_counter()
            runtime(feeds)
            times.append((time.perf_counter() - t0) * 1000.0)
            if time.monotonic() - last > PROGRESS_EVERY_S:
                reporter.progress(start + (end - start) * (i + 1) / iterations, "measure")
                last = time.monotonic()
    reporter.progress(end, "measure")
    arr = np.asarray(times)
    return Latency(
        p50=float(np.percentile(arr, 50)),
        p95=float(np.percentile(arr, 95)),
        mean=float(arr.mean()),
    )


def paired_latency(
    original: Runtime,
    candidate: Runtime,
    inputs: dict[str, np.ndarray],
    sizes: list[int],
    *,
    rounds: int,
    warmup: int,
    iterations: int,
    reporter: Reporter,
) -> dict[str, PairedLatency]:
    """Time two models side by side: ``rounds`` rounds per batch size, each timing the
    original then the candidate (the order alternates every round), so drift in the
    machine's speed hits both alike. By batch size: the medians over the rounds of each
    p50 and of the per-round speedup, with the lowest and highest speedup."""
    found: dict[str, PairedLatency] = {}
    total = max(1, len(sizes) * rounds)
    for i, batch in enumerate(sizes):
        feeds = make_batch(inputs, batch)
        for runtime in (original, candidate):  # untimed: first-call costs stay out
            for _ in range(warmup):
                runtime(feeds)
        before: list[float] = []
        after: list[float] = []
        for r in range(rounds):
            at = (i * rounds + r) / total
            span = (at, at)
            order = [(original, before), (candidate, after)]
            for runtime, into in order if r % 2 == 0 else order[::-1]:
                into.append(time_runs(runtime, feeds, 0, iterations, reporter, span).p50)
        speedups = [b / a for b, a in zip(before, after, strict=True) if a > 0]
        found[f"batch_{batch}"] = PairedLatency(
            original_p50=float(np.median(before)),
            compressed_p50=float(np.median(after)),
            speedup=float(np.median(speedups)) if speedups else 0.0,
            speedup_range=[min(speedups, default=0.0), max(speedups, default=0.0)],
            rounds=rounds,
        )
    reporter.progress(1.0, "measure")
    return found
