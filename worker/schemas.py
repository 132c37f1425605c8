"""The metrics of a job (DESIGN §6) as typed models: their names are a client contract.

Pydantic only (no torch, no numpy), so that the API can type ``JobOut.metrics`` with
:class:`PipelineMetrics` and ``/openapi.json`` documents every figure, while the engine
builds its result from the same models.

A figure that was not measured is absent, never ``null``: every model here drops its
unset fields when serialized (whatever the caller's ``exclude_none``), and its JSON Schema
lists such a field as optional, not as nullable. Unknown keys are kept (a newer worker may
write figures an older API does not know yet), so a stored row always reads back as it
was written.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer
from pydantic.json_schema import SkipJsonSchema

from worker.contract import ErrorCode, LayerStatus, ModelFormat, Objective, RuntimeName, TrialStatus


def _unset_is_not_null(schema: dict[str, Any]) -> None:
    # An optional figure defaults to "absent"; a "default": null would say it reads as null.
    for prop in schema.get("properties", {}).values():
        if prop.get("default", ...) is None:
            del prop["default"]


class Figures(BaseModel):
    """Base of the metric models: unset fields are left out, unknown keys kept."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_unset_is_not_null)

    # No return annotation: with one, pydantic would document the serialized form as that
    # type instead of as this model.
    @model_serializer(mode="wrap")
    def _absent_when_unmeasured(self, handler: SerializerFunctionWrapHandler):
        data = handler(self)
        return {key: value for key, value in data.items() if value is not None}

    def to_json(self) -> dict[str, Any]:
        """The JSON form: what a job stores in its `metrics` and writes to its report."""
        return self.model_dump(mode="json", exclude_none=True)


class Latency(Figures):
    """Wall-clock time of one call with one batch, over the timed runs, in milliseconds."""

    p50: float = Field(description="Median of the timed runs, ms.")
    p95: float = Field(description="95th percentile of the timed runs, ms.")
    mean: float = Field(description="Mean of the timed runs, ms.")


class FileFigures(Figures):
    """What is measured on a model file, after each step as for the original and the artifact."""

    size_bytes: int | SkipJsonSchema[None] = Field(None, description="Bytes of the model file.")
    size_bytes_gzip: int | SkipJsonSchema[None] = Field(
        None, description="Bytes of the file compressed with gzip (level 6)."
    )
    parameters: int | SkipJsonSchema[None] = Field(
        None,
        description=(
            "Weights in the file's weight tensors (int8 and packed weights count as weights; "
            "quantization scales and zero points do not)."
        ),
    )
    nonzero_parameters: int | SkipJsonSchema[None] = Field(
        None, description="Of `parameters`, those whose stored value is not zero."
    )
    sparsity: float | SkipJsonSchema[None] = Field(
        None, description="1 - nonzero_parameters / parameters; absent without weight tensors."
    )
    macs: int | SkipJsonSchema[None] = Field(
        None,
        description=(
            "Multiply-accumulates of the matmul and convolution ops for one sample, counted "
            "in the runtime where countable."
        ),
    )
    latency_ms: dict[str, Latency] | SkipJsonSchema[None] = Field(
        None,
        description=(
            "By batch size (`batch_1`, `batch_32`, ...): latency on the worker's device in the "
            "runtime of the file's format. A batch size the model cannot run is absent."
        ),
    )


class ModelMetrics(FileFigures):
    """`metrics.original` and `metrics.compressed`: one model file, fully measured."""

    peak_memory_bytes: int | SkipJsonSchema[None] = Field(
        None,
        description=(
            "Host memory the model adds at its peak while loaded and run on the largest "
            "batch, measured in a fresh process."
        ),
    )
    accuracy: float | SkipJsonSchema[None] = Field(
        None, description="Top-1 accuracy on the eval dataset; only with labelled eval data."
    )


