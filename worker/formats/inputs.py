"""Inputs built from a model's signature, and feeds cast to its input dtypes."""

from __future__ import annotations

import numpy as np

from worker.formats.registry import backend_for
from worker.formats.types import LoadedModel


def _numpy_dtype(dtype: str) -> np.dtype:
    # numpy has no bfloat16: such inputs are fed as float32 and cast by the runtime
    return np.dtype("float32" if dtype == "bfloat16" else dtype)


def generate_inputs(model: LoadedModel, batch: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs built from the signature: standard normal floats, zeros for integers.

    Text inputs are the exception: an ``attention_mask`` is all ones, and an hf model's
    ``input_ids`` are uniform random token ids of its vocabulary. A dynamic axis 0 gets
    ``batch``; another dynamic dim gets the export's example size when known, else 8.
    """
    rng = np.random.default_rng(seed)
    vocab = backend_for(model.format).vocab_size(model)
    feeds: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif axis == 0:
                shape.append(batch)
            else:
                shape.append(max(2, model.dim_hints.get(dim, 8)))
        dtype = _numpy_dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        elif spec.name == "input_ids" and vocab is not None:
            feeds[spec.name] = rng.integers(0, vocab, size=shape).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return feeds


def cast_feeds(model: LoadedModel, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays cast to the dtypes of the model's inputs, in input order."""
    return {
        spec.name: np.ascontiguousarray(feeds[spec.name], dtype=_numpy_dtype(spec.dtype))
        for spec in model.inputs
    }
