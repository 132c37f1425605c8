"""aoti: an AOTInductor package, compiled by the worker for its own CPU (DESIGN §9).

A pt2 program (or an hf model, exported first) is compiled with
``torch._inductor.aoti_compile_and_package`` into a ``.aoti.pt2`` package (torch's packager
requires the ``.pt2`` ending; it is a zip of the generated C++ and its shared library,
weights inside) that loads with ``torch._inductor.aoti_load_package(path)`` and runs
without Python in the loop.

Compile options (:func:`compile_options`), measured on this code's benchmarks rather than
assumed:

- ``freezing``: the weights become constants, folded and prepacked for oneDNN. It is what
  makes a PT2E int8 program fast: Inductor's quantization lowerings (``qlinear`` /
  ``qconv`` with int8 weights, ``torch/_inductor/fx_passes/quantization.py``) are freezing
  passes, and freezing only runs with autograd off, so the compile runs under
  ``torch.no_grad()``. Without it the int8 program compiles to dequantize + fp32 GEMM
  (4 x Linear(1024) MLP, batch 1: 0.64 ms, as slow as fp32; with it 0.28 ms).
- ``max_autotune`` with the ``CPP`` GEMM backend, for statically quantized programs only: Inductor
  benchmarks its own VNNI/AMX micro-GEMM templates against oneDNN at compile time (MLP int8:
  0.09 ms at batch 1 against 0.30 ms; digits CNN 0.20 vs 0.24 ms; about 2-3x the compile
  time). On fp32 programs it picked kernels that were slower at batch 32 than the default.
  On dynamically quantized programs (``quantize.dynamic``) torch 2.13 crashes while
  autotuning ("double free or corruption", SIGABRT; the digits MLP and CNN alike), so
  those compile with freezing alone.
- ``aot_inductor.enable_line_tables`` off: torch builds the library with ``-g1`` line
  tables for profilers by default, debug sections that were 3.8 of the 28 MB of MiniLM's
  int8 package; the kernels are the same without them.
- the thread count of the worker's torch (kernels are generated for it) and ``-march=native``
  (torch's default for AOTInductor): the package is for this CPU.

Compiling runs in a child process (``python -m worker.formats.aoti``) with a time limit,
so a compiler that hangs or crashes fails the job with the reason instead of taking the
worker with it, and a cancelled job kills it. What the package needs to load elsewhere is
recorded in its metadata and in the job's metrics (``metrics.conversion``): the torch
version, the instruction set Inductor compiled for, the CPU, the options.

The package keeps its weights inside the compiled library, transformed for its kernels
(prepacked, blocked), so ``parameters`` and ``sparsity`` are not read from it (the steps'
entries have them, measured before the compile), and its ops run outside PyTorch's
dispatcher, so ``macs`` are not counted either; the job's events say so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.contract import ModelFormat
from worker.errors import EngineError, InvalidModelError, MethodFailedError, UnsupportedError
from worker.formats._torch import tensor_to_numpy, torch_device
from worker.formats.base import Runner, WeightsUnreadable
from worker.formats.types import LoadedModel, TensorSpec

if TYPE_CHECKING:
    from torch.export import ExportedProgram

    from worker.context import Reporter

COMPILE_TIMEOUT_S = 3600
"""A compile that takes longer fails the job (large models take minutes on a few cores)."""
COMPILE_MODULE = "worker.formats.aoti"
SIGNATURE_KEY = "squish.signature"
BUILD_KEY = "squish.build"
WEIGHTS_UNREADABLE = (
    "an AOTInductor package keeps its weights inside the compiled library, transformed for "
    "its kernels; metrics.steps has the counts measured before the compile"
)
_POLL_S = 1.0
_EXPECTED_S = 120.0  # for the progress shown while compiling; the limit is the timeout
_QUANTIZED_NAMESPACES = ("quantized_decomposed", "torchao")


def is_quantized(program: ExportedProgram) -> bool:
    """Whether the program holds PT2E / torchao quantize-dequantize ops."""
    import torch

    for node in program.graph.nodes:
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target.namespace in _QUANTIZED_NAMESPACES:
            return True
    return False


def single_channel_int8_convs(program: ExportedProgram) -> list[str]:
    """Module paths of the int8 convolutions with one input channel (not depthwise): with
    freezing, torch 2.13's Inductor lowers them to wrong results (a digits CNN's stem:
    cosine 0.44 to the program's outputs), while wider ones agree to 1e-7."""
    import torch

    found = []
    for node in program.graph.nodes:
        target = node.target
        if not isinstance(target, torch._ops.OpOverload) or "conv" not in target._opname:
            continue
        weight = node.args[1] if len(node.args) > 1 else None
        is_int8 = isinstance(weight, torch.fx.Node) and "dequantize" in str(weight.target)
        value = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
        groups = node.args[-1] if target._opname == "conv2d" and len(node.args) > 6 else 1
        if is_int8 and value is not None and value.ndim >= 3 and value.shape[1] == 1 == groups:
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            found.append(str(stack[-1][0]) if stack else node.name)
    return found


