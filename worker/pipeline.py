"""Run a compression pipeline: check, load, data, steps (each measured), convert, save,
measure, report.

A plain library: the Celery task (and ``squish compress --local``) call
:func:`run_pipeline` with a reporter and read the :class:`PipelineResult`. What is
measured, and how, is :mod:`worker.measurement`; the figures are the models of
:mod:`worker.schemas` (DESIGN §6): ``original``, ``compressed``, ``fidelity``, ``ratios``
and ``steps``, one entry per step measured on the model as that step left it (``format``
is the format the step's model was in, which is ``onnx`` for quantization steps run after
a conversion). Intermediate models are timed with ``latency_iterations``
(:data:`STEP_ITERATIONS`) runs per batch size and get no peak memory figure; the last
step's entry is the artifact's own measurement when the artifact is that step's model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker import hardware
from worker.context import RecordingReporter, Reporter, ScaledReporter, StepContext
from worker.contract import DatasetRole, ModelFormat, format_facts, values
from worker.convert import conversion_figures, convert, export_hf
from worker.data import Dataset, fit_dataset, load_dataset
from worker.errors import EngineError, MethodFailedError, error_for
from worker.formats import LoadedModel, layer_names, load_model, save_model
from worker.formats.onnx import normalize_onnx, validated_output
from worker.measurement.bench import STEP_ITERATIONS as STEP_ITERATIONS
from worker.measurement.bench import Bench
from worker.methods.base import Method, MethodParams
from worker.schemas import Conversion, HardwareInfo, PipelineMetrics, StepMetrics
from worker.spec import CheckedPipeline, DatasetInfo, PipelineRequest, SpecError, resolve_pipeline

DATASET_ROLES = values(DatasetRole)

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
_STEP_RUN_SHARE = 0.75  # of a step's progress slice; the rest measures its model


@dataclass
class PipelineSpec:
    """What to run.

    Attributes:
        steps: ``(method name, params)`` in order; params as normalized by the API.
        output_format: the artifact's format: the input format, or ``onnx`` or ``aoti`` for
            a pt2 or hf model (see :mod:`worker.convert` for where the conversion happens).
        device: ``"cpu"`` or ``"gpu"`` (methods and measurement).
        batch_sizes: latency batch sizes.
        warmup / iterations: untimed and timed runs per latency batch size.
        models: other uploaded models that steps' params name, by id: ``(path, format)``.
        peak_memory: measure both ends' ``peak_memory_bytes`` (a fresh process each).
    """

    steps: list[tuple[str, dict]]
    output_format: str
    device: str = "cpu"
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    warmup: int = 3
    iterations: int = 20
    models: dict[str, tuple[Path, str]] = field(default_factory=dict)
    peak_memory: bool = True


@dataclass
class Resume:
    """A model the first ``len(steps)`` steps of a spec made (in the input format), with
    those steps' measured entries."""

    model_path: Path
    steps: list[StepMetrics]


AfterStep = Callable[[int, LoadedModel, list[StepMetrics]], None]


@dataclass
class PipelineResult:
    """The compressed model and what was measured.

    Attributes:
        artifact_path: the saved model (``model.pt2``, ``model.onnx`` or ``model.zip`` (hf)
            in the work dir).
        artifact_format: its format.
        measured: the figures, typed (:class:`worker.schemas.PipelineMetrics`).
        report_path: ``report.json``: spec, model signature, steps, metrics and the log.
        reused_steps: leading steps taken from a ``resume`` model instead of run.
    """

    artifact_path: Path
    artifact_format: str
    measured: PipelineMetrics
    report_path: Path
    reused_steps: int = 0

    @property
    def metrics(self) -> dict[str, Any]:
        """The figures as a job stores them: JSON, with what was not measured absent."""
        return self.measured.to_json()


