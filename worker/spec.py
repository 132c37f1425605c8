"""The job-spec check: the one place that says whether a pipeline can run on a model.

``POST /v1/jobs`` (which answers 422 with every :class:`Problem`) and the engine
(:func:`worker.pipeline.run_pipeline`, ``squish compress --local``, which raise the
first problem's :class:`~worker.errors.EngineError`) call :func:`check_pipeline`, so
both give the same answer, in the same words, for the same spec. Torch-free.

The conversion policy lives here too (:data:`QUANTIZED_AFTER_CONVERSION`,
:func:`step_formats`, and :mod:`worker.convert` for why): with ``output_format: onnx``
for a pt2 or hf model, a trailing run of steps whose method declares ``post_conversion``
(ONNX Runtime quantization) gets the converted model; with ``output_format: aoti`` every
step runs in PyTorch and the model is compiled after the last one. An hf model bound for
``aoti`` is exported to a torch.export program (pt2) before the first step that takes
programs but not hf models (PT2E quantization ...): :data:`EXPORTED_FOR`.

``exclude`` is checked here too, against the model's layer names when they are known
(:attr:`PipelineRequest.layer_names`; :mod:`worker.layers`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from worker.contract import (
    FORMATS,
    DatasetFormat,
    DatasetRole,
    Device,
    ErrorCode,
    ModelFormat,
    RuntimeName,
    conversion_problem,
    values,
)
from worker.layers import exclude_problem, excluded_entries
from worker.methods import get_method
from worker.methods.base import DataNeed, Method, MethodParams, UnknownMethodError

# Bounds of ``evaluate`` (the API's request schema uses the same numbers).
MAX_BATCH_SIZES = 8
MAX_BATCH_SIZE = 1024
MAX_WARMUP = 100
MAX_ITERATIONS = 10_000

Loc = tuple[str | int, ...]

QUANTIZED_AFTER_CONVERSION = frozenset({ModelFormat.onnx})
"""Output formats whose runtime quantizes the converted model itself: a trailing run of
``post_conversion`` steps (ONNX Runtime quantization) runs on the converted model, since
ONNX cannot express a PyTorch-quantized program and ONNX Runtime's int8 kernels need its
own QDQ / integer ops. Any other output format (``aoti``) is converted after the last
step: AOTInductor compiles the program the PyTorch steps left, and a PT2E-quantized
program is what Inductor lowers to its int8 kernels (``freezing``), so quantization steps
run in torch *before* the compile."""

EXPORTED_FOR = frozenset({ModelFormat.aoti})
"""Output formats for which an hf model becomes a torch.export program (``pt2``) on the
way: the steps before the first one that does not take hf models (but takes pt2) run on
the transformers module, that step and those after it on the exported program (its
inputs keep the hf input names, its weights the module paths), which is then compiled.
A PT2E int8 program is what Inductor lowers to int8 kernels, and only a program can be
quantized that way."""


@dataclass(frozen=True)
class Problem:
    """One reason a spec cannot run: where (``loc``, as in a 422's ``errors``) and what to change.

    ``code`` is the job error code the engine raises for it; ``type`` the validation error
    type clients see in a 422 (pydantic's, for params).
    """

    loc: Loc
    msg: str
    code: ErrorCode = ErrorCode.invalid_params
    type: str = "value_error"

    def to_dict(self) -> dict[str, Any]:
        return {"loc": list(self.loc), "msg": self.msg, "type": self.type}


def describe(problems: Sequence[Problem]) -> str:
    """``"pipeline.0.params.amount: must be …; datasets.train: …"``: the 422's detail."""
    return "; ".join(f"{'.'.join(str(p) for p in pr.loc) or 'spec'}: {pr.msg}" for pr in problems)


@dataclass(frozen=True)
class DatasetInfo:
    """What the check knows of a dataset before it is loaded (``None``: not known yet)."""

    format: DatasetFormat | None = None
    has_labels: bool | None = None


@dataclass(frozen=True)
class PipelineRequest:
    """A spec as the check sees it: raw step params, the model's format, the datasets given."""

    model_format: str
    steps: Sequence[tuple[str, Mapping[str, Any]]]
    output_format: str | None = None
    device: str = Device.cpu
    runtime: str | None = None
    datasets: Mapping[str, DatasetInfo] = field(default_factory=dict)
    batch_sizes: Sequence[int] = (1,)
    warmup: int = 3
    iterations: int = 20
    layer_names: Sequence[str] | None = None
    """The model's layers (``info.layer_names``); None when not known (``exclude`` is then
    checked when the step runs)."""


@dataclass(frozen=True)
class CheckedStep:
    method: Method
    params: MethodParams
    format: ModelFormat
    """The format of the model this step receives."""


@dataclass(frozen=True)
class CheckedPipeline:
    """A spec that can run: validated params and the format each step gets."""

    steps: list[CheckedStep]
    model_format: ModelFormat
    output_format: ModelFormat
    runtime: RuntimeName

    @property
    def export_at(self) -> int:
        """The index of the first step that gets the hf model exported to a pt2 program
        (``len(steps)``: none does; :data:`EXPORTED_FOR`)."""
        if self.model_format != ModelFormat.hf:
            return len(self.steps)
        return next(
            (i for i, s in enumerate(self.steps) if s.format == ModelFormat.pt2), len(self.steps)
        )

    @property
    def convert_at(self) -> int:
        """The index of the first step that gets the converted model (``len(steps)``: none)."""
        if self.output_format == self.model_format:
            return len(self.steps)
        return next(
            (i for i, s in enumerate(self.steps) if s.format == self.output_format),
            len(self.steps),
        )


class SpecError(Exception):
    """The spec cannot run; ``problems`` says every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(describe(problems))
        self.problems = problems


def check_pipeline(request: PipelineRequest) -> list[Problem]:
    """Every reason ``request`` cannot run; empty when it can."""
    return _check(request)[1]


def resolve_pipeline(request: PipelineRequest) -> CheckedPipeline:
    """The checked pipeline; raises :class:`SpecError` with every problem when it cannot run."""
    checked, problems = _check(request)
    if problems or checked is None:
        raise SpecError(problems)
    return checked


def runs_after_conversion(method: Method, output_format: str) -> bool:
    """Whether a trailing step of this method runs on the converted model."""
    return (
        output_format in QUANTIZED_AFTER_CONVERSION
        and method.post_conversion
        and output_format in method.formats
    )


def step_formats(input_format: str, output_format: str, methods: Sequence[Method]) -> list[str]:
    """The format of the model each step receives (see the module docstring)."""
    count = len(methods)
    point = count
    if input_format == ModelFormat.hf and output_format in EXPORTED_FOR:
        point = next(
            (
                i
                for i, m in enumerate(methods)
                if ModelFormat.hf not in m.formats and ModelFormat.pt2 in m.formats
            ),
            count,
        )
        return [input_format] * point + [ModelFormat.pt2] * (count - point)
    if input_format != output_format:
        while point > 0 and runs_after_conversion(methods[point - 1], output_format):
            point -= 1
    return [input_format] * point + [output_format] * (count - point)


def format_problem(method: Method, fmt: str, input_format: str, output_format: str) -> str | None:
    """Why ``method`` cannot take a ``fmt`` model in this job, with what to change."""
    if fmt in method.formats:
        return None
    message = (
        f"{method.name} does not accept {fmt} models "
        f"(it accepts {', '.join(sorted(method.formats))})"
    )
    onnx_side = method.post_conversion and ModelFormat.onnx in method.formats
    converts = ModelFormat.onnx in FORMATS[ModelFormat(input_format)].converts_to
    if onnx_side and input_format != ModelFormat.onnx and converts:
        if output_format == ModelFormat.onnx:
            message += (
                "; with output_format 'onnx' it runs on the converted ONNX model when it "
                "comes after every step that is not an ONNX Runtime quantization: move it "
                "to the end of the pipeline"
            )
        else:
            message += (
                "; set output_format to 'onnx' to convert the model and run it in ONNX "
                "Runtime at the end of the pipeline"
            )
    return message


def _check(request: PipelineRequest) -> tuple[CheckedPipeline | None, list[Problem]]:
    problems: list[Problem] = []
    unsupported = ErrorCode.unsupported
    if request.model_format not in values(ModelFormat):
        known = ", ".join(values(ModelFormat))
        msg = f"unknown model format {request.model_format!r}; supported: {known}"
        return None, [Problem(("model_format",), msg, unsupported)]
    model_format = ModelFormat(request.model_format)
    output = request.output_format or model_format
    if output not in values(ModelFormat):
        msg = f"unknown output_format {output!r}; use {', '.join(values(ModelFormat))}"
        return None, [Problem(("output_format",), msg, unsupported)]
    output_format = ModelFormat(output)
    conversion = conversion_problem(model_format, output_format)
    if conversion is not None:
        problems.append(Problem(("output_format",), conversion, unsupported))
    runtime = FORMATS[output_format].runtime
    if request.runtime is not None and request.runtime != runtime:
        problems.append(
            Problem(
                ("target", "runtime"),
                f"a {output_format} artifact runs in {runtime}; set target.runtime to "
                f"{runtime.value!r} or omit it",
                unsupported,
            )
        )
    device_ok = request.device in values(Device)
    if not device_ok:
        problems.append(
            Problem(
                ("target", "device"),
                f"unknown device {request.device!r}; use {' or '.join(values(Device))}",
                unsupported,
            )
        )
    elif request.device not in FORMATS[output_format].devices:
        made_for = " or ".join(sorted(FORMATS[output_format].devices))
        problems.append(
            Problem(
                ("target", "device"),
                f"{output_format} artifacts are made for {made_for} workers only; use "
                f"target.device {made_for!r} or another output_format",
                unsupported,
            )
        )
    problems += _evaluate_problems(request)
    problems += _dataset_problems(request, model_format)

    methods: list[Method | None] = []
    for index, (name, _) in enumerate(request.steps):
        try:
            methods.append(get_method(name))
        except UnknownMethodError as exc:
            problems.append(Problem(("pipeline", index, "method"), str(exc)))
            methods.append(None)
    if not request.steps:
        problems.append(Problem(("pipeline",), "the pipeline needs at least one step"))
    found = [m for m in methods if m is not None]
    formats = iter(step_formats(model_format, output_format, found) if conversion is None else [])

    steps: list[CheckedStep] = []
    for index, ((_, raw), method) in enumerate(zip(request.steps, methods, strict=True)):
        if method is None:
            continue
        fmt = ModelFormat(next(formats, model_format))
        where: Loc = ("pipeline", index)
        try:
            params = method.validate_params(raw or {}, fmt)
        except ValidationError as exc:
            problems += [
                Problem((*where, "params", *e["loc"]), e["msg"], type=e["type"])
                for e in exc.errors()
            ]
            continue
        refusal = format_problem(method, fmt, model_format, output_format)
        if refusal is not None:
            problems.append(Problem((*where, "method"), refusal, unsupported))
        if device_ok and request.device not in method.devices:
            problems.append(
                Problem(
                    ("target", "device"),
                    f"{method.name} does not run on {request.device} "
                    f"(it runs on {', '.join(sorted(method.devices))})",
                    unsupported,
                )
            )
        for need in method.needs(params):
            unmet = _unmet(need, request.datasets)
            if unmet is not None:
                problems.append(Problem(unmet[0], f"{method.name} {unmet[1]}"))
        # Layer names are the model's (an exported hf model keeps them): a step on the
        # converted model is checked when it runs.
        entries = excluded_entries(params)
        same_layers = fmt == model_format or (model_format, fmt) == (ModelFormat.hf, "pt2")
        if entries and request.layer_names is not None and same_layers:
            wrong = exclude_problem(entries, request.layer_names, method.name)
            if wrong is not None:
                problems.append(Problem((*where, "params", "exclude"), wrong))
        steps.append(CheckedStep(method, params, fmt))
    if problems:
        return None, problems
    return CheckedPipeline(steps, model_format, output_format, runtime), []


def _unmet(need: DataNeed, datasets: Mapping[str, DatasetInfo]) -> tuple[Loc, str] | None:
    """Where and why ``need`` is not met by the datasets given; None when it is."""
    given = [str(role) for role in need.roles if role in datasets]
    if need.labelled:
        if any(datasets[role].has_labels is not False for role in given):
            return None  # labelled, or not known yet (checked again once loaded)
    elif given:
        return None
    what = " or ".join(str(role) for role in need.roles)
    msg = f"needs a {what} dataset" + (" with labels" if need.labelled else "")
    if need.why:
        msg += f" ({need.why})"
    if given:
        msg += f"; the {' and '.join(given)} dataset has no 'labels'"
    else:
        msg += f"; upload one and pass its id in datasets.{need.roles[0]}"
    return ("datasets", str((given or list(need.roles))[0])), msg


def _evaluate_problems(request: PipelineRequest) -> list[Problem]:
    problems = []
    sizes = list(request.batch_sizes)
    if not sizes or len(sizes) > MAX_BATCH_SIZES:
        problems.append(
            Problem(("evaluate", "batch_sizes"), f"give 1 to {MAX_BATCH_SIZES} batch sizes")
        )
    if any(not 1 <= size <= MAX_BATCH_SIZE for size in sizes):
        problems.append(
            Problem(
                ("evaluate", "batch_sizes"),
                f"each batch size must be between 1 and {MAX_BATCH_SIZE}",
            )
        )
    if not 0 <= request.warmup <= MAX_WARMUP:
        problems.append(Problem(("evaluate", "warmup"), f"must be between 0 and {MAX_WARMUP}"))
    if not 1 <= request.iterations <= MAX_ITERATIONS:
        problems.append(
            Problem(("evaluate", "iterations"), f"must be between 1 and {MAX_ITERATIONS}")
        )
    return problems


def _dataset_problems(request: PipelineRequest, model_format: ModelFormat) -> list[Problem]:
    problems = []
    for role, info in request.datasets.items():
        if role not in values(DatasetRole):
            problems.append(
                Problem(
                    ("datasets", role),
                    f"unknown dataset role {role!r}; use {', '.join(values(DatasetRole))}",
                    ErrorCode.unsupported,
                )
            )
        elif info.format == DatasetFormat.jsonl and model_format != ModelFormat.hf:
            problems.append(
                Problem(
                    ("datasets", role),
                    "text (.jsonl) datasets need a Hugging Face (hf) model, whose tokenizer "
                    f"turns them into inputs; this model is {model_format}: use .npz or "
                    ".safetensors",
                    ErrorCode.dataset_mismatch,
                )
            )
    return problems
