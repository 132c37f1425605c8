"""Run a compression pipeline: load, check data, apply each method, save, measure.

A plain library: the Celery task (and ``squish compress --local``) call
:func:`run_pipeline` with a reporter and read the :class:`PipelineResult`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from worker.context import RecordingReporter, Reporter, ScaledReporter, StepContext
from worker.data import Dataset, fit_dataset, load_dataset
from worker.errors import EngineError, InvalidParamsError, MethodFailedError, UnsupportedError
from worker.formats import (
    FILE_SUFFIX,
    FORMATS,
    LoadedModel,
    Runtime,
    generate_inputs,
    load_model,
    save_model,
)
from worker.methods import get_method
from worker.methods.base import UnknownMethodError
from worker.metrics import accuracy, compare_outputs, measure_model, run_loaded

DATASET_ROLES = ("calibration", "train", "eval")
DEVICES = ("cpu", "gpu")
FIDELITY_BATCH = 32
GENERATED_SAMPLES = 8

# What the libraries a method wraps raise when a model is beyond them.
_LIBRARY_ERRORS = (
    RuntimeError, ValueError, TypeError, AssertionError, NotImplementedError, KeyError,
    IndexError, AttributeError,
)  # fmt: skip

# Overall progress owned by each stage.
_P_LOADED = 0.03
_P_DATA = 0.06
_P_STEPS_END = 0.45
_P_SAVED = 0.47
_P_MEASURED_ORIGINAL = 0.68
_P_MEASURED_COMPRESSED = 0.89


@dataclass
class PipelineSpec:
    """What to run.

    Attributes:
        steps: ``(method name, params)`` in order; params as normalized by the API.
        output_format: must equal the input format for now.
        device: ``"cpu"`` or ``"gpu"`` (methods and measurement).
        batch_sizes: latency batch sizes.
        warmup / iterations: untimed and timed runs per latency batch size.
        models: other uploaded models that steps' params name, by id: ``(path, format)``.
    """

    steps: list[tuple[str, dict]]
    output_format: str
    device: str = "cpu"
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    warmup: int = 3
    iterations: int = 20
    models: dict[str, tuple[Path, str]] = field(default_factory=dict)


@dataclass
class PipelineResult:
    """The compressed model and what was measured.

    Attributes:
        artifact_path: the saved model (``model.pt2`` or ``model.onnx`` in the work dir).
        artifact_format: its format.
        metrics: ``{"original", "compressed", "fidelity", "ratios"}`` (DESIGN §6).
        report_path: ``report.json``: spec, model signature, steps, metrics and the log.
    """

    artifact_path: Path
    artifact_format: str
    metrics: dict[str, Any]
    report_path: Path


def run_pipeline(
    model_path: Path,
    model_format: str,
    spec: PipelineSpec,
    datasets: dict[str, Path],
    work_dir: Path,
    reporter: Reporter,
) -> PipelineResult:
    """Compress ``model_path`` as ``spec`` says and measure the result against it.

    Raises:
        EngineError: its subclasses for every expected failure (broken model, data that
        does not fit, unsupported request, cancellation), with the stage in ``step``.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    log = RecordingReporter(inner=reporter)
    started = time.monotonic()
    _check_spec(model_format, spec, datasets)
    methods = _resolve_steps(model_format, spec, datasets)

    log.progress(0.0, "load")
    model = load_model(model_path, model_format)
    signature = {
        "inputs": [s.to_dict() for s in model.inputs],
        "outputs": [s.to_dict() for s in model.outputs],
    }
    log.log("model loaded", data=signature)
    log.progress(_P_LOADED, "load_datasets")

    loaded_data = _load_datasets(datasets)
    feeds_by_role = {role: fit_dataset(model, role, ds) for role, ds in loaded_data.items()}
    log.progress(_P_DATA, "check_datasets")

    step_records = []
    span = (_P_STEPS_END - _P_DATA) / max(1, len(methods))
    for index, (method, params) in enumerate(methods):
        ctx = StepContext(
            step=index,
            method=method.name,
            reporter=log,
            datasets=loaded_data,
            device=spec.device,
            work_dir=work_dir,
            progress_start=_P_DATA + span * index,
            progress_end=_P_DATA + span * (index + 1),
            original=(Path(model_path), model_format),
            models=spec.models,
        )
        ctx.progress(0.0)
        t0 = time.monotonic()
        try:
            model = method.handler(model, params, ctx)
        except EngineError as exc:
            exc.step = exc.step or method.name
            raise
        except _LIBRARY_ERRORS as exc:
            raise MethodFailedError(
                f"{method.name} failed on this model: {type(exc).__name__}: {exc}",
                step=method.name,
            ) from exc
        seconds = time.monotonic() - t0
        step_records.append(
            {"method": method.name, "params": params.model_dump(mode="json"), "seconds": seconds}
        )
        log.log(f"step {index + 1}/{len(methods)} {method.name} done in {seconds:.2f}s")
        ctx.progress(1.0)

    log.progress(_P_STEPS_END, "save")
    artifact = work_dir / f"model{FILE_SUFFIX[spec.output_format]}"
    save_model(model, artifact)
    log.log("artifact saved", data={"size_bytes": artifact.stat().st_size})
    log.progress(_P_SAVED, "measure")

    measure_inputs = _measure_inputs(model, feeds_by_role, log)
    metrics: dict[str, Any] = {}
    for name, path, (start, end) in (
        ("original", Path(model_path), (_P_SAVED, _P_MEASURED_ORIGINAL)),
        ("compressed", artifact, (_P_MEASURED_ORIGINAL, _P_MEASURED_COMPRESSED)),
    ):
        metrics[name] = measure_model(
            path,
            model_format,
            inputs=measure_inputs,
            batch_sizes=spec.batch_sizes,
            warmup=spec.warmup,
            iterations=spec.iterations,
            device=spec.device,
            reporter=ScaledReporter(log, start, end, f"measure_{name}"),
        )

    log.progress(_P_MEASURED_COMPRESSED, "evaluate")
    _evaluate(model, Path(model_path), artifact, spec, feeds_by_role, loaded_data, metrics, log)
    metrics["ratios"] = _ratios(metrics["original"], metrics["compressed"])

    report_path = work_dir / "report.json"
    report = {
        "spec": asdict(spec),
        "model": {"format": model_format, **signature},
        "steps": step_records,
        "metrics": metrics,
        "seconds": time.monotonic() - started,
        "log": log.logs,
    }
    report_path.write_text(json.dumps(report, indent=2, default=str))
    log.progress(1.0, "done")
    return PipelineResult(artifact, spec.output_format, metrics, report_path)


