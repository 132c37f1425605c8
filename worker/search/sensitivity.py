"""Per-layer sensitivity: how far the model's output moves when only one layer changes.

For each layer with a float weight matrix (Linear, Conv, MatMul, Gemm ...; named as
``info.layer_names``), two changes are tried, each alone, on the eval inputs (the search
split; else calibration, else train; at most :data:`MAX_SAMPLES` samples):

- ``quantized``: its weights rounded to int8 (symmetric, one scale per output channel, the
  grid ``quantize.*`` use for weights), everything else float;
- ``pruned``: its :data:`PRUNE_AMOUNT` smallest-magnitude weights set to zero.

Each gives the mean output cosine against the unchanged model and, with labels, the top-1
accuracy. The ranking (lowest ``quantized_cosine`` first) chooses the layers a search keeps
float (:mod:`worker.search.space`). pt2 and hf models are changed in memory (the weight
tensor edited in place and restored); onnx models are rewritten per change. A ``deadline``
stops the analysis early with the layers done so far.

The same measurement chooses the per-layer amounts of ``allocation: "sensitivity"``
(``prune.magnitude`` per tensor, ``prune.structured`` per channel group):
:class:`OutputCosine` on the eval (else calibration) inputs, amounts on
:func:`allocation_grid`, the largest that keeps ``min_cosine`` found by
:func:`largest_within`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.context import Reporter, StepContext
from worker.contract import DatasetRole, ModelFormat
from worker.data import fit_dataset, load_dataset
from worker.errors import DatasetMismatchError, InvalidParamsError, UnsupportedError
from worker.formats import LoadedModel, Runtime, layer_names
from worker.layers import layer_of
from worker.measurement.fidelity import (
    FIDELITY_BATCH,
    accuracy,
    pool_token_outputs,
    sample_cosines,
)
from worker.measurement.runs import run_loaded
from worker.methods.prune_magnitude import ALLOCATION_DATA, ALLOCATION_STEP
from worker.schemas import LayerSensitivity

MAX_SAMPLES = 256
PRUNE_AMOUNT = 0.5
INT8_MAX = 127


@dataclass
class Sensitivity:
    """The analysis: by layer (graph order), and what it was measured on."""

    layers: dict[str, LayerSensitivity] = field(default_factory=dict)
    samples: int = 0
    role: str = ""
    seconds: float = 0.0
    complete: bool = True
    """False when the deadline stopped it before every layer was analyzed."""

    def to_json(self) -> dict[str, Any]:
        return {name: s.to_json() for name, s in self.layers.items()}


def quantize_int8(weight: np.ndarray) -> np.ndarray:
    """Symmetric int8 rounding with one scale per output channel (axis 0), back in float."""
    flat = weight.reshape(weight.shape[0], -1).astype(np.float64)
    scale = np.abs(flat).max(axis=1, keepdims=True) / INT8_MAX
    scale[scale == 0] = 1.0
    rounded = np.clip(np.round(flat / scale), -INT8_MAX, INT8_MAX) * scale
    return rounded.reshape(weight.shape).astype(weight.dtype)


def prune_smallest(weight: np.ndarray, amount: float) -> np.ndarray:
    """A copy with the ``amount`` share of smallest-magnitude entries set to zero."""
    count = round(weight.size * amount)
    out = weight.copy()
    if count:
        index = np.argsort(np.abs(weight), axis=None, kind="stable")[:count]
        out.reshape(-1)[index] = 0
    return out


def analyze(
    model_path: Path,
    model_format: str,
    datasets: dict[str, Path],
    device: str,
    work_dir: Path,
    reporter: Reporter,
    deadline: float | None = None,
) -> Sensitivity:
    """Analyze every layer (see the module docstring); ``deadline`` is a ``time.monotonic()``.

    Raises:
        DatasetMismatchError: no dataset to run the model on, or one that does not fit.
        JobCancelled: from ``reporter.progress``.
    """
    started = time.monotonic()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    runtime = Runtime(Path(model_path), model_format, device)
    model = runtime.model
    role = next((r for r in (DatasetRole.eval, DatasetRole.calibration, DatasetRole.train) if r in datasets), None)  # fmt: skip
    if role is None:
        raise DatasetMismatchError(
            "sensitivity analysis needs inputs: give an eval (or calibration) dataset",
            step="sensitivity",
        )
    data = load_dataset(Path(datasets[role]), model).head(MAX_SAMPLES)
    feeds = fit_dataset(model, role, data)
    labels = data.labels if role == DatasetRole.eval else None
    reference = pool_token_outputs(run_loaded(runtime, feeds, FIDELITY_BATCH), feeds)
    can_score = labels is not None

    def score(outputs: list[np.ndarray]) -> tuple[float, float | None]:
        nonlocal can_score
        cosine = float(sample_cosines(reference, pool_token_outputs(outputs, feeds)).mean())
        acc = None
        if can_score and labels is not None:
            try:
                acc = accuracy(outputs, labels)
            except UnsupportedError:
                can_score = False
        return cosine, acc

    result = Sensitivity(samples=data.num_samples, role=str(role))
    targets = _weights(model)
    reporter.log(
        f"sensitivity: {len(targets)} layers, int8 weights and {PRUNE_AMOUNT:.0%} pruning each "
        f"alone, on {data.num_samples} {role} samples"
    )
    for index, (layer, weight_name) in enumerate(targets.items()):
        if deadline is not None and time.monotonic() > deadline:
            result.complete = False
            reporter.log(
                f"sensitivity stopped at the search's time budget after {index} of "
                f"{len(targets)} layers",
                "warning",
            )
            break
        reporter.progress(index / max(1, len(targets)), "sensitivity")
        figures: dict[str, Any] = {"pruned_amount": PRUNE_AMOUNT}
        for kind, change in (("quantized", quantize_int8), ("pruned", _pruner(PRUNE_AMOUNT))):
            with _changed(runtime, model, weight_name, change, work_dir, device) as changed:
                outputs = run_loaded(changed, feeds, FIDELITY_BATCH)
            cosine, acc = score(outputs)
            figures[f"{kind}_cosine"] = round(cosine, 6)
            if acc is not None:
                figures[f"{kind}_accuracy"] = round(acc, 6)
        figures["parameters"] = int(np.prod(_shape(model, weight_name)))
        result.layers[layer] = LayerSensitivity(**figures)
    ranked = sorted(result.layers, key=lambda n: result.layers[n].quantized_cosine or 1.0)
    for rank, name in enumerate(ranked, 1):
        result.layers[name].rank = rank
    reporter.progress(1.0, "sensitivity")
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _pruner(amount: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda weight: prune_smallest(weight, amount)


def _weights(model: LoadedModel) -> dict[str, str]:
    """By layer (``layer_names`` order): the name of its float weight matrix."""
    from worker.formats import weight_arrays

    arrays = weight_arrays(model)
    if model.format == ModelFormat.onnx:
        from worker.formats.onnx import onnx_weight_layers

        owners = onnx_weight_layers(model)
    else:
        owners = {name: layer_of(name) for name in arrays}
    found: dict[str, str] = {}
    for name, array in arrays.items():
        layer = owners.get(name)
        if layer is None or layer in found:
            continue
        if array.ndim >= 2 and array.dtype.kind == "f" and array.size > 1:
            found[layer] = name
    order = {name: i for i, name in enumerate(layer_names(model))}
    return dict(sorted(found.items(), key=lambda item: order.get(item[0], len(order))))


def _shape(model: LoadedModel, weight_name: str) -> tuple[int, ...]:
    from worker.formats import weight_shapes

    return weight_shapes(model)[weight_name]


def _torch_weight(model: LoadedModel, name: str) -> Any:
    if model.format == ModelFormat.pt2:
        assert model.program is not None
        return model.program.state_dict[name]
    assert model.module is not None
    return dict(model.module.named_parameters())[name]


def _changed(
    runtime: Runtime,
    model: LoadedModel,
    weight_name: str,
    change: Callable[[np.ndarray], np.ndarray],
    work_dir: Path,
    device: str,
) -> Any:
    """A context giving a runtime of the model with one weight changed (restored on exit)."""
    import contextlib

    @contextlib.contextmanager
    def in_memory() -> Iterator[Runtime]:
        import torch

        tensor = _torch_weight(model, weight_name)
        original = tensor.detach().clone()
        changed = change(original.float().cpu().numpy())
        with torch.no_grad():
            tensor.copy_(torch.from_numpy(changed).to(tensor.dtype))
        try:
            yield runtime
        finally:
            with torch.no_grad():
                tensor.copy_(original)

    @contextlib.contextmanager
    def rewritten() -> Iterator[Runtime]:
        import onnx
        from onnx import numpy_helper

        assert model.proto is not None
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        for init in proto.graph.initializer:
            if init.name == weight_name:
                array = numpy_helper.to_array(init)
                init.CopyFrom(numpy_helper.from_array(change(array), weight_name))
                break
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            path = Path(tmp) / "changed.onnx"
            onnx.save_model(proto, str(path))
            yield Runtime(path, "onnx", device)

    return rewritten() if model.format == ModelFormat.onnx else in_memory()


class _InMemory:
    """A runtime over a model in memory (pt2 or hf), as :func:`run_loaded` calls one."""

    def __init__(self, model: LoadedModel) -> None:
        from worker.formats.registry import backend_for

        self.model = model
        self.device = "cpu"
        # the pt2 and hf runners run the model in memory: no file is read
        self._run = backend_for(model.format).runner(model, Path(), "cpu")

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._run(feeds)


class LiftedRuntime:
    """A runtime over ``module``, a module lifted from the pt2 ``model``
    (:func:`worker.lifting.lift`) and maybe changed since, as :func:`run_loaded` calls one:
    called as the program is, its output tensors in the program's order."""

    def __init__(self, model: LoadedModel, module: Any) -> None:
        self.model = model
        self.device = "cpu"
        self.module = module

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch
        from torch.utils import _pytree as pytree

        from worker.formats import _tensor_to_numpy, pt2_example_args

        args, kwargs = pt2_example_args(self.model, feeds)
        with torch.inference_mode():
            result = self.module(*args, **kwargs)
        leaves = pytree.tree_leaves(result)  # the order the pt2 runner returns them in
        return [_tensor_to_numpy(t) for t in leaves if isinstance(t, torch.Tensor)]


