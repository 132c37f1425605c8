"""``quantize.log``: logarithmic (power-of-two) weights, optionally trained with a
straight-through estimator, stored packed.

Each weight of a Linear or Conv1d/Conv2d layer becomes ``±2 ** k * s`` or 0, with one
float32 scale ``s`` per output channel: a 3 or 4-bit code, a sign bit over an exponent
field whose 0 means zero (:func:`worker.packing.log_codes`). Powers of two spend the
levels where trained weights are dense (near zero) and make every product a shift on
hardware with such kernels; eager PyTorch still multiplies floats, so this saves storage
and memory, not time. No maintained library does it for exported models, so it is
written here, small:

- the code of a weight is the level nearest in value to ``w / s``;
- ``s`` is chosen per output channel among ``max|w| * 2 ** (-j / 8)``, ``j = 0 .. 7``
  (one octave: a factor of 2 only shifts the grid), the one with the least squared error;
- with ``epochs > 0`` the lifted model (``worker.lifting``) trains on ``train`` with each
  weight replaced by its quantized value in the forward pass and the gradient passed
  straight through to the latent float weight, so the rest of the network adapts.

Then each layer is stored packed (:mod:`worker.packing`: 8 codes in 3 bytes or 2 per
byte, a 2**bits-entry table of levels, the scales), decoded at run time by plain aten
ops; the file's size is the packed size and ``parameters`` count the logical weights.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from worker.contract import DatasetRole
from worker.errors import UnsupportedError
from worker.layers import Exclude, excluded_layers, record_layers
from worker.methods.base import DataNeed, Method, MethodParams

if TYPE_CHECKING:
    import torch

    from worker.context import StepContext
    from worker.formats import LoadedModel

SCALE_STEPS = 8
"""Scale candidates per output channel, spread over one octave below ``max|w|``."""


class LogQuantizeParams(MethodParams):
    """Log (power-of-two) weights: ``±2^k * scale`` or 0, one scale per output channel.

    Applies to Linear and Conv1d/Conv2d layers. A code is a sign bit and an exponent
    field: 3 bits give the magnitudes 0, 1/4, 1/2, 1 (times the scale), 4 bits 0 and
    1/64 .. 1. With ``epochs`` = 0 (the default) the weights are quantized as they are,
    without data; with ``epochs`` > 0 a ``train`` dataset with labels is needed (an
    ``eval`` dataset, when given, picks the best epoch).

    Args:
        bits: code width, 3 or 4 (sign + 2 or 3 exponent bits).
        epochs: straight-through-estimator training epochs on ``train``; 0 = post-training.
        lr: Adam learning rate of the training.
        batch_size: training batch size.
        keep_first_last: keep the first and the last layer in float32 (the usual
            practice: they are small and the most sensitive; on the digits CNN the stem
            conv alone, at 4 bits, costs 12 points of accuracy without training).
        exclude: layers left float, as the model's ``info.layer_names`` lists them
            (module paths) or ``re:`` patterns.

    Example:
        ``{"method": "quantize.log", "params": {"bits": 4, "epochs": 2}}``
    """

    bits: Literal[3, 4] = Field(
        default=4, description="Code width: 3 or 4 bits (a sign bit and the exponent)."
    )
    epochs: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="Straight-through-estimator training epochs on `train`; 0 = post-training.",
    )
    lr: float = Field(default=1e-4, gt=0.0, le=1.0, description="Adam learning rate.")
    batch_size: int = Field(default=64, ge=1, le=65_536, description="Training batch size.")
    keep_first_last: bool = Field(
        default=True, description="Keep the first and last layers in float32."
    )
    exclude: Exclude = None


def _datasets_for(params: LogQuantizeParams) -> list[DataNeed]:
    if params.epochs == 0:
        return []
    return [
        DataNeed((DatasetRole.train,), labelled=True, why="epochs > 0 trains through the quantizer")
    ]


def quantize_log(model: LoadedModel, params: LogQuantizeParams, ctx: StepContext) -> LoadedModel:
    """Quantize the weights to powers of two, training through the quantizer first."""

    from worker.formats import layer_names
    from worker.lifting import lift, lifted_name, relower
    from worker.packing import log_layer, packable_layers, replace_layer

    names = layer_names(model)
    excluded = excluded_layers(params, names, ctx.method)
    module = lift(model)
    # the lifted module names a layer "a_b" where the model (and exclude) says "a.b"
    back = {lifted_name(f"{name}.weight"): name for name in names}
    layers = [(back.get(name, name), layer) for name, layer in packable_layers(module)]
    ends = {layers[0][0], layers[-1][0]} if params.keep_first_last and layers else set()
    kept = {name: "first or last layer" for name, _ in layers if name in ends}
    kept.update({name: "excluded" for name, _ in layers if name in excluded})
    targets = [(name, layer) for name, layer in layers if name not in kept]
    if not targets:
        raise UnsupportedError(
            f"the model has {len(layers)} Linear/Conv layers: nothing is left to quantize"
            + ("; set keep_first_last=false" if ends else "")
            + (" or exclude fewer layers" if excluded else ""),
            step=ctx.method,
        )
    lifted = {name: lifted for lifted, name in back.items()}
    ctx.progress(0.05)
    if params.epochs > 0:
        from worker.training import train_through_quantizer

        train_through_quantizer(
            model,
            module,
            ctx,
            layers=[layer for _, layer in targets],
            quantize=functools.partial(dequantized, bits=params.bits),
            epochs=params.epochs,
            lr=params.lr,
            batch_size=params.batch_size,
            quantizer=f"{params.bits}-bit log",
        )
    ctx.progress(0.85)
    packed_bytes = 0
    zeros: dict[str, float] = {}
    for name, layer in targets:
        weight = layer.weight.detach()  # type: ignore[operator]
        packed = log_layer(layer, params.bits, channel_scales(weight, params.bits))
        packed_bytes += int(packed.packed.numel())
        zeros[name] = round(float((packed.decode_weight() == 0).float().mean()), 6)
        replace_layer(module, lifted.get(name, name), packed)
    quantized = relower(model, module)
    others = {name: "not a Linear/Conv layer" for name in names if name not in zeros}
    record_layers(ctx, list(zeros), others | kept, dtype=f"log{params.bits}", sparsity=zeros)
    ctx.log(
        f"stored {len(targets)} layers as {params.bits}-bit log weights ({packed_bytes} packed "
        "bytes plus one float32 scale per output channel)"
        + (f"; kept float: {', '.join(kept)}" if kept else ""),
        data={"layers": list(zeros), "packed_bytes": packed_bytes, "zero_fraction": zeros},
    )
    ctx.progress(1.0)
    return quantized


def channel_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The scale per output channel (``[out, 1, ...]``) whose log code fits ``weight`` with
    the least squared error, among ``max|w| * 2 ** (-j / SCALE_STEPS)``; 1 for a zero channel."""
    import torch

    from worker.packing import log_codes, log_levels

    flat = weight.detach().reshape(weight.shape[0], -1).to(torch.float32)
    peak = flat.abs().amax(dim=1, keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    levels = log_levels(bits).to(flat.device)
    best_error = torch.full_like(peak, float("inf"))
    best = peak
    for step in range(SCALE_STEPS):
        scale = peak * 2.0 ** (-step / SCALE_STEPS)
        error = (levels[log_codes(flat, scale, bits).long()] * scale - flat).square().sum(1, True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, scale, best)
    return best.reshape((weight.shape[0],) + (1,) * (weight.ndim - 1))


def dequantized(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The weight the packed layer will compute with: ``levels[code] * scale``."""
    from worker.packing import log_codes, log_levels

    scale = channel_scales(weight, bits)
    levels = log_levels(bits).to(weight.device)
    return (levels[log_codes(weight, scale, bits).long()] * scale).to(weight.dtype)


def straight_through(bits: int) -> torch.nn.Module:
    """A parametrization module applying the straight-through log quantizer of ``bits``."""
    from worker.training import straight_through as through

    return through(functools.partial(dequantized, bits=bits))


METHOD = Method(
    name="quantize.log",
    summary="Log (power-of-two) 3/4-bit weights with a per-channel scale, packed; optional STE.",
    params=LogQuantizeParams,
    formats=frozenset({"pt2"}),
    handler=quantize_log,
    datasets_optional=frozenset({"train", "eval"}),
    datasets_for=_datasets_for,
    devices=frozenset({"cpu", "gpu"}),
)
