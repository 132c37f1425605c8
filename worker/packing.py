"""Sub-byte weight storage: 1, 2 or 4-bit codes packed into bytes, decoded by plain aten ops.

No maintained library stores binary, ternary or CPU int4 weights in a ``torch.export``
program that loads with stock tools: torchao's int4 layouts are tensor subclasses
(pickled by ``torch.export.save``) whose kernels need CUDA. Here a layer's weight is
kept as

- ``packed``: ``uint8``, ``8 // bits`` codes per byte, least significant bits first,
  the codes of the weight flattened in row-major order (``ceil(numel * bits / 8)`` bytes);
- ``scale`` and ``offset``: float32, broadcast over the weight viewed as
  ``[out_channels, groups, group_size]``;
- ``packed_layout``: int64 ``[bits, groups, *weight_shape]``, unused at run time: it lets
  a reader of the file (squish's metrics: parameters, sparsity) decode the logical weight
  (:func:`decode_packed`) without the module;

and decoded at run time as ``weight = (code - offset) * scale`` with bitwise shifts and
ands, so ``torch.export.load(...).module()`` runs it with no custom op. The encodings:

========  =====  ==============================  ===================================
scheme    bits   codes                           weight
========  =====  ==============================  ===================================
binary    1      ``w >= 0``                      ``(code - 0.5) * 2a`` = ``±a``
ternary   2      ``sign(w) + 1`` (0, 1, 2)       ``(code - 1) * a`` in {-a, 0, +a}
int4      4      ``q - qmin`` (0..15)            ``(code - (zero_point - qmin)) * scale``
========  =====  ==============================  ===================================

All three decode exactly (small integers and halves are exact in float32).

This module imports torch: method modules import it inside their handlers only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

SUPPORTED_BITS = (1, 2, 4)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, not {bits}")


def packed_size(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take once packed."""
    _check_bits(bits)
    return math.ceil(numel * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a flat ``uint8`` tensor.

    Raises:
        ValueError: a code does not fit in ``bits`` bits.
    """
    _check_bits(bits)
    flat = codes.detach().reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to pack into {bits} bits")
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(0, 8, bits, dtype=torch.int32)
    return (flat.reshape(-1, per_byte) << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The first ``numel`` codes of ``packed`` (``uint8``), with traceable aten ops only."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = torch.bitwise_and(
        torch.bitwise_right_shift(packed.unsqueeze(-1), shifts), (1 << bits) - 1
    )
    return codes.reshape(-1)[:numel]


class PackedLayer(nn.Module):
    """A Linear or Conv1d/Conv2d layer whose weight is stored packed (see the module doc).

    Attributes (buffers): ``packed`` (uint8), ``scale`` and ``offset`` (float32, shapes
    broadcastable to ``[out_channels, groups, group_size]``), ``packed_layout`` (int64,
    ``[bits, groups, *weight_shape]``), and the float ``bias`` parameter when the layer
    has one.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        *,
        kind: str,
        weight_shape: tuple[int, ...],
        bits: int,
        codes: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        groups: int,
        bias: torch.Tensor | None,
        conv: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_bits(bits)
        if kind not in ("linear", "conv1d", "conv2d"):
            raise ValueError(f"unknown layer kind {kind!r}")
        numel = math.prod(weight_shape)
        if codes.numel() != numel:
            raise ValueError(f"{codes.numel()} codes for a weight of shape {weight_shape}")
        out = weight_shape[0]
        if (numel // out) % groups:
            raise ValueError(f"{groups} groups do not divide the {numel // out} inputs per channel")
        self.kind = kind
        self.bits = bits
        self.weight_shape = tuple(int(d) for d in weight_shape)
        self.grouped_shape = (out, groups, numel // out // groups)
        self.numel = numel
        self.conv = dict(conv or {})
        self.register_buffer("packed", pack_codes(codes, bits))
        self.register_buffer("scale", scale.detach().to(torch.float32).clone())
        self.register_buffer("offset", offset.detach().to(torch.float32).clone())
        self.register_buffer(
            "packed_layout", torch.tensor([bits, groups, *self.weight_shape], dtype=torch.int64)
        )
        self.bias = (
            torch.nn.Parameter(bias.detach().to(torch.float32).clone(), requires_grad=False)
            if bias is not None
            else None
        )

    def decode_weight(self) -> torch.Tensor:
        """The decoded float32 weight."""
        codes = unpack_codes(self.packed, self.bits, self.numel).reshape(self.grouped_shape)
        values = (codes.to(torch.float32) - self.offset) * self.scale
        return values.reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.decode_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        if self.kind == "conv1d":
            return F.conv1d(x, weight, bias, **self.conv)
        return F.conv2d(x, weight, bias, **self.conv)

    def extra_repr(self) -> str:
        return (
            f"{self.kind}, weight={list(self.weight_shape)}, bits={self.bits}, "
            f"groups={self.grouped_shape[1]}, packed_bytes={self.packed.numel()}"
        )


# The buffers of one packed layer share a prefix: ``<layer>.packed``, ``<layer>.scale``, ...
# (``<layer>_packed`` once a program is unflattened into a GraphModule).
PACKED_SUFFIX = "packed"
LAYOUT_SUFFIX = "packed_layout"


def layout_name(packed_name: str) -> str | None:
    """The name of the ``packed_layout`` buffer beside a ``packed`` buffer, or None if
    ``packed_name`` is not one."""
    if not packed_name.endswith(PACKED_SUFFIX):
        return None
    return packed_name[: -len(PACKED_SUFFIX)] + LAYOUT_SUFFIX


def decode_packed(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, layout: torch.Tensor
) -> torch.Tensor:
    """The float32 weight a :class:`PackedLayer`'s buffers encode (as its forward decodes it)."""
    bits, groups, *shape = (int(v) for v in layout.tolist())
    _check_bits(bits)
    numel = math.prod(shape)
    codes = unpack_codes(packed, bits, numel).reshape(shape[0], groups, -1)
    return ((codes.to(torch.float32) - offset) * scale).reshape(shape)


def layer_kind(layer: torch.nn.Module) -> tuple[str, dict[str, Any]] | None:
    """``(kind, conv arguments)`` of a layer :class:`PackedLayer` can stand in for."""
    if type(layer) is nn.Linear:
        return "linear", {}
    if type(layer) in (nn.Conv1d, nn.Conv2d) and layer.padding_mode == "zeros":
        conv = {
            "stride": layer.stride,
            "padding": layer.padding,
            "dilation": layer.dilation,
            "groups": layer.groups,
        }
        return ("conv1d" if type(layer) is nn.Conv1d else "conv2d"), conv
    return None


def int4_layer(layer: nn.Module) -> PackedLayer:
    """A PackedLayer holding the int4 values torchao chose for ``layer``.

    ``layer`` is an ``nn.Linear`` whose weight torchao replaced by an
    ``IntxUnpackedToInt8Tensor`` (``IntxWeightOnlyConfig(torch.int4, PerGroup)``, or the
    convert step of QAT with it): int4 values kept one per int8, a scale and a zero point
    per group. The codes ``q + 8`` are packed two per byte; decoding computes
    ``(q - zero_point) * scale`` exactly as torchao's ``dequantize`` does.
    """
    weight: Any = layer.weight
    qdata, scale, zero_point = weight.qdata, weight.scale, weight.zero_point
    qmin = -8
    offset = (zero_point.to(torch.float32) - qmin).unsqueeze(-1)
    if bool((offset == offset.reshape(-1)[0]).all()):
        offset = offset.reshape(-1)[0]  # symmetric: one zero point for every group
    return PackedLayer(
        kind="linear",
        weight_shape=tuple(qdata.shape),
        bits=4,
        codes=(qdata.to(torch.int16) - qmin).to(torch.uint8),
        scale=scale.to(torch.float32).unsqueeze(-1),
        offset=offset,
        groups=int(scale.shape[-1]),
        bias=_bias(layer),
    )


def _bias(layer: nn.Module) -> torch.Tensor | None:
    bias = getattr(layer, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None
