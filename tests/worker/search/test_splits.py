"""The eval split: deterministic, disjoint, stratified, and refused when too small."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import factories
from worker.data import load_dataset
from worker.errors import DatasetMismatchError
from worker.search.splits import split_eval


def _rows(path: Path) -> set[bytes]:
    data = load_dataset(path)
    return {row.tobytes() for row in data.inputs["inputs"]}


def test_split_is_disjoint_stratified_and_deterministic(tmp_path: Path) -> None:
    source = factories.digits_npz(tmp_path / "eval.npz")
    whole = load_dataset(source)
    search, holdout = split_eval(source, 0.3, seed=7, out_dir=tmp_path / "a")
    again = split_eval(source, 0.3, seed=7, out_dir=tmp_path / "b")
    other = split_eval(source, 0.3, seed=8, out_dir=tmp_path / "c")
    s, h = load_dataset(search), load_dataset(holdout)
    assert s.num_samples + h.num_samples == whole.num_samples
    assert h.num_samples == round(whole.num_samples * 0.3)
    assert not _rows(search) & _rows(holdout)  # no sample in both
    assert _rows(search) | _rows(holdout) == _rows(source)
    assert (load_dataset(again[1]).inputs["inputs"] == h.inputs["inputs"]).all()
    assert not np.array_equal(load_dataset(other[1]).inputs["inputs"], h.inputs["inputs"])
    assert h.labels is not None and whole.labels is not None
    for label in np.unique(whole.labels):  # each class keeps its share (within one sample)
        share = (whole.labels == label).sum() * 0.3
        assert abs((h.labels == label).sum() - share) <= 1


def test_too_small_to_split_says_the_minimum(tmp_path: Path) -> None:
    source = factories.write_npz(
        tmp_path / "small.npz", np.zeros((20, 4), np.float32), np.arange(20) % 2
    )
    with pytest.raises(DatasetMismatchError, match="needs at least 34"):
        split_eval(source, 0.3, seed=0, out_dir=tmp_path / "out")


def test_text_is_split_by_record_and_stays_jsonl(tmp_path: Path) -> None:
    source = tmp_path / "eval.jsonl"
    lines = [{"text": f"sample {i}", "label": ["pos", "neg"][i % 2]} for i in range(40)]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    search, holdout = split_eval(source, 0.25, seed=0, out_dir=tmp_path / "out")
    assert (search.suffix, holdout.suffix) == (".jsonl", ".jsonl")
    held = [json.loads(line) for line in holdout.read_text().splitlines()]
    kept = [json.loads(line) for line in search.read_text().splitlines()]
    assert len(held) == 10 and len(kept) == 30
    assert sorted(r["text"] for r in held + kept) == sorted(r["text"] for r in lines)
    assert sum(r["label"] == "pos" for r in held) == 5
