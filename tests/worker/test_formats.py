"""Loading uploads safely, inspecting and saving models."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests import factories
from worker.errors import InvalidModelError
from worker.formats import inspect_model, load_model, save_model

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
