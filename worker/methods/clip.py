"""``clip``: clamp each layer's weights to a range, optionally followed by a short fine-tune.

Outlier weights stretch the range a quantizer must cover, so every other weight gets
coarser steps; clamping them first (the min/max clipping of the compression literature)
trades a little error on a few weights for finer steps on all the others. Per weight
tensor, the range is

- ``range``: the ``[min, max]`` given, the same for every layer;
- ``percentile``: ``[q(100 - p), q(p)]`` of that tensor's values (linear interpolation,
  as ``numpy.percentile``);
- ``sigma``: ``mean ± k * std`` of that tensor's values.

The weights are the weight matrices and kernels (float tensors of rank >= 2): pt2
program parameters and hf module parameters (both edited in place, the graph
unchanged), onnx initializers read by MatMul, Gemm, Conv, ConvTranspose or Gather nodes.
With ``epochs > 0`` (pt2, hf) the model is then fine-tuned on ``train`` (the shared loop,
as ``finetune``) with every clipped weight seen through the clamp (the gradient passed
straight through), and clamped again at the end, so the artifact keeps the range. The
job's log gives the number of weights clipped per layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Self

import numpy as np
from pydantic import Field, ValidationInfo, model_validator

from worker.contract import DatasetRole
from worker.errors import InvalidParamsError
from worker.layers import Exclude, excluded_layers, layer_of, record_layers
from worker.methods.base import DataNeed, Method, MethodParams, context_format

if TYPE_CHECKING:
    import torch

    from worker.context import StepContext
    from worker.formats import LoadedModel

DEFAULT_PERCENTILE = 99.9
DEFAULT_K = 3.0
_ONNX_LAYER_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Gather"})
_MODE_FIELDS = {"range": ("min", "max"), "percentile": ("percentile",), "sigma": ("k",)}


class ClipParams(MethodParams):
    """Clamp each layer's weights to a range; optionally fine-tune inside it.

    Applies to the weight matrices and kernels (float tensors of rank >= 2; onnx: the
    initializers of MatMul/Gemm/Conv/ConvTranspose/Gather nodes). ``mode`` picks how each
    tensor's range is set, and only that mode's fields may be given.

    Args:
        mode: ``"range"``: ``[min, max]`` for every layer; ``"percentile"``: per tensor,
            ``[q(100 - percentile), q(percentile)]`` of its values; ``"sigma"``: per
            tensor, ``mean ± k * std``.
        min: ``mode="range"``: the lower bound (null: none; give ``min`` or ``max``).
        max: ``mode="range"``: the upper bound (null: none).
        percentile: ``mode="percentile"``: the upper percentile, in (50, 100); the lower
            one is ``100 - percentile``. Default 99.9.
        k: ``mode="sigma"``: standard deviations either side of the mean. Default 3.
        epochs: fine-tuning epochs on ``train`` after clipping (needs a labelled ``train``
            dataset; pt2 and hf); the weights stay inside their range. 0: clip only.
        lr: Adam learning rate of the fine-tuning.
        batch_size: fine-tuning batch size.
        exclude: layers left as they are, as the model's ``info.layer_names`` lists them
            (module paths for pt2/hf, node names for onnx) or ``re:`` patterns.

    Example:
        ``{"method": "clip", "params": {"mode": "percentile", "percentile": 99.9, "epochs": 1}}``
    """

    mode: Literal["range", "percentile", "sigma"] = Field(
        default="sigma",
        description=(
            "'range': [min, max] for every layer; 'percentile': per tensor, "
            "[q(100 - percentile), q(percentile)]; 'sigma': per tensor, mean ± k * std."
        ),
    )
    min: float | None = Field(default=None, description="mode 'range': the lower bound.")
    max: float | None = Field(default=None, description="mode 'range': the upper bound.")
    percentile: float | None = Field(
        default=None,
        gt=50.0,
        lt=100.0,
        description=f"mode 'percentile': the upper percentile (50, 100); default {DEFAULT_PERCENTILE}.",
    )
    k: float | None = Field(
        default=None,
        gt=0.0,
        le=100.0,
        description=f"mode 'sigma': standard deviations either side of the mean; default {DEFAULT_K}.",
    )
    epochs: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="Fine-tuning epochs on `train` inside the clipped range (pt2, hf); 0 = none.",
    )
    lr: float = Field(default=1e-4, gt=0.0, le=1.0, description="Adam learning rate.")
    batch_size: int = Field(default=32, ge=1, le=65_536, description="Fine-tuning batch size.")
    exclude: Exclude = None

    @model_validator(mode="after")
    def _one_mode(self, info: ValidationInfo) -> Self:
        for mode, names in _MODE_FIELDS.items():
            given = [name for name in names if getattr(self, name) is not None]
            if mode != self.mode and given:
                raise ValueError(
                    f"{' and '.join(given)} belong{'s' if len(given) == 1 else ''} to mode "
                    f"{mode!r}, not to mode {self.mode!r}"
                )
        if self.mode == "range":
            if self.min is None and self.max is None:
                raise ValueError("mode 'range' needs min, max or both")
            if self.min is not None and self.max is not None and not self.min < self.max:
                raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        if context_format(info) == "onnx" and self.epochs > 0:
            raise ValueError(
                "epochs > 0 fine-tunes the model and onnx models cannot be trained: use "
                "epochs=0, or upload the model as pt2"
            )
        return self


def _datasets_for(params: ClipParams) -> list[DataNeed]:
    if params.epochs == 0:
        return []
    return [DataNeed((DatasetRole.train,), labelled=True, why="epochs > 0 fine-tunes")]


def clip(model: LoadedModel, params: ClipParams, ctx: StepContext) -> LoadedModel:
    """Clamp the weights to their range (and fine-tune inside it); returns the model."""
    from worker.formats import layer_names

    if model.format == "onnx":
        from worker.formats.onnx import normalize_onnx

        model = normalize_onnx(model, ctx, step=ctx.method)  # Constant weights: initializers
    names = layer_names(model)
    excluded = excluded_layers(params, names, ctx.method)
    found = _targets(model)
    layers = _layers(model, list(found))
    tensors = {name: t for name, t in found.items() if layers[name] not in excluded}
    if not tensors:
        raise InvalidParamsError(
            "the model has no float weight matrices or kernels to clip"
            + (" once exclude is applied" if found else ""),
            step=ctx.method,
        )
    ctx.progress(0.05)
    bounds = {name: clip_bounds(t, params) for name, t in tensors.items()}
    clipped = {
        name: int(((t < bounds[name][0]) | (t > bounds[name][1])).sum())
        for name, t in tensors.items()
    }
    _write(model, {name: t.clamp(*bounds[name]) for name, t in tensors.items()})
    per_layer: dict[str, int] = {}
    for name, count in clipped.items():
        per_layer[layers[name]] = per_layer.get(layers[name], 0) + count
    _record(ctx, per_layer, names, excluded)
    total = sum(t.numel() for t in tensors.values())
    ctx.log(
        f"clipped {sum(clipped.values())} of {total} weights in {len(tensors)} tensors "
        f"({_describe(params)})",
        data={
            "clipped": per_layer,
            "bounds": {layers[name]: [low, high] for name, (low, high) in bounds.items()},
            "weights": total,
        },
    )
    ctx.progress(0.15)
    if params.epochs > 0:
        model = _finetune(model, params, ctx, bounds)
    ctx.progress(1.0)
    return model


def clip_bounds(tensor: torch.Tensor, params: ClipParams) -> tuple[float, float]:
    """``(low, high)`` of one weight tensor under ``params`` (infinite where unbounded)."""
    import torch

    if params.mode == "range":
        low = -np.inf if params.min is None else params.min
        high = np.inf if params.max is None else params.max
        return float(low), float(high)
    flat = tensor.detach().reshape(-1).to(torch.float64)
    if params.mode == "sigma":
        k = DEFAULT_K if params.k is None else params.k
        mean, std = float(flat.mean()), float(flat.std(correction=0))
        return mean - k * std, mean + k * std
    upper = (DEFAULT_PERCENTILE if params.percentile is None else params.percentile) / 100
    return _quantile(flat, 1.0 - upper), _quantile(flat, upper)


def _quantile(flat: torch.Tensor, q: float) -> float:
    """``numpy.quantile`` (linear) without ``torch.quantile``'s 16M-element limit."""
    import math

    import torch

    position = q * (flat.numel() - 1)
    below, above = math.floor(position), math.ceil(position)
    low = float(torch.kthvalue(flat, below + 1).values)
    high = low if above == below else float(torch.kthvalue(flat, above + 1).values)
    return low + (high - low) * (position - below)


