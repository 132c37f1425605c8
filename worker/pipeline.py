"""Run a compression pipeline: load, check data, apply each method, save, measure.

A plain library: the Celery task (and ``squish compress --local``) call
:func:`run_pipeline` with a reporter and read the :class:`PipelineResult`.

``metrics`` holds the figures of DESIGN §6 (``original``, ``compressed``, ``fidelity``,
``ratios``) and ``steps``: one entry per step, ``{"method", "params", "seconds",
"format", "size_bytes", "size_bytes_gzip", "parameters", "nonzero_parameters",
"sparsity", "macs", "latency_ms", "latency_iterations", "fidelity", "accuracy"}``
measured on the model as that step left it (a figure that could not be measured is
absent; ``format`` is the format the step's model was in, which is ``onnx`` for
quantization steps run after a conversion). Intermediate models are timed with
``latency_iterations`` (:data:`STEP_ITERATIONS`) runs per batch size and get no peak
memory figure; the last step's entry is the artifact's own measurement when the
artifact is that step's model.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.context import NullReporter, RecordingReporter, Reporter, ScaledReporter, StepContext
from worker.contract import DatasetRole, values
from worker.convert import convert
from worker.data import Dataset, fit_dataset, load_dataset
from worker.errors import EngineError, JobCancelled, MethodFailedError, UnsupportedError, error_for
from worker.formats import (
    FILE_SUFFIX,
    LoadedModel,
    Runtime,
    generate_inputs,
    load_model,
    save_model,
)
from worker.metrics import (
    accuracy,
    compare_outputs,
    is_token_output,
    measure_model,
    pool_token_outputs,
    run_loaded,
)
from worker.spec import CheckedPipeline, DatasetInfo, PipelineRequest, SpecError, resolve_pipeline

DATASET_ROLES = values(DatasetRole)
FIDELITY_BATCH = 32
GENERATED_SAMPLES = 8
STEP_WARMUP = 1
STEP_ITERATIONS = 5
"""Timed runs per batch size when measuring an intermediate step's model."""
_STEP_METRICS = (
    "size_bytes", "size_bytes_gzip", "parameters", "nonzero_parameters", "sparsity", "macs",
    "latency_ms",
)  # fmt: skip

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
_STEP_RUN_SHARE = 0.75  # of a step's progress slice; the rest measures its model


