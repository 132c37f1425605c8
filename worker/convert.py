"""Converting the pipeline's model to another output format: ``pt2`` or ``hf`` → ``onnx``
or ``aoti``.

A job whose ``output_format`` differs from its model's format is converted once, with
``torch.onnx.export(..., dynamo=True, external_data=False)`` into one self-contained
``.onnx`` file, keeping every dynamic dim of the input (pt2: the program's own symbolic
dims; hf: ``batch`` and ``sequence`` of ``input_ids``/``attention_mask``/``token_type_ids``).

Where the conversion happens (:func:`step_formats`): after the steps that need PyTorch
(pruning, distillation, fine-tuning ...), before a trailing run of quantization steps
that ONNX Runtime can do (``quantize.*`` methods that accept ``onnx``). Those run on the
converted model, in ONNX Runtime, because

- their point is ONNX Runtime's int8 kernels, which only an ONNX-side quantization
  (``DynamicQuantizeLinear`` + ``MatMulInteger``, QDQ) gives the artifact, and
- a pt2 program quantized with torchao PT2E does not convert: its
  ``quantized_decomposed`` ops (``choose_qparams`` ...) have no ONNX export; an hf
  model cannot be quantized dynamically in PyTorch and still be saved as safetensors
  for ``from_pretrained``.

So ``prune.magnitude → quantize.dynamic`` with ``output_format: onnx`` on a pt2 model
prunes the program, converts it, and quantizes the ONNX model with ONNX Runtime. Any
other step must accept the input format; a quantization step followed by a PyTorch step
runs in PyTorch, and if the quantized program then cannot be converted the job fails
with a message that says to move the quantization to the end. The API applies the same
rule at ``POST /v1/jobs``: the policy itself is :mod:`worker.spec`'s (``step_formats``).

``aoti`` is the other way round: every step runs in PyTorch (a PT2E-quantized program is
what Inductor lowers to its int8 kernels), then the program (an hf model: exported with
``torch.export``, ``batch`` and ``sequence`` dynamic, by :func:`export_hf` before the first
step that takes programs only, or else after the last step) is compiled once by
:func:`worker.formats.aoti.compile_program`, its dynamic dims kept, and the package is
checked against the source on the sample inputs (the max abs error is logged), also at a
second size of every dynamic dim.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.contract import FORMATS, ModelFormat, conversion_problem
from worker.errors import EngineError, UnsupportedError
from worker.spec import format_problem, runs_after_conversion, step_formats

if TYPE_CHECKING:
    import torch

    from worker.context import Reporter
    from worker.formats import LoadedModel
    from worker.schemas import Conversion

_CHECK_SAMPLES = 8
COMPILED_MIN_COSINE = 0.99
"""Below this cosine to the source's outputs (int8 kernels against the reference ops they
replace agree to 0.9999 and more), a compiled package is wrong, not approximate."""


def convert(
    model: LoadedModel,
    output_format: str,
    *,
    feeds: dict[str, np.ndarray] | None = None,
    reporter: Reporter | None = None,
) -> LoadedModel:
    """The model in ``output_format`` (``onnx``, ``aoti``), checked against the source on
    ``feeds``.

    Args:
        model: a pt2 or hf model.
        output_format: ``"onnx"`` or ``"aoti"``.
        feeds: sample inputs (by input name) to trace an hf model with and to compare the
            converted model's outputs with the source's; generated from the signature
            when None.
        reporter: gets a log line with the conversion's max abs error (and, compiling,
            progress calls, which raise JobCancelled for a cancelled job).

    Raises:
        UnsupportedError: the conversion is not supported, or the exporter failed (the
            message names the operator it could not convert and what to change).
        MethodFailedError: AOTInductor failed to compile the program, or timed out.
    """
    problem = conversion_problem(model.format, output_format)
    if problem is not None:
        raise UnsupportedError(problem, step="convert")
    if model.format == output_format:
        return model
    return _CONVERTERS[ModelFormat(output_format)](model, _check_sample(model, feeds), reporter)


def export_hf(
    model: LoadedModel,
    *,
    feeds: dict[str, np.ndarray] | None = None,
    reporter: Reporter | None = None,
) -> LoadedModel:
    """The hf model as a pt2 program, for the steps of an aoti job that take programs
    (:data:`worker.spec.EXPORTED_FOR`): ``torch.export`` of the transformers module itself,
    so its inputs keep the hf input names and its weights the module paths (``exclude``
    names the same layers), ``batch`` and ``sequence`` dynamic; checked against the module
    on ``feeds`` (as :func:`convert`).

    Raises:
        UnsupportedError: torch.export cannot export the model, or the program computes
            something else.
    """
    import time

    from worker.formats import pt2_model_from_program

    started = time.monotonic()
    sample = _check_sample(model, feeds)
    exported = pt2_model_from_program(_hf_program(model, sample))
    expected = _source_outputs(model, sample)
    error = _worst_difference(expected, _source_outputs(exported, sample), "exported program")
    if reporter is not None:
        reporter.log(
            f"exported the hf model to a torch.export program in "
            f"{time.monotonic() - started:.1f}s for the steps that take programs; max abs "
            f"error vs the hf model on {len(next(iter(sample.values())))} samples: {error:.3g}",
            data={"max_abs_error": error},
        )
    return exported


def _check_sample(model: LoadedModel, feeds: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The inputs a conversion is traced with and checked on: ``feeds`` (or inputs
    generated from the signature), a static batch at its size, a dynamic one with 2..8 rows
    (1 would specialize it)."""
    from worker.formats import cast_feeds, generate_inputs

    sample = cast_feeds(model, feeds if feeds is not None else generate_inputs(model, batch=2))
    rows = len(next(iter(sample.values())))
    batch = model.static_batch or min(max(rows, 2), _CHECK_SAMPLES)
    return {k: np.resize(v, (batch, *v.shape[1:])).astype(v.dtype) for k, v in sample.items()}


