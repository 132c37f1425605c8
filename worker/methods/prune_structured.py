"""``prune.structured``: remove whole channels and neurons with torch-pruning.

The pt2 program is lifted to real layers (:mod:`worker.lifting`), torch-pruning's
dependency graph finds which tensors are coupled (a residual add ties every layer that
feeds it to one channel set; a concatenation maps each branch to its slice of the next
layer's inputs; a BatchNorm follows its convolution), an importance strategy ranks the
channels of each coupled group, the least important are cut out of every tensor of the
group, and the smaller module is exported again with the upload's signature. Parameters
and MACs really drop; the model's outputs keep their shape because the layers that
produce them are never pruned.

With ``allocation: "sensitivity"`` each group gets its own fraction: the largest on
``prune.magnitude``'s grid (multiples of 0.05, up to ``amount``) at which pruning that group
alone keeps the model's output cosine to the original's at ``min_cosine`` on real inputs
(the same measurement and bisection, :mod:`worker.search.sensitivity`), and torch-pruning
prunes with those fractions (its ``pruning_ratio_dict``, keyed by each group's root layer).

The helpers at the bottom (:func:`prune_groups`, :func:`output_layers`,
:func:`ignored_layers`, ...) are shared with ``prune.activation``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import Field, model_validator

from worker.contract import DatasetRole
from worker.errors import DatasetMismatchError, InvalidParamsError, MethodFailedError
from worker.formats.models import layer_names
from worker.layers import Exclude, excluded_layers, record_layers
from worker.methods.base import (
    Choice,
    DataNeed,
    Method,
    MethodParams,
    Range,
    Searchable,
    SearchRole,
)
from worker.methods.prune_magnitude import ALLOCATION_DATA, min_cosine_field

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from worker.context import StepContext
    from worker.formats import LoadedModel

ImportanceName = Literal["l1", "l2", "taylor", "bn_scale", "random"]


class StructuredPruneParams(MethodParams):
    """Structured (channel/neuron) pruning: remove whole channels, so tensors shrink.

    Args:
        amount: fraction of the channels removed, strictly between 0 and 1: of every
            coupled group of channels with ``scope="local"``, of all of them together
            with ``"global"``. Layers joined by a residual add or a BatchNorm are pruned
            together, so the model stays consistent.
        importance: how channels are ranked. ``"l1"`` / ``"l2"``: norm of the channel's
            weights over every coupled layer; ``"taylor"``: |w · ∂L/∂w|, the first-order
            loss change when the channel goes (needs a labelled ``train`` or
            ``calibration`` dataset); ``"bn_scale"``: |gamma| of the BatchNorm after the
            layer (network slimming; groups without a BatchNorm are left alone);
            ``"random"``: a baseline that ranks at random (seeded, reproducible).
        scope: ``"local"`` prunes ``amount`` of every group; ``"global"`` ranks all
            channels together (importances normalized per group), so groups with many
            unimportant channels lose more. A group is never pruned to zero channels.
        round_to: keep channel counts at multiples of this (e.g. 8 for tensor cores or
            SIMD widths); rounding keeps fewer channels, never more. A group smaller than
            ``round_to`` is left as it is.
        ignore: more layers whose output channels are kept, by name: the layer's FQN in
            the uploaded model (``"block1.conv1"``) or its weight's (``"block1.conv1.weight"``).
            The layers that produce the model's outputs (the classifier head) are always
            kept.
        exclude: layers left untouched, as the model's ``info.layer_names`` lists them
            (or ``re:`` patterns): their output channels are kept, like ``ignore``'s.
        allocation: ``"uniform"`` (default) prunes ``amount`` of every group;
            ``"sensitivity"`` prunes each group (named by its root layer, the one
            torch-pruning ranks it from) as far as the model's output, with only that
            group pruned, keeps a cosine of ``min_cosine`` to the original's on the eval
            (else calibration) inputs, up to ``amount`` (robust groups lose more channels,
            sensitive ones fewer; ``scope="local"``).
        min_cosine: the output cosine each group's pruning must keep with
            ``allocation="sensitivity"`` (default 0.99).

    Example:
        ``{"method": "prune.structured", "params": {"amount": 0.5, "importance": "l1",
        "round_to": 8}}``, ``{"method": "prune.structured", "params": {"amount": 0.6,
        "allocation": "sensitivity", "min_cosine": 0.98}}``
    """

    amount: float = Field(
        gt=0.0,
        lt=1.0,
        description=(
            "Fraction of channels removed (0 < amount < 1): of every coupled group "
            "(scope 'local') or of all channels together (scope 'global')."
        ),
    )
    importance: ImportanceName = Field(
        default="l1",
        description=(
            "Channel ranking: 'l1'/'l2' weight norm, 'taylor' |w·grad| (needs labelled "
            "train or calibration data), 'bn_scale' BatchNorm |gamma|, 'random' baseline."
        ),
    )
    scope: Literal["local", "global"] = Field(
        default="local",
        description=(
            "'local': prune `amount` of every group; 'global': one ranking over all "
            "channels, so groups with unimportant channels lose more."
        ),
    )
    round_to: int | None = Field(
        default=None,
        ge=1,
        description="Keep channel counts at multiples of this (e.g. 8); rounds down.",
    )
    ignore: tuple[str, ...] = Field(
        default=(),
        description=(
            "Layers whose output channels are kept, by FQN ('block1.conv1' or "
            "'block1.conv1.weight'). Output layers (the classifier head) are always kept."
        ),
    )
    exclude: Exclude = None
    allocation: Literal["uniform", "sensitivity"] = Field(
        default="uniform",
        description=(
            "'uniform': `amount` of every coupled group's channels removed; 'sensitivity': "
            "each group (by its root layer) pruned as far as the model's output, with only "
            "that group pruned, keeps a cosine similarity of at least `min_cosine` to the "
            "original's on the eval (else calibration) inputs, and at most to `amount` "
            "(fractions tried: multiples of 0.05; scope 'local')."
        ),
    )
    min_cosine: float = min_cosine_field("group")

    @model_validator(mode="after")
    def _one_fraction_per_group(self) -> Self:
        if self.allocation == "sensitivity" and self.scope != "local":
            raise ValueError(
                "allocation 'sensitivity' chooses one fraction per group: use scope 'local'"
            )
        return self


@dataclass(frozen=True)
class Criterion:
    """An importance strategy: how to build torch-pruning's ``Importance``, and what it needs.

    Attributes:
        build: returns a fresh ``torch_pruning`` importance object.
        needs_gradients: ranks with ``weight.grad``: a labelled dataset must be run first.
        needs_batch_norm: only ranks groups that contain a BatchNorm.
    """

    build: Callable[[], Any]
    needs_gradients: bool = False
    needs_batch_norm: bool = False


def _criteria() -> dict[str, Criterion]:
    import torch_pruning as tp

    imp = tp.importance
    return {
        "l1": Criterion(lambda: imp.GroupMagnitudeImportance(p=1)),
        "l2": Criterion(lambda: imp.GroupMagnitudeImportance(p=2)),
        "taylor": Criterion(imp.GroupTaylorImportance, needs_gradients=True),
        "bn_scale": Criterion(imp.BNScaleImportance, needs_batch_norm=True),
        "random": Criterion(imp.RandomImportance),
    }


def prune_structured(
    model: LoadedModel, params: StructuredPruneParams, ctx: StepContext
) -> LoadedModel:
    """Remove the least important channels of every prunable group; returns a new model."""
    import torch

    from worker.lifting import lift, relower

    criterion = _criteria()[params.importance]
    lifted = lift(model)
    ctx.progress(0.05)
    example, trace_feeds = example_inputs(model, ctx)
    if criterion.needs_batch_norm and not _has_batch_norm(lifted):
        raise InvalidParamsError(
            "importance='bn_scale' ranks channels by the |gamma| of their BatchNorm, and "
            "this model has none; use 'l1', 'l2' or 'taylor'",
            step=ctx.method,
        )
    if criterion.needs_gradients:
        accumulate_gradients(model, lifted, ctx, span=(0.05, 0.3))
    ctx.progress(0.3)
    excluded = excluded_layers(params, layer_names(model), ctx.method)
    keep = ignored_layers(lifted, (*params.ignore, *sorted(excluded)), ctx)
    before = channel_counts(lifted)
    shapes = layer_shapes(lifted)
    params_before = count_parameters(lifted)
    fractions = None
    if params.allocation == "sensitivity":
        fractions = allocate_channels(model, lifted, criterion, example, params, keep, ctx)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the 'random' baseline is reproducible
        prune_groups(
            lifted,
            criterion.build(),
            example,
            # with fractions, a group that has none (not ranked) keeps its channels
            amount=params.amount if fractions is None else 0.0,
            global_scope=params.scope == "global",
            round_to=params.round_to,
            keep=keep,
            ctx=ctx,
            span=(0.3, 0.8) if fractions is None else (0.6, 0.8),
            fractions=fractions,
        )
    for param in lifted.parameters():
        param.grad = None
    after = channel_counts(lifted)
    report_pruning(ctx, before, after, params_before, count_parameters(lifted))
    record_pruned_layers(ctx, model, shapes, lifted, excluded)
    pruned = relower(model, lifted, example_inputs=trace_feeds)
    ctx.progress(1.0)
    return pruned


def allocate_channels(
    model: LoadedModel,
    lifted: nn.Module,
    criterion: Criterion,
    example: Any,
    params: StructuredPruneParams,
    keep: list[Any],
    ctx: StepContext,
) -> dict[nn.Module, float]:
    """``allocation: "sensitivity"``: by group root layer, the largest fraction on the grid
    (up to ``amount``) at which torch-pruning pruning only that group (same importance,
    same ``round_to``) keeps the output cosine at ``min_cosine``; each try prunes a fresh
    lift of ``model`` (``lifted`` before any pruning, its gradients copied in). Logs the
    fraction and the cosine measured for each group.

    Raises:
        DatasetMismatchError: no eval or calibration dataset.
        InvalidParamsError: no group keeps the bound even at the smallest fraction.
    """
    from functools import partial

    import torch

    from worker.lifting import lift, lifted_name
    from worker.search.sensitivity import (
        LiftedRuntime,
        OutputCosine,
        allocation_grid,
        largest_within,
        nothing_allocated,
    )

    cosine = OutputCosine(model, ctx, LiftedRuntime(model, lifted))
    names = {module: name for name, module in lifted.named_modules()}
    kept = [names[m] for m in keep]
    with torch.random.fork_rng():  # 'random' importance draws
        roots = _group_roots(lifted, criterion.build(), example, keep)
    grads = {n: p.grad for n, p in lifted.named_parameters() if p.grad is not None}
    grid = allocation_grid(params.amount)

    def pruned_alone(root: str, fraction: float) -> float:
        trial = lift(model)
        for name, param in trial.named_parameters():  # taylor's gradients
            if name in grads:
                param.grad = grads[name].clone()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            pruner = _pruner(
                trial,
                criterion.build(),
                example,
                amount=0.0,  # every other group keeps its channels
                global_scope=False,
                round_to=params.round_to,
                keep=[trial.get_submodule(n) for n in kept],
                fractions={trial.get_submodule(root): fraction},
            )
            for group in pruner.step(interactive=True) or ():
                group.prune()
        _check_runs(trial, example, ctx)
        return cosine(LiftedRuntime(model, trial))

    allocated = {}
    for index, root in enumerate(roots):
        ctx.progress(0.3 + 0.3 * index / max(1, len(roots)))
        allocated[root] = largest_within(grid, partial(pruned_alone, root), params.min_cosine)
    layers = {lifted_name(f"{n}.weight"): n for n in layer_names(model)}
    order = {name: i for i, name in enumerate(layers)}
    allocated = dict(sorted(allocated.items(), key=lambda item: order.get(item[0], len(order))))
    fractions = {layers.get(r, r): a.amount for r, a in allocated.items()}
    pruned = sum(1 for a in allocated.values() if a.amount > 0)
    ctx.log(
        f"sensitivity allocation (output cosine >= {params.min_cosine} on {cosine.samples} "
        f"{cosine.role} samples): {pruned} of {len(allocated)} channel groups pruned (by "
        "root layer; cosines: each group alone pruned to its fraction, a group left whole "
        "at the smallest fraction tried)",
        data={
            "fractions": fractions,
            "cosines": {layers.get(r, r): round(a.cosine, 6) for r, a in allocated.items()},
        },
    )
    if not pruned:
        raise nothing_allocated("channel group", params.min_cosine, ctx.method)
    return {lifted.get_submodule(r): a.amount for r, a in allocated.items()}


def _group_roots(lifted: nn.Module, importance: Any, example: Any, keep: list[Any]) -> list[str]:
    """The (lifted) names of the layers torch-pruning ranks a prunable group from, in its
    order: groups with an ignored layer, or no importance under ``importance``, left out."""
    pruner = _pruner(
        lifted,
        importance,
        example,
        amount=0.0,
        global_scope=False,
        round_to=None,
        keep=keep,
        fractions=None,
    )
    names = {module: name for name, module in lifted.named_modules()}
    groups = pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    )
    return [
        names[group[0].dep.target.module]
        for group in groups
        if pruner.estimate_importance(group) is not None
    ]


# --------------------------------------------------------------------------------------
# Shared with prune.activation


def example_inputs(model: LoadedModel, ctx: StepContext) -> tuple[Any, dict[str, np.ndarray]]:
    """``((args, kwargs), feeds)`` to trace the lifted module with and to re-export with.

    A few calibration samples when given (sized to a static batch), else inputs generated
    from the signature with batch 2 (so a dynamic batch dim stays dynamic).
    """
    import numpy as np

    from worker.data import fit_dataset
    from worker.formats import cast_feeds, generate_inputs, pt2_example_args

    dataset = ctx.datasets.get("calibration")
    batch = model.static_batch or 2
    feeds: dict[str, np.ndarray]
    if dataset is not None:
        fitted = fit_dataset(model, "calibration", dataset.head(batch))
        feeds = {k: np.resize(v, (batch, *v.shape[1:])) for k, v in fitted.items()}
    else:
        feeds = generate_inputs(model, batch=batch)
    feeds = cast_feeds(model, feeds)
    return pt2_example_args(model, feeds), feeds


def call_with(module: nn.Module, example: Any) -> Any:
    """torch-pruning's ``forward_fn``: call the lifted module with ``(args, kwargs)``."""
    args, kwargs = example
    return module(*args, **kwargs)


