"""``prune.magnitude``: unstructured L1 magnitude pruning.

The smallest-magnitude weights are set to zero with ``torch.nn.utils.prune`` (per tensor
or with one global threshold) and the masks are folded in, so the saved model is a plain
dense model with zeros: smaller once compressed (``size_bytes_gzip``), not faster on
dense kernels. pt2 weights are edited in place in the program's state dict (the graph
does not change, so its input signature, dynamic dims included, is kept as uploaded);
onnx weights are the initializers feeding MatMul/Gemm/Conv; hf weights are those of the
transformers module's ``nn.Linear``/``nn.Conv*`` (and transformers' ``Conv1D``) layers,
edited in place (embeddings and LayerNorms are left alone unless ``layers`` names them).

With ``steps > 1`` the pruning is gradual (Zhu & Gupta, 2017, "To prune, or not to
prune"): round ``t`` of ``n`` prunes to sparsity ``amount * (1 - (1 - t/n)^3)`` (fast at
first, slowly at the end, exactly ``amount`` at the last round) and then fine-tunes on
the ``train`` dataset for ``epochs_per_step`` epochs with the masks fixed: the gradient
of a pruned weight is masked, so it stays exactly zero under Adam. The model is lifted to
real layers for training (``worker.lifting.lift``) and exported again afterwards (pt2),
or trained in place (hf); onnx models cannot be trained and take ``steps = 1`` only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Self

import numpy as np
from pydantic import Field, ValidationInfo, model_validator

from worker.contract import DatasetRole
from worker.errors import InvalidParamsError
from worker.layers import Exclude, excluded_layers, layer_of, record_layers
from worker.methods.base import (
    Choice,
    DataNeed,
    Method,
    MethodParams,
    Range,
    Searchable,
    SearchRole,
    context_format,
)

if TYPE_CHECKING:
    import torch

    from worker.context import StepContext
    from worker.formats import LoadedModel


def min_cosine_field(unit: str) -> Any:
    """``min_cosine`` of the pruning methods' ``allocation: "sensitivity"``: the output cosine
    each ``unit`` (tensor, channel group) keeps when it alone is pruned."""
    return Field(
        default=0.99,
        gt=0.0,
        lt=1.0,
        description=f"allocation 'sensitivity': the output cosine each {unit}'s pruning keeps.",
    )


class MagnitudePruneParams(MethodParams):
    """Unstructured L1 magnitude pruning: zero the weights of smallest absolute value.

    Args:
        amount: fraction of the selected weights set to zero, strictly between 0 and 1.
            The pruned tensors reach exactly this sparsity, up to rounding to whole
            elements (per tensor with ``scope="layer"``, over all of them with ``"global"``).
        scope: ``"layer"`` prunes every selected tensor to ``amount``; ``"global"`` ranks
            all selected weights together under one threshold, so layers with many small
            weights lose more of them.
        layers: name substrings; when given, every float parameter (matrices and kernels;
            biases too with ``include_bias``) whose name contains one of them is pruned.
            By default the weights of Linear/Conv (pt2) or MatMul/Gemm/Conv (onnx) layers.
        include_bias: also prune the bias vectors of the selected layers.
        exclude: layers left untouched, as the model's ``info.layer_names`` lists them
            (module paths for pt2/hf, node names for onnx) or ``re:`` patterns; applied
            after ``layers``.
        steps: pruning rounds. 1 (default) prunes once, with no data. More rounds raise
            the sparsity on a cubic schedule to ``amount``, fine-tuning on the ``train``
            dataset (inputs and labels, required then) after each round; pt2 and hf only.
        epochs_per_step: fine-tuning epochs after each round (``steps > 1``).
        lr: Adam learning rate of the fine-tuning (``steps > 1``).
        batch_size: fine-tuning batch size (``steps > 1``).

        allocation: ``"uniform"`` (default) prunes every tensor to ``amount``;
            ``"sensitivity"`` prunes each tensor as far as the model's output, with only
            that tensor pruned, keeps a cosine of ``min_cosine`` to the original's on the
            eval (else calibration) inputs, up to ``amount`` (stability-based pruning:
            robust layers lose more, sensitive ones less; pt2 and hf, ``steps=1``).
        min_cosine: the output cosine each tensor's pruning must keep with
            ``allocation="sensitivity"`` (default 0.99).

    Example:
        ``{"method": "prune.magnitude", "params": {"amount": 0.8, "steps": 4, "epochs_per_step": 2}}``
    """

    amount: float = Field(
        gt=0.0,
        lt=1.0,
        description="Fraction of the selected weights set to zero (0 < amount < 1).",
    )
    scope: Literal["layer", "global"] = Field(
        default="layer",
        description=(
            "'layer': prune each selected tensor to `amount`; 'global': one magnitude "
            "threshold over all selected tensors together."
        ),
    )
    layers: tuple[str, ...] | None = Field(
        default=None,
        min_length=1,
        description=(
            "Only prune parameters whose name contains one of these substrings. "
            "Default: the weights of Linear/Conv/MatMul/Gemm layers."
        ),
    )
    include_bias: bool = Field(
        default=False, description="Also prune the bias vectors of the selected layers."
    )
    exclude: Exclude = None
    steps: int = Field(
        default=1,
        ge=1,
        le=100,
        description=(
            "Pruning rounds: 1 prunes once (no data needed); more rounds raise sparsity on "
            "a cubic schedule to `amount`, fine-tuning on the train dataset after each "
            "(needs a labelled train dataset; pt2 and hf models)."
        ),
    )
    epochs_per_step: int = Field(
        default=1, ge=1, le=1000, description="Fine-tuning epochs after each round (steps > 1)."
    )
    lr: float = Field(
        default=1e-3, gt=0.0, le=1.0, description="Fine-tuning learning rate, Adam (steps > 1)."
    )
    batch_size: int = Field(
        default=32, ge=1, le=65536, description="Fine-tuning batch size (steps > 1)."
    )
    allocation: Literal["uniform", "sensitivity"] = Field(
        default="uniform",
        description=(
            "'uniform': every selected tensor pruned to `amount`; 'sensitivity': each tensor "
            "pruned as far as the model's output, with only that tensor pruned, keeps a "
            "cosine similarity of at least `min_cosine` to the original's on the eval (else "
            "calibration) inputs, and at most to `amount` (pt2 and hf models, steps=1, "
            "scope 'layer')."
        ),
    )
    min_cosine: float = min_cosine_field("tensor")

    @model_validator(mode="after")
    def _trainable_format(self, info: ValidationInfo) -> Self:
        fmt = context_format(info)
        if self.allocation == "sensitivity":
            if fmt == "onnx":
                raise ValueError(
                    "allocation 'sensitivity' runs the model with each tensor pruned in "
                    "memory, which pt2 and hf models allow: upload the model as pt2, or use "
                    "allocation 'uniform'"
                )
            if self.steps > 1 or self.scope != "layer":
                raise ValueError(
                    "allocation 'sensitivity' chooses one amount per tensor: use steps=1 and "
                    "scope 'layer'"
                )
        if fmt == "onnx" and self.steps > 1:
            raise ValueError(
                "steps > 1 fine-tunes the model between pruning rounds, and onnx models "
                "cannot be trained: use steps=1, or upload the model as pt2"
            )
        return self

    def schedule(self) -> list[float]:
        """The sparsity after each round: ``amount * (1 - (1 - t/steps)^3)``, t = 1..steps."""
        n = self.steps
        return [self.amount * (1.0 - (1.0 - t / n) ** 3) for t in range(1, n + 1)]


# aten op -> (argument positions holding weights, positions holding the bias)
_PT2_WEIGHT_ARGS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "aten::linear": ((1,), (2,)),
    "aten::conv1d": ((1,), (2,)),
    "aten::conv2d": ((1,), (2,)),
    "aten::conv3d": ((1,), (2,)),
    "aten::convolution": ((1,), (2,)),
    "aten::_convolution": ((1,), (2,)),
    "aten::conv_transpose1d": ((1,), (2,)),
    "aten::conv_transpose2d": ((1,), (2,)),
    "aten::conv_transpose3d": ((1,), (2,)),
    "aten::matmul": ((0, 1), ()),
    "aten::mm": ((0, 1), ()),
    "aten::bmm": ((0, 1), ()),
    "aten::addmm": ((1, 2), (0,)),
    "aten::baddbmm": ((1, 2), (0,)),
}
_ONNX_WEIGHT_INPUTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "MatMul": ((0, 1), ()),
    "Gemm": ((0, 1), (2,)),
    "Conv": ((1,), (2,)),
    "ConvTranspose": ((1,), (2,)),
}
ALLOCATION_STEP = 0.05
"""allocation 'sensitivity' tries amounts on this grid (and `amount` itself); shared with
``prune.structured`` (:func:`worker.search.sensitivity.allocation_grid`)."""
ALLOCATION_DATA = DataNeed(
    (DatasetRole.eval, DatasetRole.calibration),
    why="allocation 'sensitivity' runs the model on real inputs",
)
"""What allocation 'sensitivity' runs the model on (the first role given), here and in
``prune.structured``: checked at ``POST /v1/jobs`` through the method's ``needs``."""

