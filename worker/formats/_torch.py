"""Torch helpers the torch-based backends (pt2, hf) share; torch is imported inside them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from worker.errors import UnsupportedError

if TYPE_CHECKING:
    import torch


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def torch_device(device: str) -> torch.device:
    """The torch device of ``target.device``; refuses ``gpu`` on a worker without CUDA."""
    import torch

    if device == "gpu":
        if not torch.cuda.is_available():
            raise UnsupportedError("device 'gpu' requested but this worker has no CUDA GPU")
        return torch.device("cuda")
    return torch.device("cpu")


WEIGHT_INT_DTYPES = ("int8", "uint8")
"""Integer buffers of these dtypes are weights too (quantized weights)."""


def int8_weights(tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The 8-bit integer tensors among ``tensors`` (quantized weights kept as buffers)."""
    import torch

    return {
        name: t
        for name, t in tensors.items()
        if isinstance(t, torch.Tensor) and torch_dtype_name(t.dtype) in WEIGHT_INT_DTYPES
    }


def decode_packed_weights(
    weights: dict[str, torch.Tensor], buffers: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Each packed 1/2/3/4-bit weight (a ``packed`` buffer of :class:`worker.packing.PackedLayer`
    with its ``packed_layout`` beside it) replaced by the logical weight it decodes to, so
    parameters and sparsity count weights, not bytes; the file size stays the packed size."""
    import torch

    from worker.packing import LEVELS_SUFFIX, PACKED_SUFFIX, decode_packed, layout_name

    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        layout = buffers.get(layout_name(name) or "")
        if tensor.dtype != torch.uint8 or not isinstance(layout, torch.Tensor):
            out[name] = tensor
            continue
        prefix = name[: -len(PACKED_SUFFIX)]
        scale, offset = buffers.get(prefix + "scale"), buffers.get(prefix + "offset")
        if not isinstance(scale, torch.Tensor) or not isinstance(offset, torch.Tensor):
            out[name] = tensor
            continue
        levels = buffers.get(prefix + LEVELS_SUFFIX)  # a non-linear (log) code's values
        out[prefix + "weight"] = decode_packed(tensor, scale, offset, layout, levels)
    return out
