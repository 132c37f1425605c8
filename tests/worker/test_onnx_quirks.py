"""ONNX graphs as real exporters write them, through every ONNX quantization method.

The corpus (tests/factories_onnx.py) reproduces what PaddlePaddle, TensorFlow and PyTorch
exporters do to a graph: weights as ``Constant`` nodes, a batch written as ``-1``, opset
11, int32 token ids with ``:0`` names, several inputs and outputs, named symbolic dims,
external data. Each must give a loadable artifact with the upload's signature and
equivalent outputs, or a refusal that says what is true about the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests import factories_onnx as quirks
from tests.helpers import apply, cosine
from worker import hardware
from worker.context import RecordingReporter
from worker.data import Dataset
from worker.errors import EngineError, InvalidModelError, MethodFailedError, UnsupportedError
from worker.formats import inspect_model, load_model, save_model
from worker.measurement.result_warnings import warn_about_the_result
from worker.methods import quantize_static
from worker.pipeline import PipelineSpec, run_pipeline
from worker.schemas import Fidelity, Latency, ModelMetrics, PipelineMetrics, Ratios, StepMetrics

METHODS = ("quantize.dynamic", "quantize.static", "quantize.half", "quantize.weight_only")
# Cosine of every output against the float model's, at least.
FAITHFUL = {
    "quantize.dynamic": 0.995,
    "quantize.static": 0.995,
    "quantize.half": 0.9999,
    "quantize.weight_only": 0.999,
}

CORPUS: dict[str, Callable[[], object]] = {
    "constant-node weights (paddle2onnx)": lambda: quirks.weights_as_constants(
        quirks.conv_classifier()
    ),
    "batch written as -1": lambda: quirks.batch_dim(quirks.conv_classifier(), -1),
    "opset 11": lambda: quirks.conv_classifier(opset=11),
    "paddle2onnx detector: constants, -1 batch, opset 11": lambda: quirks.batch_dim(
        quirks.weights_as_constants(quirks.conv_classifier(opset=11)), -1
    ),
    "int32 token ids, ':0' names (tf2onnx)": lambda: quirks.int32_ids_classifier(),
    "two inputs, two outputs": lambda: quirks.two_inputs_two_outputs(),
    "named symbolic dims": lambda: quirks.conv_classifier(
        batch="batch", height="height", width="width"
    ),
    "opset-11 MLP with constant weights": lambda: quirks.weights_as_constants(quirks.mlp(opset=11)),
}


def _signature(path: Path) -> list[tuple[str, int, list[int | str]]]:
    """Names, element types and dims of a file's graph inputs and outputs, read with onnx."""
    import onnx

    model = onnx.load(str(path))
    initializers = {t.name for t in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in initializers]
    return [
        (
            v.name,
            v.type.tensor_type.elem_type,
            [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        )
        for v in [*values, *model.graph.output]
    ]


def _stock(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feeds)]


def _calibration(proto: object) -> Dataset:
    return Dataset(quirks.samples(proto, 96, seed=2), None, 96)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("quirk", list(CORPUS))
def test_each_quirk_through_each_method(quirk: str, method: str, tmp_path: Path) -> None:
    proto = CORPUS[quirk]()
    src = quirks.save(proto, tmp_path / "upload.onnx")  # type: ignore[arg-type]
    log = RecordingReporter()
    model = apply(
        method, load_model(src, "onnx"), {}, tmp_path,
        datasets={"calibration": _calibration(proto)}, reporter=log,
    )  # fmt: skip
    out = tmp_path / "artifact.onnx"
    save_model(model, out)
    # A drop-in replacement: the same input/output names, types and dims...
    assert _signature(out) == _signature(src)
    # ...that stock ONNX Runtime runs, computing what the upload computes.
    feeds = quirks.samples(proto, 16, seed=3)  # type: ignore[arg-type]
    for reference, got in zip(_stock(src, feeds), _stock(out, feeds), strict=True):
        assert got.shape == reference.shape
        assert cosine(reference, got) >= FAITHFUL[method], quirk
    # It really is quantized / halved.
    ops = {n.op_type for n in model.proto.graph.node}  # type: ignore[union-attr]
    expected = {
        "quantize.dynamic": "MatMulInteger",
        "quantize.static": "DequantizeLinear",
        "quantize.weight_only": "MatMulNBits",
        "quantize.half": "Cast",
    }[method]
    assert expected in ops, sorted(ops)