# Nodes a weight may pass through between its initializer and the layer.
_ONNX_PASS_THROUGH = frozenset({"Transpose", "Identity", "Cast", "Reshape"})


def prune_magnitude(
    model: LoadedModel, params: MagnitudePruneParams, ctx: StepContext
) -> LoadedModel:
    """Zero the smallest-magnitude weights; returns the same model, edited."""
    import torch

    select = {"pt2": _pt2_targets, "hf": _hf_targets}.get(model.format, _onnx_targets)
    tensors = select(model, params)
    owners = tensor_layers(model)
    excluded = excluded_layers(params, list(dict.fromkeys(owners.values())), ctx.method)
    tensors = {name: t for name, t in tensors.items() if owners.get(name) not in excluded}
    if not tensors:
        what = (
            f"matching {list(params.layers)}"
            if params.layers
            else "in Linear/Conv/MatMul/Gemm layers"
        )
        raise InvalidParamsError(f"no prunable float weights {what}", step=ctx.method)
    if params.steps > 1:
        pruned_model, final = _prune_iteratively(model, params, ctx, list(tensors))
        _record(ctx, owners, final, excluded)
        return pruned_model
    ctx.progress(0.1)
    if params.allocation == "sensitivity":
        from worker.search.sensitivity import allocate_pruning, nothing_allocated

        allocated = allocate_pruning(model, ctx, tensors, params.amount, params.min_cosine)
        pruned = {
            name: l1_prune({name: tensors[name]}, share.amount, "layer")[name]
            for name, share in allocated.items()
            if share.amount > 0
        }
        ctx.log(
            f"sensitivity allocation (output cosine >= {params.min_cosine}): "
            f"{len(pruned)} of {len(allocated)} tensors pruned (cosines: each tensor alone "
            "pruned to its amount; a tensor left whole, at the smallest amount tried)",
            data={
                "amounts": {name: share.amount for name, share in allocated.items()},
                "cosines": {name: round(share.cosine, 6) for name, share in allocated.items()},
            },
        )
        if not pruned:
            raise nothing_allocated("tensor", params.min_cosine, ctx.method)
    else:
        pruned = l1_prune(tensors, params.amount, params.scope)
    ctx.progress(0.8)
    if model.format == "pt2":
        assert model.program is not None
        with torch.no_grad():
            for name, value in pruned.items():
                model.program.state_dict[name].copy_(value)
    elif model.format == "hf":
        _hf_write(model, pruned)
    else:
        _onnx_write(model, pruned)
    per_tensor = {
        name: round(1.0 - int(torch.count_nonzero(t)) / t.numel(), 6) for name, t in pruned.items()
    }
    total = sum(t.numel() for t in pruned.values())
    zeros = sum(t.numel() - int(torch.count_nonzero(t)) for t in pruned.values())
    ctx.log(
        f"pruned {len(pruned)} tensors ({params.scope} scope) to sparsity {zeros / total:.4f}",
        data={"sparsity": per_tensor},
    )
    _record(ctx, owners, pruned, excluded)
    ctx.progress(1.0)
    return model


