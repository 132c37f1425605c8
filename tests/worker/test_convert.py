"""output_format onnx from pt2 and hf models: the conversion, where it happens, and jobs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests import factories, factories_text
from worker.context import NullReporter, RecordingReporter, StepContext
from worker.convert import conversion_problem, convert, format_problem, step_formats
from worker.errors import UnsupportedError
from worker.formats import generate_inputs, load_model, save_model
from worker.methods import get_method
from worker.pipeline import PipelineSpec, run_pipeline


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run many times faster on one thread on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text")
    return {
        "classifier": factories_text.tiny_bert_hf_zip(root / "bert.zip"),
        "encoder": factories_text.tiny_bert_encoder_zip(root / "encoder.zip"),
        "eval": factories_text.sentiment_jsonl(root / "test.jsonl"),
    }


def ort_session(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])


def node_metadata(model) -> int:
    return sum(len(node.metadata_props) for node in model.proto.graph.node)


# --------------------------------------------------------------------------------------
# Planning (torch-free: the API uses the same functions)


def test_where_the_conversion_happens() -> None:
    prune, dynamic = get_method("prune.magnitude"), get_method("quantize.dynamic")
    assert step_formats("pt2", "pt2", [prune, dynamic]) == ["pt2", "pt2"]
    # Trailing ONNX Runtime quantization runs on the converted model ...
    assert step_formats("pt2", "onnx", [prune, dynamic]) == ["pt2", "onnx"]
    assert step_formats("hf", "onnx", [dynamic]) == ["onnx"]
    # ... other steps, and quantization followed by another step, run before it.
    assert step_formats("pt2", "onnx", [dynamic, prune]) == ["pt2", "pt2"]
    assert step_formats("hf", "onnx", [prune]) == ["hf"]


def test_which_conversions_exist() -> None:
    assert conversion_problem("pt2", "onnx") is None
    assert conversion_problem("hf", "onnx") is None
    assert conversion_problem("onnx", "onnx") is None
    problem = conversion_problem("onnx", "pt2")
    assert problem is not None and "output_format 'pt2'" in problem and "'onnx'" in problem
    problem = conversion_problem("pt2", "hf")
    assert problem is not None and "'onnx'" in problem


def test_format_problems_say_what_to_change() -> None:
    dynamic = get_method("quantize.dynamic")
    assert format_problem(dynamic, "onnx", "hf", "onnx") is None
    problem = format_problem(dynamic, "hf", "hf", "hf")
    assert problem is not None and "set output_format to 'onnx'" in problem
    problem = format_problem(dynamic, "hf", "hf", "onnx")
    assert problem is not None and "move it to the end" in problem


# --------------------------------------------------------------------------------------
# The conversion itself


def test_pt2_to_onnx_keeps_outputs_names_and_dynamic_batch(files) -> None:
    source = load_model(files["pt2"], "pt2")
    reporter = RecordingReporter()
    converted = convert(source, "onnx", reporter=reporter)
    assert converted.format == "onnx"
    assert [s.name for s in converted.inputs] == [s.name for s in source.inputs]
    assert converted.inputs[0].is_dynamic(0) and converted.inputs[0].shape[1] == 64
    assert node_metadata(converted) == 0  # no stack traces of the worker in the artifact
    session = ort_session(converted)
    module = source.program.module()  # type: ignore[union-attr]
    import torch

    for batch in (1, 3, 17):
        x = factories.digits_arrays()[2][:batch]
        [got] = session.run(None, {converted.inputs[0].name: x})
        with torch.inference_mode():
            expected = module(torch.from_numpy(x)).numpy()
        assert np.abs(got - expected).max() < 1e-4
    assert "max abs error" in reporter.logs[-1]["message"]


def test_static_batch_stays_static(files) -> None:
    source = load_model(files["pt2_static"], "pt2")
    feeds = {source.inputs[0].name: factories.digits_arrays()[2][:50]}  # checked at batch 4
    converted = convert(source, "onnx", feeds=feeds)
    assert converted.inputs[0].shape == (4, 64)


def test_hf_to_onnx_keeps_outputs_with_dynamic_batch_and_sequence(text) -> None:
    import torch

    source = load_model(text["classifier"], "hf")
    converted = convert(source, "onnx")
    assert [s.name for s in converted.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    for spec in converted.inputs:
        assert spec.shape == ("batch", "sequence")
    assert [s.name for s in converted.outputs] == [s.name for s in source.outputs]
    session = ort_session(converted)
    tokenizer = source.tokenizer
    for texts in (["great film"], ["the plot was really quite dull and weak", "fun", "i loved it"]):
        enc = tokenizer(texts, padding=True, return_tensors="np")
        feeds = {
            name: enc[name].astype(np.int64)
            for name in ("input_ids", "attention_mask", "token_type_ids")
        }
        [got] = session.run(None, feeds)
        with torch.inference_mode():
            result = source.module(**{k: torch.from_numpy(v) for k, v in feeds.items()})  # type: ignore[misc]
        expected = result.logits.numpy()
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4


def test_torch_quantized_program_does_not_convert_and_says_why(files, tmp_path: Path) -> None:
    method = get_method("quantize.dynamic")
    model = load_model(files["pt2"], "pt2")
    ctx = StepContext(
        step=0, method=method.name, reporter=NullReporter(), datasets={}, device="cpu",
        work_dir=tmp_path,
    )  # fmt: skip
    quantized = method.handler(model, method.validate_params({}, "pt2"), ctx)
    with pytest.raises(UnsupportedError) as err:
        convert(quantized, "onnx")
    assert "choose_qparams" in err.value.message
    assert "at the end of the pipeline" in err.value.message
    assert err.value.step == "convert"


# --------------------------------------------------------------------------------------
# Jobs with output_format onnx


def test_pt2_job_to_onnx_quantizes_in_onnx_runtime(files, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    reporter = RecordingReporter()
    spec = PipelineSpec(
        steps=[("prune.magnitude", {"amount": 0.5}), ("quantize.dynamic", {})],
        output_format="onnx", batch_sizes=[1, 16], warmup=1, iterations=3,
    )  # fmt: skip
    result = run_pipeline(files["pt2"], "pt2", spec, {"eval": files["eval"]}, tmp_path, reporter)
    assert result.artifact_path.suffix == ".onnx" and result.artifact_format == "onnx"
    proto = onnx.load(str(result.artifact_path))
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in proto.graph.node}
    session = ort.InferenceSession(str(result.artifact_path), providers=["CPUExecutionProvider"])
    x = factories.digits_arrays()[2][:5]
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (5, 10)

    metrics = result.metrics
    assert [(s["method"], s["format"]) for s in metrics["steps"]] == [
        ("prune.magnitude", "pt2"),
        ("quantize.dynamic", "onnx"),
    ]
    original, compressed = metrics["original"], metrics["compressed"]
    # The original is measured as a pt2 file, the artifact as an ONNX file: int8 weights.
    assert compressed["size_bytes"] == result.artifact_path.stat().st_size
    assert compressed["size_bytes"] < original["size_bytes"] / 3
    assert compressed["parameters"] == original["parameters"]
    assert compressed["accuracy"] >= original["accuracy"] - 0.01
    assert metrics["fidelity"]["top1_agreement"] >= 0.97
    messages = [line["message"] for line in reporter.logs]
    converted = [m for m in messages if m.startswith("converted the pt2 model to ONNX")]
    assert converted and messages.index(converted[0]) < messages.index(
        next(m for m in messages if m.startswith("quantized 1 op types"))
    )


def test_hf_encoder_job_to_onnx_compares_sentence_embeddings(text, tmp_path: Path) -> None:
    reporter = RecordingReporter()
    spec = PipelineSpec(
        steps=[("quantize.dynamic", {})], output_format="onnx", batch_sizes=[4],
        warmup=1, iterations=3,
    )  # fmt: skip
    result = run_pipeline(text["encoder"], "hf", spec, {"eval": text["eval"]}, tmp_path, reporter)
    assert result.artifact_format == "onnx"
    fidelity = result.metrics["fidelity"]
    assert "top1_agreement" not in fidelity  # embeddings, not class scores
    assert fidelity["cosine_similarity"] > 0.99
    assert "accuracy" not in result.metrics["compressed"]
    messages = " ".join(line["message"] for line in reporter.logs)
    assert "sentence embeddings" in messages
    assert "accuracy not measured" in messages


def test_unsupported_output_formats_are_refused(files, tmp_path: Path) -> None:
    for fmt, out in (("onnx", "pt2"), ("pt2", "hf")):
        spec = PipelineSpec(steps=[("prune.magnitude", {"amount": 0.5})], output_format=out)
        with pytest.raises(UnsupportedError, match="output_format"):
            run_pipeline(files[fmt], fmt, spec, {}, tmp_path, NullReporter())


def test_quantization_in_the_middle_is_refused_for_hf(text, tmp_path: Path) -> None:
    spec = PipelineSpec(
        steps=[("quantize.dynamic", {}), ("prune.magnitude", {"amount": 0.3})],
        output_format="onnx",
    )
    with pytest.raises(UnsupportedError, match="move it to the end"):
        run_pipeline(text["classifier"], "hf", spec, {}, tmp_path, NullReporter())


def test_converted_model_saves_and_reloads(files, tmp_path: Path) -> None:
    converted = convert(load_model(files["pt2"], "pt2"), "onnx")
    path = tmp_path / "m.onnx"
    save_model(converted, path)
    reloaded = load_model(path, "onnx")
    feeds = generate_inputs(reloaded, batch=2)
    assert ort_session(reloaded).run(None, feeds)[0].shape == (2, 10)


def test_an_hf_encoder_exported_for_aoti_keeps_its_names_and_drops_what_no_output_reads(
    text: dict[str, Path],
) -> None:
    """The export before a PT2E step: the program's inputs are the hf input names, its
    weights the module paths, and BERT's pooler (read by no output of a feature-extraction
    model) is dead code that torchao's x86 quantizer would fail on."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from worker.convert import export_hf

    model = load_model(text["encoder"], "hf")
    log = RecordingReporter()
    exported = export_hf(model, reporter=log)
    assert exported.format == "pt2"
    assert [s.name for s in exported.inputs] == [s.name for s in model.inputs]
    assert set(exported.program.state_dict) <= set(model.module.state_dict())
    targets = {str(n.target) for n in exported.program.graph.nodes}
    assert "aten.tanh.default" not in targets  # the pooler's activation
    assert log.logs[-1]["data"]["max_abs_error"] == 0.0
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported.program.module(), quantizer)  # raised before
    feeds = generate_inputs(exported, batch=2)
    prepared(*(torch.from_numpy(feeds[s.name]) for s in exported.inputs))
