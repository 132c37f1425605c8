"""``quantize.static``: post-training int8 with calibrated activation ranges.

Weights and activations are both int8/uint8; the activation ranges are measured once,
on the ``calibration`` dataset, instead of at every call (``quantize.dynamic``).

- pt2: torchao's PT2E flow with ``X86InductorQuantizer`` in static mode
  (``prepare_pt2e`` inserts observers, the calibration batches run through it,
  ``convert_pt2e`` folds the weights to int8 constants and writes the activation
  scales into quantize/dequantize pairs). The graph is re-exported with the upload's
  dynamic dims; fp32 weights the graph no longer reads are dropped, so the file holds
  int8 weights only (about a quarter of fp32). torchao's x86 quantizer quantizes
  weights per channel and activations as uint8; other choices are refused for pt2. It
  leaves embedding tables float, so squish stores them int8 with one scale per row
  (dequantized where rows are looked up, as ONNX Runtime's static ``Gather``): in a
  transformer encoder they are most of the weights. ``exclude`` keeps one float.
  Run eagerly, these are reference ops (dequantize, fp32 kernel); ``torch.compile``
  with freezing lowers them to int8 kernels. With ``smooth_alpha`` the linear layers'
  input outliers are moved into their weights first, on the program's graph
  (:func:`worker.smoothing.smooth_pt2`); an inserted ``1/s`` multiply stays float (the x86
  quantizer does not annotate it), is re-exported as a buffer, and compiles with AOTInductor.
- onnx: ONNX Runtime's ``quant_pre_process`` (shape inference and graph optimization,
  which ORT recommends before quantizing) and ``quantize_static`` in QDQ format, with
  minmax, percentile or entropy calibration. ONNX Runtime's CPU provider fuses the QDQ
  pairs into int8 kernels. A model older than opset 13 is upgraded first when weights are
  quantized per channel (``DequantizeLinear``'s axis), and checked to compute the same
  outputs (:func:`worker.formats.onnx.normalize_onnx`); ``reduce_range`` defaults to what
  the worker's CPU needs (:mod:`worker.hardware`). With ``smooth_alpha`` the layers' input
  outliers are first moved into their weights (SmoothQuant, :mod:`worker.smoothing`); with
  ``quantize_matmul_outputs=false`` MatMul/Gemm outputs stay float (ONNX Runtime's
  ``OpTypesToExcludeOutputQuantization``), which transformer encoders need: the FFN
  output layer writes the residual stream's outlier dims, which one uint8 scale cannot hold.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, Self

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from worker import hardware
from worker.errors import DatasetMismatchError, UnsupportedError
from worker.layers import (
    Exclude,
    exclude_from_pt2e,
    excluded_layers,
    onnx_nodes_to_exclude,
    record_onnx_layers,
    record_pt2e_layers,
)
from worker.methods.base import Choice, Method, MethodParams, Searchable, SearchRole, context_format

if TYPE_CHECKING:
    from pathlib import Path

    from worker.context import StepContext
    from worker.data import Dataset
    from worker.formats import LoadedModel
    from worker.smoothing import SmoothingResult

CalibrationMethod = Literal["minmax", "histogram", "percentile", "entropy"]
# The operator types ONNX Runtime's static quantizer handles (QDQ and QLinear registries of
# onnxruntime.quantization.registry); its default is all of them.
ORT_STATIC_OP_TYPES = frozenset(
    {
        "Add", "ArgMax", "AveragePool", "BatchNormalization", "Clip", "Concat", "Conv",
        "ConvTranspose", "CumSum", "EmbedLayerNormalization", "Flatten", "Gather",
        "GatherElements", "Gemm", "GlobalAveragePool", "InstanceNormalization",
        "LayerNormalization", "LeakyRelu", "MatMul", "MaxPool", "Mul", "Pad", "Relu",
        "Reshape", "Resize", "Sigmoid", "Slice", "Softmax", "Split", "Squeeze", "TopK",
        "Transpose", "Unsqueeze", "Where",
    }
)  # fmt: skip
_CALIBRATION_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "pt2": ("histogram", "minmax"),
    "onnx": ("minmax", "percentile", "entropy"),
}


class StaticQuantizeParams(MethodParams):
    """Static post-training quantization: int8 weights and activations, calibrated.

    Needs a ``calibration`` dataset: a few hundred representative inputs (no labels
    needed) from which the activation ranges are measured once.

    Args:
        per_channel: one weight scale per output channel (more accurate) instead of one
            per tensor. pt2 (torchao's x86 quantizer) is per channel only.
        calibrate_method: how activation ranges are chosen from the calibration data.
            ``"minmax"``: the observed min and max; ``"histogram"`` (pt2 only): torchao's
            histogram observer, the range that minimizes the quantization error;
            ``"percentile"`` (onnx only): clip at ``percentile``; ``"entropy"`` (onnx
            only): the range that minimizes the KL divergence. Default: ``histogram``
            for pt2, ``minmax`` for onnx.
        percentile: with ``calibrate_method="percentile"``, the percentile of absolute
            activation values kept unclipped.
        activation_type: ``"uint8"`` (asymmetric, what x86 int8 kernels want) or
            ``"int8"`` (symmetric; ARM and GPU targets). pt2: uint8 only.
        weight_type: ``"int8"`` or ``"uint8"`` (onnx only). pt2: int8 only.
        reduce_range: use 7 bits of range, which x86 CPUs without VNNI need to avoid
            overflow in u8 x s8 kernels (pt2: activations, onnx: weights). Default
            (null): chosen for the worker's CPU, and the choice is recorded in the job's
            step params and events: on for onnx with uint8 activations and int8 weights
            on an x86 CPU without VNNI (measured on a pruned, distilled digits CNN on an
            AVX2 CPU: 96.0 % in fp32, int8 90.7 % without, 96.0 % with); off where the
            overflow does not exist (AVX512-VNNI, AVX-VNNI, AMX, ARM), which keeps the
            weights' eighth bit, and for pt2 (reference kernels run eagerly).
        op_types: onnx only: the operator types to quantize (ONNX Runtime's
            ``op_types_to_quantize``); default every type it handles. Transformer
            encoders keep far more fidelity with ``["MatMul", "Gemm"]`` (measured on
            MiniLM: cosine 0.945 vs 0.399 with every type), though ``quantize.dynamic``
            keeps the most (0.992).
        smooth_alpha: SmoothQuant before quantizing (onnx and pt2): each input channel
            ``j`` of a MatMul/Gemm (onnx) or linear layer (pt2) is divided by
            ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (measured on the calibration data)
            and the matching weight row (onnx ``[in, out]``) or column (pt2 ``[out, in]``)
            multiplied by it, exact in float, so that a few outlier channels no longer set
            the activation's one int8 scale. 0..1: higher moves more of the range into the
            weights. Default (null): off. Layers in ``exclude`` are neither smoothed nor
            folded into. Measured on a small pt2 block (LayerNorm → three Linear layers,
            a post-LN Linear; three and two input channels 50x the others): cosine to fp32
            0.970 without, 0.99998 with ``smooth_alpha`` 0.5.
        quantize_matmul_outputs: onnx only: quantize MatMul/Gemm outputs too (ONNX
            Runtime's QDQ default). ``false`` keeps them float (int8 GEMM, float output).
            MiniLM static int8 (op_types MatMul, Gemm, Gather), cosine to fp32 embeddings on
            this project's benchmark: 0.943 with, 0.987 without, 0.995 without and with
            ``smooth_alpha`` 0.8, at 0.25x the fp32 size.
        max_samples: at most this many calibration samples are used.
        batch_size: calibration batch size (a model with a fixed batch uses its own).
        exclude: layers left float, as the model's ``info.layer_names`` lists them
            (module paths for pt2, node names for onnx) or ``re:`` patterns: torchao's
            module-name configuration (pt2), ONNX Runtime's ``nodes_to_exclude`` (onnx).

    Example:
        ``{"method": "quantize.static", "params": {"calibrate_method": "entropy"}}``; a
        transformer encoder: ``{"smooth_alpha": 0.8, "quantize_matmul_outputs": false,
        "op_types": ["MatMul", "Gemm", "Gather"]}``.
    """

    per_channel: bool = Field(
        default=True,
        description=(
            "One weight scale per output channel (true) or per tensor (false; onnx only)."
        ),
    )
    calibrate_method: CalibrationMethod | None = Field(
        default=None,
        description=(
            "Activation range from the calibration data: 'minmax'; 'histogram' (pt2 only, "
            "minimizes the quantization error); 'percentile' or 'entropy' (onnx only). "
            "Default: histogram for pt2, minmax for onnx."
        ),
    )
    percentile: float = Field(
        default=99.999,
        gt=90.0,
        le=100.0,
        description="With calibrate_method='percentile': the percentile kept unclipped.",
    )
    activation_type: Literal["uint8", "int8"] = Field(
        default="uint8",
        description="Activation type: uint8 (x86 kernels) or int8 (onnx only).",
    )
    weight_type: Literal["int8", "uint8"] = Field(
        default="int8", description="Weight type: int8, or uint8 (onnx only)."
    )
    reduce_range: bool | None = Field(
        default=None,
        description=(
            "7 bits of range, for x86 CPUs without VNNI (pt2: activations, onnx: weights). "
            "null: chosen for the worker's CPU and recorded in the step's params: on for "
            "onnx with uint8 activations and int8 weights where u8 x s8 kernels overflow "
            "(x86 without VNNI), off otherwise."
        ),
    )
    op_types: tuple[str, ...] | None = Field(
        default=None,
        min_length=1,
        max_length=len(ORT_STATIC_OP_TYPES),
        description=(
            "onnx only: operator types to quantize, e.g. ['MatMul', 'Gemm'] for transformer "
            "encoders; null: every type ONNX Runtime handles."
        ),
    )
    smooth_alpha: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description=(
            "SmoothQuant migration strength (0..1), or null for none: each input channel j "
            "of a linear layer is divided by s_j = max|X_j|^alpha / max|W_j|^(1-alpha) from "
            "the calibration data and its weights multiplied by s_j (exact in float), so that "
            "outlier channels stop setting the activation's int8 scale. onnx (MatMul/Gemm) "
            "and pt2 (linear layers; also with output_format 'aoti'). Transformer encoders: "
            "0.5-0.8."
        ),
    )
    quantize_matmul_outputs: bool = Field(
        default=True,
        description=(
            "onnx only: quantize MatMul/Gemm outputs too (ONNX Runtime's default); false "
            "keeps them float (int8 GEMM, float output), which transformer encoders need."
        ),
    )
    max_samples: int = Field(
        default=512, ge=1, le=100_000, description="At most this many calibration samples."
    )
    batch_size: int = Field(
        default=32, ge=1, le=4096, description="Calibration batch size (a fixed batch wins)."
    )
    exclude: Exclude = None

    @model_validator(mode="after")
    def _supported_by_backend(self, info: ValidationInfo) -> Self:
        fmt = context_format(info)
        if fmt is None:
            return self
        problem = unsupported_reason(self, fmt)
        if problem:
            raise ValueError(problem)
        return self

    @field_validator("op_types")
    @classmethod
    def _known_op_types(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return checked_op_types(value, ORT_STATIC_OP_TYPES, "statically")

    def calibration(self, fmt: str) -> str:
        """The calibration method, the backend's default filled in."""
        return self.calibrate_method or _CALIBRATION_BY_FORMAT[fmt][0]

    def use_reduce_range(self, fmt: str, cpu: hardware.Cpu | None = None) -> bool:
        """``reduce_range``, the default filled in for ``cpu`` (default: this worker's)."""
        if self.reduce_range is not None:
            return self.reduce_range
        cpu = cpu or hardware.worker_cpu()
        u8s8 = (self.activation_type, self.weight_type) == ("uint8", "int8")
        return fmt == "onnx" and u8s8 and cpu.int8_overflows

    def for_hardware(self, fmt: str, cpu: hardware.Cpu) -> Self:
        """These params with ``reduce_range`` chosen for ``cpu`` if it was left unset."""
        if self.reduce_range is not None:
            return self
        return self.model_copy(update={"reduce_range": self.use_reduce_range(fmt, cpu)})


def checked_op_types(
    value: tuple[str, ...] | None, handled: frozenset[str], how: str
) -> tuple[str, ...] | None:
    """``op_types`` without repeats; a type ONNX Runtime does not quantize ``how``
    (``"statically"``, ``"dynamically"``) is refused, naming those it does."""
    if value is None:
        return None
    unknown = sorted(set(value) - handled)
    if unknown:
        raise ValueError(
            f"ONNX Runtime cannot quantize {', '.join(unknown)} {how}; op_types "
            f"takes {', '.join(sorted(handled))}"
        )
    return tuple(dict.fromkeys(value))


def unsupported_reason(params: StaticQuantizeParams, fmt: str) -> str | None:
    """Why ``fmt``'s backend cannot do what ``params`` ask, or None."""
    if fmt == "pt2":
        if not params.per_channel:
            return (
                "per_channel=false is not supported for pt2 models: torchao's x86 quantizer "
                "quantizes weights per channel only; use per_channel=true, or an onnx model"
            )
        if params.activation_type != "uint8" or params.weight_type != "int8":
            return (
                "pt2 models are quantized with uint8 activations and int8 weights (torchao's "
                "x86 quantizer); use activation_type='uint8' and weight_type='int8', or an "
                "onnx model"
            )
        if params.op_types is not None:
            return (
                "op_types is for onnx models (ONNX Runtime); torchao's x86 quantizer "
                "chooses the layers of a pt2 model itself: leave op_types out"
            )
        if not params.quantize_matmul_outputs:
            return (
                "quantize_matmul_outputs is for onnx models (ONNX Runtime's QDQ); torchao's "
                "x86 quantizer decides which outputs of a pt2 model are quantized: leave it out"
            )
    allowed = _CALIBRATION_BY_FORMAT.get(fmt)
    if allowed and params.calibrate_method is not None and params.calibrate_method not in allowed:
        return (
            f"calibrate_method={params.calibrate_method!r} is not available for {fmt} models; "
            f"use one of {', '.join(allowed)}"
        )
    return None


def quantize_static(
    model: LoadedModel, params: StaticQuantizeParams, ctx: StepContext
) -> LoadedModel:
    """Quantize weights and activations to 8 bits, activation ranges from calibration."""
    problem = unsupported_reason(params, model.format)
    if problem:
        raise UnsupportedError(problem, step=ctx.method)
    params = hardware.fill_defaults(params, model.format, ctx, method=ctx.method)
    dataset = ctx.datasets.get("calibration")
    if dataset is None:
        raise DatasetMismatchError(
            "quantize.static needs a 'calibration' dataset of representative inputs",
            step=ctx.method,
        )
    batches = calibration_batches(model, dataset, params.max_samples, params.batch_size)
    if model.format == "onnx":
        return _quantize_onnx(model, params, batches, ctx)
    return _quantize_pt2(model, params, batches, ctx)


def calibration_batches(
    model: LoadedModel,
    dataset: Dataset,
    max_samples: int,
    batch_size: int,
    role: str = "calibration",
) -> list[dict[str, np.ndarray]]:
    """The first ``max_samples`` samples, fitted to the model's inputs, in batches.

    A model whose batch dim is fixed gets batches of exactly that size (the last one
    filled up by repeating samples); otherwise batches of ``batch_size``, at least 2
    samples each so that a dynamic batch dim is not specialized when traced. An onnx
    model gets equal batches too (ONNX Runtime's histogram calibrators, ``percentile``
    and ``entropy``, stack every batch's activations and fail on a short last batch).
    """
    from worker.data import fit_dataset

    feeds = fit_dataset(model, role, dataset.head(max_samples))
    total = len(next(iter(feeds.values())))
    size = model.static_batch or max(2, min(batch_size, total))
    equal = model.static_batch is not None or model.format == "onnx"
    batches = []
    for start in range(0, total, size):
        rows = min(size, total - start)
        if equal or rows < 2:
            rows = size if equal else 2
            index = np.arange(start, start + rows) % total  # fill up by repeating samples
        else:
            index = np.arange(start, start + rows)
        batches.append({k: np.ascontiguousarray(v[index]) for k, v in feeds.items()})
    return batches


def _quantize_pt2(
    model: LoadedModel,
    params: StaticQuantizeParams,
    batches: list[dict[str, np.ndarray]],
    ctx: StepContext,
) -> LoadedModel:
    import dataclasses

    import torch
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from worker.formats import layer_names, pt2_example_args, reexport_pt2

    assert model.program is not None
    config = get_default_x86_inductor_quantization_config(
        reduce_range=params.use_reduce_range("pt2")
    )
    method = params.calibration("pt2")
    if method == "minmax":
        assert config.input_activation is not None
        spec = dataclasses.replace(
            config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12)
        )
        config = dataclasses.replace(config, input_activation=spec, output_activation=spec)
    quantizer = X86InductorQuantizer().set_global(config)
    excluded = excluded_layers(params, layer_names(model), ctx.method)
    exclude_from_pt2e(quantizer, excluded, model.program)
    module = model.program.module()
    if params.smooth_alpha is not None:
        from worker.smoothing import smooth_pt2

        smoothed = smooth_pt2(
            module,
            [pt2_example_args(model, batch) for batch in batches],
            params.smooth_alpha,
            skip=excluded,
        )
        # The inserted Muls (activation times a [C] constant) are not annotated by the
        # x86 quantizer (it quantizes a mul of two same-shape tensors only): they stay float.
        _log_smoothing(smoothed, params.smooth_alpha, "linear layer with a 2-D weight", ctx)
    prepared = prepare_pt2e(module, quantizer)
    ctx.progress(0.1)
    with torch.no_grad():
        for index, batch in enumerate(batches):
            args, kwargs = pt2_example_args(model, batch)
            prepared(*args, **kwargs)
            ctx.progress(0.1 + 0.6 * (index + 1) / len(batches))
    converted = convert_pt2e(prepared)
    embeddings = _int8_embeddings(converted, excluded)
    int8 = _int8_weights(converted)
    if not int8:
        raise UnsupportedError(
            "torchao's x86 static quantizer found no Linear or Conv layer to quantize",
            step=ctx.method,
        )
    record_pt2e_layers(ctx, model, converted, excluded)
    ctx.progress(0.8)
    # Traced with inputs generated from the signature: the saved program keeps its
    # example inputs, and calibration data has no business inside the artifact.
    quantized = reexport_pt2(converted, model)
    assert quantized.program is not None
    leftover = _float_weight_matrices(quantized.program)
    ctx.log(
        f"quantized {len(int8)} weight tensors to int8 and the activations to uint8 with "
        f"torchao (PT2E, x86 static), calibrated ({method}) on "
        f"{sum(len(next(iter(b.values()))) for b in batches)} samples",
        data={
            "float_weight_matrices_left": leftover,
            "int8_embeddings": embeddings,
            "reduce_range": params.use_reduce_range("pt2"),
        },
    )
    if embeddings:
        ctx.log(
            f"stored {len(embeddings)} embedding tables as int8, one scale per row "
            f"(dequantized where rows are looked up): {', '.join(embeddings)}"
        )
    ctx.progress(1.0)
    return quantized


def _int8_embeddings(module: object, excluded: frozenset[str]) -> list[str]:
    """Each float embedding table the graph looks rows up in, as int8 with one symmetric
    scale per row: ``embedding(q, ids).float() * embedding(scale, ids)``; returns their
    layers. torchao's x86 quantizer leaves embeddings float, and in a transformer encoder
    they are most of the weights (MiniLM's word embeddings: 47 MB in fp32 of its 83.5 MB
    upload); ONNX Runtime's static
    quantizer does the same to ``Gather`` by default. A table in ``excluded`` stays float.
    """
    import torch

    from worker.layers import layer_of

    aten = torch.ops.aten
    graph = module.graph  # type: ignore[attr-defined]
    done = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.embedding.default:
            continue
        table = node.args[0]
        if not isinstance(table, torch.fx.Node) or table.op != "get_attr":
            continue
        name = str(table.target)
        weight = _attribute(module, name)
        if layer_of(name) in excluded or not isinstance(weight, torch.Tensor):
            continue
        if weight.dtype != torch.float32 or weight.ndim != 2:
            continue
        with torch.no_grad():
            scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
            codes = torch.round(weight / scale).clamp(-127, 127).to(torch.int8)
        base = name.replace(".", "_")
        module.register_buffer(f"{base}_int8", codes)  # type: ignore[attr-defined]
        module.register_buffer(f"{base}_row_scale", scale)  # type: ignore[attr-defined]
        with graph.inserting_before(node):
            rows = graph.call_function(
                aten.embedding.default, (graph.get_attr(f"{base}_int8"), *node.args[1:])
            )
            floats = graph.call_function(aten._to_copy.default, (rows,), {"dtype": torch.float32})
            scales = graph.call_function(
                aten.embedding.default, (graph.get_attr(f"{base}_row_scale"), node.args[1])
            )
            value = graph.call_function(aten.mul.Tensor, (floats, scales))
        node.replace_all_uses_with(value)
        graph.erase_node(node)
        if not table.users:
            graph.erase_node(table)
        done.append(layer_of(name))
    if done:
        graph.lint()
        module.recompile()  # type: ignore[attr-defined]
    return done


def _attribute(module: object, name: str) -> object:
    """What a ``get_attr`` node of ``module`` reads (``name``: a dotted path)."""
    value = module
    for part in name.split("."):
        value = getattr(value, part)
    return value


def _int8_weights(module: object) -> list[str]:
    import torch

    names = []
    for node in module.graph.nodes:  # type: ignore[attr-defined]
        if node.op != "get_attr":
            continue
        value = _attribute(module, str(node.target))
        if isinstance(value, torch.Tensor) and value.dtype == torch.int8:
            names.append(str(node.target))
    return names


def _float_weight_matrices(program: object) -> list[str]:
    """Float tensors of rank >= 2 still in the program (quantization left them float)."""
    tensors = {**program.state_dict, **program.constants}  # type: ignore[attr-defined]
    return sorted(
        name
        for name, t in tensors.items()
        if hasattr(t, "is_floating_point") and t.is_floating_point() and t.ndim >= 2
    )


@contextlib.contextmanager
def _histogram_errors(method: str, ctx: StepContext) -> Iterator[None]:
    """ONNX Runtime's entropy calibrator cannot bin a tensor whose values span more than
    float32 holds (an attention mask filled with the float32 minimum, as transformers
    exports have): refused with what to change, not a failed job. numpy's overflow
    warnings on the way there are ORT's business, not the job's."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    except ValueError as exc:
        if "Too many bins" not in str(exc):
            raise
        raise UnsupportedError(
            f"{method} calibration failed on this model: ONNX Runtime could not bin a tensor "
            f"whose values span more than float32 holds, such as an attention mask filled "
            f"with the float32 minimum ({exc}); use calibrate_method 'minmax' or "
            "'percentile', or restrict op_types",
            step=ctx.method,
        ) from exc


def _quantize_onnx(
    model: LoadedModel,
    params: StaticQuantizeParams,
    batches: list[dict[str, np.ndarray]],
    ctx: StepContext,
) -> LoadedModel:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
    )
    from onnxruntime.quantization import quantize_static as ort_quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from worker.formats import layer_names
    from worker.formats.onnx import QDQ_PER_CHANNEL_OPSET, normalize_onnx, validated_output

    # QuantizeLinear/DequantizeLinear exist from opset 10 and ORT fuses them from 11; their
    # per-channel axis needs 13 (ORT writes it whatever the model's opset).
    opset = QDQ_PER_CHANNEL_OPSET if params.per_channel else 11
    need = "per-channel QDQ (DequantizeLinear's axis)" if params.per_channel else "QDQ fusion"
    model = normalize_onnx(model, ctx, step=ctx.method, min_opset=opset, why=need)
    assert model.proto is not None
    excluded = excluded_layers(params, layer_names(model), ctx.method)
    source = ctx.work_dir / f"step{ctx.step}_float.onnx"
    prepared = ctx.work_dir / f"step{ctx.step}_prepared.onnx"
    target = ctx.work_dir / f"step{ctx.step}_static_int8.onnx"
    onnx.save(model.proto, str(source))
    try:
        # ORT writes temporary files (shape inference of large models) into the current
        # directory: keep them in this step's scratch folder.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.chdir(ctx.work_dir):
            quant_pre_process(str(source), str(prepared))
        quant_input = prepared
    except Exception as exc:  # ORT's pre-processing is advice; quantizing works without it
        ctx.log(
            f"ONNX Runtime's quant_pre_process failed ({type(exc).__name__}: {exc}); "
            "quantizing the model as uploaded",
            "warning",
        )
        quant_input = source
    ctx.progress(0.1)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.index = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.index >= len(batches):
                return None
            batch = batches[self.index]
            self.index += 1
            ctx.progress(0.1 + 0.7 * self.index / len(batches))
            return batch

    nodes_to_exclude = onnx_nodes_to_exclude(excluded)
    smoothed: SmoothingResult | None = None
    if params.smooth_alpha is not None:
        quant_input, smoothed = _smoothed(quant_input, params.smooth_alpha, batches, excluded, ctx)
        nodes_to_exclude += smoothed.inserted  # the inserted Muls stay float, as ORT's own SQ does
    method = params.calibration("onnx")
    reduce_range = params.use_reduce_range("onnx")
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    extra: dict[str, object] = {}
    if method == "percentile":
        extra["CalibPercentile"] = params.percentile
    if not params.quantize_matmul_outputs:
        extra["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Gemm"]
    with contextlib.redirect_stdout(io.StringIO()), _histogram_errors(method, ctx):
        ort_quantize_static(
            quant_input,
            target,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=params.per_channel,
            reduce_range=reduce_range,
            activation_type=types[params.activation_type],
            weight_type=types[params.weight_type],
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy,
            }[method],
            op_types_to_quantize=list(params.op_types) if params.op_types else None,
            nodes_to_exclude=nodes_to_exclude,
            extra_options=extra,
        )
    ctx.progress(0.85)
    proto = onnx.load(str(target))
    for path in (source, prepared, target, _smoothed_path(ctx)):
        path.unlink(missing_ok=True)
    quantized = validated_output(
        proto, model, step=ctx.method, library="ONNX Runtime's quantize_static",
        advice="Try per_channel=false, op_types=['MatMul', 'Gemm'], or quantize.dynamic.",
    )  # fmt: skip
    quantized_weights = _onnx_quantized_weights(proto)
    if not quantized_weights:
        which = f" of op_types {', '.join(params.op_types)}" if params.op_types else ""
        raise UnsupportedError(
            f"ONNX Runtime found no layer{which} with constant weights to quantize "
            "statically (it handles MatMul, Gemm, Conv and more)",
            step=ctx.method,
        )
    record_onnx_layers(ctx, model, quantized, excluded)
    ctx.log(
        f"quantized {len(quantized_weights)} weight tensors to {params.weight_type} with ONNX "
        f"Runtime (QDQ, {method} calibration on "
        f"{sum(len(next(iter(b.values()))) for b in batches)} samples)",
        data={
            "per_channel": params.per_channel,
            "activation_type": params.activation_type,
            "reduce_range": reduce_range,
            "quantize_matmul_outputs": params.quantize_matmul_outputs,
        },
    )
    ctx.progress(1.0)
    return quantized


def _smoothed_path(ctx: StepContext) -> Path:
    return ctx.work_dir / f"step{ctx.step}_smoothed.onnx"


def _smoothed(
    source: Path,
    alpha: float,
    batches: list[dict[str, np.ndarray]],
    excluded: frozenset[str],
    ctx: StepContext,
) -> tuple[Path, SmoothingResult]:
    """The model at ``source`` smoothed (:func:`worker.smoothing.smooth_onnx`), saved for
    ONNX Runtime's quantizer; its path and what was done."""
    import onnx

    from worker.smoothing import smooth_onnx

    result = smooth_onnx(
        onnx.load(str(source)), batches, alpha, skip=onnx_nodes_to_exclude(excluded)
    )
    _log_smoothing(result, alpha, "MatMul or Gemm layer with a constant 2-D weight", ctx)
    target = _smoothed_path(ctx)
    assert isinstance(result.model, onnx.ModelProto)
    onnx.save(result.model, str(target))
    ctx.progress(0.2)
    return target, result


def _log_smoothing(result: SmoothingResult, alpha: float, layers: str, ctx: StepContext) -> None:
    """The SmoothQuant event of either backend; refused when nothing was smoothed
    (``layers``: what the backend smooths)."""
    if not result.inputs:
        raise UnsupportedError(
            f"smooth_alpha found no {layers} whose input it could smooth; leave "
            "smooth_alpha out for this model",
            step=ctx.method,
        )
    summary = result.summary()
    ctx.log(
        f"SmoothQuant (alpha {alpha}): {summary['smoothed_layers']} layers reading "
        f"{summary['smoothed_inputs']} tensors; the largest activation range "
        f"{summary['max_range_before']:.3g} -> {summary['max_range_after']:.3g}; 1/s folded "
        f"into {summary['folded']} LayerNorm/linear layers, {summary['mul_inserted']} Mul "
        "nodes inserted (kept float)",
        data=summary,
    )


def _onnx_quantized_weights(proto: object) -> list[str]:
    """8-bit initializers that a DequantizeLinear turns back into a layer's weights."""
    import onnx

    graph = proto.graph  # type: ignore[attr-defined]
    eight_bit = {
        t.name
        for t in graph.initializer
        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(t.dims) >= 1
    }
    return sorted(
        node.input[0]
        for node in graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in eight_bit
    )


METHOD = Method(
    name="quantize.static",
    summary="Static post-training int8: weights and calibrated activations (PT2E / ORT QDQ).",
    params=StaticQuantizeParams,
    formats=frozenset({"pt2", "onnx"}),
    handler=quantize_static,
    datasets_required=frozenset({"calibration"}),
    devices=frozenset({"cpu"}),
    post_conversion=True,
    search=Searchable(SearchRole.precision, {"per_channel": Choice((True, False))}, exclude=True),
)
