"""SmoothQuant (quantize.static's smooth_alpha): the maths on small ONNX graphs and pt2
programs, the param's validation, and static int8 of transformer blocks with outlier
channels (ONNX Runtime, and torchao's PT2E, compiled with AOTInductor too)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import apply
from worker.context import RecordingReporter
from worker.data import Dataset
from worker.formats import onnx_model_from_proto
from worker.methods import get_method
from worker.smoothing import smooth_onnx, smooth_pt2, smoothing_factors
from worker.spec import PipelineRequest, check_pipeline

WIDTH, HIDDEN, TOKENS = 16, 32, 6
OUTLIER = 3  # the input channel of the first layer that is OUTLIER_SCALE times the others
OUTLIER_SCALE = 100.0


def transformer_block(seed: int = 0) -> object:
    """One encoder block as exporters write it: ``h = LN1(x)``, ``y = x + W2·GELU(W1·h)``
    (pre-LN: only W1 reads ``h``), ``out = z + W3·z`` with ``z = LN2(y)`` (post-LN: the
    residual reads ``z`` too). LN1's scale makes channel ``OUTLIER`` 100x the others."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def tensor(name: str, *shape: int, scale: float = 0.3) -> object:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name
        )

    gamma = np.ones(WIDTH, np.float32)
    gamma[OUTLIER] = OUTLIER_SCALE
    inits = [
        numpy_helper.from_array(gamma, "ln1.weight"),
        numpy_helper.from_array(np.zeros(WIDTH, np.float32), "ln1.bias"),
        tensor("w1", WIDTH, HIDDEN), tensor("b1", HIDDEN, scale=0.1),
        tensor("w2", HIDDEN, WIDTH), tensor("b2", WIDTH, scale=0.1),
        numpy_helper.from_array(np.ones(WIDTH, np.float32), "ln2.weight"),
        numpy_helper.from_array(np.zeros(WIDTH, np.float32), "ln2.bias"),
        tensor("w3", WIDTH, WIDTH), tensor("b3", WIDTH, scale=0.1),
    ]  # fmt: skip
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln1.weight", "ln1.bias"], ["h"], name="ln1", axis=-1),
        helper.make_node("MatMul", ["h", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["h1b"], name="fc1_bias"),
        helper.make_node("Gelu", ["h1b"], ["g"], name="gelu", domain=""),
        helper.make_node("MatMul", ["g", "w2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["h2", "b2"], ["h2b"], name="fc2_bias"),
        helper.make_node("Add", ["x", "h2b"], ["y"], name="residual1"),
        helper.make_node("LayerNormalization", ["y", "ln2.weight", "ln2.bias"], ["z"], name="ln2", axis=-1),
        helper.make_node("MatMul", ["z", "w3"], ["h3"], name="fc3"),
        helper.make_node("Add", ["h3", "b3"], ["h3b"], name="fc3_bias"),
        helper.make_node("Add", ["z", "h3b"], ["out"], name="residual2"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TOKENS, WIDTH])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", TOKENS, WIDTH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    return model


def block_inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, TOKENS, WIDTH)).astype(np.float32)