class Fidelity(Figures):
    """The compressed model's outputs against the original's, on the same inputs.

    Token outputs (`[N, T, H]` with an `attention_mask`) are compared as sentence
    embeddings, averaged over the tokens the mask keeps.
    """

    cosine_similarity: float = Field(
        description="Mean over samples of the cosine between a sample's flattened outputs."
    )
    mse: float = Field(description="Mean squared error over all output elements.")
    max_abs_error: float = Field(description="Largest absolute difference of an output element.")
    top1_agreement: float | SkipJsonSchema[None] = Field(
        None,
        description="Share of samples whose argmax agrees; classifiers (`[N, C>1]`) only.",
    )


class Ratios(Figures):
    """The original against the compressed model."""

    size: float | SkipJsonSchema[None] = Field(
        None, description="Original size_bytes / compressed size_bytes."
    )
    speedup: dict[str, float] | SkipJsonSchema[None] = Field(
        None,
        description="By batch size (`batch_1`, ...): original p50 latency / compressed p50.",
    )


class LayerMetrics(Figures):
    """`metrics.layers[name]` (and a step's `layers`): what the job did to one layer."""

    status: LayerStatus = Field(
        description="`changed` (a step rewrote its weights) or `kept` (left as it was)."
    )
    dtype: str | SkipJsonSchema[None] = Field(
        None, description="The type its weights were stored in by the step that changed it."
    )
    sparsity: float | SkipJsonSchema[None] = Field(
        None, description="Share of its weights that are zero after the step that changed it."
    )
    clipped: int | SkipJsonSchema[None] = Field(
        None, description="`clip`: how many of its weights were clamped to the range."
    )
    reason: str | SkipJsonSchema[None] = Field(
        None, description="Why a kept layer was kept (`excluded`, or what the method skips)."
    )
    steps: list[int] | SkipJsonSchema[None] = Field(
        None, description="The pipeline steps (0-based) that changed it."
    )


class CompileFigures(Figures):
    """How an `aoti` package was compiled: what must match where it is loaded."""

    torch_version: str = Field(description="The torch that compiled it; load it with the same.")
    instruction_set: str = Field(
        description="The vector instruction set Inductor generated kernels for, e.g. `avx512`."
    )
    machine: str = Field(description="`x86_64`, `aarch64`, ...")
    cpu: str | SkipJsonSchema[None] = Field(None, description="The worker CPU's model name.")
    cpu_instruction_sets: list[str] = Field(
        description=(
            "The worker CPU's instruction sets (as `metrics.hardware` lists them): the "
            "kernels may use any of them (`march`), so the CPU that loads it needs them all."
        )
    )
    march: str = Field(description="The C++ compiler's `-march` (`native`: this CPU's flags).")
    threads: int = Field(description="The thread count its kernels were generated for.")
    options: dict[str, Any] = Field(description="The Inductor options it was compiled with.")
    compile_seconds: float = Field(description="Wall-clock time of the compile.")


class Conversion(Figures):
    """`metrics.conversion`: the model converted (or compiled) into the output format."""

    format: ModelFormat = Field(description="The artifact's format (`onnx`, `aoti`).")
    runtime: RuntimeName = Field(description="The runtime it runs in.")
    seconds: float = Field(description="Wall-clock time of the conversion, checks included.")
    compiled: CompileFigures | SkipJsonSchema[None] = Field(
        None, description="For `aoti`: how the package was compiled."
    )