class OutputCosine:
    """``allocation: "sensitivity"``'s measurement: the mean output cosine of a changed
    model to ``model``'s, on the first dataset given of the roles of ``ALLOCATION_DATA``
    (:mod:`worker.methods.prune_magnitude`), at most :data:`MAX_SAMPLES` samples.
    ``reference`` runs the unchanged model (default: ``model`` itself, in memory); call the
    measurement with a runtime of the changed one.

    Raises:
        DatasetMismatchError: no such dataset (``POST /v1/jobs`` refuses the spec first,
            through the method's ``needs``), or one that does not fit the model.
    """

    def __init__(self, model: LoadedModel, ctx: StepContext, reference: Any = None) -> None:
        roles = ALLOCATION_DATA.roles
        role = next((r for r in roles if r in ctx.datasets), None)
        if role is None:
            what = " or ".join(str(r) for r in roles)
            raise DatasetMismatchError(
                f"allocation 'sensitivity' needs an {what} dataset", step=ctx.method
            )
        data = ctx.datasets[role].head(MAX_SAMPLES)
        self.role = str(role)
        self.samples = data.num_samples
        self._feeds = fit_dataset(model, role, data)
        self._reference = self._outputs(reference if reference is not None else _InMemory(model))

    def _outputs(self, runtime: Any) -> list[np.ndarray]:
        return pool_token_outputs(run_loaded(runtime, self._feeds, FIDELITY_BATCH), self._feeds)

    def __call__(self, runtime: Any) -> float:
        return float(sample_cosines(self._reference, self._outputs(runtime)).mean())