def conversion_figures(converted: LoadedModel, seconds: float) -> Conversion:
    """``metrics.conversion`` for a model that ``convert`` made in ``seconds``."""
    from worker.schemas import CompileFigures, Conversion

    fmt = ModelFormat(converted.format)
    compiled = CompileFigures.model_validate(converted.build) if converted.build else None
    return Conversion(format=fmt, runtime=FORMATS[fmt].runtime, seconds=seconds, compiled=compiled)


def _to_onnx(
    model: LoadedModel, sample: dict[str, np.ndarray], reporter: Reporter | None
) -> LoadedModel:
    converted = _hf_to_onnx(model, sample) if model.format == "hf" else _pt2_to_onnx(model)
    _check_dynamic_dims(model, converted)
    error = _max_abs_error(model, converted, sample)
    if reporter is not None:
        reporter.log(
            f"converted the {model.format} model to ONNX (torch.onnx.export, dynamo); max abs "
            f"error vs the {model.format} model on {len(next(iter(sample.values())))} "
            f"samples: {error:.3g}",
            data={"max_abs_error": error},
        )
    return converted


def _to_aoti(
    model: LoadedModel, sample: dict[str, np.ndarray], reporter: Reporter | None
) -> LoadedModel:
    from worker.errors import MethodFailedError
    from worker.formats.aoti import compile_program, single_channel_int8_convs

    program = _hf_program(model, sample) if model.format == "hf" else model.program
    assert program is not None
    compiled = compile_program(program, model.inputs, model.outputs, reporter)
    error, cosine = _compiled_error(model, compiled, sample)
    rows = len(next(iter(sample.values())))
    if cosine < COMPILED_MIN_COSINE:  # a wrong lowering must not pass as a fast model
        hint = ""
        convs = single_channel_int8_convs(program)
        if convs:
            hint = (
                f"; its int8 convolutions with a single input channel ({', '.join(convs)}) "
                f"are miscompiled by this torch's Inductor with freezing: keep them float "
                f'with the quantization step\'s exclude, e.g. "exclude": {json.dumps(convs)}'
            )
        raise MethodFailedError(
            f"the compiled package computes something else than the {model.format} model "
            f"(cosine {cosine:.4f} of their outputs on {rows} samples){hint}; otherwise use "
            "output_format 'onnx' or 'pt2' for this model",
            step="convert",
        )
    if reporter is not None:
        build = compiled.build
        reporter.log(
            f"compiled the {model.format} model with AOTInductor in "
            f"{build['compile_seconds']:.1f}s for {build['instruction_set']} "
            f"(torch {build['torch_version']}, {build['threads']} threads); max abs error vs "
            f"the {model.format} model on {rows} samples: {error:.3g} (cosine {cosine:.6f})",
            data={"max_abs_error": error, "cosine_similarity": cosine, **build},
        )
    return compiled