def test_named_dims_stay_dynamic_in_the_artifact(tmp_path: Path) -> None:
    proto = CORPUS["named symbolic dims"]()
    src = quirks.save(proto, tmp_path / "upload.onnx")  # type: ignore[arg-type]
    model = apply(
        "quantize.static", load_model(src, "onnx"), {}, tmp_path,
        datasets={"calibration": _calibration(proto)},
    )  # fmt: skip
    out = tmp_path / "artifact.onnx"
    save_model(model, out)
    feeds = {"input": np.random.default_rng(0).standard_normal((3, 1, 12, 10)).astype("float32")}
    reference, got = _stock(src, feeds)[0], _stock(out, feeds)[0]
    assert got.shape == (3, 10)
    assert cosine(reference, got) >= 0.99


# --- finding 1 and 6: weights stored as Constant nodes ----------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: quirks.weights_as_constants(quirks.conv_classifier()),
        lambda: quirks.weights_as_constants(quirks.int32_ids_classifier()),
        lambda: quirks.conv_classifier(),
    ],
)
def test_parameters_count_weights_however_they_are_stored(build, tmp_path: Path) -> None:
    proto = build()
    expected = quirks.float_weight_count(proto)
    assert expected > 800
    assert inspect_model(quirks.save(proto, tmp_path / "m.onnx"), "onnx")["parameters"] == expected


def test_constant_weights_are_lifted_to_initializers_and_said_so(tmp_path: Path) -> None:
    import onnx

    proto = quirks.weights_as_constants(quirks.conv_classifier())
    assert not proto.graph.initializer
    src = quirks.save(proto, tmp_path / "upload.onnx")
    log = RecordingReporter()
    model = apply(
        "quantize.half", load_model(src, "onnx"), {}, tmp_path, reporter=log
    )  # before: "the model has no float32 weights to convert" (false)
    assert model.proto is not None
    assert not [n for n in model.proto.graph.node if n.op_type == "Constant"]
    assert {t.data_type for t in model.proto.graph.initializer} == {onnx.TensorProto.FLOAT16}
    lifted = [e for e in log.logs if "normalized" in e["message"]]
    assert lifted and lifted[0]["data"]["constants_lifted"] == 8
    assert "onnx-ir" in lifted[0]["message"]


def test_a_pipeline_on_constant_weights_counts_them_and_records_the_normalization(
    tmp_path: Path,
) -> None:
    proto = quirks.batch_dim(quirks.weights_as_constants(quirks.conv_classifier(opset=11)), -1)
    src = quirks.save(proto, tmp_path / "upload.onnx")
    log = RecordingReporter()
    spec = PipelineSpec(
        steps=[("quantize.dynamic", {})], output_format="onnx", warmup=0, iterations=2
    )
    result = run_pipeline(src, "onnx", spec, {}, tmp_path / "w", log)
    metrics = result.metrics
    weights = quirks.float_weight_count(proto)
    assert metrics["original"]["parameters"] == weights  # before: 0
    assert metrics["compressed"]["parameters"] == weights
    normalized = [e for e in log.logs if e["message"].startswith("ONNX model normalized")]
    assert normalized and normalized[0]["data"] == {"constants_lifted": 8}
    assert _signature(result.artifact_path) == _signature(src)


def test_the_refusals_say_what_is_true_about_the_model(tmp_path: Path) -> None:
    """A fully convolutional detector really has no MatMul/Gemm: weight-only says so and
    names the method that handles convolutions; dynamic int8 explains its default."""
    proto = quirks.weights_as_constants(quirks.fully_convolutional())
    src = quirks.save(proto, tmp_path / "upload.onnx")
    with pytest.raises(
        UnsupportedError, match=r"for this model.s convolutions use quantize\.static"
    ):
        apply("quantize.weight_only", load_model(src, "onnx"), {}, tmp_path)
    with pytest.raises(UnsupportedError, match=r"convolution-dominated \(100% .*quantize.static"):
        apply("quantize.dynamic", load_model(src, "onnx"), {}, tmp_path)
    half = apply("quantize.half", load_model(src, "onnx"), {}, tmp_path)
    assert half.proto is not None and half.proto.graph.initializer
    static = apply(
        "quantize.static", load_model(src, "onnx"), {}, tmp_path,
        datasets={"calibration": _calibration(proto)},
    )  # fmt: skip
    assert static.proto is not None