def run(proto: object, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    return np.asarray(session.run(None, {"x": x})[0])


def tensor_values(proto: object, name: str, x: np.ndarray) -> np.ndarray:
    """The values of an inner tensor of ``proto`` on ``x``."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    import onnxruntime as ort

    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([name], {"x": x})[0])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_factors_balance_activation_and_weight_ranges() -> None:
    act = np.array([40.0, 1.0, 0.0, 4.0])
    weight = np.array([0.1, 1.0, 2.0, 0.0])
    s = smoothing_factors(act, weight, 0.5)
    assert s[0] == pytest.approx(np.sqrt(40.0 / 0.1))
    assert s[1] == pytest.approx(1.0)
    assert s[2] == 1.0 and s[3] == 1.0  # a channel never seen, or an all-zero weight row
    np.testing.assert_allclose(smoothing_factors(act[:2], weight[:2], 1.0), act[:2], rtol=1e-6)
    np.testing.assert_allclose(
        smoothing_factors(act[:2], weight[:2], 0.0), 1 / weight[:2], rtol=1e-6
    )


def test_smoothing_keeps_the_float_outputs_and_shrinks_the_outlier_range() -> None:
    proto = transformer_block()
    calib = block_inputs(64, seed=1)
    held_out = block_inputs(16, seed=2)
    result = smooth_onnx(proto, [{"x": calib[i : i + 16]} for i in range(0, 64, 16)], 0.5)

    np.testing.assert_allclose(run(result.model, held_out), run(proto, held_out), atol=1e-5)
    by_tensor = {s.tensor: s for s in result.inputs}
    assert set(by_tensor) == {"h", "g", "z"}
    # pre-LN: only fc1 reads LN1's output, so 1/s went into LN1's scale and bias; GELU's
    # output and the post-LN output (read by the residual too) get a Mul instead.
    assert by_tensor["h"].folded_into == "ln1"
    assert by_tensor["g"].folded_into is None and by_tensor["z"].folded_into is None
    assert len(result.inserted) == 2
    before = np.abs(tensor_values(proto, "h", held_out)).max(axis=(0, 1))
    after = np.abs(tensor_values(result.model, "h", held_out)).max(axis=(0, 1))
    assert before[OUTLIER] > 20 * np.median(before)
    assert after[OUTLIER] < before[OUTLIER] / 4
    assert after.max() / np.median(after) < before.max() / np.median(before) / 4
    assert by_tensor["h"].range_after < by_tensor["h"].range_before / 4
    proto_copy = transformer_block()
    assert proto.SerializeToString() == proto_copy.SerializeToString()  # input untouched


def test_smoothing_folds_into_a_linear_layer_that_only_the_next_one_reads() -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    wa = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)
    wa[:, OUTLIER] *= 50  # an outlier output channel of the first layer
    inits = [
        numpy_helper.from_array(wa, "wa"),
        numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32), "ba"),
        numpy_helper.from_array(rng.standard_normal((WIDTH, 4)).astype(np.float32), "wb"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"], name="fa"),
        helper.make_node("Add", ["a", "ba"], ["ab"], name="fa_bias"),
        helper.make_node("MatMul", ["ab", "wb"], ["out"], name="fb"),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TOKENS, WIDTH])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", TOKENS, 4])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    x = block_inputs(16, seed=4)
    result = smooth_onnx(proto, [{"x": x}], 0.5)
    by_tensor = {s.tensor: s for s in result.inputs}
    assert by_tensor["ab"].folded_into == "fa"
    assert result.inserted == ["x_smoothed"]  # the graph input: nothing to fold into
    np.testing.assert_allclose(run(result.model, x), run(proto, x), rtol=1e-5, atol=1e-4)
    assert by_tensor["ab"].range_after < by_tensor["ab"].range_before / 4


def test_smoothing_leaves_skipped_layers_and_graph_outputs() -> None:
    proto = transformer_block()
    batches = [{"x": block_inputs(16, seed=1)}]
    result = smooth_onnx(proto, batches, 0.5, skip=["fc1", "fc3"])
    assert [s.layers for s in result.inputs] == [("fc2",)]
    with pytest.raises(ValueError, match="between 0 and 1"):
        smooth_onnx(proto, batches, 1.5)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_out_of_range_is_refused_at_post_jobs(alpha: float) -> None:
    problems = check_pipeline(
        PipelineRequest(
            model_format="onnx",
            steps=[("quantize.static", {"smooth_alpha": alpha})],
            datasets={"calibration": _known()},
        )
    )
    # The problems POST /v1/jobs answers 422 with (tests/app/test_spec_parity.py).
    assert [p.loc for p in problems] == [("pipeline", 0, "params", "smooth_alpha")]
    bound = "greater than or equal to 0" if alpha < 0 else "less than or equal to 1"
    assert bound in problems[0].msg


@pytest.mark.parametrize("output_format", [None, "onnx", "aoti"])
def test_smoothing_is_accepted_for_pt2_models(output_format: str | None) -> None:
    request = PipelineRequest(
        model_format="pt2",
        steps=[("quantize.static", {"smooth_alpha": 0.5})],
        output_format=output_format,
        datasets={"calibration": _known()},
    )
    assert check_pipeline(request) == []


def _known() -> object:
    from worker.spec import DatasetInfo

    return DatasetInfo()


def test_static_int8_of_a_transformer_block_keeps_more_with_smoothing(tmp_path: Path) -> None:
    proto = transformer_block()
    calibration = Dataset({"x": block_inputs(128, seed=1)}, None, 128)
    held_out = block_inputs(64, seed=2)
    reference = run(proto, held_out)
    # 7-bit weights: exact in every x86 CPU's u8 x s8 kernels (with VNNI or not), so the
    # figures do not depend on the machine.
    common = {"op_types": ["MatMul"], "quantize_matmul_outputs": False, "reduce_range": True}
    scores = {}
    for alpha in (None, 0.5):
        log = RecordingReporter()
        work = tmp_path / str(alpha)
        work.mkdir()
        model = apply(
            get_method("quantize.static"),
            onnx_model_from_proto(proto),
            {**common, "smooth_alpha": alpha},
            work,
            datasets={"calibration": calibration},
            reporter=log,
        )
        assert model.proto is not None
        scores[alpha] = cosine(reference, run(model.proto, held_out))
        smoothing = [e for e in log.logs if e["message"].startswith("SmoothQuant")]
        assert len(smoothing) == (alpha is not None)
    # Measured: cosine 0.9888 without, 0.9992 with.
    assert 1 - scores[0.5] < (1 - scores[None]) / 4


def test_smoothing_of_an_hf_model_for_aoti_is_accepted() -> None:
    """An hf model bound for aoti becomes a torch.export program before PT2E (worker.spec's
    EXPORTED_FOR), so smooth_alpha runs on that program."""
    problems = check_pipeline(
        PipelineRequest(
            model_format="hf",
            steps=[("quantize.static", {"smooth_alpha": 0.5})],
            output_format="aoti",
            datasets={"calibration": _known()},
        )
    )
    assert problems == []


# -- pt2 programs -----------------------------------------------------------------------------

PT2_WIDTH = 32
LN_OUTLIERS = [1, 7, 20]  # input channels of q, k and v that LN1 makes 50x the others
LN2_OUTLIERS = [3, 11]  # and of fc, from LN2


def pt2_block() -> object:
    """``h = LN1(x)``; ``y = q(h) + k(h) + v(h)`` (three layers read ``h``, nothing else);
    ``z = LN2(x + y)``; ``out = [fc(z), relu(z)]`` (``z`` is read beside ``fc``). The LNs'
    scales make a few channels 50x the others, and the weight columns that read them are
    50x smaller, so the output depends on the ordinary channels as much as on the outliers
    (what a single uint8 scale for ``h`` and ``z`` loses)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(PT2_WIDTH), nn.LayerNorm(PT2_WIDTH)
            self.q, self.k, self.v, self.fc = (nn.Linear(PT2_WIDTH, PT2_WIDTH) for _ in range(4))
            with torch.no_grad():
                self.ln1.weight[LN_OUTLIERS] = 50.0
                self.ln2.weight[LN2_OUTLIERS] = 50.0
                for layer in (self.q, self.k, self.v):
                    layer.weight[:, LN_OUTLIERS] /= 50
                self.fc.weight[:, LN2_OUTLIERS] /= 50

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln1(x)
            z = self.ln2(x + self.q(h) + self.k(h) + self.v(h))
            return torch.cat([self.fc(z), torch.relu(z)], dim=-1)

    torch.manual_seed(0)
    return Block().eval()


def pt2_program(module: object) -> object:
    import torch

    example = torch.from_numpy(pt2_inputs(4, seed=0))
    return torch.export.export(
        module,  # type: ignore[arg-type]
        (example,),
        dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
    )


def pt2_inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, TOKENS, PT2_WIDTH)).astype(np.float32)


