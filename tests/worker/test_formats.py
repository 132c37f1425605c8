"""Loading uploads safely, inspecting and saving models."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests import factories
from worker.contract import FORMATS, ModelFormat
from worker.errors import InvalidModelError, UnsupportedError
from worker.formats import (
    BACKENDS,
    LoadedModel,
    Runtime,
    backend_for,
    inspect_model,
    load_model,
    save_model,
)

MLP_PARAMETERS = 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10


def rewrite_archive(src: Path, dst: Path, edit) -> Path:
    """Copy a zip archive, passing each member's (name, bytes) through ``edit``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))
    return dst


def edit_json(suffix: str, change):
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith(suffix):
            doc = json.loads(data)
            change(doc)
            return json.dumps(doc).encode()
        return data

    return edit


def test_every_format_has_one_backend() -> None:
    assert set(BACKENDS) == set(ModelFormat) == set(FORMATS)
    for fmt, backend in BACKENDS.items():
        assert backend.format == fmt
        assert backend_for(str(fmt)) is backend


def test_an_unknown_format_fails_loudly_naming_the_known_ones(files, tmp_path: Path) -> None:
    calls = [
        lambda: backend_for("tflite"),
        lambda: load_model(files["onnx"], "tflite"),
        lambda: inspect_model(files["onnx"], "tflite"),
        lambda: Runtime(files["onnx"], "tflite"),
        lambda: save_model(LoadedModel("tflite", [], []), tmp_path / "m.tflite"),
    ]
    for call in calls:
        with pytest.raises(UnsupportedError) as err:
            call()
        assert "'tflite'" in err.value.message and "pt2, onnx, hf" in err.value.message
    assert not (tmp_path / "m.tflite").exists()


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_inspect_reports_parameters_layers_and_signature(files, fmt: str) -> None:
    info = inspect_model(files[fmt], fmt)
    assert info["parameters"] == MLP_PARAMETERS
    layer = "aten.linear" if fmt == "pt2" else "Gemm"
    assert info["layers"][layer] == 3
    [inp] = info["inputs"]
    assert isinstance(inp["shape"][0], str) and inp["shape"][1] == 64  # dynamic batch
    assert inp["dtype"] == "float32"
    assert info["outputs"][0]["shape"][1] == 10


def test_static_batch_is_read_as_static(files) -> None:
    model = load_model(files["pt2_static"], "pt2")
    assert model.inputs[0].shape == (4, 64)
    assert model.static_batch == 4
    assert load_model(files["pt2"], "pt2").static_batch is None