def test_external_data_is_refused_clearly(tmp_path: Path) -> None:
    src = quirks.save_with_external_data(quirks.conv_classifier(), tmp_path / "ext.onnx")
    assert (tmp_path / "ext.onnx.data").is_file()
    with pytest.raises(InvalidModelError, match=r"external data files .*external_data=False"):
        load_model(src, "onnx")
    spec = PipelineSpec(steps=[("quantize.dynamic", {})], output_format="onnx")
    with pytest.raises(InvalidModelError) as caught:
        run_pipeline(src, "onnx", spec, {}, tmp_path / "w", RecordingReporter())
    assert caught.value.step == "load"


# --- finding 2: a batch written as -1 -------------------------------------------------


@pytest.mark.parametrize("value", [-1, 0])
def test_a_batch_of_minus_one_or_zero_reads_as_dynamic(value: int, tmp_path: Path) -> None:
    src = quirks.save(quirks.batch_dim(quirks.conv_classifier(), value), tmp_path / "m.onnx")
    model = load_model(src, "onnx")
    assert model.static_batch is None
    assert model.inputs[0].is_dynamic(0) and not model.inputs[0].is_dynamic(1)
    assert inspect_model(src, "onnx")["inputs"][0]["shape"] == ["input_dim0", 1, 8, 8]


def test_static_quantization_calibrates_a_minus_one_batch(tmp_path: Path) -> None:
    proto = quirks.batch_dim(quirks.conv_classifier(), -1)
    model = load_model(quirks.save(proto, tmp_path / "m.onnx"), "onnx")
    batches = quantize_static.calibration_batches(model, _calibration(proto), 512, 32)
    assert [len(b["input"]) for b in batches] == [
        32,
        32,
        32,
    ]  # before: none ("No data is collected.")


# --- finding 3: blame the method, not the upload -------------------------------------


def test_opset_11_is_upgraded_for_per_channel_static_int8(tmp_path: Path) -> None:
    """Per-channel DequantizeLinear needs opset 13: the model is upgraded with ONNX's
    version converter first (before: ORT wrote an opset-11 graph onnx rejects, and the job
    failed as invalid_model at step load)."""
    import onnx

    proto = quirks.conv_classifier(opset=11)
    src = quirks.save(proto, tmp_path / "upload.onnx")
    log = RecordingReporter()
    spec = PipelineSpec(
        steps=[("quantize.static", {})], output_format="onnx", warmup=0, iterations=2
    )
    result = run_pipeline(
        src, "onnx", spec, {"calibration": _npz(proto, tmp_path)}, tmp_path / "w", log
    )
    opsets = {o.domain: o.version for o in onnx.load(str(result.artifact_path)).opset_import}
    assert opsets[""] == 13
    upgrades = [e for e in log.logs if "version_converter" in e["message"]]
    assert upgrades[0]["data"] == {"opset_from": 11, "opset_to": 13}
    assert result.metrics["fidelity"]["cosine_similarity"] >= 0.99
    # Per tensor, opset 11 is enough: no upgrade.
    log = RecordingReporter()
    apply(
        "quantize.static", load_model(src, "onnx"), {"per_channel": False}, tmp_path,
        datasets={"calibration": _calibration(proto)}, reporter=log,
    )  # fmt: skip
    assert not [e for e in log.logs if "version_converter" in e["message"]]


def _npz(proto: object, tmp_path: Path) -> Path:
    path = tmp_path / "calibration.npz"
    np.savez(path, **quirks.samples(proto, 96, seed=2))  # type: ignore[arg-type]
    return path


def _write_opset11_axis_graph(path: Path, features: int, classes: int) -> None:
    """What ONNX Runtime's quantizer wrote for per-channel weights at opset 11: a
    DequantizeLinear with an ``axis``, which that opset does not have (``x`` in, ``y``
    out, like :func:`tests.factories_onnx.mlp`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((classes, features), dtype=np.int8), "w_q")
    scale = numpy_helper.from_array(np.ones(classes, dtype=np.float32), "w_scale")
    zero = numpy_helper.from_array(np.zeros(classes, dtype=np.int8), "w_zero")
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=0),
        helper.make_node("Gemm", ["x", "w"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], [w, scale, zero],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7)
    onnx.save(model, str(path))


def test_an_invalid_quantizer_output_is_the_methods_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library that writes a graph onnx rejects fails the step as method_failed, naming
    the library and what to try; the upload, which stock tools accept, is not blamed."""
    import onnxruntime.quantization as ortq

    def broken_quantizer(model_input, model_output, *args, **kwargs) -> None:
        _write_opset11_axis_graph(Path(model_output), features=32, classes=8)

    monkeypatch.setattr(ortq, "quantize_static", broken_quantizer)
    proto = quirks.mlp()
    src = quirks.save(proto, tmp_path / "upload.onnx")
    spec = PipelineSpec(steps=[("quantize.static", {})], output_format="onnx")
    with pytest.raises(EngineError) as caught:
        run_pipeline(
            src, "onnx", spec, {"calibration": _npz(proto, tmp_path)}, tmp_path / "w",
            RecordingReporter(),
        )  # fmt: skip
    error = caught.value
    assert isinstance(error, MethodFailedError), error.to_dict()  # before: invalid_model
    assert error.step == "quantize.static"  # before: load
    assert "ONNX Runtime's quantize_static wrote an ONNX model that" in error.message
    assert "Unrecognized attribute: axis for operator DequantizeLinear" in error.message
    assert "The model given to quantize.static is valid" in error.message
    assert "per_channel=false" in error.message