def _describe(params: ClipParams) -> str:
    if params.mode == "range":
        return f"range [{params.min}, {params.max}]"
    if params.mode == "percentile":
        upper = DEFAULT_PERCENTILE if params.percentile is None else params.percentile
        return f"percentiles {100 - upper:g}..{upper:g} per tensor"
    return f"mean ± {DEFAULT_K if params.k is None else params.k:g} std per tensor"


def _targets(model: LoadedModel) -> dict[str, torch.Tensor]:
    """The weight matrices and kernels, by tensor name (a tied weight once)."""
    import torch

    found: dict[str, torch.Tensor] = {}
    if model.format == "onnx":
        from onnx import numpy_helper

        assert model.proto is not None
        graph = model.proto.graph
        read = {i for node in graph.node if node.op_type in _ONNX_LAYER_OPS for i in node.input}
        for init in graph.initializer:
            if init.name in read:
                array = numpy_helper.to_array(init)
                if array.dtype.kind == "f" and array.ndim >= 2:
                    found[init.name] = torch.from_numpy(np.array(array))
        return {n: t for n, t in found.items() if bool(torch.isfinite(t).all())}
    if model.format == "hf":
        assert model.module is not None
        named = dict(model.module.named_parameters(remove_duplicate=True))
    else:
        assert model.program is not None
        state = model.program.state_dict
        named = {n: state[n] for n in model.program.graph_signature.parameters}
    for name, tensor in named.items():
        if tensor.is_floating_point() and tensor.ndim >= 2 and bool(torch.isfinite(tensor).all()):
            found[name] = tensor.detach()
    return found


