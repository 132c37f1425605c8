"""Dataset files and their fit to a model's inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import factories
from worker.data import fit_dataset, load_dataset
from worker.errors import DatasetMismatchError, UnsupportedError
from worker.formats import LoadedModel, TensorSpec


def two_input_model() -> LoadedModel:
    return LoadedModel(
        "onnx",
        inputs=[
            TensorSpec("ids", ("batch", "seq"), "int64"),
            TensorSpec("mask", ("batch", "seq"), "float32"),
        ],
        outputs=[],
    )


def test_npz_with_inputs_and_labels(tmp_path: Path) -> None:
    ds = load_dataset(factories.digits_npz(tmp_path / "d.npz"))
    assert ds.is_single_input and ds.num_samples == 450
    assert ds.inputs["inputs"].shape == (450, 64) and ds.labels.shape == (450,)


def test_safetensors_with_named_inputs(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "d.safetensors"
    save_file({"ids": np.ones((3, 5), np.int64), "mask": np.ones((3, 5), np.float32)}, str(path))
    ds = load_dataset(path)
    assert ds.labels is None and ds.num_samples == 3
    feeds = fit_dataset(two_input_model(), "eval", ds)
    assert list(feeds) == ["ids", "mask"] and feeds["ids"].dtype == np.int64


def test_floats_cannot_feed_an_integer_input(tmp_path: Path) -> None:
    path = factories.write_npz(
        tmp_path / "d.npz",
        {"ids": np.ones((3, 5), np.float32), "mask": np.ones((3, 5), np.float32)},
    )
    with pytest.raises(DatasetMismatchError, match="ids"):
        fit_dataset(two_input_model(), "eval", load_dataset(path))


def test_ints_feed_a_float_input_cast(tmp_path: Path) -> None:
    model = LoadedModel("onnx", inputs=[TensorSpec("x", ("n", 4), "float32")], outputs=[])
    feeds = fit_dataset(
        model,
        "eval",
        load_dataset(factories.write_npz(tmp_path / "d.npz", np.ones((2, 4), np.int64))),
    )
    assert feeds["x"].dtype == np.float32


def test_arrays_must_agree_on_samples(tmp_path: Path) -> None:
    path = factories.write_npz(
        tmp_path / "d.npz", np.zeros((5, 64), np.float32), labels=np.zeros(4)
    )
    with pytest.raises(DatasetMismatchError, match="same leading"):
        load_dataset(path)


def test_object_arrays_are_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DatasetMismatchError, match="unpickling"):
        load_dataset(path)


def test_jsonl_is_for_later(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hi", "label": 1}\n')
    with pytest.raises(UnsupportedError, match="Hugging Face"):
        load_dataset(path)


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(DatasetMismatchError):
        load_dataset(path)


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"inputs": np.zeros((3, 2), np.float32), "ids": np.zeros((3, 2))}, "both 'inputs'"),
        ({"inputs": np.zeros((3, 2), np.float32), "labels": np.zeros(3)}, "1-D integer"),
        ({"inputs": np.zeros((0, 2), np.float32)}, "no samples"),
        ({"inputs": np.array(["a", "b"])}, "dtype"),
    ],
)
def test_upload_check_and_loader_refuse_the_same_files(tmp_path: Path, arrays, needle) -> None:
    # Both apply worker.safety.datasets; the loader names the file it read.
    from app.sniff import Rejected, check_dataset_file

    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(Rejected) as upload:
        check_dataset_file(path, "d.npz", None)
    with pytest.raises(DatasetMismatchError) as loader:
        load_dataset(path)
    assert needle in upload.value.detail
    assert loader.value.message == f"d.npz: {upload.value.detail}"


def test_jsonl_rules_are_the_upload_checks(tmp_path: Path) -> None:
    from app.sniff import Rejected, check_dataset_file

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": true}\n')
    with pytest.raises(Rejected) as upload:
        check_dataset_file(path, "d.jsonl", None)
    model = LoadedModel("hf", [], [], tokenizer=object())
    with pytest.raises(DatasetMismatchError) as loader:
        load_dataset(path, model)
    assert loader.value.message == f"d.jsonl: {upload.value.detail}"