def run_pipeline(
    model_path: Path,
    model_format: str,
    spec: PipelineSpec,
    datasets: dict[str, Path],
    work_dir: Path,
    reporter: Reporter,
    *,
    resume: Resume | None = None,
    after_step: AfterStep | None = None,
) -> PipelineResult:
    """Compress ``model_path`` as ``spec`` says and measure the result against it.

    With an ``output_format`` other than the model's (pt2 or hf → onnx) the model is
    converted once (:mod:`worker.convert`): before a trailing run of ONNX Runtime
    quantization steps, or else after the last step; an hf model bound for aoti is exported
    to a pt2 program before the first step that takes programs only
    (:data:`worker.spec.EXPORTED_FOR`). ``metrics.original`` is measured
    in the upload's runtime and ``metrics.compressed`` in the artifact's (onnxruntime for
    onnx), which is what a user of each file gets.

    After every step the model is saved and measured (:data:`STEP_ITERATIONS` timed runs
    per batch size, no peak memory; the last step reuses the artifact's full measurement
    when the artifact is that step's model) into ``metrics["steps"]``.

    ``resume`` starts from a model the first steps of ``spec`` already made (a search's
    trials share such prefixes): those steps are not rerun, their entries are taken as
    they were measured, and everything is still measured against ``model_path``.
    ``after_step(index, model, steps)`` is called after each step that runs on the model in
    its own format, once that step is measured (a search stores such prefixes).

    Raises:
        EngineError: its subclasses for every expected failure (broken model, data that
        does not fit, unsupported request, cancellation), with the stage in ``step``.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    log = RecordingReporter(inner=reporter)
    started = time.monotonic()

    # Check: the spec against the model's format and the datasets given.
    checked = _resolve(model_format, spec, datasets)
    methods = [(step.method, step.params) for step in checked.steps]
    converting = spec.output_format != model_format
    # The index of the first step that gets the converted model (len(methods): none does),
    # and of the first that gets an hf model exported to a program (aoti jobs).
    convert_at = checked.convert_at
    export_at = checked.export_at
    # The artifact is the last step's model unless the conversion comes after that step.
    last_is_artifact = bool(methods) and not (converting and convert_at == len(methods))

    # Load the model, then the data it will be fed and measured on.
    log.progress(0.0, "load")
    model = load_model(model_path, model_format)
    signature = {
        "inputs": [s.to_dict() for s in model.inputs],
        "outputs": [s.to_dict() for s in model.outputs],
    }
    log.log("model loaded", data=signature)
    machine = HardwareInfo.model_validate(hardware.worker_hardware(spec.device))
    log.log(f"worker CPU: {hardware.worker_cpu().describe()}", data=machine.to_json())
    if model.format == ModelFormat.onnx:  # what exporters write, as ONNX's tools want it
        model = normalize_onnx(model, log, step="normalize")

    log.progress(_P_LOADED, "load_datasets")
    loaded_data = _load_datasets(datasets, model)
    _resolve(model_format, spec, loaded_data, layer_names(model))  # labels and layers known
    feeds_by_role = {role: fit_dataset(model, role, ds) for role, ds in loaded_data.items()}
    bench = Bench.prepare(
        model, Path(model_path), feeds_by_role, loaded_data, batch_sizes=spec.batch_sizes,
        warmup=spec.warmup, iterations=spec.iterations, device=spec.device, log=log,
    )  # fmt: skip
    log.progress(_P_DATA, "check_datasets")

    # The steps, each measured on the model it leaves (the last one may be the artifact).
    steps: list[StepMetrics] = []
    if resume is not None:
        model = load_model(resume.model_path, model_format)
        steps = [step.model_copy(deep=True) for step in resume.steps]
        log.log(f"steps 1-{len(steps)} reused from an earlier run of the same steps")
    conversion: Conversion | None = None
    span = (_P_STEPS_END - _P_DATA) / max(1, len(methods))
    for index, (method, params) in enumerate(methods):
        if index < len(steps):
            continue
        step_start = _P_DATA + span * index
        if converting and index == convert_at:
            model, conversion = _convert(model, spec.output_format, bench.inputs, log, step_start)
        if index == export_at and model.format == ModelFormat.hf:
            model = _export(model, bench.inputs, log, step_start)
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
        model, step = _run_step(method, params, model, ctx, of=len(methods))
        steps.append(step)
        if not (last_is_artifact and index == len(methods) - 1):
            measuring = ScaledReporter(log, step_start + span * _STEP_RUN_SHARE, step_start + span)
            bench.measure_step(model, step, index, work_dir, measuring)
        if after_step is not None and model.format == model_format:
            after_step(index, model, steps)

    if converting and convert_at == len(methods):
        model, conversion = _convert(model, spec.output_format, bench.inputs, log, _P_STEPS_END)

    # Save the artifact, measure it against the upload, report.
    log.progress(_P_STEPS_END, "save")
    artifact = work_dir / f"model{format_facts(spec.output_format).suffix}"
    save_model(model, artifact)
    log.log("artifact saved", data={"size_bytes": artifact.stat().st_size})

    log.progress(_P_SAVED, "measure")
    measured = bench.measure_result(
        (Path(model_path), model_format), (artifact, spec.output_format), steps,
        last_step_is_artifact=last_is_artifact, reporter=ScaledReporter(log, _P_SAVED, 1.0),
        with_peak_memory=spec.peak_memory,
    )  # fmt: skip

    measured.hardware = machine
    measured.conversion = conversion
    report_path = _write_report(work_dir, spec, model_format, signature, measured, started, log)
    log.progress(1.0, "done")
    return PipelineResult(artifact, spec.output_format, measured, report_path)


def _run_step(
    method: Method, params: MethodParams, model: LoadedModel, ctx: StepContext, *, of: int
) -> tuple[LoadedModel, StepMetrics]:
    """Run one step's handler (a library's failure becomes a MethodFailedError, and so does
    an ONNX model that stock tools refuse); the model it returns and the step's entry, not
    measured yet. Defaults that depend on the worker's hardware are filled in first, so the
    entry's params are the ones that ran."""
    ctx.progress(0.0)
    params = hardware.fill_defaults(params, model.format, ctx, method=method.name)
    t0 = time.monotonic()
    given = model
    try:
        model = method.handler(model, params, ctx)
        if model.format == given.format == ModelFormat.onnx and model.proto is not None:
            model = validated_output(
                model.proto, given, step=method.name, library=method.name,
                advice="Try other parameters or another method for this model.",
            )  # fmt: skip
    except EngineError as exc:
        exc.step = exc.step or method.name
        raise
    except _LIBRARY_ERRORS as exc:
        raise MethodFailedError(
            f"{method.name} failed on this model: {type(exc).__name__}: {exc}",
            step=method.name,
        ) from exc
    seconds = time.monotonic() - t0
    step = StepMetrics(
        method=method.name,
        params=params.model_dump(mode="json"),
        seconds=seconds,
        format=model.format,
        layers=dict(ctx.layers) or None,
    )
    ctx.log(f"step {ctx.step + 1}/{of} {method.name} done in {seconds:.2f}s")
    ctx.progress(1.0)
    return model, step