def _write(model: LoadedModel, values: dict[str, torch.Tensor]) -> None:
    import torch

    if model.format == "onnx":
        from onnx import numpy_helper

        assert model.proto is not None
        for init in model.proto.graph.initializer:
            if init.name in values:
                array = values[init.name].numpy().astype(numpy_helper.to_array(init).dtype)
                init.CopyFrom(numpy_helper.from_array(array, init.name))
        return
    with torch.no_grad():
        for name, value in values.items():
            _tensor(model, name).copy_(value)


def _tensor(model: LoadedModel, name: str) -> torch.Tensor:
    if model.format == "hf":
        assert model.module is not None
        return model.module.get_parameter(name)
    assert model.program is not None
    return model.program.state_dict[name]


def _layers(model: LoadedModel, tensor_names: list[str]) -> dict[str, str]:
    """The layer of each weight, as ``info.layer_names`` names it: its module path (pt2,
    hf), the node that reads it (onnx)."""
    if model.format == "onnx":
        from worker.formats.onnx import onnx_weight_layers

        readers = onnx_weight_layers(model)
        return {name: readers.get(name, name) for name in tensor_names}
    return {name: layer_of(name) for name in tensor_names}


def _record(
    ctx: StepContext, clipped: dict[str, int], names: list[str], excluded: frozenset[str]
) -> None:
    """``metrics.layers``: a layer with clipped weights changed; the others kept, and why;
    ``clipped`` counts each examined layer's clipped weights."""
    changed = [layer for layer, count in clipped.items() if count]
    kept = {layer: "every weight inside its range" for layer, count in clipped.items() if not count}
    kept.update({layer: "no weight matrix or kernel" for layer in names if layer not in clipped})
    kept.update({layer: "excluded" for layer in excluded})
    record_layers(ctx, changed, kept)
    for layer, count in clipped.items():
        ctx.layers[layer] = ctx.layers[layer].model_copy(update={"clipped": count})