def test_pickled_module_is_refused_with_export_instructions(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "model.pt2"
    torch.save(factories.mlp(), path)
    with pytest.raises(InvalidModelError) as err:
        load_model(path, "pt2")
    assert "torch.export.export(model, example_args)" in err.value.message
    assert "torch.export.save(ep" in err.value.message
    assert err.value.code == "invalid_model"


def test_legacy_pickle_file_is_refused(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "legacy.pt"
    torch.save(factories.mlp().state_dict(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(InvalidModelError, match="never unpickles"):
        load_model(path, "pt2")


def test_pickled_weight_entry_is_refused(files, tmp_path: Path) -> None:
    def set_pickle(doc: dict) -> None:
        next(iter(doc["config"].values()))["use_pickle"] = True

    bad = rewrite_archive(
        files["pt2"], tmp_path / "bad.pt2", edit_json("model_weights_config.json", set_pickle)
    )
    with pytest.raises(InvalidModelError, match="use_pickle"):
        load_model(bad, "pt2")


def test_opaque_constant_is_refused(files, tmp_path: Path) -> None:
    def add_opaque(doc: dict) -> None:
        doc["config"]["evil"] = {
            "path_name": "opaque_obj_0", "is_param": False, "use_pickle": False,
            "tensor_meta": None,
        }  # fmt: skip

    bad = rewrite_archive(
        files["pt2"], tmp_path / "bad.pt2", edit_json("model_constants_config.json", add_opaque)
    )
    with pytest.raises(InvalidModelError, match="opaque"):
        load_model(bad, "pt2")


def test_code_in_a_symbolic_shape_is_refused(files, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"

    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("models/model.json"):
            text = data.decode()
            assert '"expr_str": "' in text
            return text.replace(
                '"expr_str": "', '"expr_str": "' + payload.replace("'", "\\u0027") + " + ", 1
            ).encode()
        return data

    bad = rewrite_archive(files["pt2"], tmp_path / "bad.pt2", edit)
    with pytest.raises(InvalidModelError, match="not plain arithmetic"):
        load_model(bad, "pt2")
    assert not marker.exists()


def test_graph_calling_a_python_function_is_refused(files, tmp_path: Path) -> None:
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("models/model.json"):
            return data.replace(b'"torch.ops.aten.relu.default"', b'"torch.manual_seed"', 1)
        return data

    bad = rewrite_archive(files["pt2"], tmp_path / "bad.pt2", edit)
    with pytest.raises(InvalidModelError, match=r"not an (allowed )?operator"):
        load_model(bad, "pt2")


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_truncated_file_is_refused(files, tmp_path: Path, fmt: str) -> None:
    data = files[fmt].read_bytes()
    path = tmp_path / f"truncated.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidModelError):
        load_model(path, fmt)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_garbage_is_refused(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"garbage.{fmt}"
    path.write_bytes(b"x" * 1000)
    with pytest.raises(InvalidModelError):
        load_model(path, fmt)


def test_onnx_external_data_is_refused(files, tmp_path: Path) -> None:
    import onnx

    proto = onnx.load(str(files["onnx"]))
    path = tmp_path / "external.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, size_threshold=0, location="w.bin")
    with pytest.raises(InvalidModelError, match="external data"):
        load_model(path, "onnx")


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_save_round_trips(files, tmp_path: Path, fmt: str) -> None:
    model = load_model(files[fmt], fmt)
    out = tmp_path / f"copy.{fmt}"
    save_model(model, out)
    assert inspect_model(out, fmt) == inspect_model(files[fmt], fmt)
    x = factories.digits_arrays()[2][:5]
    if fmt == "pt2":
        import torch

        got = torch.export.load(str(out)).module()(torch.from_numpy(x)).detach().numpy()
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": x})[0]
    assert got.shape == (5, 10)
    assert np.isfinite(got).all()


# --------------------------------------------------------------------------------------
# One rule for the upload check and the loader (both call worker.safety)


def without_member(src: Path, dst: Path, suffix: str) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith(suffix):
                zout.writestr(info, zin.read(info.filename))
    return dst


def test_archive_with_archive_version_is_accepted_by_upload_and_loader(files) -> None:
    from app.sniff import check_model_file

    with zipfile.ZipFile(files["pt2"]) as zf:
        [entry] = [n for n in zf.namelist() if n.endswith("/archive_version")]
        assert zf.read(entry) == b"0"  # what torch.export.save writes
    assert check_model_file(files["pt2"], None, "mlp.pt2") == "pt2"
    assert load_model(files["pt2"], "pt2").format == "pt2"


def test_archive_without_archive_version_is_refused_by_upload_and_loader(files, tmp_path) -> None:
    import torch

    from app.sniff import Rejected, check_model_file

    path = without_member(files["pt2"], tmp_path / "no_version.pt2", "/archive_version")
    # The rule follows torch: torch.export.load does not default a missing record to "0".
    with pytest.raises(RuntimeError):
        torch.export.load(str(path))
    with pytest.raises(Rejected) as upload:
        check_model_file(path, None, "no_version.pt2")
    with pytest.raises(InvalidModelError) as loader:
        load_model(path, "pt2")
    assert upload.value.status == 422
    assert "no archive_version" in upload.value.detail
    assert loader.value.message == upload.value.detail


@pytest.mark.parametrize(
    "edit",
    [
        edit_json("model_weights_config.json", lambda d: d["config"][next(iter(d["config"]))]
                  .update(use_pickle=True)),
        edit_json("model_constants_config.json", lambda d: d["config"].update(
            evil={"path_name": "opaque_obj_0", "use_pickle": False, "tensor_meta": None})),
        lambda name, data: data.replace(b'"expr_str": "', b'"expr_str": "__import__(1) + ', 1)
        if name.endswith("models/model.json") else data,
    ],
    ids=["use_pickle", "opaque_object", "code_in_symbolic_shape"],
)  # fmt: skip
def test_upload_and_loader_refuse_in_the_same_words(files, tmp_path: Path, edit) -> None:
    from app.sniff import Rejected, check_model_file

    bad = rewrite_archive(files["pt2"], tmp_path / "bad.pt2", edit)
    with pytest.raises(Rejected) as upload:
        check_model_file(bad, None, "bad.pt2")
    with pytest.raises(InvalidModelError) as loader:
        load_model(bad, "pt2")
    assert loader.value.message == upload.value.detail
