"""Datasets: calibration, training and evaluation arrays uploaded with a job."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.errors import DatasetMismatchError, UnsupportedError

if TYPE_CHECKING:
    from worker.formats import LoadedModel, TensorSpec

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
    shapes = {k: v.shape for k, v in arrays.items()}
    if labels is not None:
        shapes[LABELS_KEY] = labels.shape
    distinct = {shape[0] if shape else None for shape in shapes.values()}
    if None in distinct or len(distinct) != 1:
        listed = ", ".join(f"{k}: {list(shape)}" for k, shape in shapes.items())
        raise DatasetMismatchError(
            f"{name}: every array needs the same leading (sample) axis; got {listed}",
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


def fit_dataset(model: LoadedModel, role: str, dataset: Dataset) -> dict[str, np.ndarray]:
    """Match a dataset to the model's inputs and cast it to their dtypes.

    Axis 0 of every array is the sample axis (it becomes the batch axis); the rank and
    every static non-batch dim must match, and the dtype must cast within its kind
    (ints and floats feed a float input; floats cannot feed an integer input).

    Returns:
        Arrays by model input name, in input order.

    Raises:
        DatasetMismatchError: naming the expected and the given shapes.
    """
    expected = ", ".join(s.describe() for s in model.inputs)
    if dataset.is_single_input:
        if len(model.inputs) != 1:
            raise DatasetMismatchError(
                f"{role} dataset has one 'inputs' array but the model takes "
                f"{len(model.inputs)} inputs ({expected}); store one array per input name",
                step="check_datasets",
            )
        given = {model.inputs[0].name: dataset.inputs[SINGLE_INPUT_KEY]}
    else:
        names = {s.name for s in model.inputs}
        missing = sorted(names - set(dataset.inputs))
        extra = sorted(set(dataset.inputs) - names)
        if missing or extra:
            raise DatasetMismatchError(
                f"{role} dataset arrays {sorted(dataset.inputs)} do not match the model inputs "
                f"({expected}); missing {missing}, unexpected {extra}",
                step="check_datasets",
            )
        given = dataset.inputs
    feeds: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        array = given[spec.name]
        _check_array(role, spec, array)
        target = np.dtype("float32" if spec.dtype == "bfloat16" else spec.dtype)
        feeds[spec.name] = np.ascontiguousarray(array, dtype=target)
    return feeds


def _check_array(role: str, spec: TensorSpec, array: np.ndarray) -> None:
    fits = array.ndim == spec.rank and all(
        not isinstance(dim, int) or axis == 0 or dim == array.shape[axis]
        for axis, dim in enumerate(spec.shape)
    )
    target = np.dtype("float32" if spec.dtype == "bfloat16" else spec.dtype)
    castable = np.can_cast(array.dtype, target, casting="same_kind") and not (
        target.kind in "iub" and array.dtype.kind == "f"
    )
    if fits and castable:
        return
    expected = "[" + ", ".join(str(d) for d in spec.shape) + f"] {spec.dtype}"
    given = f"{list(array.shape)} {array.dtype}"
    raise DatasetMismatchError(
        f"{role} dataset does not fit model input {spec.name!r}: expected shape {expected} "
        f"(axis 0 is the sample axis), given {given}",
        step="check_datasets",
    )