@dataclass
class PipelineSpec:
    """What to run.

    Attributes:
        steps: ``(method name, params)`` in order; params as normalized by the API.
        output_format: the artifact's format: the input format, or ``onnx`` for a pt2 or
            hf model (see :mod:`worker.convert` for where the conversion happens).
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
        artifact_path: the saved model (``model.pt2``, ``model.onnx`` or ``model.zip`` (hf)
            in the work dir).
        artifact_format: its format.
        metrics: ``{"original", "compressed", "fidelity", "ratios", "steps"}`` (DESIGN §6
            and the module docstring).
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

    With an ``output_format`` other than the model's (pt2 or hf → onnx) the model is
    converted once (:mod:`worker.convert`): before a trailing run of ONNX Runtime
    quantization steps, or else after the last step. ``metrics.original`` is measured
    in the upload's runtime and ``metrics.compressed`` in the artifact's (onnxruntime for
    onnx), which is what a user of each file gets.

    After every step the model is saved and measured (:data:`STEP_ITERATIONS` timed runs
    per batch size, no peak memory; the last step reuses the artifact's full measurement
    when the artifact is that step's model) into ``metrics["steps"]``.

    Raises:
        EngineError: its subclasses for every expected failure (broken model, data that
        does not fit, unsupported request, cancellation), with the stage in ``step``.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    log = RecordingReporter(inner=reporter)
    started = time.monotonic()
    checked = _resolve(model_format, spec, datasets)
    methods = [(step.method, step.params) for step in checked.steps]
    converting = spec.output_format != model_format
    # The index of the first step that gets the converted model (len(methods): none does).
    convert_at = checked.convert_at
    # The artifact is the last step's model unless the conversion comes after that step.
    last_is_artifact = bool(methods) and not (converting and convert_at == len(methods))

    log.progress(0.0, "load")
    model = load_model(model_path, model_format)
    signature = {
        "inputs": [s.to_dict() for s in model.inputs],
        "outputs": [s.to_dict() for s in model.outputs],
    }
    log.log("model loaded", data=signature)
    log.progress(_P_LOADED, "load_datasets")

    loaded_data = _load_datasets(datasets, model)
    _resolve(model_format, spec, loaded_data)  # now that labels are known
    feeds_by_role = {role: fit_dataset(model, role, ds) for role, ds in loaded_data.items()}
    measure_inputs = _measure_inputs(model, feeds_by_role, log)
    evaluation = _Evaluation.choose(model, Path(model_path), spec, feeds_by_role, loaded_data, log)
    log.progress(_P_DATA, "check_datasets")

    step_records: list[dict[str, Any]] = []
    span = (_P_STEPS_END - _P_DATA) / max(1, len(methods))
    for index, (method, params) in enumerate(methods):
        step_start = _P_DATA + span * index
        if converting and index == convert_at:
            model = _convert(model, spec.output_format, measure_inputs, log, step_start)
        ctx = StepContext(
            step=index,
            method=method.name,
            reporter=log,
            datasets=loaded_data,
            device=spec.device,
            work_dir=work_dir,
            progress_start=step_start,
            progress_end=step_start + span * _STEP_RUN_SHARE,
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
        record: dict[str, Any] = {
            "method": method.name,
            "params": params.model_dump(mode="json"),
            "seconds": seconds,
            "format": model.format,
        }
        step_records.append(record)
        log.log(f"step {index + 1}/{len(methods)} {method.name} done in {seconds:.2f}s")
        ctx.progress(1.0)
        if not (last_is_artifact and index == len(methods) - 1):
            measure_span = (step_start + span * _STEP_RUN_SHARE, step_start + span)
            _measure_step(
                model, index, record, spec, measure_inputs, evaluation, work_dir, log, measure_span
            )

    if converting and convert_at == len(methods):
        model = _convert(model, spec.output_format, measure_inputs, log, _P_STEPS_END)
    log.progress(_P_STEPS_END, "save")
    artifact = work_dir / f"model{FILE_SUFFIX[spec.output_format]}"
    save_model(model, artifact)
    log.log("artifact saved", data={"size_bytes": artifact.stat().st_size})
    log.progress(_P_SAVED, "measure")

    metrics: dict[str, Any] = {}
    for name, path, fmt, (start, end) in (
        ("original", Path(model_path), model_format, (_P_SAVED, _P_MEASURED_ORIGINAL)),
        (
            "compressed",
            artifact,
            spec.output_format,
            (_P_MEASURED_ORIGINAL, _P_MEASURED_COMPRESSED),
        ),
    ):
        metrics[name] = measure_model(
            path,
            fmt,
            inputs=measure_inputs,
            batch_sizes=spec.batch_sizes,
            warmup=spec.warmup,
            iterations=spec.iterations,
            device=spec.device,
            reporter=ScaledReporter(log, start, end, f"measure_{name}"),
        )

    log.progress(_P_MEASURED_COMPRESSED, "evaluate")
    _evaluate(artifact, spec.output_format, evaluation, metrics, log)
    metrics["ratios"] = _ratios(metrics["original"], metrics["compressed"])
    _warn_about_the_result(metrics, spec.output_format, log)
    if last_is_artifact:
        step_records[-1].update(_step_view(metrics["compressed"], spec.iterations))
        if "fidelity" in metrics:
            step_records[-1]["fidelity"] = metrics["fidelity"]
    metrics["steps"] = step_records

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


def _resolve(
    model_format: str,
    spec: PipelineSpec,
    datasets: Mapping[str, Path | Dataset],
) -> CheckedPipeline:
    """:func:`worker.spec.resolve_pipeline` on this spec; the first problem's error if any.

    Called before the datasets are loaded (paths: only their presence is known) and again
    after (whether each has labels).
    """
    infos = {
        role: DatasetInfo(has_labels=ds.labels is not None)
        if isinstance(ds, Dataset)
        else DatasetInfo()
        for role, ds in datasets.items()
    }
    request = PipelineRequest(
        model_format=model_format,
        steps=spec.steps,
        output_format=spec.output_format,
        device=spec.device,
        datasets=infos,
        batch_sizes=spec.batch_sizes,
        warmup=spec.warmup,
        iterations=spec.iterations,
    )
    try:
        return resolve_pipeline(request)
    except SpecError as exc:
        raise error_for(exc.problems[0].code, str(exc), step="validate") from None


def _convert(
    model: LoadedModel,
    output_format: str,
    feeds: dict[str, np.ndarray],
    log: RecordingReporter,
    at: float,
) -> LoadedModel:
    log.progress(at, "convert")
    try:
        return convert(model, output_format, feeds=feeds, reporter=log)
    except EngineError as exc:
        exc.step = exc.step or "convert"
        raise


def _step_view(measured: dict[str, Any], iterations: int) -> dict[str, Any]:
    view = {key: measured[key] for key in _STEP_METRICS if key in measured}
    if "latency_ms" in view:
        view["latency_iterations"] = iterations
    if "accuracy" in measured:
        view["accuracy"] = measured["accuracy"]
    return view


def _measure_step(
    model: LoadedModel,
    index: int,
    record: dict[str, Any],
    spec: PipelineSpec,
    inputs: dict[str, np.ndarray],
    evaluation: _Evaluation,
    work_dir: Path,
    log: RecordingReporter,
    span: tuple[float, float],
) -> None:
    """Save the model after step ``index`` and measure it into ``record``."""
    start, end = span
    path = work_dir / f"step{index + 1}{FILE_SUFFIX[model.format]}"
    iterations = min(spec.iterations, STEP_ITERATIONS)
    try:
        save_model(model, path)
        measured = measure_model(
            path,
            model.format,
            inputs=inputs,
            batch_sizes=spec.batch_sizes,
            warmup=min(spec.warmup, STEP_WARMUP),
            iterations=iterations,
            device=spec.device,
            reporter=ScaledReporter(log, start, start + (end - start) * 0.7, "measure_step"),
            with_peak_memory=False,
        )
        record.update(_step_view(measured, iterations))
        reporter = ScaledReporter(log, start + (end - start) * 0.7, end, "measure_step")
        record.update(evaluation.score(path, model.format, reporter))
    except JobCancelled:
        raise
    except EngineError as exc:
        log.log(f"step {index + 1} ({record['method']}) not measured: {exc.message}", "warning")
    finally:
        path.unlink(missing_ok=True)
    log.progress(end, "measure_step")


def _load_datasets(datasets: dict[str, Path], model: LoadedModel) -> dict[str, Dataset]:
    """Every dataset by role; text (.jsonl) is tokenized with the hf model's tokenizer."""
    loaded = {}
    for role in DATASET_ROLES:
        if role in datasets:
            try:
                loaded[role] = load_dataset(Path(datasets[role]), model)
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