def quantization_of(program: ExportedProgram) -> str | None:
    """``"dynamic"`` (activation scales chosen at run time: ``choose_qparams`` ops),
    ``"static"`` (other quantize-dequantize ops), or None for a float program."""
    import torch

    if not is_quantized(program):
        return None
    for node in program.graph.nodes:
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and "choose_qparams" in target._opname:
            return "dynamic"
    return "static"


def compile_options(quantization: str | None) -> dict[str, Any]:
    """Inductor's options for a program of this :func:`quantization_of` (see the module
    docstring for the figures)."""
    options: dict[str, Any] = {"freezing": True, "aot_inductor.enable_line_tables": False}
    if quantization == "static":
        options.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")
    return options


def build_record(options: dict[str, Any], threads: int) -> dict[str, Any]:
    """What the package needs where it is loaded: torch, the CPU and the options."""
    import torch
    from torch._inductor import cpu_vec_isa

    from worker.hardware import worker_cpu

    cpu = worker_cpu()
    return {
        "torch_version": torch.__version__,
        "instruction_set": str(cpu_vec_isa.pick_vec_isa()) or "none",
        "machine": cpu.arch,
        "cpu": cpu.name,
        "cpu_instruction_sets": list(cpu.instruction_sets),
        "march": "native",
        "threads": threads,
        "options": options,
    }


def compile_program(
    program: ExportedProgram,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    reporter: Reporter | None = None,
    *,
    timeout_s: float = COMPILE_TIMEOUT_S,
) -> LoadedModel:
    """The program compiled into a package, as an ``aoti`` model (file in a temporary
    folder that lives as long as the model does).

    Raises:
        MethodFailedError: the compiler failed (its reason, shortened) or ran out of time.
        JobCancelled: the reporter's progress call raised it (the compile is killed).
    """
    import torch

    options = compile_options(quantization_of(program))
    build = build_record(options, torch.get_num_threads())
    folder = Path(tempfile.mkdtemp(prefix="squish-aoti-"))
    source = folder / "program.pt2"
    package = folder / "model.aoti.pt2"
    signature = {"inputs": [s.to_dict() for s in inputs], "outputs": [s.to_dict() for s in outputs]}
    try:
        torch.export.save(program, str(source))
        command = [
            sys.executable, "-m", COMPILE_MODULE, "--program", str(source),
            "--package", str(package), "--threads", str(build["threads"]),
            "--options", json.dumps(options),
            "--metadata", json.dumps({SIGNATURE_KEY: signature, BUILD_KEY: build}),
        ]  # fmt: skip
        seconds = _run_bounded(command, timeout_s, reporter)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    source.unlink(missing_ok=True)
    build["compile_seconds"] = round(seconds, 3)
    model = LoadedModel(ModelFormat.aoti, inputs, outputs, package=package, build=build)
    weakref.finalize(model, shutil.rmtree, folder, True)
    return model


def _run_bounded(command: list[str], timeout_s: float, reporter: Reporter | None) -> float:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while child.poll() is None:
                elapsed = time.monotonic() - started
                if elapsed > timeout_s:
                    raise MethodFailedError(
                        f"compiling with AOTInductor took over {timeout_s:.0f} s and was "
                        "stopped; use output_format 'onnx' or 'pt2' for this model",
                        step="convert",
                    )
                if reporter is not None:  # a cancelled job's progress call raises
                    reporter.progress(min(elapsed / _EXPECTED_S, 0.95), "convert")
                time.sleep(_POLL_S)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        log.seek(0)
        output = log.read()
    if child.returncode != 0:
        reason = _reason(output)
        if child.returncode < 0:
            signal_number = -child.returncode
            how = (
                "killed (signal 9: out of memory?)"
                if signal_number == 9
                else f"crashed (signal {signal_number}, inside torch or the compiler)"
            )
            reason = f"the compiling process {how}; its last words: {reason}"
        raise MethodFailedError(
            f"compiling with AOTInductor failed: {reason}; use output_format "
            "'onnx' or 'pt2' for this model, or remove the step whose ops the reason names",
            step="convert",
        )
    return time.monotonic() - started