def _write_report(
    work_dir: Path,
    spec: PipelineSpec,
    model_format: str,
    signature: dict[str, Any],
    measured: PipelineMetrics,
    started: float,
    log: RecordingReporter,
) -> Path:
    """``report.json``: the spec, the model's signature, the metrics and the log."""
    metrics = measured.to_json()
    report = {
        "spec": asdict(spec),
        "model": {"format": model_format, **signature},
        "steps": metrics["steps"],
        "metrics": metrics,
        "seconds": time.monotonic() - started,
        "log": log.logs,
    }
    path = work_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def _resolve(
    model_format: str,
    spec: PipelineSpec,
    datasets: Mapping[str, Path | Dataset],
    layers: list[str] | None = None,
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
        layer_names=layers,
    )
    try:
        return resolve_pipeline(request)
    except SpecError as exc:
        raise error_for(exc.problems[0].code, str(exc), step="validate") from None


def _export(
    model: LoadedModel, feeds: dict[str, np.ndarray], log: Reporter, at: float
) -> LoadedModel:
    log.progress(at, "export")
    try:
        return export_hf(model, feeds=feeds, reporter=log)
    except EngineError as exc:
        exc.step = "export"
        raise


def _convert(
    model: LoadedModel,
    output_format: str,
    feeds: dict[str, np.ndarray],
    log: RecordingReporter,
    at: float,
) -> tuple[LoadedModel, Conversion]:
    log.progress(at, "convert")
    t0 = time.monotonic()
    try:
        converted = convert(
            model, output_format, feeds=feeds, reporter=ScaledReporter(log, at, at, "convert")
        )
    except EngineError as exc:
        exc.step = exc.step or "convert"
        raise
    return converted, conversion_figures(converted, time.monotonic() - t0)


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