def _datasets_for(params: MagnitudePruneParams) -> list[DataNeed | str]:
    needs: list[DataNeed | str] = ["train"] if params.steps > 1 else []
    if params.allocation == "sensitivity":
        needs.append(ALLOCATION_DATA)
    return needs


def tensor_layers(model: LoadedModel) -> dict[str, str]:
    """Each weight tensor's layer, as ``info.layer_names`` names it."""
    if model.format == "onnx":
        from worker.formats.onnx import onnx_weight_layers

        return onnx_weight_layers(model)
    from worker.formats import weight_shapes

    return {name: layer_of(name) for name in weight_shapes(model)}


def _record(
    ctx: StepContext,
    owners: dict[str, str],
    pruned: dict[str, torch.Tensor],
    excluded: frozenset[str],
) -> None:
    """Per layer: changed (sparsity over its pruned tensors) or kept (and why)."""
    import torch

    zeros: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for name, tensor in pruned.items():
        layer = owners.get(name, layer_of(name))
        zeros[layer] = zeros.get(layer, 0) + tensor.numel() - int(torch.count_nonzero(tensor))
        sizes[layer] = sizes.get(layer, 0) + tensor.numel()
    kept = {
        layer: "excluded" if layer in excluded else "not selected"
        for layer in dict.fromkeys(owners.values())
        if layer not in sizes
    }
    sparsity = {layer: round(zeros[layer] / sizes[layer], 6) for layer in sizes}
    record_layers(ctx, list(sizes), kept, sparsity=sparsity)


