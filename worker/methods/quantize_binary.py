"""``quantize.binary``: 1-bit (binary) or ternary weights, trained with a straight-through
estimator, stored packed.

No maintained library does this for exported models, so it is written here, small:

- binary (BinaryConnect / XNOR-Net weights): ``w ≈ a * sign(w)``, one scale per output
  channel, ``a = mean |w|`` (the L2-optimal scale for a sign pattern);
- ternary (Ternary Weight Networks): ``w ∈ {-a, 0, +a}``, threshold
  ``d = 0.7 * mean |w|`` per output channel, ``a`` = the mean of the ``|w|`` above it.

With ``epochs > 0`` the lifted model (``worker.lifting``) trains on the ``train`` dataset
with every selected weight replaced by its binarized value in the forward pass and the
gradient passed straight through to the latent float weight (the straight-through
estimator), so the rest of the network adapts to the 1- or 2-bit weights. Then each
layer is stored packed (:mod:`worker.packing`): 8 binary or 4 ternary codes per byte
plus one float32 scale per output channel, decoded at run time by plain aten ops. The
file's size (what ``metrics.size_bytes`` reports) is the packed size. Eager kernels
still multiply float weights, so this saves storage and memory, not time.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from worker.errors import UnsupportedError
from worker.methods.base import Method, MethodParams

if TYPE_CHECKING:
    import torch

    from worker.context import StepContext
    from worker.formats import LoadedModel
    from worker.packing import PackedLayer

TERNARY_THRESHOLD = 0.7


class BinaryQuantizeParams(MethodParams):
    """Binary (1-bit) or ternary (2-bit) weights, trained with a straight-through estimator.

    Applies to Linear and Conv1d/Conv2d layers. With ``epochs`` > 0 a ``train`` dataset
    with labels is needed (an ``eval`` dataset, when given, picks the best epoch); with
    ``epochs`` = 0 the weights are binarized as they are, without data (expect a large
    accuracy drop: binarization is meant to be trained).

    Args:
        mode: ``"binary"``: ``w = a * sign(w)`` with one ``a`` (mean ``|w|``) per output
            channel, 1 bit per weight; ``"ternary"``: ``w`` in ``{-a, 0, +a}`` with the
            threshold ``0.7 * mean |w|`` per output channel, 2 bits per weight.
        epochs: training epochs with the straight-through estimator; 0 = binarize only.
        lr: Adam learning rate of the training.
        batch_size: training batch size.
        keep_first_last: keep the first and the last layer in float32 (the usual
            practice: they are small and the most sensitive).

    Example:
        ``{"method": "quantize.binary", "params": {"mode": "ternary", "epochs": 5}}``
    """

    mode: Literal["binary", "ternary"] = Field(
        default="binary",
        description="'binary': a*sign(w), 1 bit; 'ternary': {-a, 0, +a}, 2 bits per weight.",
    )
    epochs: int = Field(
        default=5,
        ge=0,
        le=1000,
        description="Straight-through-estimator training epochs on `train`; 0 = no training.",
    )
    lr: float = Field(default=1e-3, gt=0.0, le=1.0, description="Adam learning rate.")
    batch_size: int = Field(default=64, ge=1, le=65_536, description="Training batch size.")
    keep_first_last: bool = Field(
        default=True, description="Keep the first and last layers in float32."
    )


def _datasets_for(params: BinaryQuantizeParams) -> frozenset[str]:
    return frozenset({"train"}) if params.epochs > 0 else frozenset()


def quantize_binary(
    model: LoadedModel, params: BinaryQuantizeParams, ctx: StepContext
) -> LoadedModel:
    """Binarize (or ternarize) the weights, training through the quantizer first."""

    from worker.lifting import lift, relower
    from worker.packing import packable_layers, replace_layer

    module = lift(model)
    layers = packable_layers(module)
    targets = layers[1:-1] if params.keep_first_last else layers
    if not targets:
        raise UnsupportedError(
            f"the model has {len(layers)} Linear/Conv layers: nothing is left to binarize "
            "once the first and last are kept float; set keep_first_last=false",
            step=ctx.method,
        )
    ctx.progress(0.05)
    if params.epochs > 0:
        from worker.training import train_through_quantizer

        train_through_quantizer(
            model,
            module,
            ctx,
            layers=[layer for _, layer in targets],
            quantize=functools.partial(dequantized, mode=params.mode),
            epochs=params.epochs,
            lr=params.lr,
            batch_size=params.batch_size,
            quantizer=params.mode,
        )
    ctx.progress(0.85)
    packed_bytes = 0
    for name, layer in targets:
        packed = pack_layer(layer, params.mode)
        packed_bytes += int(packed.packed.numel())
        replace_layer(module, name, packed)
    quantized = relower(model, module)
    kept = [name for name, _ in layers if name not in {n for n, _ in targets}]
    ctx.log(
        f"stored {len(targets)} layers as {params.mode} weights "
        f"({1 if params.mode == 'binary' else 2} bit per weight, {packed_bytes} packed bytes "
        f"plus one float32 scale per output channel)"
        + (f"; kept float: {', '.join(kept)}" if kept else ""),
        data={"layers": [n for n, _ in targets], "packed_bytes": packed_bytes},
    )
    ctx.progress(1.0)
    return quantized


def binarize(weight: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, alpha)``: binary codes ``w >= 0`` or ternary codes ``sign(w) + 1`` (with
    the threshold), and the per-output-channel scale, shaped ``[out, 1, ...]``."""
    import torch

    flat = weight.detach().reshape(weight.shape[0], -1)
    magnitude = flat.abs()
    if mode == "binary":
        alpha = magnitude.mean(dim=1)
        codes = (flat >= 0).to(torch.uint8)
    else:
        delta = TERNARY_THRESHOLD * magnitude.mean(dim=1, keepdim=True)
        keep = magnitude > delta
        alpha = (magnitude * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        codes = (torch.sign(flat) * keep + 1).to(torch.uint8)
    shape = (weight.shape[0],) + (1,) * (weight.ndim - 1)
    return codes.reshape(weight.shape), alpha.reshape(shape)


def dequantized(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """The weight the packed layer will compute with: ``a * sign(w)`` or ``a * ternary``."""
    codes, alpha = binarize(weight, mode)
    offset = 0.5 if mode == "binary" else 1.0
    step = 2.0 if mode == "binary" else 1.0
    return (codes.to(weight.dtype) - offset) * (alpha * step)


def straight_through(mode: str) -> torch.nn.Module:
    """A parametrization module applying the straight-through binarizer of ``mode``."""
    from worker.training import straight_through as through

    return through(functools.partial(dequantized, mode=mode))


def pack_layer(layer: torch.nn.Module, mode: str) -> PackedLayer:
    """A PackedLayer storing ``layer``'s weight as binary or ternary codes."""
    import torch

    from worker.packing import PackedLayer, layer_kind

    found = layer_kind(layer)
    assert found is not None
    kind, conv = found
    weight: torch.Tensor = layer.weight.detach()  # type: ignore[operator]
    codes, alpha = binarize(weight, mode)
    out = weight.shape[0]
    binary = mode == "binary"
    return PackedLayer(
        kind=kind,
        weight_shape=tuple(weight.shape),
        bits=1 if binary else 2,
        codes=codes,
        scale=(alpha * (2.0 if binary else 1.0)).reshape(out, 1, 1),
        offset=alpha.new_tensor(0.5 if binary else 1.0),
        groups=1,
        bias=layer.bias if isinstance(layer.bias, torch.Tensor) else None,
        conv=conv,
    )


METHOD = Method(
    name="quantize.binary",
    summary="Binary (1-bit) or ternary weights trained with a straight-through estimator, packed.",
    params=BinaryQuantizeParams,
    formats=frozenset({"pt2"}),
    handler=quantize_binary,
    datasets_optional=frozenset({"train", "eval"}),
    datasets_for=_datasets_for,
    devices=frozenset({"cpu", "gpu"}),
    post_conversion=True,
)
