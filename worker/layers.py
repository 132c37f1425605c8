"""Layer names and ``exclude``: the layers a step must leave untouched (DESIGN §12).

Layers are named as a model resource's ``info.layer_names`` lists them: module paths
(``features.0``, ``classifier``) for pt2 and hf models, node names for onnx. ``exclude``
takes those names or ``re:`` patterns (``re:^encoder\\.layer\\.0\\.``, matched with
``re.search``). One field type (:data:`Exclude`) serves every method that takes it, and one
resolver (:func:`resolve_exclude`) turns it into names, for the spec check at
``POST /v1/jobs`` (:func:`exclude_problem`) and for the handlers. Torch-free.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, Field

if TYPE_CHECKING:
    from worker.context import StepContext
    from worker.formats import LoadedModel
    from worker.schemas import LayerMetrics, StepMetrics

PATTERN_PREFIX = "re:"
MAX_EXCLUDE = 1000
_LISTED = 40  # names a message lists before "... and N more"


def _valid_entries(value: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    for entry in value:
        if not entry.strip():
            raise ValueError("exclude takes layer names or 're:' patterns, not empty strings")
        if entry.startswith(PATTERN_PREFIX):
            try:
                re.compile(entry[len(PATTERN_PREFIX) :])
            except re.error as exc:
                msg = f"exclude pattern {entry!r} is not a regular expression: {exc}"
                raise ValueError(msg) from None
    return tuple(dict.fromkeys(value))


Exclude = Annotated[
    tuple[str, ...] | None,
    Field(
        max_length=MAX_EXCLUDE,
        description=(
            "Layers left untouched: names as the model's info.layer_names lists them (module "
            "paths such as 'features.0' for pt2/hf, node names for onnx) or 're:' patterns "
            "(Python regular expressions, searched in each name). An unknown name is refused "
            "with the real names listed."
        ),
    ),
    AfterValidator(_valid_entries),
]
"""The ``exclude`` field of every method that leaves chosen layers untouched."""


@dataclass(frozen=True)
class Resolved:
    """``exclude`` resolved against a model's layer names."""

    excluded: frozenset[str]
    unknown: tuple[str, ...]
    """Entries that name no layer (a name not in the list, a pattern matching none)."""


def excluded_entries(params: Any) -> tuple[str, ...]:
    """A step's ``exclude`` entries (none when its method has no such field)."""
    return tuple(getattr(params, "exclude", None) or ())


def resolve_exclude(entries: Iterable[str], names: Sequence[str]) -> Resolved:
    """The layers of ``names`` that ``entries`` pick, and the entries that pick none.

    A name picks its layer; failing that, the layer it became once an earlier step lifted
    and re-exported the model (:func:`worker.lifting.lifted_name`: ``block1.conv1`` →
    ``block1_conv1``), so an ``exclude`` written against the upload's layers still holds
    after pruning or training.
    """
    excluded: set[str] = set()
    unknown: list[str] = []
    known = set(names)
    lifted = {_flat(name): name for name in names}
    for entry in entries:
        if entry.startswith(PATTERN_PREFIX):
            pattern = re.compile(entry[len(PATTERN_PREFIX) :])
            hits = {name for name in names if pattern.search(name)}
        elif entry in known:
            hits = {entry}
        else:
            hits = {lifted[_flat(entry)]} if _flat(entry) in lifted else set()
        if not hits:
            unknown.append(entry)
        excluded |= hits
    return Resolved(frozenset(excluded), tuple(unknown))


def _flat(name: str) -> str:
    return name.replace(".", "_")


def exclude_problem(entries: Iterable[str], names: Sequence[str], method: str) -> str | None:
    """Why ``entries`` cannot be applied to a model with these layers, or None."""
    resolved = resolve_exclude(entries, names)
    if not resolved.unknown:
        return None
    what = ", ".join(repr(e) for e in resolved.unknown)
    return f"{method}: exclude names no layer of this model: {what}; its layers are {listed(names)}"


def listed(names: Sequence[str]) -> str:
    """``a, b, c`` (the first few, then how many more)."""
    shown = ", ".join(names[:_LISTED])
    more = len(names) - _LISTED
    return shown + (f" ... and {more} more" if more > 0 else "") if names else "(none)"


def layer_of(tensor_name: str) -> str:
    """The layer a weight belongs to: ``features.0.weight`` → ``features.0``."""
    return tensor_name.rpartition(".")[0] or tensor_name


def excluded_layers(params: Any, names: Sequence[str], method: str) -> frozenset[str]:
    """The layers of ``names`` a step's ``exclude`` picks, as the handler applies it.

    Raises:
        InvalidParamsError: an entry names no layer of the model as the step received it
            (checked at ``POST /v1/jobs`` against the upload when its layers are known).
    """
    from worker.errors import InvalidParamsError

    entries = excluded_entries(params)
    if not entries:
        return frozenset()
    problem = exclude_problem(entries, names, method)
    if problem is not None:
        raise InvalidParamsError(problem, step=method)
    return resolve_exclude(entries, names).excluded