def _hf_program(model: LoadedModel, sample: dict[str, np.ndarray]) -> Any:
    """The hf model as an ExportedProgram of its text inputs, by their names, returning the
    one output squish measures (``logits`` or ``last_hidden_state``), batch and sequence
    dynamic. The module itself is exported (its ``forward`` swapped for the time of the
    export), so the program's weights keep the module's paths."""
    import inspect

    import torch

    module = model.module
    assert module is not None
    names = [s.name for s in model.inputs]
    output = _hf_output_name(model)
    inner = module.forward

    def forward(*inputs: torch.Tensor) -> torch.Tensor:
        return getattr(inner(**dict(zip(names, inputs, strict=True))), output)

    # torch.export names the program's inputs after the signature's parameters.
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, kind) for name in names]
    )
    args = tuple(torch.from_numpy(np.ascontiguousarray(sample[name])) for name in names)
    batch, sequence = _hf_dims(model)
    module.eval()
    module.forward = forward  # type: ignore[method-assign]
    try:
        program = torch.export.export(
            module, args, dynamic_shapes=tuple({0: batch, 1: sequence} for _ in names)
        )
    except Exception as exc:  # export raises many types
        raise UnsupportedError(
            f"torch.export could not export the hf model: {type(exc).__name__}: {str(exc)[:400]}",
            step="convert",
        ) from exc
    finally:
        del module.forward  # the class's forward again
    # What feeds only the outputs left out (BERT's pooler beside last_hidden_state) is dead
    # code; torchao's x86 quantizer fails on a Linear whose output nothing reads.
    program.graph.eliminate_dead_code()
    program.graph_module.recompile()
    return program


def _hf_dims(model: LoadedModel) -> tuple[Any, Any]:
    import torch

    assert model.module is not None
    positions = getattr(model.module.config, "max_position_embeddings", None)
    batch = torch.export.Dim("batch")
    if isinstance(positions, int) and positions > 1:
        return batch, torch.export.Dim("sequence", max=positions)
    return batch, torch.export.Dim("sequence")


def _compiled_error(
    source: LoadedModel, compiled: LoadedModel, sample: dict[str, np.ndarray]
) -> tuple[float, float]:
    """Run the package on the sample against the source (max abs error, cosine of the
    flattened outputs); then at a second size of every dynamic dim, which a package that
    specialized one refuses."""
    from worker.formats import backend_for

    assert compiled.package is not None
    run = backend_for(compiled.format).runner(compiled, compiled.package, "cpu")
    try:
        actual = run(sample)
    except Exception as exc:  # the package's own run errors
        raise UnsupportedError(
            f"the compiled package cannot run the sample inputs: {type(exc).__name__}: {exc}",
            step="convert",
        ) from exc
    grown = _grown(source, sample)
    if grown is not None:
        try:
            run(grown)
        except Exception as exc:
            raise UnsupportedError(
                "the compiled package lost a dynamic dim of the model's inputs (it refuses "
                f"{ {k: list(v.shape) for k, v in grown.items()} }): {str(exc)[:300]}",
                step="convert",
            ) from exc
    expected = _source_outputs(source, sample)
    worst = _worst_difference(expected, actual, "compiled package")
    a = np.concatenate([np.ravel(x).astype(np.float64) for x in expected])
    b = np.concatenate([np.ravel(x).astype(np.float64) for x in actual])
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(a @ b / norms) if norms > 0 else float(np.array_equal(a, b))
    return worst, cosine


