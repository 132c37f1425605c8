"""The eval data split into a search split (ranks trials) and a held-out one (verifies).

Only the held-out split verifies the Pareto set and the chosen model (DESIGN §10).

Deterministic for a seed, disjoint, and stratified by label when the data is labelled
(each class keeps its share in both splits), so a bound verified on the held-out split
is not one the search tuned itself to. Arrays (``.npz``, ``.safetensors``) are written as
``.npz``; text (``.jsonl``) is split by record and stays ``.jsonl``, so an hf model
tokenizes each split as it would the upload.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from worker.contract import DatasetFormat
from worker.data import LABELS_KEY, load_dataset
from worker.errors import DatasetMismatchError
from worker.safety import Unsafe
from worker.safety.datasets import iter_jsonl

MIN_SPLIT_SAMPLES = 10
"""Each split needs at least this many samples for a figure worth reporting."""
_MAX_CLASSES_SHARE = 0.5  # more distinct labels than this share of N: not class labels


def split_eval(
    eval_path: Path, holdout_fraction: float, seed: int, out_dir: Path
) -> tuple[Path, Path]:
    """``(search_path, holdout_path)``: the eval dataset split, ``holdout_fraction`` held out.

    Raises:
        DatasetMismatchError: the file cannot be read, or it is too small to split (the
        message says the minimum for this fraction).
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), not {holdout_fraction}")
    eval_path, out_dir = Path(eval_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if eval_path.suffix.lower() == f".{DatasetFormat.jsonl}":
        return _split_jsonl(eval_path, holdout_fraction, seed, out_dir)
    dataset = load_dataset(eval_path)
    search, holdout = holdout_indices(
        dataset.num_samples, dataset.labels, holdout_fraction, seed, eval_path.name
    )
    paths = []
    for name, index in (("search", search), ("holdout", holdout)):
        arrays = {key: value[index] for key, value in dataset.inputs.items()}
        if dataset.labels is not None:
            arrays[LABELS_KEY] = dataset.labels[index]
        path = out_dir / f"{name}.npz"
        np.savez(path, **arrays)  # type: ignore[arg-type]
        paths.append(path)
    return paths[0], paths[1]


def holdout_indices(
    num_samples: int,
    labels: np.ndarray | None,
    holdout_fraction: float,
    seed: int,
    name: str = "the eval dataset",
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted sample indices of the search and held-out splits (disjoint, covering all)."""
    held = round(num_samples * holdout_fraction)
    if min(held, num_samples - held) < MIN_SPLIT_SAMPLES:
        need = math.ceil(MIN_SPLIT_SAMPLES / min(holdout_fraction, 1.0 - holdout_fraction))
        raise DatasetMismatchError(
            f"{name} has {num_samples} samples: holding out {holdout_fraction:g} of them for "
            f"verification needs at least {need} ({MIN_SPLIT_SAMPLES} in each split); upload "
            "a larger eval dataset",
            step="split",
        )
    rng = np.random.default_rng(seed)
    classes = _classes(labels, num_samples)
    if classes is None:
        order = rng.permutation(num_samples)
        holdout = np.sort(order[:held])
    else:
        holdout = np.sort(_stratified(classes, held, rng))
    search = np.setdiff1d(np.arange(num_samples), holdout)
    return search, holdout


def _classes(labels: np.ndarray | None, num_samples: int) -> np.ndarray | None:
    """One class id per sample, or None when the labels are not classes."""
    if labels is None:
        return None
    array = np.asarray(labels)
    if array.ndim == 2 and array.shape[1] > 1:  # one-hot
        array = array.argmax(axis=1)
    if array.ndim != 1 or array.dtype.kind not in "iub":
        if array.ndim == 1 and array.dtype.kind == "f" and np.all(array == np.round(array)):
            array = array.astype(np.int64)
        else:
            return None
    if len(np.unique(array)) > max(2, _MAX_CLASSES_SHARE * num_samples):
        return None
    return array


def _stratified(classes: np.ndarray, held: int, rng: np.random.Generator) -> np.ndarray:
    """``held`` indices, each class contributing its share (largest remainders round up)."""
    values, counts = np.unique(classes, return_counts=True)
    exact = counts * held / len(classes)
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take), kind="stable")[: held - int(take.sum())]:
        take[i] += 1
    chosen = []
    for value, k in zip(values, take, strict=True):
        members = np.flatnonzero(classes == value)
        chosen.append(rng.permutation(members)[:k])
    return np.concatenate(chosen)


def _split_jsonl(path: Path, fraction: float, seed: int, out_dir: Path) -> tuple[Path, Path]:
    try:
        records = list(iter_jsonl(path))
    except Unsafe as exc:
        raise DatasetMismatchError(f"{path.name}: {exc.detail}", step="split") from None
    labels = [label for _, label in records]
    classes = None
    if all(label is not None for label in labels):
        names = {label: i for i, label in enumerate(dict.fromkeys(map(str, labels)))}
        classes = np.asarray([names[str(label)] for label in labels])
    search, holdout = holdout_indices(len(records), classes, fraction, seed, path.name)
    paths = []
    for name, index in (("search", search), ("holdout", holdout)):
        out = out_dir / f"{name}.jsonl"
        with out.open("w", encoding="utf-8") as f:
            for i in index:
                text, label = records[int(i)]
                record = {"text": text} if label is None else {"text": text, "label": label}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        paths.append(out)
    return paths[0], paths[1]
