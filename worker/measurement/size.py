"""How big a model is: the file's bytes, gzipped bytes, and its weights counted."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.formats import LoadedModel, weight_arrays

GZIP_LEVEL = 6  # gzip's own default: what `gzip model.pt2` gives
_CHUNK = 1 << 20


def file_size(path: Path) -> int:
    """Bytes of the file."""
    return Path(path).stat().st_size


def gzip_size(path: Path) -> int:
    """Bytes of the gzip-compressed file (level 6), streamed in 1 MiB chunks."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip container
    total = 0
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            total += len(compressor.compress(chunk))
    return total + len(compressor.flush())


@dataclass(frozen=True)
class WeightCounts:
    """``parameters``, ``nonzero_parameters`` and ``sparsity`` (None without weights)."""

    parameters: int
    nonzero_parameters: int
    sparsity: float | None


def weight_counts(model: LoadedModel) -> WeightCounts:
    """Weights and nonzero weights over the weight tensors.

    Weights are as :func:`worker.formats.weight_shapes` defines them: int8 weights count
    as parameters; quantization scales and zero points do not. A stored value that is
    not zero counts as nonzero (for asymmetric int8, a pruned weight is its zero point).
    """
    total = 0
    nonzero = 0
    for array in weight_arrays(model).values():
        total += int(array.size)
        nonzero += int(np.count_nonzero(array))
    return WeightCounts(total, nonzero, 1.0 - nonzero / total if total else None)
