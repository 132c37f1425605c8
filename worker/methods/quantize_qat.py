"""``quantize.qat``: quantization-aware training, then conversion to integer weights.

The model trains on the ``train`` dataset with its weights (and, for 8 bits, its
activations) fake-quantized in the forward pass, so it learns to tolerate the rounding
of the integer model it becomes; then it is converted.

- ``weight_bits=8``: torchao's PT2E QAT on the exported graph (Linear and Conv layers;
  BatchNorm folded into the convs beforehand, its statistics frozen): ``prepare_qat_pt2e`` with
  ``X86InductorQuantizer(is_qat=True)`` inserts fake-quantizers (per-channel int8
  weights, uint8 activations whose ranges are learned as moving averages), training
  runs in the graph's train mode, ``convert_pt2e`` folds int8 weights. The result has
  the layout of ``quantize.static``: QAT is its trained counterpart.
- ``weight_bits=4``: torchao's ``QATConfig`` with ``IntxWeightOnlyConfig(torch.int4,
  PerGroup(group_size))`` on the lifted Linear layers (``worker.lifting``): prepare swaps
  in ``FakeQuantizedLinear``, convert gives int4 values and group scales, which are
  stored two per byte like ``quantize.weight_only`` with ``bits=4`` (its trained
  counterpart). Conv layers stay float in this mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from worker.errors import UnsupportedError
from worker.methods.base import Choice, Method, MethodParams, Range, Searchable, SearchRole

if TYPE_CHECKING:
    import torch

    from worker.context import StepContext
    from worker.formats import LoadedModel

DEFAULT_GROUP = 128


class QATParams(MethodParams):
    """Quantization-aware training: train with fake-quantized weights, then convert.

    Needs a ``train`` dataset with labels; an ``eval`` dataset, when given, picks the
    epoch with the lowest eval loss (and stops early with ``patience``).

    Args:
        weight_bits: 8: int8 per-channel weights and uint8 activations for Linear and
            Conv layers (torchao PT2E QAT, the layout of ``quantize.static``); 4: int4
            weights in groups of ``group_size`` for Linear layers, float activations
            (torchao ``QATConfig``, the layout of ``quantize.weight_only`` with 4 bits).
        group_size: with ``weight_bits=4``, inputs per scale (32, 64, 128 or 256;
            default 128). Linear layers whose input size it does not divide stay float.
        epochs: training epochs.
        lr: Adam learning rate (QAT fine-tunes a trained model: keep it small).
        batch_size: training batch size (a model with a fixed batch uses its own).
        patience: with an eval dataset, stop after this many epochs without improvement.

    Example:
        ``{"method": "quantize.qat", "params": {"weight_bits": 8, "epochs": 3, "lr": 1e-4}}``
    """

    weight_bits: Literal[8, 4] = Field(
        default=8,
        description=(
            "8: int8 weights + uint8 activations, Linear and Conv (PT2E QAT); "
            "4: int4 grouped weights, Linear only (torchao QATConfig)."
        ),
    )
    group_size: Literal[32, 64, 128, 256] | None = Field(
        default=None, description="With weight_bits=4: inputs per scale (default 128)."
    )
    epochs: int = Field(default=3, ge=1, le=1000, description="Training epochs.")
    lr: float = Field(default=1e-4, gt=0.0, le=1.0, description="Adam learning rate.")
    batch_size: int = Field(default=64, ge=1, le=65_536, description="Training batch size.")
    patience: int | None = Field(
        default=None,
        ge=1,
        description="With an eval dataset: stop after this many epochs without improvement.",
    )


def quantize_qat(model: LoadedModel, params: QATParams, ctx: StepContext) -> LoadedModel:
    """Fake-quantize, train on ``train``, convert to integer weights."""
    from worker.training import training_data

    data = training_data(model, ctx, labels_required=True)
    if params.weight_bits == 8:
        return _qat_pt2e(model, params, data, ctx)
    return _qat_int4(model, params, data, ctx)


def _fit(
    model: LoadedModel, module: torch.nn.Module, params: QATParams, data: Any, ctx: StepContext
) -> dict[str, Any]:
    from worker.training import fit_supervised

    return fit_supervised(
        model,
        module,
        data,
        ctx,
        epochs=params.epochs,
        lr=params.lr,
        batch_size=params.batch_size,
        patience=params.patience,
        progress_range=(0.1, 0.85),
    )


def _qat_pt2e(model: LoadedModel, params: QATParams, data: Any, ctx: StepContext) -> LoadedModel:
    import torch
    from torchao.quantization.pt2e import (
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    from worker.formats import reexport_pt2

    assert model.program is not None
    quantizer = X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config(is_qat=True)
    )
    graph = model.program.module()
    # BatchNorm is folded into the convs first and stays frozen while training: the
    # usual practice when QAT fine-tunes a trained model, the layout quantize.static
    # produces, and it spares torchao's QAT conv-BN rewrite, which exports some hundred
    # pattern graphs per conversion (tens of seconds on a small CPU).
    _fuse_conv_bn_(graph)
    prepared = prepare_qat_pt2e(graph, quantizer)
    for param in prepared.parameters():
        param.requires_grad_(param.is_floating_point())
    ctx.progress(0.1)

    class Trainable(torch.nn.Module):
        """The prepared graph, switched between train and eval the way PT2E requires
        (``model.train()`` on a prepared graph is refused: BatchNorm and dropout ops in
        the graph are rewritten instead)."""

        def __init__(self, graph: torch.fx.GraphModule) -> None:
            super().__init__()
            self.graph_module = graph

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.graph_module(*args, **kwargs)

        def train(self, mode: bool = True) -> Trainable:
            if mode:
                move_exported_model_to_train(self.graph_module)
            else:
                move_exported_model_to_eval(self.graph_module)
            self.training = mode
            return self

    trainable = Trainable(prepared)
    history = _fit(model, trainable, params, data, ctx)
    trainable.eval()
    converted = convert_pt2e(prepared)
    int8 = [
        str(n.target)
        for n in converted.graph.nodes
        if n.op == "get_attr" and _attr(converted, str(n.target)).dtype == torch.int8
    ]
    if not int8:
        raise UnsupportedError(
            "torchao's x86 QAT quantizer found no Linear or Conv layer to quantize",
            step=ctx.method,
        )
    ctx.progress(0.9)
    quantized = reexport_pt2(converted, model)
    ctx.log(
        f"quantization-aware training for {history['epochs_run']} epochs (train loss "
        f"{history['train_loss'][0]:.4f} -> {history['train_loss'][-1]:.4f}), then "
        f"{len(int8)} weight tensors converted to int8 (PT2E, x86, uint8 activations)",
        data={k: v for k, v in history.items() if k != "train_loss"},
    )
    ctx.progress(1.0)
    return quantized


def _qat_int4(model: LoadedModel, params: QATParams, data: Any, ctx: StepContext) -> LoadedModel:
    import torch
    from torch import nn
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.qat import QATConfig

    from worker.lifting import lift, relower
    from worker.packing import int4_layer

    module = lift(model)
    group = params.group_size or DEFAULT_GROUP
    linears = {n: m for n, m in module.named_modules() if type(m) is nn.Linear}
    chosen = {n for n, m in linears.items() if m.in_features % group == 0}
    if not chosen:
        raise UnsupportedError(
            f"no Linear layer whose input size is divisible by group_size={group}; choose a "
            "group_size that divides the layers' input sizes",
            step=ctx.method,
        )
    base = IntxWeightOnlyConfig(
        weight_dtype=torch.int4,  # type: ignore[attr-defined]
        granularity=PerGroup(group),
        mapping_type=MappingType.SYMMETRIC,
    )
    quantize_(module, QATConfig(base, step="prepare"), filter_fn=lambda m, fqn: fqn in chosen)
    ctx.progress(0.1)
    history = _fit(model, module, params, data, ctx)
    quantize_(module, QATConfig(base, step="convert"), filter_fn=lambda m, fqn: fqn in chosen)
    for name in sorted(chosen):
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        setattr(owner, attr, int4_layer(module.get_submodule(name)))
    ctx.progress(0.9)
    quantized = relower(model, module)
    kept = sorted(set(linears) - chosen)
    ctx.log(
        f"quantization-aware training for {history['epochs_run']} epochs (train loss "
        f"{history['train_loss'][0]:.4f} -> {history['train_loss'][-1]:.4f}), then "
        f"{len(chosen)} Linear weights converted to int4 (groups of {group}), packed"
        + (f"; kept float: {', '.join(kept)}" if kept else ""),
        data={k: v for k, v in history.items() if k != "train_loss"},
    )
    ctx.progress(1.0)
    return quantized


def _attr(module: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


METHOD = Method(
    name="quantize.qat",
    summary="Quantization-aware training (int8 PT2E QAT or int4 torchao QAT), then convert.",
    params=QATParams,
    formats=frozenset({"pt2"}),
    handler=quantize_qat,
    datasets_required=frozenset({"train"}),
    datasets_optional=frozenset({"eval"}),
    devices=frozenset({"cpu"}),
    post_conversion=True,
    search=Searchable(
        SearchRole.precision,
        {"weight_bits": Choice((8, 4)), "epochs": Range(1, 3, step=1, integer=True)},
    ),
)