def _has_batch_norm(module: nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) for m in module.modules())


def accumulate_gradients(
    model: LoadedModel, lifted: nn.Module, ctx: StepContext, *, span: tuple[float, float]
) -> None:
    """Sum the supervised loss gradients of up to 512 labelled samples into ``.grad``.

    Uses the ``train`` dataset if it has labels, else the ``calibration`` one.

    Raises:
        InvalidParamsError: neither is given with labels.
    """
    import torch

    from worker.data import fit_dataset
    from worker.training import model_forward, supervised_loss

    role = next(
        (
            r
            for r in ("train", "calibration")
            if getattr(ctx.datasets.get(r), "labels", None) is not None
        ),
        None,
    )
    if role is None:
        given = sorted(r for r in ("train", "calibration") if r in ctx.datasets)
        raise InvalidParamsError(
            "importance='taylor' ranks channels by |weight x gradient of the loss| and needs "
            "labelled data: pass a train or calibration dataset with a 'labels' array"
            + (f" (the {' and '.join(given)} dataset has no labels)" if given else ""),
            step=ctx.method,
        )
    dataset = ctx.datasets[role].head(512)
    feeds = fit_dataset(model, role, dataset)
    labels = dataset.labels
    assert labels is not None
    forward = model_forward(model)
    batch = model.static_batch or 64
    count = dataset.num_samples - (dataset.num_samples % batch if model.static_batch else 0)
    if count == 0:
        raise DatasetMismatchError(
            f"the {role} dataset has fewer samples than the model's static batch ({batch})",
            step=ctx.method,
        )
    lifted.zero_grad(set_to_none=True)
    lifted.eval()
    steps = range(0, count, batch)
    for i, first in enumerate(steps):
        rows = slice(first, min(first + batch, count))
        inputs = {k: torch.from_numpy(v[rows]) for k, v in feeds.items()}
        target = torch.from_numpy(labels[rows])
        supervised_loss(forward(lifted, inputs), target).backward()
        ctx.progress(span[0] + (span[1] - span[0]) * (i + 1) / len(steps))
    ctx.log(f"gradients for the taylor importance from {count} {role} samples")