class StepMetrics(FileFigures):
    """`metrics.steps[]`: one step of the pipeline and its model as that step left it.

    An intermediate model is timed with fewer runs (`latency_iterations`) and gets no
    peak memory figure; the last step's entry is the artifact's measurement when the
    artifact is that step's model.
    """

    method: str = Field(description="The method's registered name, e.g. 'prune.magnitude'.")
    params: dict[str, Any] = Field(description="The step's parameters, normalized.")
    seconds: float = Field(description="Wall-clock time the method took.")
    format: ModelFormat = Field(
        description="The format of the step's model ('onnx' for steps after the conversion)."
    )
    latency_iterations: int | SkipJsonSchema[None] = Field(
        None, description="Timed runs per batch size behind this entry's latency_ms."
    )
    fidelity: Fidelity | SkipJsonSchema[None] = Field(
        None, description="The step's model against the original."
    )
    accuracy: float | SkipJsonSchema[None] = Field(
        None, description="Top-1 accuracy on the eval dataset; only with labelled eval data."
    )
    layers: dict[str, LayerMetrics] | SkipJsonSchema[None] = Field(
        None, description="By layer name: the layers this step changed and those it kept."
    )


class CpuInfo(Figures):
    """The worker's CPU, as far as int8 kernels care."""

    arch: str = Field(description="`x86_64`, `aarch64`, ...")
    name: str | SkipJsonSchema[None] = Field(None, description="The model name the OS reports.")
    instruction_sets: list[str] = Field(
        description=(
            "Of the instruction sets squish looks for (`avx2`, `avx512f`, `avx512_vnni`, "
            "`avx_vnni`, `avx512_bf16`, `amx_int8`, ..., ARM's `asimddp`, `i8mm`, ...), "
            "those this CPU has; empty when they could not be read."
        )
    )
    vnni: bool = Field(
        description="Has an int8 dot product that accumulates in int32 (VNNI or AMX)."
    )
    int8_overflows: bool = Field(
        description=(
            "u8 x s8 int8 kernels saturate here (x86 without VNNI): what `reduce_range` "
            "defaults follow."
        )
    )


class GpuInfo(Figures):
    """The worker's first CUDA device."""

    name: str = Field(description="The device name.")
    count: int = Field(description="CUDA devices on the worker.")
    compute_capability: str = Field(description="`major.minor`, e.g. `9.0`.")
    memory_bytes: int = Field(description="Memory of the first device.")


class HardwareInfo(Figures):
    """The machine the job ran and was measured on."""

    cpu: CpuInfo = Field(description="The worker's CPU.")
    gpu: GpuInfo | SkipJsonSchema[None] = Field(
        None, description="The GPU a `gpu` job ran on; absent on `cpu` jobs."
    )


class PipelineMetrics(Figures):
    """A job's `metrics`: every figure measured, none estimated from the config."""

    original: ModelMetrics = Field(description="The uploaded model, in its own runtime.")
    compressed: ModelMetrics = Field(description="The artifact, in the runtime of its format.")
    fidelity: Fidelity | SkipJsonSchema[None] = Field(
        None, description="The artifact's outputs against the original's."
    )
    ratios: Ratios = Field(description="Original / compressed size and latency.")
    steps: list[StepMetrics] | SkipJsonSchema[None] = Field(
        None, description="One entry per pipeline step, in order."
    )
    layers: dict[str, LayerMetrics] | SkipJsonSchema[None] = Field(
        None,
        description=(
            "By layer name (as `info.layer_names`), over every step that reports layers: "
            "`changed` by at least one step, else `kept`."
        ),
    )
    conversion: Conversion | SkipJsonSchema[None] = Field(
        None, description="The conversion into `output_format`, when there was one."
    )
    hardware: HardwareInfo | SkipJsonSchema[None] = Field(
        None,
        description=(
            "The worker's CPU (and GPU on `gpu` jobs); the defaults that depend on it are "
            "in each step's `params`."
        ),
    )
    search: SearchMetrics | SkipJsonSchema[None] = Field(
        None,
        description=(
            "A search job's trials, Pareto set, chosen trial and verdict (DESIGN §10); "
            "updated while the search runs."
        ),
    )


class Violation(BaseModel):
    """One bound a result does not meet: ``measured`` is absent when it was not measured."""

    constraint: str = Field(
        description="The constraint, e.g. `accuracy_drop`, `latency_ms.batch_1`."
    )
    bound: float = Field(description="The bound the spec set.")
    measured: float | None = Field(
        None, description="What the result measured; null: not measured."
    )