def _reason(output: str) -> str:
    """The compiler's last error line, without its traceback (a crash: its exit)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error:" in line:
            return line[:400]
    return lines[-1][:400] if lines else "the compiler exited without a message"


def load_package(path: Path) -> LoadedModel:
    """A package squish compiled: its signature and build record from its metadata."""
    compiled = _load_compiled(path)
    metadata = compiled.get_metadata()
    try:
        signature = json.loads(metadata[SIGNATURE_KEY])
        build = json.loads(metadata.get(BUILD_KEY, "{}"))
    except (KeyError, ValueError) as exc:
        raise InvalidModelError(
            "the AOTInductor package was not made by squish (no signature in its metadata)",
            step="load",
        ) from exc

    def spec(entry: dict[str, Any]) -> TensorSpec:
        return TensorSpec(entry["name"], tuple(entry["shape"]), entry["dtype"])

    build = {**build, "aoti_cpu_isa": metadata.get("AOTI_CPU_ISA")}
    return LoadedModel(
        ModelFormat.aoti,
        [spec(e) for e in signature["inputs"]],
        [spec(e) for e in signature["outputs"]],
        package=Path(path),
        build=build,
    )


def _load_compiled(path: Path, device_index: int = -1) -> Any:
    import torch

    try:
        return torch._inductor.aoti_load_package(str(path), device_index=device_index)
    except EngineError:
        raise
    except Exception as exc:  # the loader raises RuntimeError and friends
        raise InvalidModelError(
            f"could not load the AOTInductor package: {type(exc).__name__}: {exc}", step="load"
        ) from exc


class AotiBackend:
    """The aoti format (see the module docstring)."""

    format = ModelFormat.aoti

    def load(self, path: Path) -> LoadedModel:
        return load_package(path)

    def save(self, model: LoadedModel, path: Path) -> None:
        """The package file, copied."""
        if model.package is None:
            raise UnsupportedError("this aoti model has no compiled package", step="save")
        if Path(model.package).resolve() != Path(path).resolve():
            shutil.copyfile(model.package, path)

    def layer_counts(self, model: LoadedModel) -> Counter[str]:
        return Counter()

    def layer_names(self, model: LoadedModel) -> list[str]:
        return []

    def describe(self, model: LoadedModel) -> dict[str, Any]:
        return {"build": model.build}

    def weight_arrays(self, model: LoadedModel) -> dict[str, np.ndarray]:
        raise WeightsUnreadable(WEIGHTS_UNREADABLE)

    def weight_shapes(self, model: LoadedModel) -> dict[str, tuple[int, ...]]:
        raise WeightsUnreadable(WEIGHTS_UNREADABLE)

    def vocab_size(self, model: LoadedModel) -> int | None:
        return None

    def runner(self, model: LoadedModel, path: Path, device: str) -> Runner:
        import torch

        target = torch_device(device)
        if target.type != "cpu":
            raise UnsupportedError("aoti packages are compiled for the worker's CPU", step="run")
        compiled = _load_compiled(path)
        names = [s.name for s in model.inputs]

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            args = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in names]
            with torch.inference_mode():
                result = compiled(*args)
            leaves = torch.utils._pytree.tree_leaves(result)
            return [tensor_to_numpy(t) for t in leaves if isinstance(t, torch.Tensor)]

        return run


# -- the compiling process ---------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Compile a saved program into a package (run by :func:`compile_program`)."""
    parser = argparse.ArgumentParser(prog=f"python -m {COMPILE_MODULE}", description=__doc__)
    parser.add_argument("--program", type=Path, required=True)
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--options", required=True, help="Inductor options, JSON")
    parser.add_argument("--metadata", required=True, help="JSON of JSON values to record")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)  # the kernels are generated for this many threads
    from worker.formats.pt2 import load_pt2_program

    program = load_pt2_program(args.program)
    options = json.loads(args.options)
    metadata = {key: json.dumps(value) for key, value in json.loads(args.metadata).items()}
    options["aot_inductor.metadata"] = metadata
    with torch.no_grad():  # freezing runs only without autograd
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(args.package), inductor_configs=options
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
