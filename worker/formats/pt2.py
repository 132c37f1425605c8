"""pt2: a ``torch.export`` ExportedProgram saved with ``torch.export.save``.

Uploads are untrusted, and ``torch.export.load`` can unpickle, resolve ``torch.*``
callables as graph targets, and ``sympy.sympify`` (``eval``) symbolic-shape strings. The
loader therefore checks the archive first with :mod:`worker.safety.pt2` (the upload
check's rules: no pickled payload, no custom or opaque object, no compiled code, no legacy
layout, plain symbolic expressions only), loads it with ``torch.load`` forced to
``weights_only=True`` and unpickling refused, and then checks that every graph node calls
an operator, never an arbitrary Python callable. It runs eagerly:
``torch.export.load(...).module()`` under ``torch.inference_mode``.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.contract import ModelFormat
from worker.errors import EngineError, InvalidModelError, UnsupportedError
from worker.formats._torch import (
    decode_packed_weights,
    int8_weights,
    tensor_to_numpy,
    torch_device,
    torch_dtype_name,
)
from worker.formats.base import Runner, refused
from worker.formats.types import LoadedModel, TensorSpec
from worker.layers import layer_of
from worker.safety import pt2 as pt2_safety

if TYPE_CHECKING:
    import torch
    from torch.export import ExportedProgram


# Operators that touch the file system; a model has no business calling them.
_DENIED_OPS = frozenset({"aten::from_file", "aten::_save", "aten::save"})
_ALLOWED_OPERATOR_FNS = frozenset(
    {
        "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos",
        "abs", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert",
        "lshift", "rshift", "matmul", "truth", "index",
    }
)  # fmt: skip
_load_lock = threading.Lock()


def load_pt2_program(path: Path) -> ExportedProgram:
    """Load a ``.pt2`` upload without unpickling anything (see the module docstring)."""
    path = Path(path)
    with refused():
        ops_used = pt2_safety.check_pt2_file(path)
    import torch

    if "quantized_decomposed" in ops_used:
        import torch.ao.quantization.fx._decomposed
    if "torchao" in ops_used:
        import torchao  # noqa: F401  (registers torchao's ops)
    try:
        with _weights_only_unpickling():
            program = torch.export.load(str(path))
    except EngineError:
        raise
    except Exception as exc:
        raise InvalidModelError(
            f"could not load the pt2 archive: {type(exc).__name__}: {exc}", step="load"
        ) from exc
    _check_graph_targets(program)
    return program


class _NoUnpickling:
    """Stands in for the ``pickle`` module inside torch's archive reader during a load."""

    def __getattr__(self, name: str) -> Any:
        import pickle

        return getattr(pickle, name)

    @staticmethod
    def loads(*args: Any, **kwargs: Any) -> Any:
        raise InvalidModelError("the archive holds a pickled object; refused", step="load")


@contextlib.contextmanager
def _weights_only_unpickling() -> Iterator[None]:
    """Force ``torch.load(weights_only=True)`` and refuse object unpickling during a load.

    ``torch.export.load`` calls ``torch.load(..., weights_only=False)`` for pickled
    payloads and as a fallback for sample inputs; both go through this wrapper.
    """
    import torch
    from torch.export.pt2_archive import _package

    real_load = torch.load
    real_pickle_load_obj = torch._C._pickle_load_obj
    real_pickle = _package.pickle

    def weights_only_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("pickle_module", None)
        kwargs["weights_only"] = True
        return real_load(f, *args, **kwargs)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise InvalidModelError("the archive holds a TorchScript object; refused", step="load")

    with _load_lock:
        torch.load = weights_only_load  # type: ignore[assignment]
        torch._C._pickle_load_obj = refuse
        _package.pickle = _NoUnpickling()  # type: ignore[assignment]
        try:
            yield
        finally:
            torch.load = real_load
            torch._C._pickle_load_obj = real_pickle_load_obj
            _package.pickle = real_pickle


def _check_graph_targets(program: ExportedProgram) -> None:
    """Every node must call an operator: torch's deserializer resolves any ``torch.*`` name."""
    import math
    import operator

    import torch

    allowed_callables = {
        torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not,
        torch.sym_ite, torch.sym_sum, torch.sym_sqrt,
    }  # fmt: skip
    for gm in program.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op in ("call_method", "call_module"):
                raise InvalidModelError(
                    f"node {node.name} is a {node.op}, which an exported program never has",
                    step="load",
                )
            if node.op != "call_function":
                continue
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                if target._schema.name in _DENIED_OPS:
                    raise InvalidModelError(
                        f"node {node.name} calls {target._schema.name}, which reads or writes "
                        "files; refused",
                        step="load",
                    )
                continue
            if isinstance(target, torch._ops.HigherOrderOperator) or target in allowed_callables:
                continue
            module = getattr(target, "__module__", None)
            name = getattr(target, "__name__", "")
            if module in ("_operator", "operator") and name in _ALLOWED_OPERATOR_FNS:
                continue
            if module == "math" and getattr(math, name, None) is target:
                continue
            if getattr(operator, name, None) is target and name in _ALLOWED_OPERATOR_FNS:
                continue
            raise InvalidModelError(
                f"node {node.name} calls {target!r}, which is not an operator; refused",
                step="load",
            )


