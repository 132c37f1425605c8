"""onnx: a single self-contained ``.onnx`` file, run with ONNX Runtime.

Checked by :mod:`worker.safety.onnx` (external data is refused: its paths would point at
files on the worker; ``onnx.checker`` must accept the model). It runs in an
``onnxruntime.InferenceSession`` (CPU provider, or CUDA for ``gpu``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.contract import ModelFormat
from worker.errors import InvalidModelError, MethodFailedError, UnsupportedError
from worker.formats.base import Runner, refused
from worker.formats.types import LoadedModel, TensorSpec, is_fixed_size
from worker.safety import NotThisFormat, Unsafe
from worker.safety import onnx as onnx_safety

if TYPE_CHECKING:
    import onnx

MAX_PROTO_BYTES = 2**31
"""Protobuf's limit: a larger model needs external data files, which squish refuses."""


def load_onnx_proto(path: Path) -> onnx.ModelProto:
    """Load a single-file ONNX model and check it (worker.safety's ONNX rules)."""
    with refused():
        try:
            return onnx_safety.check_onnx_file(path)
        except NotThisFormat as exc:
            raise onnx_safety.not_onnx(exc) from None


def _onnx_value_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    import onnx

    ttype = value.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)).name
    except (KeyError, TypeError, ValueError):
        dtype = onnx.TensorProto.DataType.Name(ttype.elem_type).lower()
    shape: list[int | str] = []
    for i, dim in enumerate(ttype.shape.dim):
        if dim.HasField("dim_value") and is_fixed_size(dim.dim_value):
            shape.append(int(dim.dim_value))
        else:
            shape.append(dim.dim_param or f"{value.name}_dim{i}")
    return TensorSpec(value.name, tuple(shape), dtype)


def onnx_model_from_proto(proto: onnx.ModelProto) -> LoadedModel:
    """Wrap a ModelProto; graph inputs that are initializers are not model inputs."""
    initializer_names = {t.name for t in proto.graph.initializer}
    inputs = [_onnx_value_spec(v) for v in proto.graph.input if v.name not in initializer_names]
    outputs = [_onnx_value_spec(v) for v in proto.graph.output]
    return LoadedModel(ModelFormat.onnx, inputs, outputs, proto=proto)


_WEIGHT_DTYPES = frozenset(
    {"float16", "bfloat16", "float32", "float64", "int8", "uint8", "int4", "uint4"}
)


_ONNX_QUANT_METADATA_INPUTS: dict[str, tuple[int, ...]] = {
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
    "MatMulInteger": (2, 3),
    "ConvInteger": (2, 3),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "QLinearConv": (1, 2, 4, 5, 6, 7),
    "DynamicQuantizeMatMul": (2, 3),
    "MatMulIntegerToFloat": (2, 3, 4, 5),
}


def _constant_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """The tensors of the graph's ``Constant`` nodes (named as their outputs): where
    paddle2onnx and other exporters keep weights instead of initializers."""
    tensors = []
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.HasField("t"):
                tensor = type(attr.t)()
                tensor.CopyFrom(attr.t)
                tensor.name = node.output[0]
                tensors.append(tensor)
    return tensors


def onnx_weight_tensors(model: LoadedModel) -> list[onnx.TensorProto]:
    """Float and 8-bit tensors the graph holds, as initializers or ``Constant`` nodes,
    except quantization metadata."""
    import onnx

    assert model.proto is not None
    graph = model.proto.graph
    metadata: set[str] = set()
    dql_scales = {n.output[1] for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
    for node in graph.node:
        for index in _ONNX_QUANT_METADATA_INPUTS.get(node.op_type, ()):
            if index < len(node.input):
                metadata.add(node.input[index])
        if node.op_type == "Mul" and any(i in dql_scales for i in node.input):
            metadata.update(node.input)
    weights = []
    for tensor in [*graph.initializer, *_constant_tensors(graph)]:
        if tensor.name in metadata:
            continue
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).name
        except (KeyError, TypeError, ValueError):
            dtype = onnx.TensorProto.DataType.Name(tensor.data_type).lower()
        if dtype in _WEIGHT_DTYPES:
            weights.append(tensor)
    return weights