@dataclass
class _Evaluation:
    """The inputs fidelity and accuracy are measured on, and the original's outputs on them.

    The original model's outputs are computed once (in its own runtime) and compared with
    each step's model and with the artifact. Token-level outputs (``[N, T, H]``, e.g. an hf
    feature-extraction model's ``last_hidden_state``) are compared as sentence embeddings:
    mean-pooled over the tokens the ``attention_mask`` keeps.
    """

    role: str
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    original: tuple[Path, str]
    device: str
    reference: list[np.ndarray] | None = None

    @classmethod
    def choose(
        cls,
        model: LoadedModel,
        original_path: Path,
        spec: PipelineSpec,
        feeds_by_role: dict[str, dict[str, np.ndarray]],
        datasets: dict[str, Dataset],
        log: Reporter,
    ) -> _Evaluation:
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
        labels = datasets["eval"].labels if "eval" in datasets else None
        return cls(role, inputs, labels, (original_path, model.format), spec.device)

    def run(self, path: Path, fmt: str, reporter: Reporter) -> list[np.ndarray]:
        runtime = Runtime(path, fmt, self.device)
        return run_loaded(runtime, self.inputs, FIDELITY_BATCH, reporter=reporter)

    def original_outputs(self, reporter: Reporter) -> list[np.ndarray]:
        if self.reference is None:
            self.reference = self.run(*self.original, reporter)
        return self.reference

    def fidelity(self, outputs: list[np.ndarray]) -> dict[str, float]:
        """compare_outputs vs the original; raises ValueError if they do not compare."""
        original = self.original_outputs(NullReporter())
        reference = pool_token_outputs(original, self.inputs)
        result = compare_outputs(reference, pool_token_outputs(outputs, self.inputs))
        if is_token_output(original[0], self.inputs):
            result.pop("top1_agreement", None)  # an embedding's argmax is no class
        return result

    def score(self, path: Path, fmt: str, reporter: Reporter) -> dict[str, Any]:
        """``fidelity`` and (with labelled eval data) ``accuracy`` of a model file."""
        self.original_outputs(ScaledReporter(reporter, 0.0, 0.5))
        outputs = self.run(path, fmt, ScaledReporter(reporter, 0.5, 1.0))
        result: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            result["fidelity"] = self.fidelity(outputs)
        if self.labels is not None:
            with contextlib.suppress(UnsupportedError):
                result["accuracy"] = accuracy(outputs, self.labels)
        return result


