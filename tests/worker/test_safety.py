"""worker.safety's checkers called directly, on files built here without torch.

The upload check (tests/app/test_sniff.py) covers what reaches the API through them; these
tests pin what the worker relies on (return values, the rules the two old copies disagreed
on) and that the package stays torch-free.
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from tests.app.test_sniff import (
    Evil,
    gemm_model,
    payload,
    write_hf,
    write_onnx,
    write_pt2,
    write_zip,
)
from worker.safety import EXPORT_HELP, NotThisFormat, Unsafe, datasets, hf, pt2
from worker.safety import onnx as onnx_rules
from worker.safety.pickles import PICKLE_TITLE, is_pickle, scan_pickle


def refused(call: Any, *args: Any) -> Unsafe:
    with pytest.raises(Unsafe) as info:
        call(*args)
    return info.value


def program(*targets: str, exprs: tuple[str, ...] = ()) -> bytes:
    nodes = [{"target": t, "inputs": [], "outputs": []} for t in targets]
    sym = {f"s{i}": {"as_expr": {"expr_str": e}} for i, e in enumerate(exprs)}
    graph = {"graph_module": {"graph": {"nodes": nodes, "sym_int_values": sym}}}
    return json.dumps(graph).encode()


# --------------------------------------------------------------------------------------
# The neutral error and pickles


def test_unsafe_carries_what_the_api_needs() -> None:
    error = Unsafe("do this instead", title="Bad thing", status=415)
    assert (error.detail, error.title, error.status) == ("do this instead", "Bad thing", 415)
    assert Unsafe("x").status == 422
    assert isinstance(NotThisFormat("x"), Unsafe)


def test_pickles_are_recognised_and_scanned_not_run() -> None:
    assert all(is_pickle(pickle.dumps(1, protocol=p)) for p in (2, 3, 4, 5))
    assert not is_pickle(b"PK\x03\x04") and not is_pickle(b"\x80")
    scan_pickle(io.BytesIO(pickle.dumps({"a": [1, 2.0]})), 10, "safe", title="T")
    evil = pickle.dumps(Evil(), protocol=2)
    with pytest.raises(Unsafe) as error:
        scan_pickle(io.BytesIO(evil), len(evil), "inputs.pkl", title="T")
    assert error.value.title == "T" and "system" in error.value.detail
    with pytest.raises(Unsafe, match="larger than"):
        scan_pickle(io.BytesIO(b""), 1 << 30, "big.pkl", title="T")


# --------------------------------------------------------------------------------------
# pt2


def test_pt2_returns_the_operator_namespaces_the_loader_must_register(tmp_path: Path) -> None:
    targets = (
        "torch.ops.aten.relu.default",
        "torch.ops.quantized_decomposed.quantize_per_tensor.default",
        "_operator.getitem",
    )
    path = write_pt2(tmp_path / "m.pt2", **{"models__model.json": program(*targets)})
    assert pt2.check_pt2_file(path) == {"aten", "quantized_decomposed"}


def test_pt2_pickle_and_non_zip_refused(tmp_path: Path) -> None:
    pickled = tmp_path / "m.pt2"
    pickled.write_bytes(pickle.dumps({"w": 1}, protocol=4))
    assert refused(pt2.check_pt2_file, pickled).title == PICKLE_TITLE
    garbage = tmp_path / "g.pt2"
    garbage.write_bytes(b"x" * 100)
    error = refused(pt2.check_pt2_file, garbage)
    assert "not a zip" in error.detail and EXPORT_HELP in error.detail


@pytest.mark.parametrize(
    "expr",
    [
        "Symbol('s0', positive=True, integer=True)",
        "Mul(Integer(2), Symbol('s0', positive=True, integer=True))",
        "FloorDiv(s0 + 1, 2)",
        "Max(2, s17)",
    ],
)
def test_plain_symbolic_shapes_accepted(expr: str) -> None:
    pt2.check_sym_expr(expr)


@pytest.mark.parametrize(
    "expr",
    ["__import__('os').system('x')", "s0.__class__", "open('/etc/passwd')", "lambda: 1", 5],
)
def test_code_in_symbolic_shapes_refused(tmp_path: Path, expr: Any) -> None:
    refused(pt2.check_sym_expr, expr)
    bad = write_pt2(tmp_path / "m.pt2", **{"models__model.json": program(exprs=(str(expr),))})
    if isinstance(expr, str):
        assert "not plain arithmetic" in refused(pt2.check_pt2_file, bad).detail


@pytest.mark.parametrize(
    ("folder", "path_name", "needle"),
    [
        ("weights", "../../etc/passwd", "not a plain tensor"),
        ("weights", "tensor_0", "not a plain tensor"),  # a constant's name among the weights
        ("constants", "weight_0", "not a plain tensor"),
        ("constants", "opaque_obj_0", "custom or opaque object"),
    ],
)
def test_payload_names_are_an_allow_list(tmp_path: Path, folder: str, path_name: str, needle: str):
    config = {"config": {"x": payload(path_name)}}
    path = write_pt2(
        tmp_path / "m.pt2",
        **{f"data__{folder}__model_{folder}_config.json": json.dumps(config).encode()},
    )
    assert needle in refused(pt2.check_pt2_file, path).detail


def test_payload_without_tensor_metadata_refused(tmp_path: Path) -> None:
    meta = payload("weight_0") | {"tensor_meta": None}
    config = json.dumps({"config": {"w": meta}}).encode()
    path = write_pt2(tmp_path / "m.pt2", **{"data__weights__model_weights_config.json": config})
    assert "tensor metadata" in refused(pt2.check_pt2_file, path).detail


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"data__weights__model.pt": b"\x80\x02."}, "legacy pickled layout"),
        ({"models__notes.txt": b"hi"}, "not a program"),
        ({"extra__libevil.so": b"\x7fELF"}, "compiled code"),
    ],
)
def test_pt2_layouts_torch_would_load_code_from_refused(tmp_path: Path, changes, needle) -> None:
    assert needle in refused(pt2.check_pt2_file, write_pt2(tmp_path / "m.pt2", **changes)).detail


def test_legacy_pt2_layout_refused_with_what_to_do(tmp_path: Path) -> None:
    path = write_zip(
        tmp_path / "old.pt2",
        {"serialized_exported_program.json": b"{}", "serialized_state_dict.pt": b"\x80\x02."},
    )
    error = refused(pt2.check_pt2_file, path)
    assert "legacy" in error.detail and "re-save" in error.detail


def test_pt2_archive_version_is_required(tmp_path: Path) -> None:
    assert pt2.check_pt2_file(write_pt2(tmp_path / "ok.pt2")) == frozenset()
    without = write_pt2(tmp_path / "m.pt2", archive_version=None)
    assert "no archive_version" in refused(pt2.check_pt2_file, without).detail
    other = write_pt2(tmp_path / "v1.pt2", archive_version=b"1")
    assert refused(pt2.check_pt2_file, other).title == "Unsupported pt2 archive"


# --------------------------------------------------------------------------------------
# hf


@pytest.mark.parametrize("root", ["bert/", ""])
def test_hf_returns_the_folder_to_extract_without_litter(tmp_path: Path, root: str) -> None:
    path = write_hf(tmp_path / "m.zip", root=root, changes={"1_Pooling/config.json": b"{}"})
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(f"{root}.DS_Store", b"junk")
        z.writestr(f"__MACOSX/{root}._config.json", b"junk")
    checked = hf.check_hf_file(path)
    assert checked.root == root
    assert sorted(checked.members) == sorted(
        root + rel
        for rel in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "1_Pooling/config.json")
    )  # fmt: skip
    assert checked.config["architectures"] == ["BertForSequenceClassification"]


def test_hf_litter_rule() -> None:
    assert hf.is_litter("__MACOSX/bert/._x") and hf.is_litter("bert/.DS_Store")
    assert not hf.is_litter("bert/config.json")


def test_hf_not_a_zip_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.zip"
    path.write_bytes(b"not a zip")
    assert "not a zip" in refused(hf.check_hf_file, path).detail


def test_hf_large_root_json_is_refused_not_skipped(tmp_path: Path, monkeypatch) -> None:
    # The old worker copy skipped large JSON files when looking for auto_map.
    from worker.safety import _zip

    monkeypatch.setattr(_zip, "MAX_JSON_MEMBER_BYTES", 1000)
    big = json.dumps({"auto_map": {"AutoTokenizer": "x.Y"}, "pad": "x" * 2000}).encode()
    path = write_hf(tmp_path / "m.zip", changes={"tokenizer_config.json": big})
    assert "larger than" in refused(hf.check_hf_file, path).detail


# --------------------------------------------------------------------------------------
# onnx


def test_onnx_check_returns_the_checked_proto(tmp_path: Path) -> None:
    proto = onnx_rules.check_onnx_file(write_onnx(tmp_path / "m.onnx"))
    assert [o.name for o in proto.graph.output] == ["Y"]


def test_onnx_not_this_format_and_external_data(tmp_path: Path) -> None:
    garbage = tmp_path / "g.onnx"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(NotThisFormat) as info:
        onnx_rules.check_onnx_file(garbage)
    assert "not a valid ONNX model" in onnx_rules.not_onnx(info.value).detail
    external = tmp_path / "e.onnx"
    onnx.save_model(gemm_model(), str(external), save_as_external_data=True, size_threshold=0)
    for check in (
        onnx_rules.check_onnx_file,
        lambda p: onnx_rules.scan_onnx_wire(p, p.stat().st_size),
    ):
        assert "external data" in refused(check, external).detail


def test_onnx_without_outputs_refused(tmp_path: Path) -> None:
    model = gemm_model()
    del model.graph.output[:]
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert "no outputs" in refused(onnx_rules.check_onnx_file, path).detail


# --------------------------------------------------------------------------------------
# datasets


def test_dataset_summaries(tmp_path: Path) -> None:
    npz = tmp_path / "d.npz"
    np.savez(npz, inputs=np.zeros((4, 2), np.float32), labels=np.arange(4))
    assert datasets.check_dataset(npz, "npz")["num_samples"] == 4
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": 0}\n')
    assert list(datasets.iter_jsonl(jsonl)) == [("a", "pos"), ("b", 0)]
    assert datasets.check_dataset(jsonl, "jsonl") == {"num_samples": 2, "has_labels": True}
    jsonl.write_text('{"text": "a"}\n')
    assert list(datasets.iter_jsonl(jsonl)) == [("a", None)]
    with pytest.raises(ValueError, match="npz, safetensors, jsonl"):
        datasets.check_dataset(jsonl, "csv")


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"inputs": np.zeros((3, 2)), "ids": np.zeros((3, 2))}, "both 'inputs' and named"),
        ({"inputs": np.zeros((3, 2)), "labels": np.zeros((3, 4), np.int64)}, "1-D integer"),
        ({"inputs": np.zeros((3, 2)), "labels": np.zeros(3)}, "1-D integer"),
        ({"inputs": np.zeros((5, 2)), "labels": np.zeros(4, np.int64)}, "same leading"),
    ],
)
def test_array_rules(tmp_path: Path, arrays: dict[str, np.ndarray], needle: str) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    assert needle in refused(datasets.check_dataset, path, "npz").detail


def test_empty_and_pickled_datasets_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(b"")
    assert refused(datasets.check_dataset, path, "npz").title == "Empty dataset"
    path.write_bytes(pickle.dumps({"inputs": [1]}, protocol=4))
    assert refused(datasets.check_dataset, path, "npz").title == "Pickled dataset refused"


# --------------------------------------------------------------------------------------
# The package stays torch-free


def test_safety_imports_no_torch() -> None:
    code = (
        "import sys, pathlib, worker.safety.pt2, worker.safety.hf, worker.safety.onnx,"
        " worker.safety.datasets, worker.safety.pickles, app.sniff;"
        "bad = [m for m in ('torch', 'onnxruntime', 'transformers') if m in sys.modules];"
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