# Nodes a weight passes through on its way to the layer that uses it.
_WEIGHT_PASS_THROUGH = frozenset(
    {"Transpose", "Identity", "Cast", "Reshape", "DequantizeLinear", "Constant"}
)


def onnx_weight_layers(model: LoadedModel) -> dict[str, str]:
    """Each weight tensor's layer: the first named node that reads it, directly or through
    :data:`_WEIGHT_PASS_THROUGH` nodes (a transpose, a dequantize)."""
    assert model.proto is not None
    weights = {t.name for t in onnx_weight_tensors(model)}
    graph = model.proto.graph
    producers = {out: node for node in graph.node for out in node.output}

    def origin(name: str) -> str | None:
        for _ in range(4):
            if name in weights:
                return name
            node = producers.get(name)
            if node is None or node.op_type not in _WEIGHT_PASS_THROUGH or not node.input:
                return None
            name = node.input[0]
        return None

    layers: dict[str, str] = {}
    for node in graph.node:
        if not node.name or node.op_type in _WEIGHT_PASS_THROUGH:
            continue
        for name in node.input:
            weight = origin(name) if name else None
            if weight is not None:
                layers.setdefault(weight, node.name)
    return layers


class OnnxBackend:
    """The onnx format (see the module docstring)."""

    format = ModelFormat.onnx

    def load(self, path: Path) -> LoadedModel:
        return onnx_model_from_proto(load_onnx_proto(path))

    def save(self, model: LoadedModel, path: Path) -> None:
        """One file, ``onnx.save``; refused over protobuf's 2 GiB."""
        import onnx

        assert model.proto is not None
        if model.proto.ByteSize() >= MAX_PROTO_BYTES:
            raise UnsupportedError(
                "the ONNX model is over 2 GiB, which needs external data files; not supported",
                step="save",
            )
        onnx.save(model.proto, str(path))

    def layer_counts(self, model: LoadedModel) -> Counter[str]:
        """Node op types (``domain.op_type`` outside the default domain)."""
        assert model.proto is not None
        counts: Counter[str] = Counter()
        for node in model.proto.graph.node:
            counts[node.op_type if not node.domain else f"{node.domain}.{node.op_type}"] += 1
        return counts

    def layer_names(self, model: LoadedModel) -> list[str]:
        """Names of the nodes that read a weight (what ONNX Runtime's ``nodes_to_exclude``
        takes), in graph order; unnamed nodes cannot be named."""
        return list(dict.fromkeys(onnx_weight_layers(model).values()))

    def describe(self, model: LoadedModel) -> dict[str, Any]:
        return {}

    def weight_arrays(self, model: LoadedModel) -> dict[str, np.ndarray]:
        from onnx import numpy_helper

        return {t.name: numpy_helper.to_array(t) for t in onnx_weight_tensors(model)}

    def weight_shapes(self, model: LoadedModel) -> dict[str, tuple[int, ...]]:
        """Float and 8-bit tensors, initializers or ``Constant`` nodes, except quantization
        metadata: scales and zero points of quantize/dequantize and integer matmul/conv ops,
        and the weight scales ONNX Runtime multiplies after an integer matmul."""
        return {t.name: tuple(t.dims) for t in onnx_weight_tensors(model)}

    def vocab_size(self, model: LoadedModel) -> int | None:
        return None

    def runner(self, model: LoadedModel, path: Path, device: str) -> Runner:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device == "gpu":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UnsupportedError(
                    "device 'gpu' requested but onnxruntime on this worker has no CUDA provider"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise InvalidModelError(
                f"ONNX Runtime cannot load the model: {exc}", step="load"
            ) from exc

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            return [np.asarray(o) for o in session.run(None, feeds)]

        return run


# --- what exporters write, normalized; what methods write, checked ----------------------

QDQ_PER_CHANNEL_OPSET = 13
"""``DequantizeLinear``'s ``axis`` (one scale per channel) exists from opset 13 on."""

_CHECK_BATCH = 2
_RTOL = 1e-4


def default_opset(proto: onnx.ModelProto) -> int:
    """The version of the default (``ai.onnx``) operator set the model imports."""
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def _subgraphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                found += _subgraphs(sub)
    return found


def _constant_count(proto: onnx.ModelProto) -> int:
    return sum(len(_constant_tensors(g)) for g in _subgraphs(proto.graph))


def _lift_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Tensor ``Constant`` nodes as initializers, with onnx-ir's own pass."""
    import onnx_ir as ir
    from onnx_ir.passes.common import (
        AddInitializersToInputsPass,
        LiftConstantsToInitializersPass,
    )

    model = ir.from_proto(proto)
    model = LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model).model
    if proto.ir_version < 4:  # before IR 4, every initializer must also be a graph input
        model = AddInitializersToInputsPass()(model).model
    return ir.to_proto(model)


