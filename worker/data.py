"""Datasets: calibration, training and evaluation arrays uploaded with a job."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.errors import DatasetMismatchError, UnsupportedError

LABELS_KEY = "labels"
SINGLE_INPUT_KEY = "inputs"


@dataclass
class Dataset:
    """Arrays of one dataset.

    Attributes:
        inputs: model inputs by name. A single array stored as ``inputs`` feeds the
            model's only input whatever its name; otherwise each key names an input.
        labels: ``[N]`` class indices (or ``[N, C]`` one-hot) when given.
        num_samples: N, the size of the leading (batch) axis shared by every array.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    num_samples: int

    @property
    def is_single_input(self) -> bool:
        return list(self.inputs) == [SINGLE_INPUT_KEY]

    def head(self, n: int) -> Dataset:
        """The first ``n`` samples."""
        n = min(n, self.num_samples)
        labels = None if self.labels is None else self.labels[:n]
        return Dataset({k: v[:n] for k, v in self.inputs.items()}, labels, n)


def load_dataset(path: Path) -> Dataset:
    """Read a dataset file: ``.npz`` (no pickles) or ``.safetensors``.

    Raises:
        DatasetMismatchError: the file is unreadable, empty, or its arrays disagree on N.
        UnsupportedError: ``.jsonl`` (text for Hugging Face models) or another format.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays = _read_npz(path)
    elif suffix == ".safetensors":
        arrays = _read_safetensors(path)
    elif suffix == ".jsonl":
        raise UnsupportedError(
            "text datasets (.jsonl with 'text' and 'label') are for Hugging Face models, "
            "which this engine does not load yet; upload arrays as .npz or .safetensors",
            step="load_datasets",
        )
    else:
        raise UnsupportedError(
            f"unknown dataset format {suffix or path.name!r}; use .npz or .safetensors "
            "with an 'inputs' array (or several named inputs) and optional 'labels'",
            step="load_datasets",
        )
    return _to_dataset(arrays, path.name)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise DatasetMismatchError(
            f"{path.name}: cannot read the .npz without unpickling ({exc}); "
            "store plain numeric arrays",
            step="load_datasets",
        ) from exc
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise DatasetMismatchError(
            f"{path.name}: not a readable .npz file ({exc})", step="load_datasets"
        ) from exc


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise DatasetMismatchError(
            f"{path.name}: not a readable .safetensors file ({exc})", step="load_datasets"
        ) from exc


def _to_dataset(arrays: dict[str, np.ndarray], name: str) -> Dataset:
    labels = arrays.pop(LABELS_KEY, None)
    if not arrays:
        raise DatasetMismatchError(
            f"{name}: no input arrays; store the inputs as 'inputs' (or one array per "
            "named model input) and optional 'labels'",
            step="load_datasets",
        )
    if SINGLE_INPUT_KEY in arrays and len(arrays) > 1:
        others = sorted(k for k in arrays if k != SINGLE_INPUT_KEY)
        raise DatasetMismatchError(
            f"{name}: has both 'inputs' and named arrays {others}; use one or the other",
            step="load_datasets",
        )
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
    if labels is not None:
        sizes[LABELS_KEY] = labels.shape[0] if labels.ndim else None
    distinct = set(sizes.values())
    if None in distinct or len(distinct) != 1:
        raise DatasetMismatchError(
            f"{name}: every array needs the same leading (sample) axis; got "
            + ", ".join(f"{k}: {list(arrays[k].shape) if k in arrays else list(labels.shape)}" for k in sizes),  # type: ignore[union-attr]
            step="load_datasets",
        )
    num_samples = distinct.pop()
    if not num_samples:
        raise DatasetMismatchError(f"{name}: the dataset has no samples", step="load_datasets")
    for key, arr in arrays.items():
        if arr.dtype.kind not in "biuf":
            raise DatasetMismatchError(
                f"{name}: array {key!r} has dtype {arr.dtype}; inputs must be numeric",
                step="load_datasets",
            )
    return Dataset(inputs=arrays, labels=labels, num_samples=int(num_samples))