class TrialError(Figures):
    """Why a trial failed: the engine's error, as a failed job's ``error``."""

    code: ErrorCode = Field(description="The stable error code (as a job's `error.code`).")
    message: str = Field(description="What went wrong and, where known, what to change.")
    step: str | SkipJsonSchema[None] = Field(None, description="The stage it happened in.")


class Interval(Figures):
    """A figure measured on a sample, with its sample size and 95 % confidence interval."""

    value: float = Field(description="The figure measured on the sample.")
    n: int = Field(description="Samples it was measured on.")
    ci95: list[float] = Field(
        description=(
            "`[low, high]`: 95 % confidence interval (Wilson for accuracy, normal over the "
            "per-sample cosines for cosine similarity)."
        )
    )


class PairedLatency(Figures):
    """One batch size timed in alternating rounds, the original and the artifact side by side."""

    original_p50: float = Field(description="Median over the rounds of the original's p50, ms.")
    compressed_p50: float = Field(description="Median over the rounds of the artifact's p50, ms.")
    speedup: float = Field(description="Median over the rounds of original p50 / artifact p50.")
    speedup_range: list[float] = Field(
        description="`[lowest, highest]` per-round speedup: the spread of the figure."
    )
    rounds: int = Field(description="Alternating rounds (each times both models).")


class HoldoutFigures(Figures):
    """A trial verified on the held-out split of the eval data, which no trial was ranked on.

    `accuracy` and `cosine_similarity` are the figures of DESIGN §12 (`value`, `n`,
    `ci95` each); `accuracy_drop` is the original's held-out accuracy minus the trial's.
    """

    accuracy: Interval | SkipJsonSchema[None] = Field(
        None, description="Top-1 accuracy on the held-out split (labelled eval data only)."
    )
    original_accuracy: Interval | SkipJsonSchema[None] = Field(
        None, description="The original's top-1 accuracy on the same held-out split."
    )
    accuracy_drop: float | SkipJsonSchema[None] = Field(
        None, description="original_accuracy - accuracy, absolute."
    )
    cosine_similarity: Interval | SkipJsonSchema[None] = Field(
        None, description="Cosine similarity of its outputs to the original's, held out."
    )
    n: int = Field(description="Samples in the held-out split.")
    ci95: list[float] | SkipJsonSchema[None] = Field(
        None,
        description=(
            "The 95 % interval of the constrained figure: accuracy's when labelled, else "
            "cosine similarity's."
        ),
    )
    latency: dict[str, PairedLatency] | SkipJsonSchema[None] = Field(
        None,
        description="By batch size: repeated paired timings against the original.",
    )
    violations: list[Violation] | SkipJsonSchema[None] = Field(
        None, description="The constraints the held-out figures do not meet."
    )
    feasible: bool | SkipJsonSchema[None] = Field(
        None, description="Meets every constraint on the held-out figures."
    )


class SearchTrial(Figures):
    """`metrics.search.trials[]`: one recipe the search ran (a retried trial counts once)."""

    number: int = Field(description="The trial's number in the study, from 0.")
    pipeline: list[dict[str, Any]] = Field(
        description="The recipe's steps, as a job's `pipeline` (`method`, `params`)."
    )
    output_format: ModelFormat = Field(description="The artifact format of the recipe.")
    runtime: RuntimeName = Field(description="The runtime the artifact runs and is timed in.")
    status: TrialStatus = Field(description="`queued`, `running`, `succeeded`, `failed`, ...")
    metrics: PipelineMetrics | SkipJsonSchema[None] = Field(
        None,
        description="Its figures, shaped as a pipeline job's, on the search split.",
    )
    objectives: dict[str, float] | SkipJsonSchema[None] = Field(
        None, description="By objective (`latency`, `size`, ...): the value it was ranked on."
    )
    feasible: bool | SkipJsonSchema[None] = Field(
        None, description="Meets every constraint on the search split."
    )
    violations: list[Violation] | SkipJsonSchema[None] = Field(
        None, description="The constraints it does not meet, with what was measured."
    )
    holdout: HoldoutFigures | SkipJsonSchema[None] = Field(
        None, description="Pareto trials: the figures verified on the held-out split."
    )
    seconds: float | SkipJsonSchema[None] = Field(None, description="Wall-clock time it ran.")
    reused: list[str] | SkipJsonSchema[None] = Field(
        None, description="The leading steps taken from an earlier trial instead of rerun."
    )
    error: TrialError | SkipJsonSchema[None] = Field(None, description="Why it failed.")


