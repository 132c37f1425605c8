"""Sub-byte weight storage: 1, 2, 3 or 4-bit codes packed into bytes, decoded by plain aten ops.

No maintained library stores binary, ternary, log or CPU int4 weights in a ``torch.export``
program that loads with stock tools: torchao's int4 layouts are tensor subclasses
(pickled by ``torch.export.save``) whose kernels need CUDA. Here a layer's weight is
kept as

- ``packed``: ``uint8``, the codes of the weight flattened in row-major order, least
  significant bits first: ``8 // bits`` codes per byte for 1, 2 and 4 bits
  (``ceil(numel * bits / 8)`` bytes), 8 codes per 3 bytes for 3 bits (a 24-bit word,
  its bytes little-endian: ``3 * ceil(numel / 8)`` bytes);
- ``scale`` and ``offset``: float32, broadcast over the weight viewed as
  ``[out_channels, groups, group_size]``;
- ``levels`` (only for a non-linear code): float32 ``[2 ** bits]``, the value of each code;
- ``packed_layout``: int64 ``[bits, groups, *weight_shape]``, unused at run time: it lets
  a reader of the file (squish's metrics: parameters, sparsity) decode the logical weight
  (:func:`decode_packed`) without the module;

and decoded at run time as ``weight = (code - offset) * scale`` (``(levels[code] - offset)
* scale`` with ``levels``) with integer division, remainder and an index, so
``torch.export.load(...).module()`` runs it with no custom op (and the program converts
to ONNX, which stores the decoded float weights). The encodings:

========  =====  ==============================  ===================================
scheme    bits   codes                           weight
========  =====  ==============================  ===================================
binary    1      ``w >= 0``                      ``(code - 0.5) * 2a`` = ``±a``
ternary   2      ``sign(w) + 1`` (0, 1, 2)       ``(code - 1) * a`` in {-a, 0, +a}
int4      4      ``q - qmin`` (0..15)            ``(code - (zero_point - qmin)) * scale``
log       3, 4   sign bit, exponent ``e``         ``levels[code] * scale`` =
                 (:func:`log_codes`)             ``±2 ** (e - e_max) * scale``, 0 at e = 0
========  =====  ==============================  ===================================

All of them decode exactly (small integers, halves and powers of two are exact in float32).

This module imports torch: method modules import it inside their handlers only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

SUPPORTED_BITS = (1, 2, 3, 4)
LOG_BITS = (3, 4)
"""Widths of the log code: a sign bit and a 2 or 3-bit exponent."""


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, not {bits}")


def _word(bits: int) -> tuple[int, int]:
    """``(bytes, codes)`` of the smallest whole-byte word that holds whole codes."""
    _check_bits(bits)
    word_bits = math.lcm(bits, 8)
    return word_bits // 8, word_bits // bits


def packed_size(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take once packed."""
    word_bytes, per_word = _word(bits)
    return math.ceil(numel / per_word) * word_bytes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a flat ``uint8`` tensor.

    Raises:
        ValueError: a code does not fit in ``bits`` bits.
    """
    word_bytes, per_word = _word(bits)
    flat = codes.detach().reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to pack into {bits} bits")
    pad = (-flat.numel()) % per_word
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(0, per_word * bits, bits, dtype=torch.int32)
    words = (flat.reshape(-1, per_word) << shifts).sum(dim=1)
    byte_shifts = torch.arange(0, 8 * word_bytes, 8, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).reshape(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The first ``numel`` codes of ``packed`` (``uint8``; int32 for 3 bits), with
    traceable aten ops only.

    Integer division and remainder by powers of two rather than shifts and ands: the
    ONNX exporter mistypes uint8 shifts (as int8), and these convert as they are.
    """
    word_bytes, per_word = _word(bits)
    if word_bytes == 1:
        words = packed.unsqueeze(-1)
        steps = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        base = 2
    else:  # 3 bits: each 3-byte word, little-endian, holds 8 codes (int32 holds the 24 bits)
        places = torch.arange(word_bytes, dtype=torch.int32, device=packed.device)
        rows = packed.reshape(-1, word_bytes).to(torch.int32)
        words = (rows * torch.pow(256, places)).sum(dim=1, dtype=torch.int32).unsqueeze(-1)
        steps = torch.arange(per_word, dtype=torch.int32, device=packed.device)
        base = 1 << bits
    codes = torch.remainder(
        torch.div(words, torch.pow(base, steps), rounding_mode="floor"), 1 << bits
    )
    codes = codes.reshape(-1)
    # decided when traced, so that a program holds no no-op slice or cast
    return codes[:numel] if codes.shape[0] != numel else codes