def pt2_batches(x: np.ndarray, size: int = 16) -> list[tuple[tuple, dict]]:
    import torch

    return [((torch.from_numpy(x[i : i + size]),), {}) for i in range(0, len(x), size)]


def forward(module: object, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()  # type: ignore[operator]


def test_pt2_smoothing_keeps_the_float_outputs_folds_into_layernorm_or_inserts_a_mul() -> None:
    import torch

    block = pt2_block()
    program = pt2_program(block)
    before = {k: v.clone() for k, v in program.state_dict.items()}  # type: ignore[attr-defined]
    module = program.module()  # type: ignore[attr-defined]
    held_out = pt2_inputs(16, seed=2)
    result = smooth_pt2(module, pt2_batches(pt2_inputs(64, seed=1)), 0.5)

    assert result.model is module
    np.testing.assert_allclose(forward(module, held_out), forward(block, held_out), atol=1e-4)
    by_layers = {s.layers: s for s in result.inputs}
    assert set(by_layers) == {("q", "k", "v"), ("fc",)}
    # Only q, k and v read LN1's output: 1/s went into LN1's scale and bias. LN2's output
    # is read by the ReLU too: a Mul by a 1/s buffer is inserted before fc.
    assert by_layers[("q", "k", "v")].folded_into == "ln1"
    assert by_layers[("fc",)].folded_into is None
    (mul,) = [n for n in module.graph.nodes if n.name in result.inserted]
    assert mul.target == torch.ops.aten.mul.Tensor
    assert [u.target for u in mul.users] == [torch.ops.aten.linear.default]
    for smoothed in result.inputs:
        assert smoothed.range_after < smoothed.range_before / 4
    # The weights took s, LN1 took 1/s; the program's own tensors are untouched.
    assert not torch.equal(module.q.weight, block.q.weight)
    assert not torch.equal(module.ln1.weight, block.ln1.weight)
    assert torch.equal(module.ln2.weight, block.ln2.weight)
    for name, value in program.state_dict.items():  # type: ignore[attr-defined]
        assert torch.equal(value, before[name]), name
    summary = result.summary()
    assert summary["layers"] == ["q", "k", "v", "fc"] and summary["folded_into"] == ["ln1"]
    assert (summary["folded"], summary["mul_inserted"]) == (1, 1)


def test_pt2_smoothing_folds_into_a_linear_layer_that_only_the_next_one_reads() -> None:
    import torch
    from torch import nn

    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(PT2_WIDTH, PT2_WIDTH), nn.Linear(PT2_WIDTH, 4)).eval()
    with torch.no_grad():
        net[0].weight[OUTLIER] *= 50  # an outlier output channel of the first layer
        net[0].bias[OUTLIER] *= 50
    module = pt2_program(net).module()  # type: ignore[attr-defined]
    x = pt2_inputs(16, seed=4)
    result = smooth_pt2(module, pt2_batches(x), 0.5)
    by_layers = {s.layers: s for s in result.inputs}
    assert by_layers[("1",)].folded_into == "0"
    assert by_layers[("0",)].folded_into is None  # the graph input: nothing to fold into
    assert len(result.inserted) == 1
    np.testing.assert_allclose(forward(module, x), forward(net, x), rtol=1e-5, atol=1e-4)
    assert by_layers[("1",)].range_after < by_layers[("1",)].range_before / 4