def test_the_pipeline_checks_every_methods_onnx_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any method's ONNX output, not only the quantizers': one that ONNX Runtime cannot
    load is the step's failure (before: invalid_model at load, when it was measured)."""
    import dataclasses

    import onnx

    from worker.formats import onnx_model_from_proto
    from worker.methods import REGISTRY

    broken = tmp_path / "broken.onnx"
    _write_opset11_axis_graph(broken, features=3, classes=4)

    def handler(model, params, ctx):
        return onnx_model_from_proto(onnx.load(str(broken)))

    method = dataclasses.replace(REGISTRY["prune.magnitude"], handler=handler)
    monkeypatch.setitem(REGISTRY, "prune.magnitude", method)
    src = quirks.save(quirks.mlp(features=3, classes=4), tmp_path / "upload.onnx")
    spec = PipelineSpec(steps=[("prune.magnitude", {"amount": 0.5})], output_format="onnx")
    with pytest.raises(MethodFailedError) as caught:
        run_pipeline(src, "onnx", spec, {}, tmp_path / "w", RecordingReporter())
    assert caught.value.step == "prune.magnitude"
    assert "onnx.checker rejected the model" in caught.value.message


def test_a_normalization_that_changes_the_outputs_stops_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.formats import onnx as onnx_backend

    real = onnx_backend._lift_constants

    def lift_and_corrupt(proto):
        from onnx import numpy_helper

        lifted = real(proto)
        first = lifted.graph.initializer[0]
        first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) * 2, first.name))
        return lifted

    monkeypatch.setattr(onnx_backend, "_lift_constants", lift_and_corrupt)
    src = quirks.save(quirks.weights_as_constants(quirks.mlp()), tmp_path / "upload.onnx")
    spec = PipelineSpec(steps=[("quantize.dynamic", {})], output_format="onnx")
    with pytest.raises(MethodFailedError, match=r"computes different outputs.*squish stops"):
        run_pipeline(src, "onnx", spec, {}, tmp_path / "w", RecordingReporter())


# --- finding 4: defaults chosen for the worker's CPU ---------------------------------

AVX2 = hardware.detect_cpu("model name : Old Xeon\nflags : sse2 avx avx2 fma", "x86_64")
VNNI = hardware.detect_cpu("model name : New Xeon\nflags : avx2 avx512f avx512_vnni", "x86_64")