@dataclass(frozen=True)
class Allocated:
    """One tensor's (or channel group's) share under ``allocation: "sensitivity"``."""

    amount: float
    """The largest amount on the grid that kept the bound; 0: none did."""
    cosine: float
    """The output cosine measured with only this change, at ``amount``; when ``amount`` is
    0, at the grid's smallest amount (the measurement that fell below the bound)."""


def allocation_grid(max_amount: float) -> list[float]:
    """The amounts ``allocation: "sensitivity"`` tries: multiples of :data:`ALLOCATION_STEP`
    up to ``max_amount``, and ``max_amount`` itself."""
    count = int(max_amount / ALLOCATION_STEP + 1e-9)
    grid = {round(ALLOCATION_STEP * k, 6) for k in range(1, count + 1)} | {max_amount}
    return sorted(a for a in grid if a <= max_amount)


def largest_within(
    grid: list[float], cosine_at: Callable[[float], float], min_cosine: float
) -> Allocated:
    """The largest amount of ``grid`` whose change (``cosine_at(amount)``, the output cosine
    with only this change made) keeps ``min_cosine``: a bisection, since the output moves
    further the more of one tensor or channel group goes."""
    low, high, best = 0, len(grid) - 1, 0.0
    measured: dict[float, float] = {}
    while low <= high:
        middle = (low + high) // 2
        measured[grid[middle]] = cosine_at(grid[middle])
        if measured[grid[middle]] >= min_cosine:
            best, low = grid[middle], middle + 1
        else:
            high = middle - 1
    return Allocated(best, measured[best] if best else measured[grid[0]])


def nothing_allocated(what: str, min_cosine: float, step: str) -> InvalidParamsError:
    """The refusal when ``allocation: "sensitivity"`` finds nothing to prune."""
    return InvalidParamsError(
        f"no {what} can be pruned (even by {ALLOCATION_STEP:g}) while the output keeps a "
        f"cosine of {min_cosine}: lower min_cosine",
        step=step,
    )


def allocate_pruning(
    model: LoadedModel,
    ctx: StepContext,
    tensors: dict[str, Any],
    max_amount: float,
    min_cosine: float,
) -> dict[str, Allocated]:
    """``prune.magnitude``'s ``allocation: "sensitivity"``: by tensor, the largest amount on
    :func:`allocation_grid` at which zeroing the smallest weights of only that tensor keeps
    the output cosine at least ``min_cosine`` (:func:`largest_within`). ``tensors`` are the
    model's own (edited in place and restored)."""
    import torch

    cosine = OutputCosine(model, ctx)
    runtime = _InMemory(model)
    grid = allocation_grid(max_amount)
    found: dict[str, Allocated] = {}
    for index, (name, tensor) in enumerate(tensors.items()):
        ctx.progress(0.1 + 0.6 * index / max(1, len(tensors)))
        original = tensor.detach().clone()

        def pruned_alone(amount: float, tensor: Any = tensor, original: Any = original) -> float:
            pruned = prune_smallest(original.float().cpu().numpy(), amount)
            with torch.no_grad():
                tensor.copy_(torch.from_numpy(pruned).to(tensor.dtype))
            try:
                return cosine(runtime)
            finally:
                with torch.no_grad():
                    tensor.copy_(original)

        found[name] = largest_within(grid, pruned_alone, min_cosine)
    return found