class Unmet(Figures):
    """A constraint no trial met: the bound, and the closest value any trial measured."""

    constraint: str = Field(description="The constraint, e.g. `latency_ms.batch_1`.")
    bound: float = Field(description="The bound the spec set.")
    closest: float | SkipJsonSchema[None] = Field(
        None, description="The value nearest the bound any trial measured; absent: none did."
    )
    trial: int | SkipJsonSchema[None] = Field(None, description="The trial that measured it.")


class LayerSensitivity(Figures):
    """`metrics.search.sensitivity[layer]`: the model's output when only this layer changes."""

    parameters: int | SkipJsonSchema[None] = Field(None, description="Weights in the layer.")
    quantized_cosine: float | SkipJsonSchema[None] = Field(
        None, description="Output cosine similarity with only this layer's weights in int8."
    )
    quantized_accuracy: float | SkipJsonSchema[None] = Field(
        None, description="Top-1 accuracy with only this layer in int8 (labelled data only)."
    )
    pruned_cosine: float | SkipJsonSchema[None] = Field(
        None,
        description="Output cosine similarity with only this layer pruned by `pruned_amount`.",
    )
    pruned_accuracy: float | SkipJsonSchema[None] = Field(
        None, description="Top-1 accuracy with only this layer pruned (labelled data only)."
    )
    pruned_amount: float | SkipJsonSchema[None] = Field(
        None, description="The share of the layer's weights zeroed for `pruned_*`."
    )
    rank: int | SkipJsonSchema[None] = Field(
        None, description="1 = the layer whose int8 weights change the output most."
    )


class SearchMetrics(Figures):
    """`metrics.search`: what a search tried, its Pareto set, its choice and its verdict."""

    objectives: list[Objective] = Field(description="The objectives, in priority order.")
    trials: list[SearchTrial] = Field(description="Every trial, by number.")
    pareto: list[int] = Field(
        description=(
            "Numbers of the trials no other succeeded trial dominates on the objectives, a "
            "trial that meets the constraints dominating every one that does not (while "
            "any does, the front of those; at the end, of those the held-out split confirms)."
        ),
    )
    best: int | SkipJsonSchema[None] = Field(
        None,
        description=(
            "The chosen trial: the feasible Pareto trial best on the first objective, then "
            "the next; when none is feasible, the closest one (its model stays downloadable)."
        ),
    )
    met: bool | SkipJsonSchema[None] = Field(
        None, description="Whether the chosen trial meets every constraint; absent while running."
    )
    unmet: list[Unmet] | SkipJsonSchema[None] = Field(
        None, description="When no trial is feasible: each constraint no trial met."
    )
    sensitivity: dict[str, LayerSensitivity] | SkipJsonSchema[None] = Field(
        None, description="By layer name (as `info.layer_names`): per-layer sensitivity."
    )
    holdout: HoldoutFigures | SkipJsonSchema[None] = Field(
        None, description="The chosen trial on the held-out split (`accuracy` or `cosine`)."
    )
    search_split: int | SkipJsonSchema[None] = Field(
        None, description="Eval samples trials were ranked on."
    )
    holdout_split: int | SkipJsonSchema[None] = Field(
        None, description="Eval samples held out to verify the Pareto set and the choice."
    )