def _weight_range(model_path: Path) -> int:
    """The largest |int8| weight ONNX Runtime stored (7-bit weights stay within 64)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model_path))
    weights = {n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    return max(
        int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max())
        for t in proto.graph.initializer
        if t.name in weights and t.data_type == onnx.TensorProto.INT8
    )


@pytest.mark.parametrize(("cpu", "reduce_range"), [(AVX2, True), (VNNI, False)])
def test_static_int8_defaults_follow_the_workers_cpu(
    cpu: hardware.Cpu, reduce_range: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hardware, "worker_cpu", lambda: cpu)
    proto = quirks.conv_classifier()
    src = quirks.save(proto, tmp_path / "upload.onnx")
    log = RecordingReporter()
    spec = PipelineSpec(
        steps=[("quantize.static", {})], output_format="onnx", warmup=0, iterations=2
    )
    result = run_pipeline(
        src, "onnx", spec, {"calibration": _npz(proto, tmp_path)}, tmp_path / "w", log
    )
    # The default that ran is in the step's params, the events and the report.
    assert result.metrics["steps"][0]["params"]["reduce_range"] is reduce_range
    said = [e for e in log.logs if "chosen for this worker's CPU" in e["message"]]
    assert len(said) == 1 and said[0]["data"]["reduce_range"] is reduce_range
    assert f"reduce_range={str(reduce_range).lower()}" in said[0]["message"]
    assert cpu.describe() in said[0]["message"]
    assert result.metrics["hardware"] == {"cpu": cpu.to_dict()}  # a cpu job: no gpu entry
    assert (_weight_range(result.artifact_path) <= 64) is reduce_range
    # A user's explicit value wins on either CPU.
    spec.steps = [("quantize.static", {"reduce_range": not reduce_range})]
    again = run_pipeline(
        src, "onnx", spec, {"calibration": _npz(proto, tmp_path)}, tmp_path / "w2",
        RecordingReporter(),
    )  # fmt: skip
    assert again.metrics["steps"][0]["params"]["reduce_range"] is (not reduce_range)
    assert (_weight_range(again.artifact_path) <= 64) is (not reduce_range)


# --- finding 5: dynamic int8 on convolution-heavy graphs ----------------------------


def test_dynamic_int8_leaves_convolutions_float_on_a_conv_dominated_graph(tmp_path: Path) -> None:
    src = quirks.save(quirks.conv_classifier(), tmp_path / "upload.onnx")
    log = RecordingReporter()
    model = apply("quantize.dynamic", load_model(src, "onnx"), {}, tmp_path, reporter=log)
    ops = [n.op_type for n in model.proto.graph.node]  # type: ignore[union-attr]
    assert "ConvInteger" not in ops and ops.count("Conv") == 3  # before: 3 ConvInteger
    assert "MatMulInteger" in ops
    said = [e for e in log.logs if "multiply-accumulates are convolutions" in e["message"]]
    assert said and said[0]["level"] == "warning" and said[0]["data"]["conv_mac_share"] > 0.5
    assert "quantize.static" in said[0]["message"]
    # Asked for, Conv is quantized; an MLP is not convolution-dominated.
    forced = apply(
        "quantize.dynamic", load_model(src, "onnx"), {"op_types": ["Conv", "Gemm"]}, tmp_path
    )
    assert [n.op_type for n in forced.proto.graph.node].count("ConvInteger") == 3  # type: ignore[union-attr]
    mlp = load_model(quirks.save(quirks.mlp(), tmp_path / "mlp.onnx"), "onnx")
    log = RecordingReporter()
    apply("quantize.dynamic", mlp, {}, tmp_path, reporter=log)
    assert not [e for e in log.logs if "convolutions" in e["message"]]


def test_dynamic_op_types_are_validated_like_static_ones() -> None:
    from pydantic import ValidationError

    from worker.methods import get_method

    method = get_method("quantize.dynamic")
    assert method.validate_params({"op_types": ["MatMul", "MatMul"]}, "onnx").op_types == (
        "MatMul",
    )
    with pytest.raises(ValidationError, match="cannot quantize Relu dynamically; op_types takes"):
        method.validate_params({"op_types": ["Relu"]}, "onnx")
    with pytest.raises(ValidationError, match="op_types is for onnx models"):
        method.validate_params({"op_types": ["MatMul"]}, "pt2")


def _metrics(method: str, speedup: float, cosine_similarity: float) -> PipelineMetrics:
    latency = {"batch_1": Latency(p50=1.0, p95=1.0, mean=1.0)}
    slow = {"batch_1": Latency(p50=1.0 / speedup, p95=1.0 / speedup, mean=1.0 / speedup)}
    return PipelineMetrics(
        original=ModelMetrics(latency_ms=latency),
        compressed=ModelMetrics(latency_ms=slow),
        fidelity=Fidelity(cosine_similarity=cosine_similarity, mse=0.1, max_abs_error=1.0),
        ratios=Ratios(speedup={"batch_1": speedup}),
        steps=[StepMetrics(method=method, params={}, seconds=0.1, format="onnx")],
    )


def test_slower_and_less_faithful_dynamic_int8_names_static_int8() -> None:
    def advice(metrics: PipelineMetrics) -> list[str]:
        log = RecordingReporter()
        warn_about_the_result(metrics, "onnx", log)
        return [e["message"] for e in log.logs if "instead of quantize.dynamic" in e["message"]]

    found = advice(_metrics("quantize.dynamic", 0.3, 0.67))  # the ImageNet classifier's figures
    assert len(found) == 1 and "quantize.static with a calibration dataset" in found[0]
    assert not advice(_metrics("quantize.dynamic", 0.3, 0.999))  # slower only
    assert not advice(_metrics("quantize.dynamic", 1.5, 0.67))  # less faithful only
    assert not advice(_metrics("quantize.static", 0.3, 0.67))