def l1_prune(
    tensors: dict[str, torch.Tensor], amount: float, scope: str
) -> dict[str, torch.Tensor]:
    """Prune copies of ``tensors`` with ``torch.nn.utils.prune`` and fold the masks in."""
    import torch
    from torch.nn.utils import prune

    holders: dict[str, torch.nn.Module] = {}
    for name, tensor in tensors.items():
        holder = torch.nn.Module()
        holder.register_parameter(
            "weight", torch.nn.Parameter(tensor.detach().clone(), requires_grad=False)
        )
        holders[name] = holder
    if scope == "global":
        prune.global_unstructured(
            [(h, "weight") for h in holders.values()],
            pruning_method=prune.L1Unstructured,
            amount=amount,
        )
    else:
        for holder in holders.values():
            prune.l1_unstructured(holder, "weight", amount=amount)
    result = {}
    for name, holder in holders.items():
        prune.remove(holder, "weight")
        result[name] = holder.get_parameter("weight").detach()
    return result


def _prune_iteratively(
    model: LoadedModel, params: MagnitudePruneParams, ctx: StepContext, names: list[str]
) -> tuple[LoadedModel, dict[str, torch.Tensor]]:
    """Gradual pruning: ``steps`` rounds of prune (cubic schedule) then masked fine-tuning;
    the pruned model and its pruned tensors by name."""
    import torch

    from worker.errors import UnsupportedError
    from worker.lifting import lift, relower
    from worker.training import (
        batch_plan,
        model_forward,
        supervised_loss,
        trace_inputs,
        train,
        training_data,
    )

    if model.format == "onnx":
        raise UnsupportedError(
            "steps > 1 fine-tunes between rounds and onnx models cannot be trained; use "
            "steps=1 or a pt2 model",
            step=ctx.method,
        )
    data = training_data(model, ctx, labels_required=True)
    module = lift(model)
    weights = _module_parameters(model, module, names)
    masks = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    for name, weight in weights.items():
        # A pruned weight gets no gradient: Adam's moments stay 0, so it stays exactly 0.
        weight.register_hook(lambda grad, name=name: grad * masks[name])
    batch_size, drop_last = batch_plan(model, params.batch_size, ctx)
    forward = model_forward(model)
    schedule = params.schedule()
    span = 0.9 / len(schedule)
    for round_index, sparsity in enumerate(schedule):
        start = 0.05 + span * round_index
        current = {name: w.detach() for name, w in weights.items()}
        pruned = l1_prune(current, sparsity, params.scope)
        with torch.no_grad():
            for name, weight in weights.items():
                weight.copy_(pruned[name])
                masks[name] = pruned[name] != 0
        history = train(
            module,
            inputs=data.inputs,
            labels=data.labels,
            loss_fn=supervised_loss,
            epochs=params.epochs_per_step,
            lr=params.lr,
            batch_size=batch_size,
            ctx=ctx,
            eval_inputs=data.eval_inputs,
            eval_labels=data.eval_labels,
            forward=forward,
            progress_range=(start, start + span),
            drop_last=drop_last,
        )
        # measured after fine-tuning, before the masks are folded in: the masks held
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        measured = zeros / sum(w.numel() for w in weights.values())
        line = (
            f"round {round_index + 1}/{len(schedule)}: target sparsity {sparsity:.4f}, "
            f"{measured:.4f} after fine-tuning (train loss {history['train_loss'][-1]:.4f}"
        )
        if history.get("eval_accuracy") and history["eval_accuracy"][-1] is not None:
            line += f", eval accuracy {history['eval_accuracy'][-1]:.4f}"
        ctx.log(line + ")", data={"target_sparsity": sparsity, "sparsity": measured})
    with torch.no_grad():  # fold the masks in (the hooks already kept them zero)
        for name, weight in weights.items():
            weight.mul_(masks[name])
    zeros = sum(int((~mask).sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    ctx.log(
        f"pruned {len(weights)} tensors ({params.scope} scope) in {len(schedule)} rounds to "
        f"sparsity {zeros / total:.4f}",
        data={
            "schedule": [round(s, 6) for s in schedule],
            "sparsity": {n: round(float((~m).float().mean()), 6) for n, m in masks.items()},
        },
    )
    final = {name: weight.detach().clone() for name, weight in weights.items()}
    result = relower(model, module, example_inputs=trace_inputs(model, data.inputs))
    ctx.progress(1.0)
    return result, final


def _module_parameters(
    model: LoadedModel, module: torch.nn.Module, names: list[str]
) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters of ``module`` (lifted from ``model``) holding the tensors
    called ``names`` in ``model`` (pt2 state-dict FQNs, hf parameter names)."""
    import torch

    from worker.errors import UnsupportedError

    if model.format == "hf":
        return {name: module.get_parameter(name) for name in names}
    assert model.program is not None
    own = dict(module.named_parameters())
    found: dict[str, torch.nn.Parameter] = {}
    for name in names:
        original = model.program.state_dict[name]
        owner, _, attr = name.rpartition(".")
        candidates = [f"{owner.replace('.', '_')}.{attr}" if owner else attr, name]
        candidates += [n for n in own if n not in candidates]  # renamed: match by value
        for candidate in candidates:
            param = own.get(candidate)
            same = param is not None and param.shape == original.shape
            if same and torch.equal(param.detach(), original.detach()):  # type: ignore[union-attr]
                found[name] = param  # type: ignore[assignment]
                break
        else:
            raise UnsupportedError(
                f"weight {name!r} is not a trainable parameter of the lifted model",
                step="prune.magnitude",
            )
    return found


def _select(name: str, ndim: int, default_role: str | None, params: MagnitudePruneParams) -> bool:
    """Whether a float tensor is pruned. ``default_role``: "weight"/"bias" if a layer uses it."""
    if params.layers is not None:
        if not any(s in name for s in params.layers):
            return False
        return ndim >= 2 or (params.include_bias and ndim == 1)
    if default_role == "weight":
        return True
    return default_role == "bias" and params.include_bias


def _pt2_targets(model: LoadedModel, params: MagnitudePruneParams) -> dict[str, torch.Tensor]:
    import torch

    program = model.program
    assert program is not None
    to_param = program.graph_signature.inputs_to_parameters
    roles: dict[str, str] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        positions = _PT2_WEIGHT_ARGS.get(node.target._schema.name)
        if positions is None:
            continue
        for role, indices in zip(("weight", "bias"), positions, strict=True):
            for index in indices:
                arg = node.args[index] if index < len(node.args) else None
                if isinstance(arg, torch.fx.Node) and arg.name in to_param:
                    roles.setdefault(to_param[arg.name], role)
    targets: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name in program.graph_signature.parameters:
        tensor = program.state_dict[name]
        if not tensor.is_floating_point() or tensor.ndim == 0:
            continue
        if not _select(name, tensor.ndim, roles.get(name), params):
            continue
        if tensor.data_ptr() in seen_storage:  # a tied weight is pruned once
            continue
        seen_storage.add(tensor.data_ptr())
        targets[name] = tensor.detach()
    return targets


def _hf_targets(model: LoadedModel, params: MagnitudePruneParams) -> dict[str, torch.Tensor]:
    from torch import nn

    assert model.module is not None
    layer_types: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2-style linear layers

        layer_types += (Conv1D,)
    except ImportError:
        pass
    roles: dict[str, str] = {}
    for prefix, layer in model.module.named_modules():
        if isinstance(layer, layer_types):
            roles[f"{prefix}.weight"] = "weight"
            if getattr(layer, "bias", None) is not None:
                roles[f"{prefix}.bias"] = "bias"
    targets: dict[str, torch.Tensor] = {}
    for name, tensor in model.module.named_parameters(remove_duplicate=True):
        if not tensor.is_floating_point() or tensor.ndim == 0:
            continue
        if _select(name, tensor.ndim, roles.get(name), params):
            targets[name] = tensor.detach()
    return targets


def _hf_write(model: LoadedModel, pruned: dict[str, torch.Tensor]) -> None:
    import torch

    assert model.module is not None
    with torch.no_grad():
        for name, value in pruned.items():
            model.module.get_parameter(name).copy_(value)


def _onnx_targets(model: LoadedModel, params: MagnitudePruneParams) -> dict[str, torch.Tensor]:
    import torch
    from onnx import numpy_helper

    assert model.proto is not None
    graph = model.proto.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def source(name: str) -> str | None:
        for _ in range(4):
            if name in initializers:
                return name
            node = producers.get(name)
            if node is None or node.op_type not in _ONNX_PASS_THROUGH or not node.input:
                return None
            name = node.input[0]
        return None

    roles: dict[str, str] = {}
    for node in graph.node:
        positions = _ONNX_WEIGHT_INPUTS.get(node.op_type)
        if positions is None:
            continue
        for role, indices in zip(("weight", "bias"), positions, strict=True):
            for index in indices:
                if index < len(node.input) and node.input[index]:
                    init = source(node.input[index])
                    if init is not None:
                        roles.setdefault(init, role)
    targets: dict[str, torch.Tensor] = {}
    for name, init in initializers.items():
        array = numpy_helper.to_array(init)
        if array.dtype.kind != "f" or array.ndim == 0:
            continue
        if _select(name, array.ndim, roles.get(name), params):
            targets[name] = torch.from_numpy(np.array(array))
    return targets


def _onnx_write(model: LoadedModel, pruned: dict[str, torch.Tensor]) -> None:
    from onnx import numpy_helper

    assert model.proto is not None
    for init in model.proto.graph.initializer:
        if init.name in pruned:
            init.CopyFrom(numpy_helper.from_array(pruned[init.name].numpy(), init.name))


METHOD = Method(
    name="prune.magnitude",
    summary="Unstructured L1 magnitude pruning: zero the smallest weights (per layer or global).",
    params=MagnitudePruneParams,
    formats=frozenset({"pt2", "onnx", "hf"}),
    handler=prune_magnitude,
    datasets_optional=frozenset({"train", "eval"}),
    devices=frozenset({"cpu", "gpu"}),
    datasets_for=_datasets_for,
    search=Searchable(
        SearchRole.structure,
        {"amount": Range(0.3, 0.9, step=0.1), "allocation": Choice(("uniform", "sensitivity"))},
        defaults={"amount": 0.5},
    ),
)