def _evaluate(
    artifact: Path,
    artifact_format: str,
    evaluation: _Evaluation,
    metrics: dict[str, Any],
    log: RecordingReporter,
) -> None:
    """Fidelity (compressed vs original) and, with labelled eval data, accuracy."""
    outputs = {}
    for index, (name, path, fmt) in enumerate(
        (("original", *evaluation.original), ("compressed", artifact, artifact_format))
    ):
        span = ScaledReporter(
            log,
            _P_MEASURED_COMPRESSED + (1 - _P_MEASURED_COMPRESSED) * index / 2,
            _P_MEASURED_COMPRESSED + (1 - _P_MEASURED_COMPRESSED) * (index + 1) / 2,
            "evaluate",
        )
        if name == "original":
            outputs[name] = evaluation.original_outputs(span)
        else:
            outputs[name] = evaluation.run(path, fmt, span)
    try:
        fidelity = evaluation.fidelity(outputs["compressed"])
    except ValueError as exc:
        log.log(f"fidelity not measured: {exc}", "warning")
    else:
        metrics["fidelity"] = fidelity
        samples = len(next(iter(evaluation.inputs.values())))
        pooled = any(is_token_output(o, evaluation.inputs) for o in outputs["original"])
        how = " (token outputs compared as mask-averaged sentence embeddings)" if pooled else ""
        log.log(f"fidelity measured on {samples} {evaluation.role} samples{how}", data=fidelity)
    if evaluation.labels is None:
        log.log("accuracy not measured: no labelled eval dataset was given")
        return
    try:
        metrics["original"]["accuracy"] = accuracy(outputs["original"], evaluation.labels)
        metrics["compressed"]["accuracy"] = accuracy(outputs["compressed"], evaluation.labels)
    except UnsupportedError as exc:
        metrics["original"].pop("accuracy", None)
        log.log(f"accuracy not measured: {exc.message}", "warning")


# Below these, the job's events carry a warning (the figures themselves are in metrics).
SLOWER_THAN = 0.95  # speedup (original p50 / compressed p50)
LOW_COSINE = 0.95
LOW_TOP1_AGREEMENT = 0.9


def _warn_about_the_result(metrics: dict[str, Any], artifact_format: str, log: Reporter) -> None:
    """Say plainly when the compressed model is slower than the original or its outputs
    moved far from the original's."""
    original, compressed = metrics["original"], metrics["compressed"]
    for key, speedup in metrics["ratios"].get("speedup", {}).items():
        if speedup >= SLOWER_THAN:
            continue
        hint = ""
        if artifact_format in ("pt2", "hf"):
            hint = (
                "; eager PyTorch runs quantized (int8, fp16 on CPU) weights through "
                "reference kernels: for CPU speed ask for output_format 'onnx' (ONNX "
                "Runtime's int8 kernels)"
            )
        log.log(
            f"the compressed model is slower than the original at {key.replace('_', ' ')}: "
            f"p50 {compressed['latency_ms'][key]['p50']:.3f} ms vs "
            f"{original['latency_ms'][key]['p50']:.3f} ms ({speedup:.2f}x){hint}",
            "warning",
            data={"batch": key, "speedup": speedup},
        )
    fidelity = metrics.get("fidelity", {})
    cosine, top1 = fidelity.get("cosine_similarity"), fidelity.get("top1_agreement")
    if (cosine is not None and cosine < LOW_COSINE) or (
        top1 is not None and top1 < LOW_TOP1_AGREEMENT
    ):
        shown = ", ".join(
            f"{k} {v:.4f}"
            for k, v in (("cosine", cosine), ("top-1 agreement", top1))
            if v is not None
        )
        log.log(
            f"the compressed model's outputs differ strongly from the original's ({shown}): "
            "metrics.steps shows which step cost it; a gentler setting (quantize.dynamic "
            "instead of quantize.static, per_channel, a smaller amount) or a training step "
            "(distill, finetune) after it may recover it",
            "warning",
            data=fidelity,
        )


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