def record_layers(
    ctx: StepContext,
    changed: Iterable[str],
    kept: Mapping[str, str],
    *,
    dtype: str | None = None,
    sparsity: Mapping[str, float] | None = None,
) -> None:
    """Say what the step did to each layer: ``changed`` ones (stored as ``dtype``, with
    their ``sparsity``), ``kept`` ones with why (``excluded``, or what the method skips)."""
    from worker.contract import LayerStatus
    from worker.schemas import LayerMetrics

    sparsity = sparsity or {}
    for name in changed:
        ctx.layers[name] = LayerMetrics(
            status=LayerStatus.changed, dtype=dtype, sparsity=sparsity.get(name), steps=[ctx.step]
        )
    for name, reason in kept.items():
        ctx.layers.setdefault(name, LayerMetrics(status=LayerStatus.kept, reason=reason))


def merge_layers(steps: Sequence[StepMetrics]) -> dict[str, LayerMetrics] | None:
    """``metrics.layers``: changed by any step (its last change's dtype and sparsity, every
    step that changed it; a figure the last change did not report is the earlier change's,
    e.g. a pruned layer's sparsity after a quantization step), else kept (the first reason
    given)."""
    from worker.contract import LayerStatus

    merged: dict[str, LayerMetrics] = {}
    for step in steps:
        for name, entry in (step.layers or {}).items():
            before = merged.get(name)
            if entry.status == LayerStatus.changed:
                earlier: dict[str, object] = {}
                if before is not None and before.status == LayerStatus.changed:
                    earlier = {
                        key: value
                        for key, value in before.model_dump(exclude_none=True).items()
                        if getattr(entry, key) is None
                    }
                done = [*(before.steps or [])] if before is not None else []
                update = {**earlier, "steps": done + list(entry.steps or [])}
                merged[name] = entry.model_copy(update=update)
            elif before is None:
                merged[name] = entry.model_copy()
    return merged or None


def exclude_from_pt2e(quantizer: Any, excluded: Iterable[str], program: Any) -> None:
    """Leave these layers float in a PT2E quantizer (torchao's module-name config, matched
    against the exported graph's ``nn_module_stack``).

    ``program`` is the ExportedProgram the layers were named in. Its ``nn_module_stack``
    paths are usually the layer names; in a program an earlier step lifted and re-exported
    they stay the upload's (``stem.0``) while its weights are renamed (``stem_0.weight``), so
    each layer's name and the stack path of every call reading its weight are both set.
    """
    layers = set(excluded)
    names = set(layers)
    weights = {
        placeholder
        for placeholder, fqn in program.graph_signature.inputs_to_parameters.items()
        if layer_of(fqn) in layers
    }
    for node in program.graph.nodes:
        reads = any(getattr(arg, "name", None) in weights for arg in node.args)
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        if node.op == "call_function" and reads and stack:
            names.add(str(stack[-1][0]))
    for name in sorted(names):
        quantizer.set_module_name_qconfig(name, None)


def record_pt2e_layers(
    ctx: StepContext, model: LoadedModel, converted: Any, excluded: frozenset[str]
) -> None:
    """After ``convert_pt2e``: a layer whose weight the graph no longer reads was quantized
    (int8; a BatchNorm folded into its convolution has no dtype of its own)."""
    from worker.formats import layer_names, weight_shapes

    shapes = weight_shapes(model)
    read = {str(node.target) for node in converted.graph.nodes if node.op == "get_attr"}
    changed: list[str] = []
    int8: list[str] = []
    kept: dict[str, str] = {}
    for name in layer_names(model):
        weight = f"{name}.weight"
        if weight in shapes and weight not in read:
            changed.append(name)
            if len(shapes[weight]) >= 2:
                int8.append(name)
        else:
            kept[name] = "excluded" if name in excluded else "left float by the quantizer"
    record_layers(ctx, int8, kept, dtype="int8")
    record_layers(ctx, [n for n in changed if n not in int8], {})


def record_onnx_layers(
    ctx: StepContext, before: LoadedModel, after: LoadedModel, excluded: frozenset[str]
) -> None:
    """After an ONNX Runtime quantization: a layer that kept its name and float weights,
    or that was excluded, was kept; the others were quantized (their new weight type)."""
    from worker.formats import layer_names, weight_arrays
    from worker.formats.onnx import onnx_weight_layers

    arrays = weight_arrays(after)
    dtypes: dict[str, str] = {}
    for weight, layer in onnx_weight_layers(after).items():
        if weight in arrays and arrays[weight].ndim >= 2:
            dtypes.setdefault(layer, str(arrays[weight].dtype))
    assert after.proto is not None
    present = {node.name for node in after.proto.graph.node}
    changed: dict[str, str | None] = {}
    kept: dict[str, str] = {}
    for name in layer_names(before):
        if name in excluded:
            kept[name] = "excluded"
        elif name in present and dtypes.get(name, "float32").startswith("float"):
            kept[name] = "left float by ONNX Runtime"
        else:
            changed[name] = dtypes.get(name)
    for dtype in set(changed.values()):
        record_layers(ctx, [n for n, d in changed.items() if d == dtype], {}, dtype=dtype)
    record_layers(ctx, [], kept)


def onnx_nodes_to_exclude(excluded: Iterable[str]) -> list[str]:
    """ONNX Runtime's ``nodes_to_exclude`` for these layers: ORT's quantizers rewrite a
    ``Gemm`` into ``<name>_MatMul`` + ``<name>_Add`` before they match names."""
    return sorted({n for name in excluded for n in (name, f"{name}_MatMul")})
