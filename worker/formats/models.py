"""Load, save and inspect a model of any format: each call is its backend's."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from worker.errors import InvalidModelError
from worker.formats.registry import backend_for
from worker.formats.types import LoadedModel


def load_model(path: Path, fmt: str) -> LoadedModel:
    """Load a model file safely.

    Raises:
        InvalidModelError: the file is broken, unsafe, or not ``fmt``; the message says why.
        UnsupportedError: ``fmt`` is not a known format.
    """
    backend = backend_for(fmt)
    path = Path(path)
    if not path.is_file():
        raise InvalidModelError(f"model file {path.name!r} does not exist", step="load")
    return backend.load(path)


def save_model(model: LoadedModel, path: Path) -> None:
    """Write the model: pt2 with ``torch.export.save`` (example inputs zeroed), onnx as one
    file with ``onnx.save``, hf as a zip of the ``save_pretrained`` folder (safetensors
    weights, tokenizer)."""
    backend = backend_for(model.format, step="save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backend.save(model, path)


def inspect_model(path: Path, fmt: str) -> dict[str, Any]:
    """Describe a model file.

    Returns:
        ``{"parameters": int, "layers": {op: count}, "layer_names": [...], "inputs": [...],
        "outputs": [...]}``; layers count operators (pt2: ``aten.linear`` ...; onnx:
        ``Gemm`` ...; hf: module types, ``Linear`` ...), layer_names are the layers
        ``exclude`` takes (module paths for pt2/hf, node names for onnx), inputs and
        outputs are ``{"name", "shape", "dtype"}`` with a
        symbol name for a dynamic dim. hf adds ``task`` and ``architecture``.
    """
    model = load_model(path, fmt)
    backend = backend_for(fmt)
    info: dict[str, Any] = {
        "parameters": sum(int(np.prod(shape)) for shape in backend.weight_shapes(model).values()),
        "layers": dict(sorted(backend.layer_counts(model).items())),
        "layer_names": backend.layer_names(model),
        "inputs": [s.to_dict() for s in model.inputs],
        "outputs": [s.to_dict() for s in model.outputs],
    }
    info.update(backend.describe(model))
    return info


def layer_counts(model: LoadedModel) -> Counter[str]:
    """Operator counts: pt2 ``aten.linear``-style names, onnx op types, hf leaf module types."""
    return backend_for(model.format).layer_counts(model)


def weight_arrays(model: LoadedModel) -> dict[str, np.ndarray]:
    """The model's weight tensors as numpy arrays (see :func:`weight_shapes` for which)."""
    return backend_for(model.format).weight_arrays(model)


def weight_shapes(model: LoadedModel) -> dict[str, tuple[int, ...]]:
    """Shapes of the weight tensors.

    Weights are a pt2 program's parameters plus its 8-bit integer buffers/constants
    (quantized weights); an hf module's parameters (a tied weight once) plus its 8-bit
    integer buffers; an onnx model's float and 8-bit initializers except those that
    are quantization metadata (scales and zero points of quantize/dequantize and integer
    matmul/conv ops, and the weight scales ONNX Runtime multiplies after an integer matmul).
    """
    return backend_for(model.format).weight_shapes(model)


def layer_names(model: LoadedModel) -> list[str]:
    """The layers ``exclude`` names: module paths (pt2, hf) or node names (onnx)."""
    return backend_for(model.format).layer_names(model)