def output_layers(lifted: nn.Module) -> list[str]:
    """The layers whose outputs reach a model output through layer-free ops only."""
    import torch

    if not isinstance(lifted, torch.fx.GraphModule):
        return []
    output = next(n for n in lifted.graph.nodes if n.op == "output")
    stack = list(output.all_input_nodes)
    seen: set[torch.fx.Node] = set()
    heads: list[str] = []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            heads.append(str(node.target))
        else:
            stack.extend(node.all_input_nodes)
    return sorted(set(heads))


def ignored_layers(lifted: nn.Module, names: tuple[str, ...], ctx: StepContext) -> list[Any]:
    """The layers whose output channels are kept: the output layers and those in ``ignore``.

    Parameters outside layers (e.g. a per-channel scale) are pruned along with the
    channels they are coupled to (torch-pruning takes their last non-singleton dim).

    Raises:
        InvalidParamsError: a name in ``ignore`` is not a layer of the model.
    """
    from worker.lifting import lifted_name

    layers = dict(lifted.named_children())
    unknown = [n for n in names if lifted_name(n) not in layers]
    if unknown:
        known = ", ".join(sorted(layers))
        raise InvalidParamsError(
            f"ignore names {unknown}, which are not layers of this model; its layers are "
            f"(dots in the uploaded names read as '_'): {known}",
            step=ctx.method,
        )
    heads = output_layers(lifted)
    kept = sorted({*heads, *(lifted_name(n) for n in names)})
    ctx.log(f"kept unpruned (output and ignored layers): {', '.join(kept)}")
    return [layers[name] for name in kept]