def pt2_model_from_program(program: ExportedProgram) -> LoadedModel:
    """Wrap an ExportedProgram, reading its user inputs and outputs from the graph."""
    import torch
    from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs: list[TensorSpec] = []
    hints: dict[str, int] = {}
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        if not isinstance(spec.arg, TensorArgument):
            raise UnsupportedError(
                f"model input {spec.arg} is not a tensor; only tensor inputs are supported",
                step="load",
            )
        val = placeholders[spec.arg.name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise InvalidModelError(f"input {spec.arg.name} has no tensor metadata", step="load")
        inputs.append(TensorSpec(spec.arg.name, _shape_of(val, hints), torch_dtype_name(val.dtype)))
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    flat_outputs = list(output_node.args[0])
    outputs: list[TensorSpec] = []
    for spec, arg in zip(program.graph_signature.output_specs, flat_outputs, strict=False):
        if spec.kind != OutputKind.USER_OUTPUT:
            continue
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        if isinstance(val, torch.Tensor):
            name = spec.arg.name if isinstance(spec.arg, TensorArgument) else str(arg)
            outputs.append(TensorSpec(name, _shape_of(val, hints), torch_dtype_name(val.dtype)))
    return LoadedModel(ModelFormat.pt2, inputs, outputs, program=program, dim_hints=hints)


def _shape_of(val: torch.Tensor, hints: dict[str, int]) -> tuple[int | str, ...]:
    import torch

    shape: list[int | str] = []
    for dim in val.shape:
        if isinstance(dim, torch.SymInt):
            name = str(dim)
            hint = dim.node.hint
            if hint is not None:
                hints.setdefault(name, int(hint))
            shape.append(name)
        else:
            shape.append(int(dim))
    return tuple(shape)


def _save_pt2_without_data(program: torch.export.ExportedProgram, path: Path) -> None:
    """``torch.export.save`` with the program's example inputs replaced by zeros of the
    same shapes and dtypes: a re-export traces with a few real samples (train or
    calibration data), and the user's data has no business inside the artifact."""
    import torch
    from torch.utils import _pytree

    examples = program.example_inputs
    if examples is not None:
        program.example_inputs = _pytree.tree_map(
            lambda v: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v, examples
        )
    try:
        torch.export.save(program, str(path))
    finally:
        if examples is not None:
            program.example_inputs = examples


def _weight_tensors(model: LoadedModel) -> dict[str, torch.Tensor]:
    program = model.program
    assert program is not None
    sig = program.graph_signature
    weights: dict[str, torch.Tensor] = {name: program.state_dict[name] for name in sig.parameters}
    others: dict[str, Any] = {}
    for name in sig.buffers:
        others[name] = program.state_dict.get(name, program.constants.get(name))
    for name in sig.lifted_tensor_constants:
        others[name] = program.constants.get(name)
    weights.update(int8_weights(others))
    return decode_packed_weights(weights, others)


class Pt2Backend:
    """The pt2 format (see the module docstring)."""

    format = ModelFormat.pt2

    def load(self, path: Path) -> LoadedModel:
        return pt2_model_from_program(load_pt2_program(path))

    def save(self, model: LoadedModel, path: Path) -> None:
        """``torch.export.save``, with the example inputs zeroed."""
        assert model.program is not None
        _save_pt2_without_data(model.program, path)

    def layer_counts(self, model: LoadedModel) -> Counter[str]:
        """``aten.linear``-style operator names of the graph's calls."""
        import torch

        assert model.program is not None
        counts: Counter[str] = Counter()
        for node in model.program.graph.nodes:
            if node.op != "call_function":
                continue
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                counts[f"{target.namespace}.{target._opname}"] += 1
            else:
                counts[getattr(target, "__name__", str(target))] += 1
        return counts

    def layer_names(self, model: LoadedModel) -> list[str]:
        """Module paths of the program's weights (``0.weight`` → ``0``), in graph order."""
        return list(dict.fromkeys(layer_of(name) for name in _weight_tensors(model)))

    def describe(self, model: LoadedModel) -> dict[str, Any]:
        return {}

    def weight_arrays(self, model: LoadedModel) -> dict[str, np.ndarray]:
        return {name: tensor_to_numpy(t) for name, t in _weight_tensors(model).items()}

    def weight_shapes(self, model: LoadedModel) -> dict[str, tuple[int, ...]]:
        """The program's parameters plus its 8-bit integer buffers and constants."""
        return {name: tuple(t.shape) for name, t in _weight_tensors(model).items()}

    def vocab_size(self, model: LoadedModel) -> int | None:
        return None

    def runner(self, model: LoadedModel, path: Path, device: str) -> Runner:
        import torch
        from torch.utils import _pytree as pytree

        program = model.program
        assert program is not None
        target = torch_device(device)
        if target.type == "cuda":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, target)
        module = program.module()
        in_spec = program.call_spec.in_spec
        names = [s.name for s in model.inputs]
        on_gpu = target.type == "cuda"

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            flat = [torch.from_numpy(feeds[name]).to(target) for name in names]
            args, kwargs = pytree.tree_unflatten(flat, in_spec)
            with torch.inference_mode():
                result = module(*args, **kwargs)
                if on_gpu:
                    torch.cuda.synchronize()
            leaves = pytree.tree_leaves(result)
            return [tensor_to_numpy(t) for t in leaves if isinstance(t, torch.Tensor)]

        return run