def _session(proto: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _check_feeds(model: LoadedModel) -> dict[str, np.ndarray]:
    from worker.formats.inputs import generate_inputs

    return generate_inputs(model, batch=_CHECK_BATCH)


def _difference(reference: list[np.ndarray], other: list[np.ndarray]) -> str | None:
    """How two runs' outputs differ beyond float rounding, or None."""
    if len(reference) != len(other):
        return f"{len(other)} outputs instead of {len(reference)}"
    for index, (a, b) in enumerate(zip(reference, other, strict=True)):
        if a.shape != b.shape:
            return f"output {index} has shape {list(b.shape)} instead of {list(a.shape)}"
        if a.dtype.kind != "f":
            if not np.array_equal(a, b):
                return f"output {index} differs"
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        finite = np.isfinite(a64)
        if not np.array_equal(finite, np.isfinite(b64)):
            return f"output {index} has non-finite values where the other has none"
        scale = float(np.abs(a64[finite]).max()) if finite.any() else 0.0
        gap = float(np.abs(a64[finite] - b64[finite]).max()) if finite.any() else 0.0
        if gap > _RTOL * max(1.0, scale):
            return f"output {index} differs by up to {gap:.3g} (largest value {scale:.3g})"
    return None


def _signature_problem(proto: onnx.ModelProto, like: onnx.ModelProto) -> str | None:
    """Give ``proto``'s graph inputs and outputs the names, types and dims of ``like``'s;
    what cannot be given back (a missing name, another element type) is the problem."""
    initializers = {t.name for t in like.graph.initializer}
    for ours, theirs, what in (
        (proto.graph.input, like.graph.input, "input"),
        (proto.graph.output, like.graph.output, "output"),
    ):
        by_name = {v.name: v for v in ours}
        for value in theirs:
            if value.name in initializers:
                continue
            mine = by_name.get(value.name)
            if mine is None:
                return f"has no {what} {value.name!r} any more"
            if mine.type.tensor_type.elem_type != value.type.tensor_type.elem_type:
                return f"changed the element type of {what} {value.name!r}"
            mine.type.CopyFrom(value.type)
    return None


def normalize_onnx(
    model: LoadedModel,
    log: Any,
    *,
    step: str,
    min_opset: int | None = None,
    why: str = "",
) -> LoadedModel:
    """The model as ONNX's tools want it, computing the same outputs.

    - weights kept in ``Constant`` nodes (paddle2onnx) become initializers, with onnx-ir's
      ``LiftConstantsToInitializersPass``;
    - with ``min_opset``, an older default opset is upgraded with
      ``onnx.version_converter`` (``why`` says which method needs it);
    - a dim written ``-1`` or ``0`` needs no rewrite: it reads as dynamic
      (:func:`~worker.formats.types.is_fixed_size`).

    Nothing to do returns ``model`` itself. Otherwise the result keeps the inputs' and
    outputs' names, types and dims, must pass ``onnx.checker`` and compute the model's
    outputs on inputs generated from its signature; ``log`` (a reporter) gets what was
    done.

    Raises:
        MethodFailedError: a rewrite failed or changed the outputs; the model is not run
            further (``step`` is the error's step).
    """
    import onnx

    assert model.proto is not None
    proto, done = model.proto, []
    data: dict[str, Any] = {}
    constants = _constant_count(proto)
    if constants:
        try:
            proto = _lift_constants(proto)
        except Exception as exc:  # onnx-ir raises assorted types on graphs it cannot read
            raise MethodFailedError(
                f"onnx-ir could not lift the {constants} Constant-node tensors of this model "
                f"to initializers ({type(exc).__name__}: {exc}); re-export it with weights "
                "as initializers",
                step=step,
            ) from exc
        lifted = constants - _constant_count(proto)
        done.append(f"lifted {lifted} Constant-node tensors to initializers (onnx-ir)")
        data["constants_lifted"] = lifted
    opset = default_opset(proto)
    if min_opset is not None and opset < min_opset:
        try:
            proto = onnx.version_converter.convert_version(proto, min_opset)
        except Exception as exc:  # the converter raises RuntimeError or its own types
            raise MethodFailedError(
                f"{why or step} needs opset {min_opset}, and onnx.version_converter could "
                f"not upgrade this opset-{opset} model ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); export "
                f"the model at opset {min_opset} or later",
                step=step,
            ) from exc
        done.append(f"opset {opset} upgraded to {min_opset} (onnx.version_converter: {why})")
        data.update(opset_from=opset, opset_to=min_opset)
    if not done:
        return model
    failure = _signature_problem(proto, model.proto)
    if failure is None:
        try:
            onnx.checker.check_model(proto)
        except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
            failure = f"onnx.checker rejects it ({str(exc).strip().splitlines()[0]})"
    if failure is None:
        failure = _compare(model, proto, log)
    if failure is not None:
        raise MethodFailedError(
            f"normalizing the ONNX model ({'; '.join(done)}) did not give an equivalent "
            f"model: it {failure}; squish stops rather than compress a different model",
            step=step,
        )
    log.log(f"ONNX model normalized: {'; '.join(done)}; outputs checked equal", data=data)
    return onnx_model_from_proto(proto)


def _compare(model: LoadedModel, proto: onnx.ModelProto, log: Any) -> str | None:
    """How ``proto``'s outputs differ from ``model``'s on generated inputs, or None."""
    assert model.proto is not None
    feeds = _check_feeds(model)
    try:
        reference = [np.asarray(o) for o in _session(model.proto).run(None, feeds)]
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        log.log(
            "the normalized ONNX model's outputs were not compared: the model as uploaded "
            f"does not run on inputs generated from its signature ({type(exc).__name__})",
            "warning",
        )
        return None
    try:
        outputs = [np.asarray(o) for o in _session(proto).run(None, feeds)]
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        return f"does not run in ONNX Runtime ({str(exc).strip().splitlines()[0]})"
    difference = _difference(reference, outputs)
    return None if difference is None else f"computes different outputs: {difference}"


def validated_output(
    proto: onnx.ModelProto, source: LoadedModel, *, step: str, library: str, advice: str
) -> LoadedModel:
    """A method's ONNX output, checked as its user's stock tools will take it.

    Its inputs and outputs get ``source``'s names, types and dims back (quantizers'
    shape inference rewrites dims); then ``onnx.checker``, an ONNX Runtime session and one
    run on inputs generated from the signature must accept it. A run that fails is the
    method's only if ``source`` runs on the same inputs.

    Raises:
        MethodFailedError: the output is not a model stock tools load and run; the message
            names ``library`` (what wrote it) and ``advice`` (what to try) and says that
            the upload is not at fault.
    """
    problem = output_problem(proto, source)
    if problem is not None:
        raise MethodFailedError(
            f"{library} wrote an ONNX model that {problem}. The model given to {step} is "
            f"valid: this is a failure of {step} on it. {advice}",
            step=step,
        )
    return onnx_model_from_proto(proto)


def output_problem(proto: onnx.ModelProto, source: LoadedModel) -> str | None:
    """What stock tools reject in a method's output (see :func:`validated_output`)."""
    assert source.proto is not None
    problem = _signature_problem(proto, source.proto)
    if problem is not None:
        return problem
    try:
        onnx_safety.check_onnx_model(proto)
    except Unsafe as exc:
        return f"is refused: {exc.detail}"
    try:
        session = _session(proto)
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        return f"ONNX Runtime cannot load ({str(exc).strip().splitlines()[0]})"
    feeds = _check_feeds(source)
    try:
        session.run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        try:
            _session(source.proto).run(None, feeds)
        except Exception:  # the input model fails on these inputs too: not the method's doing
            return None
        return f"fails to run in ONNX Runtime ({str(exc).strip().splitlines()[0]})"
    return None
