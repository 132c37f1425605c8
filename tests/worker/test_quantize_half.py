"""quantize.half: fp16/bf16 weights, float32 at the boundary, on real pt2 and onnx models."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from tests import factories
from tests.helpers import apply, cosine, step_context, stock_accuracy, stock_program, stock_run
from worker.errors import UnsupportedError
from worker.formats import load_model, save_model
from worker.methods import quantize_half

METHOD = quantize_half.METHOD


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A weight-dominated MLP (256 -> 512 -> 512 -> 10) as pt2 and onnx."""
    import torch

    root = tmp_path_factory.mktemp("half")
    module = factories.mlp(hidden=(512, 512), in_features=256)
    example = torch.randn(4, 256)
    return {
        "pt2": factories.export_pt2(module, example, root / "wide.pt2"),
        "onnx": factories.export_onnx(module, example, root / "wide.onnx"),
    }


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_pt2_weights_become_16_bit_and_the_file_halves(wide, tmp_path: Path, dtype: str) -> None:
    import torch

    model = apply(METHOD, load_model(wide["pt2"], "pt2"), {"dtype": dtype}, tmp_path)
    out = tmp_path / "half.pt2"
    save_model(model, out)
    program = stock_program(out)
    expected = torch.float16 if dtype == "fp16" else torch.bfloat16
    assert {k: v.dtype for k, v in program.state_dict.items()} == {
        name: expected
        for name in ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
    }
    ratio = out.stat().st_size / wide["pt2"].stat().st_size
    assert 0.45 <= ratio <= 0.55, ratio
    # float32 in, float32 out, dynamic batch kept.
    assert model.inputs[0].dtype == "float32" and model.inputs[0].is_dynamic(0)
    x = np.random.default_rng(0).standard_normal((13, 256)).astype(np.float32)
    got, ref = stock_run(out, x, check_loader=True), stock_run(wide["pt2"], x, check_loader=True)
    assert got.dtype == np.float32 and got.shape == (13, 10)
    assert cosine(got, ref) >= 0.999


def test_pt2_digits_accuracy_is_kept(files, tmp_path: Path) -> None:
    model = apply(METHOD, load_model(files["pt2"], "pt2"), {"dtype": "fp16"}, tmp_path)
    out = tmp_path / "digits_fp16.pt2"
    save_model(model, out)
    _, _, x_test, y_test = factories.digits_arrays()
    fp32 = stock_accuracy(files["pt2"], x_test, y_test, check_loader=True)
    fp16 = stock_accuracy(out, x_test, y_test, check_loader=True)
    assert fp16 >= fp32 - 0.005


def test_pt2_residual_cnn_with_batchnorm_and_int_inputs(tmp_path: Path) -> None:
    """Convs, BatchNorm buffers, a residual add, and an integer input that stays integer."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.embed = nn.Embedding(4, 8)
            self.head = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(y + self.bn2(self.conv2(y)))
            scale = torch.ones(1, dtype=torch.float32)  # a float32 factory in the graph
            return self.head(y.mean((2, 3)) * scale + self.embed(kind))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    x, kind = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 3])
    src = tmp_path / "cnn.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(
        torch.export.export(net, (x, kind), dynamic_shapes=({0: batch}, {0: batch})), str(src)
    )
    model = apply(METHOD, load_model(src, "pt2"), {"dtype": "fp16"}, tmp_path)
    assert [s.dtype for s in model.inputs] == ["float32", "int64"]
    out = tmp_path / "cnn_fp16.pt2"
    save_model(model, out)
    program = stock_program(out)
    assert program.state_dict["bn1.running_var"].dtype == torch.float16
    assert program.state_dict["bn1.num_batches_tracked"].dtype == torch.int64
    xs = np.random.default_rng(1).standard_normal((6, 1, 8, 8)).astype(np.float32)
    kinds = np.array([0, 1, 2, 3, 2, 1])
    assert (
        cosine(
            stock_run(out, xs, kinds, check_loader=True),
            stock_run(src, xs, kinds, check_loader=True),
        )
        >= 0.999
    )


def test_onnx_fp16_keeps_float32_io(wide, tmp_path: Path) -> None:
    import onnx

    model = apply(METHOD, load_model(wide["onnx"], "onnx"), {"dtype": "fp16"}, tmp_path)
    out = tmp_path / "half.onnx"
    save_model(model, out)
    proto = onnx.load(str(out))
    types = {t.name: t.data_type for t in proto.graph.initializer}
    for name in ("0.weight", "2.weight", "4.weight"):
        assert types[name] == onnx.TensorProto.FLOAT16
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ratio = out.stat().st_size / wide["onnx"].stat().st_size
    assert 0.45 <= ratio <= 0.55, ratio
    x = np.random.default_rng(0).standard_normal((9, 256)).astype(np.float32)
    got = stock_run(out, x, check_loader=True)
    assert got.dtype == np.float32
    assert cosine(got, stock_run(wide["onnx"], x, check_loader=True)) >= 0.999


def test_onnx_digits_accuracy_is_kept(files, tmp_path: Path) -> None:
    model = apply(METHOD, load_model(files["onnx"], "onnx"), {}, tmp_path)
    out = tmp_path / "digits_fp16.onnx"
    save_model(model, out)
    _, _, x_test, y_test = factories.digits_arrays()
    fp32 = stock_accuracy(files["onnx"], x_test, y_test, check_loader=True)
    fp16 = stock_accuracy(out, x_test, y_test, check_loader=True)
    assert fp16 >= fp32 - 0.005


def test_bf16_is_refused_for_onnx_with_a_reason(files, tmp_path: Path) -> None:
    assert METHOD.validate_params({"dtype": "bf16"}, "pt2").dtype == "bf16"
    with pytest.raises(ValidationError, match=r"bf16 is not supported for onnx.*use dtype=fp16"):
        METHOD.validate_params({"dtype": "bf16"}, "onnx")
    with pytest.raises(ValidationError):
        METHOD.validate_params({"dtype": "fp8"})
    # The handler refuses it too (a caller that skipped format validation).
    ctx = step_context(tmp_path, METHOD.name)
    params = METHOD.validate_params({"dtype": "bf16"})
    with pytest.raises(UnsupportedError, match="bfloat16"):
        METHOD.handler(load_model(files["onnx"], "onnx"), params, ctx)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_hf_transformer_is_saved_in_16_bit_and_reloads_so(tmp_path: Path, dtype: str) -> None:
    import torch
    import transformers

    from tests import factories_text

    src = factories_text.tiny_bert_hf_zip(tmp_path / "bert.zip")
    model = apply(METHOD, load_model(src, "hf"), {"dtype": dtype}, tmp_path)
    expected = torch.float16 if dtype == "fp16" else torch.bfloat16
    assert model.outputs[0].dtype == str(expected).removeprefix("torch.")
    out = tmp_path / "bert_half.zip"
    save_model(model, out)
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(out) as zf:
        zf.extractall(folder)
    # Stock transformers loads it back in 16 bits.
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder))
    assert {p.dtype for p in reloaded.parameters()} == {expected}
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    original = load_model(src, "hf")
    assert factories_text.text_accuracy(reloaded, tokenizer) >= (
        factories_text.text_accuracy(original.module, original.tokenizer) - 0.01
    )
    texts, _ = factories_text.sentiment_split("test")
    batch = tokenizer(texts[:16], return_tensors="pt", padding=True)
    with torch.inference_mode():
        got = reloaded(**batch).logits.float().numpy()
        ref = original.module(**batch).logits.numpy()
    assert cosine(got, ref) >= 0.999