def log_levels(bits: int) -> torch.Tensor:
    """The value of each ``bits``-bit log code, before the scale: float32 ``[2 ** bits]``.

    A code is a sign bit (the top bit) over an exponent field ``e`` of ``bits - 1`` bits:
    ``e = 0`` is zero (either sign), ``e >= 1`` is ``±2 ** (e - e_max)`` with
    ``e_max = 2 ** (bits - 1) - 1``, so the magnitudes are 0 and ``2 ** -(e_max - 1)`` .. 1
    (3 bits: 0, 1/4, 1/2, 1; 4 bits: 0, 1/64 .. 1).
    """
    if bits not in LOG_BITS:
        raise ValueError(f"log codes have {' or '.join(map(str, LOG_BITS))} bits, not {bits}")
    e_max = (1 << (bits - 1)) - 1
    magnitudes = [0.0] + [2.0 ** (e - e_max) for e in range(1, e_max + 1)]
    return torch.tensor(magnitudes + [-m if m else 0.0 for m in magnitudes], dtype=torch.float32)


def log_codes(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``bits``-bit log code nearest to each ``weight / scale`` (``uint8``, weight's shape).

    Nearest in value: a ratio between two magnitudes goes to the closer one (below half
    the smallest power of two, to zero; above 1, to 1). Zero is always code 0. ``scale``
    broadcasts over ``weight`` and must be positive.
    """
    levels = log_levels(bits)
    e_max = (1 << (bits - 1)) - 1
    magnitudes = levels[: e_max + 1].to(weight.device)
    midpoints = (magnitudes[:-1] + magnitudes[1:]) / 2
    ratio = (weight.detach().abs() / scale).to(torch.float32)
    exponent = torch.bucketize(ratio, midpoints)
    negative = (weight < 0) & (exponent > 0)
    return (exponent + negative.to(exponent.dtype) * (e_max + 1)).to(torch.uint8)


class PackedLayer(nn.Module):
    """A Linear or Conv1d/Conv2d layer whose weight is stored packed (see the module doc).

    Attributes (buffers): ``packed`` (uint8), ``scale`` and ``offset`` (float32, shapes
    broadcastable to ``[out_channels, groups, group_size]``), ``levels`` (float32
    ``[2 ** bits]``, the value of each code, for a non-linear code such as the log code),
    ``packed_layout`` (int64, ``[bits, groups, *weight_shape]``), and the float ``bias``
    parameter when the layer has one.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    levels: torch.Tensor | None
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
        levels: torch.Tensor | None = None,
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
        if levels is not None and levels.shape != (1 << bits,):
            raise ValueError(
                f"a {bits}-bit code needs {1 << bits} levels, not {list(levels.shape)}"
            )
        self.kind = kind
        self.bits = bits
        self.weight_shape = tuple(int(d) for d in weight_shape)
        self.grouped_shape = (out, groups, numel // out // groups)
        self.numel = numel
        self.conv = dict(conv or {})
        self.register_buffer("packed", pack_codes(codes, bits))
        self.register_buffer("scale", scale.detach().to(torch.float32).clone())
        self.register_buffer("offset", offset.detach().to(torch.float32).clone())
        kept = None if levels is None else levels.detach().to(torch.float32).clone()
        self.register_buffer("levels", kept)  # None: a linear code, no buffer
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
        return _decode(codes, self.scale, self.offset, self.levels).reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.decode_weight()
        bias = self.bias
        if x.dtype != weight.dtype:  # decided when traced: no cast node in a float32 graph
            weight = weight.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        if self.kind == "conv1d":
            return F.conv1d(x, weight, bias, **self.conv)
        return F.conv2d(x, weight, bias, **self.conv)

    def extra_repr(self) -> str:
        return (
            f"{self.kind}, weight={list(self.weight_shape)}, bits={self.bits}, "
            f"{'' if self.levels is None else 'levels, '}"
            f"groups={self.grouped_shape[1]}, packed_bytes={self.packed.numel()}"
        )


def _decode(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, levels: torch.Tensor | None
) -> torch.Tensor:
    values = codes.to(torch.float32) if levels is None else levels[codes.to(torch.int64)]
    return (values - offset) * scale


# The buffers of one packed layer share a prefix: ``<layer>.packed``, ``<layer>.scale``,
# ``<layer>.offset``, ``<layer>.levels`` (for a non-linear code), ``<layer>.packed_layout``
# (``<layer>_packed`` once a program is unflattened into a GraphModule).
PACKED_SUFFIX = "packed"
LAYOUT_SUFFIX = "packed_layout"
LEVELS_SUFFIX = "levels"


def layout_name(packed_name: str) -> str | None:
    """The name of the ``packed_layout`` buffer beside a ``packed`` buffer, or None if
    ``packed_name`` is not one."""
    if not packed_name.endswith(PACKED_SUFFIX):
        return None
    return packed_name[: -len(PACKED_SUFFIX)] + LAYOUT_SUFFIX


def decode_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    layout: torch.Tensor,
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float32 weight a :class:`PackedLayer`'s buffers encode (as its forward decodes it);
    ``levels``: its ``levels`` buffer, when it has one."""
    bits, groups, *shape = (int(v) for v in layout.tolist())
    _check_bits(bits)
    numel = math.prod(shape)
    codes = unpack_codes(packed, bits, numel).reshape(shape[0], groups, -1)
    return _decode(codes, scale, offset, levels).reshape(shape)


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


def packable_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of ``module`` a :class:`PackedLayer` can replace, in the order its forward
    calls them (a lifted GraphModule's call order; ``named_modules`` order otherwise)."""
    if isinstance(module, torch.fx.GraphModule):
        names = [str(n.target) for n in module.graph.nodes if n.op == "call_module"]
        ordered = list(dict.fromkeys(names))
    else:
        ordered = [name for name, _ in module.named_modules()]
    return [
        (name, module.get_submodule(name))
        for name in ordered
        if layer_kind(module.get_submodule(name)) is not None
    ]


def replace_layer(root: nn.Module, name: str, layer: nn.Module) -> None:
    """Put ``layer`` at the dotted path ``name`` of ``root``."""
    owner_path, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    setattr(owner, attr, layer)


def log_layer(layer: nn.Module, bits: int, scale: torch.Tensor) -> PackedLayer:
    """A PackedLayer storing ``layer``'s weight as ``bits``-bit log codes (:func:`log_codes`)
    with ``scale`` (``[out_channels, 1, ...]``, positive) per output channel."""
    found = layer_kind(layer)
    if found is None:
        raise ValueError(f"a {type(layer).__name__} cannot be stored packed")
    kind, conv = found
    weight: torch.Tensor = layer.weight.detach()  # type: ignore[operator]
    out = weight.shape[0]
    return PackedLayer(
        kind=kind,
        weight_shape=tuple(weight.shape),
        bits=bits,
        codes=log_codes(weight, scale, bits),
        scale=scale.reshape(out, 1, 1),
        offset=weight.new_zeros(()),
        groups=1,
        bias=_bias(layer),
        conv=conv,
        levels=log_levels(bits),
    )


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
