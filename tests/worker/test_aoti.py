"""output_format aoti: PyTorch steps first, then one AOTInductor compile, measured and
loaded like every artifact; the spec rules that lead there.

Compiling takes tens of seconds on a shared CPU, so each compile happens once, in a
module fixture, and the tests read its result.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import factories_text
from worker.context import NullReporter, RecordingReporter
from worker.contract import FORMATS, ModelFormat, RuntimeName, conversion_problem, format_of_suffix
from worker.errors import EngineError, JobCancelled, MethodFailedError
from worker.methods import get_method
from worker.pipeline import PipelineResult, PipelineSpec, run_pipeline
from worker.spec import PipelineRequest, check_pipeline, resolve_pipeline, step_formats

pytestmark = [pytest.mark.xdist_group("aoti")]  # one worker: its module fixtures compile once

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    result: PipelineResult
    log: RecordingReporter


def _run(upload: Path, fmt: str, steps: list, datasets: dict[str, Path], work: Path) -> Run:
    log = RecordingReporter()
    spec = PipelineSpec(steps=steps, output_format="aoti", batch_sizes=[1, 8])
    return Run(run_pipeline(upload, fmt, spec, datasets, work, log), log)


@pytest.fixture(scope="module")
def static_int8(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The digits MLP, quantize.static → aoti: the one int8 compile of this module."""
    work = tmp_path_factory.mktemp("aoti-static")
    datasets = {"calibration": files["calibration"], "eval": files["eval"]}
    return _run(files["pt2"], "pt2", [("quantize.static", {})], datasets, work)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A tiny BERT classifier (hf), magnitude-pruned on the transformers module, exported,
    static int8 (its classifier kept float) → aoti: batch and sequence dynamic."""
    root = tmp_path_factory.mktemp("aoti-hf")
    upload = factories_text.tiny_bert_hf_zip(root / "bert.zip")
    data = {
        "eval": factories_text.sentiment_jsonl(root / "eval.jsonl"),
        "calibration": factories_text.sentiment_jsonl(root / "cal.jsonl", "train", labels=False),
    }
    steps = [
        ("prune.magnitude", {"amount": 0.3}),
        ("quantize.static", {"exclude": ["classifier"]}),
    ]
    return _run(upload, "hf", steps, data, root / "work")


def _fresh_process_run(package: Path, *inputs: np.ndarray, tmp_path: Path) -> list[np.ndarray]:
    """The package loaded with stock torch only, in a new interpreter (no squish code)."""
    feeds = tmp_path / "inputs.npz"
    np.savez(feeds, *inputs)
    out = tmp_path / "outputs.npz"
    code = (
        "import sys, numpy as np, torch\n"
        "model = torch._inductor.aoti_load_package(sys.argv[1])\n"
        "with np.load(sys.argv[2]) as z: args = [torch.from_numpy(z[k]) for k in z.files]\n"
        "with torch.inference_mode(): out = model(*args)\n"
        "out = out if isinstance(out, (list, tuple)) else [out]\n"
        "np.savez(sys.argv[3], *[o.numpy() for o in out])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(package), str(feeds), str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    with np.load(out) as z:
        return [z[k] for k in z.files]


def _package_source(package: Path) -> str:
    with zipfile.ZipFile(package) as zf:
        return "\n".join(zf.read(n).decode() for n in zf.namelist() if n.endswith(".cpp"))


# -- the contract and the spec ------------------------------------------------------------


def test_aoti_is_an_output_format_of_pt2_and_hf_models_only() -> None:
    facts = FORMATS[ModelFormat.aoti]
    assert facts.runtime == RuntimeName.inductor and facts.suffix.endswith(".pt2")
    assert not facts.upload
    assert format_of_suffix("model.aoti.pt2") == ModelFormat.aoti
    assert format_of_suffix("model.pt2") == ModelFormat.pt2
    for source in ("pt2", "hf"):
        assert conversion_problem(source, "aoti") is None
    problem = conversion_problem("onnx", "aoti")
    assert problem is not None and "aoti is made from pt2 or hf models" in problem


def test_quantization_runs_in_torch_before_the_compile() -> None:
    """Unlike onnx, where a trailing quantize.* step gets the converted model."""
    methods = [get_method("prune.magnitude"), get_method("quantize.static")]
    assert step_formats("pt2", "aoti", methods) == ["pt2", "pt2"]
    assert step_formats("pt2", "onnx", methods) == ["pt2", "onnx"]
    request = PipelineRequest(
        model_format="pt2",
        steps=[("quantize.dynamic", {}), ("quantize.static", {})],
        output_format="aoti",
        datasets={"calibration": _labelled()},
    )
    checked = resolve_pipeline(request)
    assert [s.format for s in checked.steps] == ["pt2", "pt2"]
    assert checked.runtime == RuntimeName.inductor
    assert checked.convert_at == 2  # compiled after the last step


def test_an_hf_model_is_exported_to_a_program_before_the_first_step_that_needs_one() -> None:
    """hf → aoti: steps that take hf models run on the transformers module, the first one
    that takes programs only (PT2E int8) and every later one on the exported program."""
    methods = [get_method(n) for n in ("prune.magnitude", "quantize.static", "clip")]
    assert step_formats("hf", "aoti", methods) == ["hf", "pt2", "pt2"]
    assert step_formats("hf", "aoti", methods[:1]) == ["hf"]  # compiled from the module
    request = PipelineRequest(
        model_format="hf",
        steps=[
            ("prune.magnitude", {"amount": 0.5}),
            ("quantize.dynamic", {"exclude": ["classifer"]}),
        ],
        output_format="aoti",
        layer_names=["bert.encoder.layer.0.attention.self.query", "classifier"],
    )
    # The program keeps the module's layer names: exclude is checked against them at once.
    (problem,) = check_pipeline(request)
    assert problem.loc == ("pipeline", 1, "params", "exclude")
    assert "'classifer'" in problem.msg and "classifier" in problem.msg
    fixed = PipelineRequest(**{**request.__dict__, "steps": [("quantize.dynamic", {})]})
    checked = resolve_pipeline(fixed)
    assert (checked.export_at, checked.convert_at) == (0, 1)


def _labelled() -> Any:
    from worker.spec import DatasetInfo

    return DatasetInfo(has_labels=True)


def test_aoti_for_a_gpu_job_or_an_onnx_model_is_refused_with_what_to_do() -> None:
    on_gpu = check_pipeline(
        PipelineRequest(
            "pt2", [("prune.magnitude", {"amount": 0.5})], output_format="aoti", device="gpu"
        )
    )
    assert [p.loc for p in on_gpu] == [("target", "device")]
    assert "cpu workers only" in on_gpu[0].msg
    onnx = check_pipeline(
        PipelineRequest("onnx", [("prune.magnitude", {"amount": 0.5})], output_format="aoti")
    )
    assert [p.loc for p in onnx] == [("output_format",)]
    assert "pt2 or hf" in onnx[0].msg and "'onnx'" in onnx[0].msg
    runtime = check_pipeline(
        PipelineRequest(
            "pt2", [("prune.magnitude", {"amount": 0.5})], output_format="aoti", runtime="torch"
        )
    )
    assert "'inductor'" in runtime[0].msg


# -- a compiled int8 model ------------------------------------------------------------------


def test_static_int8_is_compiled_to_int8_kernels_and_loads_in_a_fresh_process(
    static_int8: Run, files: dict[str, Path], tmp_path: Path
) -> None:
    result = static_int8.result
    package = result.artifact_path
    assert package.name.endswith(".aoti.pt2") and result.artifact_format == "aoti"
    # The PT2E int8 program was lowered (freezing): int8 GEMMs, no fp32 matmul left.
    source = _package_source(package)
    assert "aoti_torch_cpu_addmm_out" not in source and "aoti_torch_cpu_mm_out" not in source
    assert "int8_t" in source or "qlinear" in source

    with np.load(files["eval"]) as z:
        x, y = z["inputs"].astype(np.float32), z["labels"]
    for rows in (1, 7):  # the upload's dynamic batch dim is kept
        (out,) = _fresh_process_run(package, x[:rows], tmp_path=tmp_path)
        assert out.shape == (rows, 10)
    (logits,) = _fresh_process_run(package, x, tmp_path=tmp_path)
    accuracy = float((logits.argmax(1) == y).mean())
    assert accuracy == pytest.approx(result.metrics["compressed"]["accuracy"])
    assert accuracy > result.metrics["original"]["accuracy"] - 0.02


def test_the_steps_ran_in_torch_and_the_compile_is_reported(static_int8: Run) -> None:
    metrics = static_int8.result.metrics
    (step,) = metrics["steps"]
    assert step["method"] == "quantize.static" and step["format"] == "pt2"
    assert step["parameters"] > 0  # measured on the int8 pt2 program, before the compile
    conversion = metrics["conversion"]
    assert conversion["format"] == "aoti" and conversion["runtime"] == "inductor"
    compiled = conversion["compiled"]
    import torch

    assert compiled["torch_version"] == torch.__version__
    assert compiled["options"]["freezing"] is True
    assert compiled["instruction_set"] and compiled["march"] == "native"
    assert 0 < compiled["compile_seconds"] <= conversion["seconds"]
    # The report keeps it too: what must match to load the package elsewhere.
    report = json.loads(static_int8.result.report_path.read_text())
    assert report["metrics"]["conversion"] == conversion


def test_the_package_is_measured_and_what_it_hides_is_said(static_int8: Run) -> None:
    metrics = static_int8.result.metrics
    compressed = metrics["compressed"]
    assert set(compressed["latency_ms"]) == {"batch_1", "batch_8"}
    assert compressed["peak_memory_bytes"] > 0  # the fresh-process probe loads packages too
    for absent in ("parameters", "sparsity", "macs"):
        assert absent not in compressed
    warnings = [e["message"] for e in static_int8.log.logs if e["level"] == "warning"]
    assert any("parameters and sparsity not measured" in w for w in warnings)
    assert any(w.startswith("macs not measured") for w in warnings)
    # Inductor's int8 kernels against the same program's reference ops in eager PyTorch.
    eager = metrics["steps"][0]["latency_ms"]["batch_1"]["p50"]
    assert compressed["latency_ms"]["batch_1"]["p50"] < eager


# -- an hf model ------------------------------------------------------------------------------


def test_an_hf_model_is_exported_quantized_and_compiled_batch_and_sequence_dynamic(
    bert: Run, tmp_path: Path
) -> None:
    metrics = bert.result.metrics
    assert metrics["fidelity"]["cosine_similarity"] > 0.99
    assert metrics["compressed"]["accuracy"] == pytest.approx(metrics["steps"][1]["accuracy"])
    # Pruned as a transformers module, then exported: the int8 step ran on the program,
    # which keeps the module's layer names (its exclude named the hf classifier).
    messages = [e["message"] for e in bert.log.logs]
    exported = next(i for i, m in enumerate(messages) if m.startswith("exported the hf model"))
    pruned = next(i for i, m in enumerate(messages) if "prune" in m.lower())
    assert pruned < exported
    layers = metrics["steps"][1]["layers"]
    assert layers["classifier"]["status"] == "kept"
    assert layers["bert.encoder.layer.0.attention.self.query"]["status"] == "changed"
    assert metrics["conversion"]["compiled"]["options"]["max_autotune"] is True  # int8
    names = [s["name"] for s in json.loads(bert.result.report_path.read_text())["model"]["inputs"]]
    for batch, sequence in ((1, 5), (3, 17)):
        ids = np.full((batch, sequence), 7, dtype=np.int64)
        given = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        inputs = [given.get(name, np.zeros_like(ids)) for name in names]
        (logits,) = _fresh_process_run(bert.result.artifact_path, *inputs, tmp_path=tmp_path)
        assert logits.shape == (batch, 2)


# -- failures ----------------------------------------------------------------------------------


def test_a_compile_that_fails_fails_the_job_with_the_reason(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.formats.aoti as aoti

    monkeypatch.setattr(aoti, "compile_options", lambda quantized: {"no_such_option": 1})
    spec = PipelineSpec(steps=[("prune.magnitude", {"amount": 0.5})], output_format="aoti")
    with pytest.raises(MethodFailedError) as failed:
        run_pipeline(files["pt2"], "pt2", spec, {}, tmp_path, NullReporter())
    assert failed.value.step == "convert"
    assert "compiling with AOTInductor failed" in failed.value.message
    assert "no_such_option" in failed.value.message
    assert "output_format 'onnx' or 'pt2'" in failed.value.message


def test_a_miscompiled_package_fails_the_job_and_names_the_layers_to_exclude(
    tmp_path: Path,
) -> None:
    """torch 2.13's Inductor computes frozen int8 convolutions with one input channel
    wrongly; the check against the program's outputs fails the job instead of delivering
    a fast wrong model, and says which layers to keep float."""
    import torch
    from torch import nn

    from tests.factories import write_npz

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    ).eval()  # fmt: skip
    example = torch.rand(4, 1, 8, 8)
    dims = ({0: torch.export.Dim.DYNAMIC},)
    upload = tmp_path / "conv.pt2"
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=dims), upload)
    data = write_npz(
        tmp_path / "calibration.npz", np.random.default_rng(0).random((64, 1, 8, 8), "f4")
    )
    spec = PipelineSpec(steps=[("quantize.static", {})], output_format="aoti")
    with pytest.raises(MethodFailedError) as failed:
        run_pipeline(upload, "pt2", spec, {"calibration": data}, tmp_path / "w", NullReporter())
    assert failed.value.step == "convert"
    assert "computes something else than the pt2 model" in failed.value.message
    assert '"exclude": ["0"]' in failed.value.message


def test_a_compile_is_bounded_in_time_and_stops_when_the_job_is_cancelled(
    files: dict[str, Path], tmp_path: Path
) -> None:
    import psutil

    from worker.formats import load_model
    from worker.formats.aoti import compile_program

    model = load_model(files["pt2"], "pt2")
    assert model.program is not None
    with pytest.raises(MethodFailedError, match=r"took over 1 s and was stopped"):
        compile_program(model.program, model.inputs, model.outputs, timeout_s=1)

    class CancelWhileCompiling(NullReporter):
        def progress(self, fraction: float, stage: str | None = None) -> None:
            if stage == "convert":
                raise JobCancelled("the job was cancelled")

    with pytest.raises(JobCancelled):
        compile_program(model.program, model.inputs, model.outputs, CancelWhileCompiling())
    children = psutil.Process().children(recursive=True)
    assert not [p for p in children if "worker.formats.aoti" in " ".join(p.cmdline())]


def test_a_package_is_never_loaded_as_a_pt2_program(static_int8: Run) -> None:
    """It holds compiled code: the pt2 loader's safety rules refuse it."""
    from worker.formats import load_model

    with pytest.raises(EngineError):
        load_model(static_int8.result.artifact_path, "pt2")


@pytest.mark.parametrize("dynamic", [False, True])
def test_dynamic_int8_compiles_without_autotuning(dynamic: bool) -> None:
    """torch 2.13's max-autotune crashes (double free, SIGABRT) on a PT2E dynamic program:
    only statically quantized programs are autotuned."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from worker.formats.aoti import compile_options, quantization_of

    module = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()).eval()
    x = torch.randn(4, 16)
    program = torch.export.export(module, (x,))
    assert quantization_of(program) is None
    config = get_default_x86_inductor_quantization_config(is_dynamic=dynamic)
    prepared = prepare_pt2e(program.module(), X86InductorQuantizer().set_global(config))
    prepared(x)
    quantized = torch.export.export(convert_pt2e(prepared), (x,))
    kind = quantization_of(quantized)
    assert kind == ("dynamic" if dynamic else "static")
    assert ("max_autotune" in compile_options(kind)) is not dynamic