def _check_spec(model_format: str, spec: PipelineSpec, datasets: dict[str, Path]) -> None:
    if model_format not in FORMATS:
        raise UnsupportedError(
            f"unknown model format {model_format!r}; supported: {', '.join(FORMATS)}",
            step="validate",
        )
    if spec.output_format != model_format:
        raise UnsupportedError(
            f"output_format {spec.output_format!r} differs from the model's format "
            f"{model_format!r}; converting between formats is not supported yet",
            step="validate",
        )
    if spec.device not in DEVICES:
        raise UnsupportedError(f"unknown device {spec.device!r}; use cpu or gpu", step="validate")
    if not spec.batch_sizes or any(b < 1 for b in spec.batch_sizes):
        raise UnsupportedError("batch_sizes must be positive integers", step="validate")
    if spec.warmup < 0 or spec.iterations < 1:
        raise UnsupportedError("warmup must be >= 0 and iterations >= 1", step="validate")
    unknown = sorted(set(datasets) - set(DATASET_ROLES))
    if unknown:
        raise UnsupportedError(
            f"unknown dataset roles {unknown}; use {', '.join(DATASET_ROLES)}", step="validate"
        )


def _resolve_steps(model_format: str, spec: PipelineSpec, datasets: dict[str, Path]) -> list:
    resolved = []
    for index, (name, raw_params) in enumerate(spec.steps):
        where = f"step {index + 1} ({name})"
        try:
            method = get_method(name)
        except UnknownMethodError as exc:
            raise InvalidParamsError(str(exc), step="validate") from exc
        if model_format not in method.formats:
            raise UnsupportedError(
                f"{where}: {name} does not take {model_format} models "
                f"(it takes {', '.join(sorted(method.formats))})",
                step="validate",
            )
        if spec.device not in method.devices:
            raise UnsupportedError(
                f"{where}: {name} does not run on {spec.device} "
                f"(it runs on {', '.join(sorted(method.devices))})",
                step="validate",
            )
        missing = sorted(method.datasets_required - set(datasets))
        if missing:
            raise InvalidParamsError(f"{where}: {name} needs datasets {missing}", step="validate")
        try:
            params = method.validate_params(raw_params or {}, model_format)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}"
                for e in exc.errors()
            )
            raise InvalidParamsError(f"{where}: {problems}", step="validate") from exc
        resolved.append((method, params))
    return resolved


