"""All the figures of one model file: size, weights, MACs, latency and peak memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from worker.context import Reporter
from worker.formats import Runtime, WeightsUnreadable
from worker.measurement.latency import measure_latency, runnable_batch_sizes
from worker.measurement.macs import count_macs
from worker.measurement.memory import peak_memory
from worker.measurement.runs import make_batch
from worker.measurement.size import file_size, gzip_size, weight_counts
from worker.schemas import ModelMetrics


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
) -> ModelMetrics:
    """Measure one model file, in the runtime of its format.

    Args:
        path: the model file.
        inputs: sample inputs by model input name (axis 0 = samples); a batch of size b
            takes the first b samples, repeating them if there are fewer.
        batch_sizes: latency batch sizes; a size the model cannot run (static batch
            dim) is skipped with a log line, and if none is left the static batch is used.
        warmup / iterations: untimed and timed runs per batch size.
        device: ``"cpu"`` or ``"gpu"``.
        reporter: gets progress (0..1 of this measurement) and the log.
        with_peak_memory: also measure ``peak_memory_bytes`` (in a fresh process).

    Returns:
        ``size_bytes``, ``size_bytes_gzip``, ``parameters``, ``nonzero_parameters``,
        ``sparsity``, ``macs`` (when countable), ``latency_ms`` (by batch size) and
        ``peak_memory_bytes``; no ``accuracy`` (that needs the eval data: see
        :mod:`worker.measurement.fidelity`).
    """
    path = Path(path)
    metrics = ModelMetrics(size_bytes=file_size(path), size_bytes_gzip=gzip_size(path))
    reporter.progress(0.05, "measure")
    runtime = Runtime(path, fmt, device)
    model = runtime.model
    try:
        counts = weight_counts(model)
    except WeightsUnreadable as exc:
        reporter.log(f"parameters and sparsity not measured: {exc.message}", "warning")
    else:
        metrics.parameters = counts.parameters
        metrics.nonzero_parameters = counts.nonzero_parameters
        metrics.sparsity = counts.sparsity
        if counts.sparsity is None:
            reporter.log("sparsity not measured: the model has no weight tensors", "warning")
    metrics.macs = count_macs(runtime, inputs, reporter)
    reporter.progress(0.15, "measure")

    sizes = runnable_batch_sizes(model, batch_sizes, reporter)
    latency = measure_latency(runtime, inputs, sizes, warmup, iterations, reporter, (0.15, 0.8))
    metrics.latency_ms = latency or None
    del runtime
    if sizes and with_peak_memory:
        feeds = make_batch(inputs, max(sizes))
        metrics.peak_memory_bytes = peak_memory(path, fmt, feeds, device, reporter)
    reporter.progress(1.0, "measure")
    return metrics
