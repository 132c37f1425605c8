"""``prune.activation``: remove the neurons/channels that are least active on real data.

Importance of a neuron (or conv channel) = its mean absolute activation over the
calibration inputs, 1/N Σ|aᵢ|, measured where the next layer reads it (after the
nonlinearity: a ReLU unit that never fires scores 0 however large its weights). The
pt2 program is lifted to real layers (:mod:`worker.lifting`), forward pre-hooks on every
Linear/Conv layer sum |input| per channel over the calibration set, and torch-pruning's
dependency graph removes the least active ``amount`` of every coupled group from every
tensor that holds it (tensors shrink; nothing is masked). A channel read by several
layers (a residual trunk, a branch point) scores the mean over its readers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from worker.errors import InvalidParamsError
from worker.formats.models import layer_names
from worker.layers import Exclude, excluded_layers
from worker.methods.base import Method, MethodParams, Range, Searchable, SearchRole
from worker.methods.prune_structured import (
    channel_counts,
    count_parameters,
    example_inputs,
    ignored_layers,
    layer_shapes,
    prune_groups,
    record_pruned_layers,
    report_pruning,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from worker.context import StepContext
    from worker.formats import LoadedModel


class ActivationPruneParams(MethodParams):
    """Activation-based structured pruning: remove the least active neurons/channels.

    Needs a ``calibration`` dataset: inputs representative of what the model will see.

    Args:
        amount: fraction of the neurons/channels of every coupled group removed (strictly
            between 0 and 1), those with the smallest mean |activation|.
        max_samples: at most this many calibration samples are run to measure activations.
        batch_size: calibration samples per forward pass (a model exported with a static
            batch size runs batches of that size).
        round_to: keep channel counts at multiples of this (rounds down).
        ignore: more layers whose outputs are kept, by FQN (``"block1.conv1"`` or
            ``"block1.conv1.weight"``). The layers producing the model's outputs are
            always kept.
        exclude: layers left untouched, as the model's ``info.layer_names`` lists them
            (or ``re:`` patterns): their outputs are kept, like ``ignore``'s.

    Example:
        ``{"method": "prune.activation", "params": {"amount": 0.3}}``
    """

    amount: float = Field(
        gt=0.0,
        lt=1.0,
        description=(
            "Fraction of the neurons/channels of every coupled group removed "
            "(0 < amount < 1): those with the smallest mean |activation|."
        ),
    )
    max_samples: int = Field(
        default=1024, ge=1, description="Calibration samples run to measure activations."
    )
    batch_size: int = Field(default=64, ge=1, description="Calibration samples per forward pass.")
    round_to: int | None = Field(
        default=None, ge=1, description="Keep channel counts at multiples of this; rounds down."
    )
    ignore: tuple[str, ...] = Field(
        default=(),
        description=(
            "Layers whose outputs are kept, by FQN ('block1.conv1' or 'block1.conv1.weight'). "
            "Output layers are always kept."
        ),
    )
    exclude: Exclude = None


class MeanActivationImportance:
    """torch-pruning importance: a channel's mean |activation| as its readers see it.

    Args:
        means: for each Linear/Conv layer, the mean |input| of each of its input channels.
    """

    def __init__(self, means: dict[nn.Module, torch.Tensor]) -> None:
        self.means = means

    def __call__(self, group: Any) -> torch.Tensor | None:
        import torch
        import torch_pruning as tp

        readers = (tp.prune_linear_in_channels, tp.prune_conv_in_channels)
        total: torch.Tensor | None = None
        seen: torch.Tensor | None = None
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if dep.handler not in readers or layer not in self.means:
                continue
            root = group[i].root_idxs
            if any(r is None for r in root):
                continue
            size = len(group[0][1])
            if total is None or seen is None:
                total, seen = torch.zeros(size), torch.zeros(size)
            index = torch.tensor(root, dtype=torch.long)
            total.scatter_add_(0, index, self.means[layer][list(idxs)].float())
            seen.scatter_add_(0, index, torch.ones(len(root)))
        if total is None or seen is None:
            return None  # no layer reads these channels: nothing to rank them by
        return total / seen.clamp(min=1)


def prune_activation(
    model: LoadedModel, params: ActivationPruneParams, ctx: StepContext
) -> LoadedModel:
    """Remove the least active neurons/channels; returns a new, smaller model."""
    from worker.lifting import lift, relower

    lifted = lift(model)
    ctx.progress(0.05)
    means = mean_abs_inputs(model, lifted, params, ctx, span=(0.05, 0.4))
    example, trace_feeds = example_inputs(model, ctx)
    excluded = excluded_layers(params, layer_names(model), ctx.method)
    keep = ignored_layers(lifted, (*params.ignore, *sorted(excluded)), ctx)
    before = channel_counts(lifted)
    shapes = layer_shapes(lifted)
    params_before = count_parameters(lifted)
    prune_groups(
        lifted,
        MeanActivationImportance(means),
        example,
        amount=params.amount,
        global_scope=False,
        round_to=params.round_to,
        keep=keep,
        ctx=ctx,
        span=(0.4, 0.85),
    )
    report_pruning(ctx, before, channel_counts(lifted), params_before, count_parameters(lifted))
    record_pruned_layers(ctx, model, shapes, lifted, excluded)
    pruned = relower(model, lifted, example_inputs=trace_feeds)
    ctx.progress(1.0)
    return pruned


def mean_abs_inputs(
    model: LoadedModel,
    lifted: nn.Module,
    params: ActivationPruneParams,
    ctx: StepContext,
    *,
    span: tuple[float, float],
) -> dict[nn.Module, torch.Tensor]:
    """Mean |input| per input channel of every Linear/Conv layer over the calibration set.

    Channels are the last axis of a Linear's input and axis 1 of a Conv's; the mean runs
    over every other axis (samples, positions, tokens).
    """
    import numpy as np
    import torch
    from torch import nn

    from worker.data import fit_dataset
    from worker.training import model_forward

    calibration = ctx.datasets.get("calibration")
    if calibration is None:
        raise InvalidParamsError(
            "prune.activation measures activations on real inputs: pass a calibration "
            "dataset (datasets.calibration)",
            step=ctx.method,
        )
    dataset = calibration.head(params.max_samples)
    feeds = fit_dataset(model, "calibration", dataset)
    batch = model.static_batch or params.batch_size
    count = dataset.num_samples
    if model.static_batch and count % batch:  # whole batches only: repeat samples to fill
        count += batch - count % batch
        feeds = {k: np.resize(v, (count, *v.shape[1:])) for k, v in feeds.items()}
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def record(layer: nn.Module, inputs: tuple[Any, ...]) -> None:
        x = inputs[0].detach().abs()
        if isinstance(layer, nn.Linear):
            per_channel = x.reshape(-1, x.shape[-1])
        else:
            per_channel = x.transpose(0, 1).reshape(x.shape[1], -1).T
        sums[layer] = sums.get(layer, 0) + per_channel.sum(dim=0, dtype=torch.float64)
        counts[layer] = counts.get(layer, 0) + per_channel.shape[0]

    layers = [m for m in lifted.modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)]
    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    forward = model_forward(model)
    steps = range(0, count, batch)
    lifted.eval()
    try:
        with torch.no_grad():
            for i, first in enumerate(steps):
                rows = slice(first, min(first + batch, count))
                forward(lifted, {k: torch.from_numpy(v[rows]) for k, v in feeds.items()})
                ctx.progress(span[0] + (span[1] - span[0]) * (i + 1) / len(steps))
    finally:
        for hook in hooks:
            hook.remove()
    ctx.log(f"mean |activation| of {len(sums)} layers' inputs over {count} calibration samples")
    return {layer: (sums[layer] / counts[layer]).float() for layer in sums}


METHOD = Method(
    name="prune.activation",
    summary=(
        "Activation-based structured pruning: remove the neurons/channels with the "
        "smallest mean |activation| on the calibration data (tensors shrink)."
    ),
    params=ActivationPruneParams,
    formats=frozenset({"pt2"}),
    handler=prune_activation,
    datasets_required=frozenset({"calibration"}),
    # the pruning is CPU tensor work with the same code path on either queue's workers
    devices=frozenset({"cpu", "gpu"}),
    search=Searchable(
        SearchRole.structure, {"amount": Range(0.1, 0.7, step=0.1)}, defaults={"amount": 0.3}
    ),
)