def test_pt2_smoothing_leaves_skipped_layers_as_they_are() -> None:
    import torch

    block = pt2_block()
    batches = pt2_batches(pt2_inputs(32, seed=1))
    module = pt2_program(block).module()  # type: ignore[attr-defined]
    result = smooth_pt2(module, batches, 0.5, skip=["k", "fc"])
    assert [(s.layers, s.folded_into) for s in result.inputs] == [(("q", "v"), None)]
    # k reads LN1's output too, so 1/s cannot go into LN1: a Mul before q and v instead.
    assert torch.equal(module.k.weight, block.k.weight)
    assert torch.equal(module.fc.weight, block.fc.weight)
    assert torch.equal(module.ln1.weight, block.ln1.weight)
    x = pt2_inputs(8, seed=2)
    np.testing.assert_allclose(forward(module, x), forward(block, x), atol=1e-4)
    # A skipped LayerNorm is not folded into either.
    module = pt2_program(block).module()  # type: ignore[attr-defined]
    result = smooth_pt2(module, batches, 0.5, skip=["ln1"])
    assert [s.folded_into for s in result.inputs] == [None, None]
    assert torch.equal(module.ln1.weight, block.ln1.weight)
    with pytest.raises(ValueError, match="between 0 and 1"):
        smooth_pt2(module, batches, -0.5)


