"""Running a model file over inputs: one batch cut from the samples, or every sample."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from worker.context import NullReporter, Reporter
from worker.formats import LoadedModel, Runtime, generate_inputs

GENERATED_SAMPLES = 8
"""Inputs generated from the model's signature when no dataset gives any."""
PROGRESS_EVERY_S = 0.5


def make_batch(inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` samples of each input, repeated cyclically if there are fewer."""
    return {
        name: np.ascontiguousarray(np.resize(arr, (batch, *arr.shape[1:])).astype(arr.dtype))
        for name, arr in inputs.items()
    }


def generated_inputs(model: LoadedModel) -> dict[str, np.ndarray]:
    """:data:`GENERATED_SAMPLES` inputs from the signature (standard normal floats)."""
    return generate_inputs(model, batch=GENERATED_SAMPLES)


def run_model(
    path: Path,
    fmt: str,
    inputs: dict[str, np.ndarray],
    batch_size: int,
    *,
    device: str = "cpu",
    reporter: Reporter | None = None,
) -> list[np.ndarray]:
    """Run the model file over every sample, in batches; outputs concatenated on axis 0.

    A model with a static batch dim runs at that size (``batch_size`` is ignored) and
    the last batch is padded by repeating samples; padded outputs are dropped.
    """
    runtime = Runtime(path, fmt, device)
    return run_loaded(runtime, inputs, batch_size, reporter=reporter)


def run_loaded(
    runtime: Runtime,
    inputs: dict[str, np.ndarray],
    batch_size: int,
    *,
    reporter: Reporter | None = None,
) -> list[np.ndarray]:
    """:func:`run_model` on an already loaded runtime."""
    reporter = reporter or NullReporter()
    batch = runtime.model.static_batch or max(1, batch_size)
    num = len(next(iter(inputs.values())))
    chunks: list[list[np.ndarray]] = []
    last = time.monotonic()
    for start in range(0, num, batch):
        part = {k: v[start : start + batch] for k, v in inputs.items()}
        size = len(next(iter(part.values())))
        if size < batch and runtime.model.static_batch is not None:
            part = make_batch(part, batch)
        outputs = runtime(part)
        chunks.append([o[:size] for o in outputs])
        if time.monotonic() - last > PROGRESS_EVERY_S:
            reporter.progress(min(1.0, (start + size) / num), None)
            last = time.monotonic()
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]