def prune_groups(
    lifted: nn.Module,
    importance: Any,
    example: Any,
    *,
    amount: float,
    global_scope: bool,
    round_to: int | None,
    keep: list[Any],
    ctx: StepContext,
    span: tuple[float, float],
    fractions: dict[nn.Module, float] | None = None,
) -> int:
    """Rank and remove channels with torch-pruning, reporting progress per group.

    ``fractions``: a fraction of its own for the group of each of these root layers
    (torch-pruning's ``pruning_ratio_dict``, each ranked alone); ``amount`` for the others.

    Returns:
        The number of groups pruned.

    Raises:
        InvalidParamsError: nothing could be pruned.
    """
    pruner = _pruner(
        lifted,
        importance,
        example,
        amount=amount,
        global_scope=global_scope,
        round_to=round_to,
        keep=keep,
        fractions=fractions,
    )
    ctx.progress(span[0] + (span[1] - span[0]) * 0.3)
    groups = 0
    for group in pruner.step(interactive=True) or ():
        group.prune()
        groups += 1
        # the number of groups is not known up front: approach the end asymptotically
        ctx.progress(span[0] + (span[1] - span[0]) * (1.0 - 0.7 / (groups + 1)))
    if groups == 0:
        raise InvalidParamsError(
            "no channel could be pruned: every prunable layer feeds a model output, is "
            "ignored, is too small for round_to, has no importance under this criterion, or "
            "is coupled to an operation squish cannot lift into a layer (it lifts Linear, "
            "Conv1d/2d, BatchNorm and LayerNorm)",
            step=ctx.method,
        )
    _check_runs(lifted, example, ctx)
    ctx.progress(span[1])
    return groups