def _pt2_static(alpha: float | None, tmp_path: Path, **params: object) -> tuple[float, dict]:
    """Static int8 of :func:`pt2_block` (torchao PT2E, default histogram calibration on the
    same 128 samples): cosine to fp32 on held-out inputs, and the SmoothQuant event's data."""
    from worker.formats import pt2_model_from_program

    block = pt2_block()
    log = RecordingReporter()
    work = tmp_path / str(alpha)
    work.mkdir()
    model = apply(
        get_method("quantize.static"),
        pt2_model_from_program(pt2_program(block)),  # type: ignore[arg-type]
        {"smooth_alpha": alpha, **params},
        work,
        datasets={"calibration": Dataset({"x": pt2_inputs(128, seed=1)}, None, 128)},
        reporter=log,
    )
    assert model.program is not None
    held_out = pt2_inputs(64, seed=2)
    score = cosine(forward(block, held_out), forward(model.program.module(), held_out))
    events = [e for e in log.logs if e["message"].startswith("SmoothQuant")]
    assert len(events) == (alpha is not None)
    return score, events[0]["data"] if events else {}


def test_pt2_static_int8_keeps_more_with_smoothing(tmp_path: Path) -> None:
    without, _ = _pt2_static(None, tmp_path)
    with_smoothing, event = _pt2_static(0.5, tmp_path)
    # Measured: cosine 0.9699 without, 0.99998 with (0.99998 with alpha 0.8 too).
    assert without < 0.98
    assert with_smoothing > 0.999
    assert event["layers"] == ["q", "k", "v", "fc"] and event["folded_into"] == ["ln1"]
    assert (event["folded"], event["mul_inserted"]) == (1, 1)
    assert event["max_range_after"] < event["max_range_before"] / 4


def test_pt2_smoothing_honours_exclude(tmp_path: Path) -> None:
    score, event = _pt2_static(0.5, tmp_path, exclude=["fc", "re:^k$"])
    assert event["layers"] == ["q", "v"] and event["folded_into"] == []
    assert score > 0.99  # fc and k left float


def test_pt2_smoothed_static_int8_compiles_with_aoti(tmp_path: Path) -> None:
    """The inserted Mul and its 1/s buffer survive re-export and AOTInductor's compile."""
    import torch

    from tests import factories
    from worker.pipeline import PipelineSpec, run_pipeline

    block = pt2_block()
    upload = tmp_path / "block.pt2"
    torch.export.save(pt2_program(block), upload)  # type: ignore[arg-type]
    calibration = factories.write_npz(tmp_path / "calib.npz", {"x": pt2_inputs(64, seed=1)})
    log = RecordingReporter()
    spec = PipelineSpec(
        steps=[("quantize.static", {"smooth_alpha": 0.5})],
        output_format="aoti",
        iterations=2,
        warmup=1,
        peak_memory=False,
    )
    result = run_pipeline(upload, "pt2", spec, {"calibration": calibration}, tmp_path, log)
    assert result.artifact_format == "aoti"
    (event,) = [e for e in log.logs if e["message"].startswith("SmoothQuant")]
    assert event["data"]["mul_inserted"] == 1
    package = torch._inductor.aoti_load_package(str(result.artifact_path))
    held_out = pt2_inputs(8, seed=2)
    with torch.inference_mode():
        compiled = package(torch.from_numpy(held_out)).numpy()
    assert cosine(forward(block, held_out), compiled) > 0.999  # measured: 0.99998
    # Lowered to int8 GEMMs (freezing): the Mul before fc did not keep it from its kernel.
    with zipfile.ZipFile(result.artifact_path) as zf:
        source = "\n".join(zf.read(n).decode() for n in zf.namelist() if n.endswith(".cpp"))
    assert "aoti_torch_cpu_addmm_out" not in source and "aoti_torch_cpu_mm_out" not in source
