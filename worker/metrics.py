"""The measurement's names as other code imports them; the code is :mod:`worker.measurement`.

:func:`measure_model`, :func:`weight_counts` and :func:`compare_outputs` here give the
figures as the JSON dicts a job stores (DESIGN §6 names, unmeasured ones absent); their
typed twins in :mod:`worker.measurement` return the models of :mod:`worker.schemas`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from worker.context import Reporter
from worker.formats import LoadedModel
from worker.measurement import fidelity as _fidelity
from worker.measurement import model as _model
from worker.measurement import size as _size
from worker.measurement.fidelity import accuracy, is_token_output, pool_token_outputs
from worker.measurement.latency import runnable_batch_sizes
from worker.measurement.memory import peak_memory
from worker.measurement.runs import make_batch, run_loaded, run_model
from worker.measurement.size import GZIP_LEVEL, gzip_size

__all__ = [
    "GZIP_LEVEL",
    "accuracy",
    "compare_outputs",
    "gzip_size",
    "is_token_output",
    "make_batch",
    "measure_model",
    "peak_memory",
    "pool_token_outputs",
    "run_loaded",
    "run_model",
    "runnable_batch_sizes",
    "weight_counts",
]


def measure_model(
    path: Path,
    fmt: str,
    *,
    inputs: dict[str, np.ndarray],
    batch_sizes: list[int],
    warmup: int,
    iterations: int,
    device: str,
    reporter: Reporter,
    with_peak_memory: bool = True,
) -> dict[str, Any]:
    """:func:`worker.measurement.model.measure_model`, as JSON."""
    return _model.measure_model(
        path, fmt, inputs=inputs, batch_sizes=batch_sizes, warmup=warmup,
        iterations=iterations, device=device, reporter=reporter,
        with_peak_memory=with_peak_memory,
    ).to_json()  # fmt: skip


def weight_counts(model: LoadedModel) -> dict[str, Any]:
    """:func:`worker.measurement.size.weight_counts`: ``parameters``, ``nonzero_parameters``
    and (with weights) ``sparsity``."""
    counts = asdict(_size.weight_counts(model))
    return {name: value for name, value in counts.items() if value is not None}


def compare_outputs(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, Any]:
    """:func:`worker.measurement.fidelity.compare_outputs`, as JSON."""
    return _fidelity.compare_outputs(reference, candidate).to_json()