def _pruner(
    lifted: nn.Module,
    importance: Any,
    example: Any,
    *,
    amount: float,
    global_scope: bool,
    round_to: int | None,
    keep: list[Any],
    fractions: dict[nn.Module, float] | None,
) -> Any:
    """torch-pruning's pruner over the lifted module (its dependency graph traced now)."""
    import torch_pruning as tp

    return tp.pruner.BasePruner(
        lifted,
        example,
        importance=importance,
        global_pruning=global_scope,
        pruning_ratio=amount,
        pruning_ratio_dict=fractions,
        ignored_layers=keep,
        round_to=round_to,
        forward_fn=call_with,
        unwrapped_parameters=_loose_parameters(lifted),
    )


def _check_runs(lifted: nn.Module, example: Any, ctx: StepContext) -> None:
    """Raises MethodFailedError when the pruned module no longer runs on ``example``."""
    import torch

    try:
        with torch.no_grad():
            call_with(lifted, example)
    except RuntimeError as exc:  # shapes that disagree after pruning
        raise MethodFailedError(
            "the pruned model no longer runs: a tensor coupled to the pruned channels is "
            "used by an operation squish cannot lift into a layer (it lifts Linear, "
            "Conv1d/2d, BatchNorm and LayerNorm); keep the layers around it with 'ignore'. "
            f"torch said: {str(exc).splitlines()[0]}",
            step=ctx.method,
        ) from exc


