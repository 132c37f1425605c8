"""The other runtimes a slower result could run in: measured when that is cheap, named
otherwise (the slower-result warning of :mod:`.result_warnings` says both).

The candidates are the output formats the upload converts to, besides the artifact's own
(a pt2 or hf upload: ``onnx`` and ``aoti``). One is measured when converting the artifact
into it costs a few seconds: an fp32 or fp16 pt2/hf artifact of at most
:data:`CHEAP_PARAMETERS` weights exported to ONNX (``torch.onnx.export``) and timed in
ONNX Runtime at the slower batch sizes, with the job's own warmup and iterations. The rest
are named with what measuring them would take: an AOTInductor compile (tens of seconds to
minutes), a quantization run again in ONNX Runtime (ONNX cannot express a PyTorch-quantized
program), a model the artifact no longer holds in PyTorch form.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from worker.context import Reporter
from worker.contract import FORMATS, ModelFormat
from worker.errors import EngineError, JobCancelled
from worker.formats import LoadedModel, Runtime, load_model, save_model, weight_arrays
from worker.measurement.latency import time_runs
from worker.measurement.result_warnings import Alternative
from worker.measurement.runs import make_batch
from worker.schemas import ModelMetrics

CHEAP_PARAMETERS = 5_000_000
"""Up to this many weights, exporting a model to ONNX takes seconds on a worker core."""
_CONVERTIBLE = frozenset({ModelFormat.pt2, ModelFormat.hf})
_QUANTIZED_DTYPES = frozenset({"int8", "uint8"})


def find_alternatives(
    upload_format: str,
    artifact: tuple[Path, str],
    original: ModelMetrics,
    slower: list[str],
    *,
    inputs: dict[str, np.ndarray],
    warmup: int,
    iterations: int,
    device: str,
    reporter: Reporter,
) -> list[Alternative]:
    """The alternatives to the artifact at the ``slower`` batch keys (see the module)."""
    path, fmt = artifact
    targets = [f for f in FORMATS if f in FORMATS[ModelFormat(upload_format)].converts_to]
    found: list[Alternative] = []
    for target in targets:
        if target == fmt:
            continue
        why = _why_not_cheap(target, path, fmt)
        if why is not None:
            found.append(Alternative(target, why_not_measured=why))
            continue
        try:
            speedup = _measure(
                path, fmt, target, original, slower, inputs, warmup, iterations, device
            )
        except JobCancelled:
            raise
        except EngineError as exc:
            reporter.log(f"{target} not measured as an alternative: {exc.message}", "warning")
            found.append(Alternative(target, why_not_measured=f"converting failed: {exc.message}"))
            continue
        found.append(Alternative(target, speedup=speedup))
    return found


def _why_not_cheap(target: ModelFormat, path: Path, fmt: str) -> str | None:
    if target == ModelFormat.aoti:
        return "compiling with AOTInductor takes tens of seconds to minutes"
    if fmt not in _CONVERTIBLE:
        return f"a {fmt} artifact does not convert: the job would convert the model before it"
    model = load_model(path, fmt)
    if _quantized(model):
        return (
            f"with output_format '{target}' the quantization steps run again in ONNX Runtime, "
            "which cannot run a PyTorch-quantized program"
        )
    weights = sum(int(a.size) for a in weight_arrays(model).values())
    if weights > CHEAP_PARAMETERS:
        return f"converting {weights:,} weights takes longer than this check may"
    return None


def _quantized(model: LoadedModel) -> bool:
    if model.program is not None:
        from worker.formats.aoti import is_quantized

        if is_quantized(model.program):
            return True
    return any(str(a.dtype) in _QUANTIZED_DTYPES for a in weight_arrays(model).values())


def _measure(
    path: Path,
    fmt: str,
    target: ModelFormat,
    original: ModelMetrics,
    slower: list[str],
    inputs: dict[str, np.ndarray],
    warmup: int,
    iterations: int,
    device: str,
) -> dict[str, float]:
    from worker.context import NullReporter
    from worker.convert import convert

    baseline = original.latency_ms or {}
    converted = convert(load_model(path, fmt), target, feeds=inputs)
    with tempfile.TemporaryDirectory(prefix="squish-alternative-") as tmp:
        file = Path(tmp) / f"model{FORMATS[target].suffix}"
        save_model(converted, file)
        runtime = Runtime(file, target, device)
        speedup = {}
        for key in slower:
            feeds = make_batch(inputs, int(key.removeprefix("batch_")))
            timed = time_runs(runtime, feeds, warmup, iterations, NullReporter(), (0.0, 1.0))
            if key in baseline and timed.p50 > 0:
                speedup[key] = baseline[key].p50 / timed.p50
        del runtime
    return speedup