def _grown(source: LoadedModel, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The sample one longer along every dynamic dim (edge values repeated); None if none."""
    grown, any_dynamic = {}, False
    for spec in source.inputs:
        widths = [(0, 1 if spec.is_dynamic(axis) else 0) for axis in range(spec.rank)]
        any_dynamic = any_dynamic or any(w for _, w in widths)
        grown[spec.name] = np.pad(sample[spec.name], widths, mode="edge")
    return grown if any_dynamic else None


_CONVERTERS: dict[
    ModelFormat, Callable[[LoadedModel, dict[str, np.ndarray], Reporter | None], LoadedModel]
] = {ModelFormat.onnx: _to_onnx, ModelFormat.aoti: _to_aoti}


def _export_failed(model: LoadedModel, exc: Exception) -> UnsupportedError:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # the exporter's messages are colored
    hint = ""
    if "quantized_decomposed" in text or "torchao" in text:
        hint = (
            " The program holds PyTorch-quantized ops, which ONNX cannot express: with "
            "output_format 'onnx', put the quantization steps at the end of the pipeline so "
            "that they run in ONNX Runtime on the converted model."
        )
    lines = [line for line in text.splitlines() if "Exception summary" not in line]
    summary = next(
        (line.strip() for line in lines if "No ONNX function" in line or "Error" in line),
        lines[0] if lines else type(exc).__name__,
    )
    return UnsupportedError(
        f"converting the {model.format} model to ONNX failed: {summary[:500]}.{hint}",
        step="convert",
    )


def _pt2_to_onnx(model: LoadedModel) -> LoadedModel:
    import torch

    from worker.formats import onnx_model_from_proto

    assert model.program is not None
    try:
        exported = torch.onnx.export(
            model.program,
            dynamo=True,
            input_names=[s.name for s in model.inputs],
            output_names=[s.name for s in model.outputs],
            external_data=False,
            verbose=False,
        )
    except Exception as exc:  # the exporter raises many types
        raise _export_failed(model, exc) from exc
    assert exported is not None
    return onnx_model_from_proto(_checked_proto(exported.model_proto))


def _hf_to_onnx(model: LoadedModel, sample: dict[str, np.ndarray]) -> LoadedModel:
    import torch

    from worker.formats import onnx_model_from_proto

    module = model.module
    assert module is not None
    names = [s.name for s in model.inputs]
    wrapper = _hf_forward_module(model, names).eval()
    batch, sequence = _hf_dims(model)
    args = tuple(torch.from_numpy(np.ascontiguousarray(sample[name])) for name in names)
    was_training = module.training
    module.eval()
    try:
        exported = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            input_names=names,
            output_names=[s.name for s in model.outputs],
            dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in names),),
            external_data=False,
            verbose=False,
        )
    except Exception as exc:  # the exporter raises many types
        raise _export_failed(model, exc) from exc
    finally:
        module.train(was_training)
    assert exported is not None
    return onnx_model_from_proto(_checked_proto(exported.model_proto))


def _hf_output_name(model: LoadedModel) -> str:
    return "logits" if model.task == "sequence-classification" else "last_hidden_state"


def _hf_forward_module(model: LoadedModel, names: list[str]) -> torch.nn.Module:
    """The transformers model called with positional text inputs, returning one tensor."""
    import torch

    output = _hf_output_name(model)

    class HFForward(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            result = self.inner(**dict(zip(names, inputs, strict=True)))
            return getattr(result, output)

    assert model.module is not None
    return HFForward(model.module)


def _strip_export_metadata(proto: Any) -> None:
    """Drop the exporter's per-node debug metadata (Python stack traces, module paths).

    It says where the worker's files live, and for a small model it is most of the file.
    """
    import onnx

    graphs = [proto.graph]
    nodes = [node for function in proto.functions for node in function.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            nodes.extend(graph.node)
            continue
        node = nodes.pop()
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                graphs.append(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                graphs.extend(attr.graphs)


def _checked_proto(proto: Any) -> Any:
    import onnx

    _strip_export_metadata(proto)
    if proto.ByteSize() >= 2**31:
        raise UnsupportedError(
            "the converted ONNX model is over 2 GiB, which needs external data files; "
            "not supported",
            step="convert",
        )
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise UnsupportedError(
            f"the converted ONNX model is invalid: {exc}", step="convert"
        ) from exc
    return proto


def _check_dynamic_dims(source: LoadedModel, converted: LoadedModel) -> None:
    by_name = {s.name: s for s in converted.inputs}
    for spec in source.inputs:
        other = by_name.get(spec.name)
        if other is None or other.rank != spec.rank:
            raise UnsupportedError(
                f"the converted ONNX model lost input {spec.name!r} ({spec.describe()}); "
                f"it takes {[s.describe() for s in converted.inputs]}",
                step="convert",
            )
        for axis in range(spec.rank):
            if spec.is_dynamic(axis) and not other.is_dynamic(axis):
                raise UnsupportedError(
                    f"the converted ONNX model lost dynamic dim {axis} of input {spec.name!r}",
                    step="convert",
                )


def _source_outputs(source: LoadedModel, sample: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The pt2 or hf model's outputs on the sample, run eagerly."""
    import torch
    from torch.utils import _pytree as pytree

    from worker.formats import _tensor_to_numpy, hf_output

    with torch.inference_mode():
        if source.format == "hf":
            assert source.module is not None
            tensors = {k: torch.from_numpy(v) for k, v in sample.items()}
            return [_tensor_to_numpy(hf_output(source, source.module(**tensors)))]
        assert source.program is not None
        flat = [torch.from_numpy(sample[s.name]) for s in source.inputs]
        args, kwargs = pytree.tree_unflatten(flat, source.program.call_spec.in_spec)
        leaves = pytree.tree_leaves(source.program.module()(*args, **kwargs))
        return [_tensor_to_numpy(t) for t in leaves if isinstance(t, torch.Tensor)]


def _max_abs_error(
    source: LoadedModel, converted: LoadedModel, sample: dict[str, np.ndarray]
) -> float:
    """Run both on the sample (torch eagerly, the ONNX model in ONNX Runtime) and compare."""
    import onnxruntime as ort

    expected = _source_outputs(source, sample)
    assert converted.proto is not None
    try:
        session = ort.InferenceSession(
            converted.proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        actual = session.run(None, {s.name: sample[s.name] for s in converted.inputs})
    except EngineError:
        raise
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        raise UnsupportedError(
            f"ONNX Runtime cannot run the converted model: {exc}", step="convert"
        ) from exc
    return _worst_difference(expected, actual, "converted model")


def _worst_difference(expected: list[np.ndarray], actual: list[Any], what: str) -> float:
    if len(actual) != len(expected):
        raise UnsupportedError(
            f"the {what} has {len(actual)} outputs, the source {len(expected)}",
            step="convert",
        )
    worst = 0.0
    for ref, got in zip(expected, actual, strict=True):
        if ref.shape != np.shape(got):
            raise UnsupportedError(
                f"the {what}'s output shape {list(np.shape(got))} differs from the "
                f"source's {list(ref.shape)}",
                step="convert",
            )
        diff = np.abs(ref.astype(np.float64) - np.asarray(got, dtype=np.float64))
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


__all__ = [
    "conversion_problem",
    "convert",
    "format_problem",
    "runs_after_conversion",
    "step_formats",
]