def _loose_parameters(lifted: nn.Module) -> list[tuple[torch.nn.Parameter, int]]:
    """Parameters outside layers, each with the dim torch-pruning cuts when its channels
    go: the last dim larger than 1 (a ``[1, C, 1, 1]`` scale, a ``[C]`` bias)."""
    from torch import nn

    layer_types = (
        nn.Linear,
        nn.modules.conv._ConvNd,
        nn.modules.batchnorm._BatchNorm,
        nn.LayerNorm,
    )
    owned = {id(p) for m in lifted.modules() if isinstance(m, layer_types) for p in m.parameters()}
    loose = []
    for param in lifted.parameters():
        dims = [i for i, size in enumerate(param.shape) if size > 1]
        if id(param) not in owned and dims:
            loose.append((param, dims[-1]))
    return loose


def channel_counts(lifted: nn.Module) -> dict[str, int]:
    """Output channels (features) of every Linear and Conv layer, by layer name."""
    from torch import nn

    counts = {}
    for name, module in lifted.named_children():
        if isinstance(module, nn.Linear):
            counts[name] = module.out_features
        elif isinstance(module, nn.modules.conv._ConvNd):
            counts[name] = module.out_channels
    return counts


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_shapes(lifted: nn.Module) -> dict[str, list[tuple[int, ...]]]:
    """The shapes of each layer's own tensors, by (lifted) layer name."""
    return {
        name: [tuple(p.shape) for p in module.parameters(recurse=False)]
        for name, module in lifted.named_children()
    }


def record_pruned_layers(
    ctx: StepContext,
    model: LoadedModel,
    before: dict[str, list[tuple[int, ...]]],
    lifted: nn.Module,
    excluded: frozenset[str],
) -> None:
    """``metrics.steps[].layers``: a layer whose tensors shrank is changed (its weight's
    new shape in the log), the others kept."""
    from worker.lifting import lifted_name

    after = layer_shapes(lifted)
    changed, kept = [], {}
    for name in layer_names(model):
        inner = lifted_name(f"{name}.weight")
        if inner in before and after.get(inner) != before[inner]:
            changed.append(name)
        else:
            kept[name] = "excluded" if name in excluded else "no channel removed"
    record_layers(ctx, changed, kept)


def report_pruning(
    ctx: StepContext,
    before: dict[str, int],
    after: dict[str, int],
    params_before: int,
    params_after: int,
) -> None:
    changed = {name: [before[name], after[name]] for name in before if after[name] != before[name]}
    ctx.log(
        f"removed channels from {len(changed)} of {len(before)} layers; parameters "
        f"{params_before} -> {params_after} ({1 - params_after / params_before:.1%} fewer)",
        data={"channels": changed, "parameters": [params_before, params_after]},
    )


def _datasets_for(params: StructuredPruneParams) -> list[DataNeed]:
    needs = []
    if params.importance == "taylor":
        why = "importance 'taylor' ranks channels by |weight x gradient of the loss|"
        roles = (DatasetRole.train, DatasetRole.calibration)
        needs.append(DataNeed(roles, labelled=True, why=why))
    if params.allocation == "sensitivity":
        needs.append(ALLOCATION_DATA)
    return needs


METHOD = Method(
    name="prune.structured",
    summary=(
        "Structured pruning with torch-pruning: remove whole channels/neurons "
        "(l1, l2, taylor, bn_scale or random importance), so tensors and MACs shrink."
    ),
    params=StructuredPruneParams,
    formats=frozenset({"pt2"}),
    handler=prune_structured,
    datasets_optional=frozenset({"calibration", "train", "eval"}),
    datasets_for=_datasets_for,
    # the pruning is CPU tensor work with the same code path on either queue's workers
    devices=frozenset({"cpu", "gpu"}),
    search=Searchable(
        SearchRole.structure,
        {"amount": Range(0.1, 0.7, step=0.1), "allocation": Choice(("uniform", "sensitivity"))},
        defaults={"amount": 0.3},
    ),
)