def _finetune(
    model: LoadedModel,
    params: ClipParams,
    ctx: StepContext,
    bounds: dict[str, tuple[float, float]],
) -> LoadedModel:
    """Fine-tune with each clipped weight seen through its clamp; clamp again at the end."""
    import torch
    from torch.nn.utils import parametrize

    from worker.lifting import lift, relower
    from worker.training import fit_supervised, loss_summary, trace_inputs, training_data

    data = training_data(model, ctx, labels_required=True)
    module = lift(model)
    held = _module_weights(model, module, list(bounds))
    owners = []
    for name, (owner, attr) in held.items():
        parametrize.register_parametrization(owner, attr, straight_through_clamp(*bounds[name]))
        owners.append((owner, attr))
    try:
        history = fit_supervised(
            model, module, data, ctx,
            epochs=params.epochs, lr=params.lr, batch_size=params.batch_size,
            progress_range=(0.15, 0.9),
        )  # fmt: skip
    finally:
        for owner, attr in owners:
            parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
    with torch.no_grad():  # the latent weights may have left the range: clamp them back
        for name, (owner, attr) in held.items():
            getattr(owner, attr).clamp_(*bounds[name])
    losses, summary = loss_summary(history)
    ctx.log(
        f"fine-tuned {history['epochs_run']} epochs inside the clipped range {losses}", data=summary
    )
    return relower(model, module, example_inputs=trace_inputs(model, data.inputs))


def _module_weights(
    model: LoadedModel, module: torch.nn.Module, names: list[str]
) -> dict[str, tuple[torch.nn.Module, str]]:
    """``(owner module, attribute)`` in ``module`` (lifted from ``model``) of each weight
    ``names`` calls by its name in ``model``."""
    import torch

    from worker.errors import UnsupportedError
    from worker.lifting import lifted_name

    own = dict(module.named_parameters())
    held: dict[str, tuple[torch.nn.Module, str]] = {}
    for name in names:
        candidates = [name] if model.format == "hf" else [f"{lifted_name(name)}.weight", name]
        original = _tensor(model, name)
        for candidate in candidates:
            param = own.get(candidate)
            if param is None or param.shape != original.shape:
                continue
            # hf trains the model's own module; a lifted pt2 layer holds a copy
            if model.format == "hf" or torch.equal(param.detach(), original.detach()):
                path, _, attr = candidate.rpartition(".")
                held[name] = (module.get_submodule(path) if path else module, attr)
                break
        else:
            raise UnsupportedError(
                f"weight {name!r} is not a trainable parameter of the lifted model", step="clip"
            )
    return held


def straight_through_clamp(low: float, high: float) -> torch.nn.Module:
    """A parametrization module clamping to ``[low, high]`` with a straight-through gradient."""
    from worker.training import straight_through

    return straight_through(lambda weight: weight.clamp(low, high))


METHOD = Method(
    name="clip",
    summary="Clamp each layer's weights to [min, max], a percentile range or mean ± k·std.",
    params=ClipParams,
    formats=frozenset({"pt2", "onnx", "hf"}),
    handler=clip,
    datasets_optional=frozenset({"train", "eval"}),
    datasets_for=_datasets_for,
    devices=frozenset({"cpu", "gpu"}),
)