def _load_datasets(datasets: dict[str, Path]) -> dict[str, Dataset]:
    loaded = {}
    for role in DATASET_ROLES:
        if role in datasets:
            try:
                loaded[role] = load_dataset(Path(datasets[role]))
            except EngineError as exc:
                exc.message = f"{role} dataset: {exc.message}"
                raise
    return loaded


def _measure_inputs(
    model: LoadedModel, feeds_by_role: dict[str, dict[str, np.ndarray]], log: Reporter
) -> dict[str, np.ndarray]:
    for role in ("eval", "calibration", "train"):
        if role in feeds_by_role:
            return feeds_by_role[role]
    log.log("latency and memory measured on inputs generated from the model's signature")
    return generate_inputs(model, batch=GENERATED_SAMPLES)


def _evaluate(
    model: LoadedModel,
    original_path: Path,
    artifact: Path,
    spec: PipelineSpec,
    feeds_by_role: dict[str, dict[str, np.ndarray]],
    datasets: dict[str, Dataset],
    metrics: dict[str, Any],
    log: RecordingReporter,
) -> None:
    """Fidelity (compressed vs original) and, with labelled eval data, accuracy."""
    if "eval" in feeds_by_role:
        role, inputs = "eval", feeds_by_role["eval"]
    elif "calibration" in feeds_by_role:
        role, inputs = "calibration", feeds_by_role["calibration"]
        log.log("fidelity measured on the calibration inputs (no eval dataset)")
    else:
        role = "generated"
        inputs = generate_inputs(model, batch=GENERATED_SAMPLES)
        log.log(
            f"fidelity measured on {GENERATED_SAMPLES} inputs generated from the model's "
            "signature (standard normal floats): no eval or calibration dataset was given",
            "warning",
        )
    outputs = {}
    for index, (name, path) in enumerate((("original", original_path), ("compressed", artifact))):
        span = ScaledReporter(
            log,
            _P_MEASURED_COMPRESSED + (1 - _P_MEASURED_COMPRESSED) * index / 2,
            _P_MEASURED_COMPRESSED + (1 - _P_MEASURED_COMPRESSED) * (index + 1) / 2,
            "evaluate",
        )
        outputs[name] = run_loaded(
            Runtime(path, model.format, spec.device), inputs, FIDELITY_BATCH, reporter=span
        )
    try:
        fidelity = compare_outputs(outputs["original"], outputs["compressed"])
    except ValueError as exc:
        log.log(f"fidelity not measured: {exc}", "warning")
    else:
        metrics["fidelity"] = fidelity
        samples = len(next(iter(inputs.values())))
        log.log(f"fidelity measured on {samples} {role} samples", data=fidelity)
    labels = datasets["eval"].labels if "eval" in datasets else None
    if labels is None:
        log.log("accuracy not measured: no labelled eval dataset was given")
        return
    try:
        metrics["original"]["accuracy"] = accuracy(outputs["original"], labels)
        metrics["compressed"]["accuracy"] = accuracy(outputs["compressed"], labels)
    except UnsupportedError as exc:
        metrics["original"].pop("accuracy", None)
        log.log(f"accuracy not measured: {exc.message}", "warning")


def _ratios(original: dict[str, Any], compressed: dict[str, Any]) -> dict[str, Any]:
    ratios: dict[str, Any] = {}
    if original.get("size_bytes") and compressed.get("size_bytes"):
        ratios["size"] = original["size_bytes"] / compressed["size_bytes"]
    speedup = {}
    for key, timing in original.get("latency_ms", {}).items():
        other = compressed.get("latency_ms", {}).get(key)
        if other and other["p50"] > 0:
            speedup[key] = timing["p50"] / other["p50"]
    if speedup:
        ratios["speedup"] = speedup
    return ratios
