"""The shared training loop: fine-tuning, distillation, QAT and iterative pruning use it.

One loop (Adam, shuffled mini-batches from a fixed seed, ``ctx.progress`` after every
batch so a cancellation is honoured within one batch, optional early stopping on an eval
set with the best weights restored) and one default loss (:func:`supervised_loss`).
Methods bring their own loss as a closure when they need more than labels (distillation
runs its teacher inside a custom ``forward``).

Torch is imported inside functions, like everywhere in the engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.errors import DatasetMismatchError, InvalidParamsError

if TYPE_CHECKING:
    import torch

    from worker.context import StepContext
    from worker.formats import LoadedModel

    Forward = Callable[[torch.nn.Module, dict[str, torch.Tensor]], Any]
    LossFn = Callable[[Any, "torch.Tensor | None"], torch.Tensor]
    ExtraLoss = Callable[[torch.nn.Module], torch.Tensor]


def primary_output(outputs: Any) -> torch.Tensor:
    """The tensor a loss is computed on: ``.logits`` of a Hugging Face output, the first
    tensor of a tuple/list/dict, or the tensor itself."""
    import torch

    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, list | tuple):
        for item in outputs:
            if isinstance(item, torch.Tensor):
                return item
    raise InvalidParamsError(
        f"the model's output ({type(outputs).__name__}) holds no tensor to compute a loss on"
    )


def supervised_loss(outputs: Any, labels: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy for ``[N, C]`` logits with integer labels (``[N]`` class indices or
    ``[N, C]`` one-hot integers); mean squared error otherwise (regression targets).

    Raises:
        InvalidParamsError: no labels, or labels whose shape does not fit the outputs.
    """
    from torch.nn import functional as F

    if labels is None:
        raise InvalidParamsError(
            "supervised training needs labels: add a 'labels' array to the train dataset"
        )
    logits = primary_output(outputs)
    integer = not labels.is_floating_point()
    if integer and logits.ndim == 2:
        if labels.ndim == 1 and labels.shape[0] == logits.shape[0]:
            return F.cross_entropy(logits, labels.long())
        if labels.shape == logits.shape:  # one-hot
            return F.cross_entropy(logits, labels.argmax(dim=1))
    if labels.numel() == logits.numel():
        return F.mse_loss(logits, labels.to(logits.dtype).reshape(logits.shape))
    raise DatasetMismatchError(
        f"labels of shape {list(labels.shape)} ({labels.dtype}) do not fit model outputs of "
        f"shape {list(logits.shape)}: give [N] class indices for [N, C] logits, or targets "
        "with the outputs' shape",
        step="train",
    )


def default_forward(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    """Call ``module`` with the batch: keyword arguments for a Hugging Face model (it has
    ``main_input_name``), otherwise positional arguments in input order."""
    if hasattr(module, "main_input_name"):
        return module(**batch)
    return module(*batch.values())


def model_forward(model: LoadedModel) -> Forward:
    """A ``forward`` for :func:`train` that calls a lifted ``model`` the way its program is
    called: flat inputs unflattened with the pt2 program's input spec (nested or keyword
    inputs work), keyword arguments for ``hf``."""
    from torch.utils import _pytree as pytree

    if model.format != "pt2" or model.program is None:
        return default_forward
    in_spec = model.program.call_spec.in_spec
    names = [s.name for s in model.inputs]

    def forward(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        flat = [batch[name] for name in names] if set(names) == set(batch) else list(batch.values())
        args, kwargs = pytree.tree_unflatten(flat, in_spec)
        return module(*args, **kwargs)

    return forward


@dataclass
class TrainingData:
    """A step's training arrays (fitted to the model's inputs) and its optional eval set.

    Attributes:
        inputs / labels: the ``train`` dataset; labels None when it has none.
        eval_inputs / eval_labels: the ``eval`` dataset, None when not given (or, for a
            step that needs labels, when it has none).
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    eval_inputs: dict[str, np.ndarray] | None = None
    eval_labels: np.ndarray | None = None


def training_data(model: LoadedModel, ctx: StepContext, *, labels_required: bool) -> TrainingData:
    """The ``train`` (and, when given, ``eval``) datasets of the job, fitted to ``model``.

    Raises:
        InvalidParamsError: no ``train`` dataset.
        DatasetMismatchError: it does not fit the model, or has no labels when required.
    """
    from worker.data import fit_dataset

    train_set = ctx.datasets.get("train")
    if train_set is None:
        raise InvalidParamsError(
            f"{ctx.method} trains the model and needs a train dataset: upload one and pass "
            "its id in datasets.train",
            step=ctx.method,
        )
    if labels_required and train_set.labels is None:
        raise DatasetMismatchError(
            f"{ctx.method} is supervised: the train dataset needs a 'labels' array",
            step=ctx.method,
        )
    data = TrainingData(fit_dataset(model, "train", train_set), train_set.labels)
    eval_set = ctx.datasets.get("eval")
    if eval_set is not None:
        if labels_required and eval_set.labels is None:
            ctx.log("the eval dataset has no labels: training runs without early stopping")
        else:
            data.eval_inputs = fit_dataset(model, "eval", eval_set)
            data.eval_labels = eval_set.labels
    return data


def batch_plan(model: LoadedModel, batch_size: int, ctx: StepContext) -> tuple[int, bool]:
    """``(batch_size, drop_last)`` for :func:`train`: a model exported with a static batch
    size only runs batches of exactly that size, so it trains with those (and says so)."""
    static = model.static_batch
    if static is None:
        return batch_size, False
    if static != batch_size:
        ctx.log(
            f"the model was exported with a static batch size of {static}: training uses "
            f"batches of {static} instead of {batch_size}"
        )
    return static, True


def trace_inputs(model: LoadedModel, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """A few real samples to re-export with (``relower(example_inputs=...)``), sized to a
    static batch if there is one; None when too few to keep a dynamic batch dim dynamic."""
    count = len(next(iter(feeds.values())))
    size = model.static_batch or min(8, count)
    if size > count or (model.static_batch is None and size < 2):
        return None
    return {k: np.ascontiguousarray(v[:size]) for k, v in feeds.items()}


def train(
    module: torch.nn.Module,
    *,
    inputs: dict[str, np.ndarray],
    labels: np.ndarray | None,
    loss_fn: LossFn,
    epochs: int,
    lr: float,
    batch_size: int,
    ctx: StepContext,
    eval_inputs: dict[str, np.ndarray] | None = None,
    eval_labels: np.ndarray | None = None,
    patience: int | None = None,
    extra_loss: ExtraLoss | None = None,
    weight_decay: float = 0.0,
    forward: Forward | None = None,
    parameters: list[torch.nn.Parameter] | None = None,
    progress_range: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    drop_last: bool = False,
) -> dict[str, Any]:
    """Train ``module`` in place with Adam on shuffled mini-batches.

    Args:
        module: a trainable module (``worker.lifting.lift`` of a pt2 model, or an hf one).
        inputs: training arrays by model input name, in input order; axis 0 is samples.
        labels: ``[N, ...]`` targets, or None (then ``loss_fn`` must not need them).
        loss_fn: ``(outputs, labels_batch) -> scalar``; ``outputs`` is what ``forward``
            returns. :func:`supervised_loss` for plain supervised training.
        epochs / lr / batch_size: the schedule (a last partial batch is kept).
        ctx: reports progress after every batch (which honours cancellation) and logs
            one line per epoch.
        eval_inputs / eval_labels: a held-out set; after every epoch the mean
            ``loss_fn`` over it (and accuracy, for classifiers with integer labels) is
            recorded; the weights of the epoch with the lowest eval loss are restored at
            the end.
        patience: with an eval set, stop after this many epochs without improvement.
        extra_loss: ``(module) -> scalar`` added to every batch's loss (e.g. an L1 term).
        weight_decay: L2 penalty coefficient given to Adam.
        forward: ``(module, batch) -> outputs``; default :func:`default_forward`.
        parameters: what the optimizer updates; default every parameter that requires grad.
        progress_range: the slice of the step's progress this training occupies.
        seed: seeds the shuffling (and nothing else: the caller owns model init).
        drop_last: skip a last partial batch (train and eval), for models exported with
            a static batch size (see :func:`batch_plan`).

    Returns:
        ``{"train_loss": [per epoch], "eval_loss": [...], "eval_accuracy": [...],
        "epochs_run", "best_epoch", "stopped_early"}`` (the eval keys only with an eval set).

    Raises:
        InvalidParamsError: bad schedule values or nothing to train.
        DatasetMismatchError: inputs and labels disagree on the number of samples.
    """
    import torch

    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise InvalidParamsError(
            f"training needs epochs >= 1, batch_size >= 1 and lr > 0 "
            f"(got {epochs}, {batch_size}, {lr})"
        )
    available = _num_samples(inputs, labels, "train")
    num_samples = available
    eval_samples = 0 if eval_inputs is None else _num_samples(eval_inputs, eval_labels, "eval")
    has_eval = eval_inputs is not None
    if drop_last:
        num_samples -= num_samples % batch_size
        eval_samples -= eval_samples % batch_size
        if num_samples == 0:
            raise DatasetMismatchError(
                f"the train dataset has fewer samples than one batch ({batch_size})",
                step="train",
            )
        has_eval = has_eval and eval_samples > 0
    forward = forward or default_forward
    params = parameters if parameters is not None else _trainable(module)
    if not params:
        raise InvalidParamsError("the model has no trainable floating-point parameters")
    device = params[0].device
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    data = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
    targets = None if labels is None else torch.from_numpy(np.ascontiguousarray(labels))

    batches_per_epoch = math.ceil(num_samples / batch_size)
    eval_batches = math.ceil(eval_samples / batch_size) if has_eval else 0
    total_units = epochs * (batches_per_epoch + eval_batches)
    start, end = progress_range
    done = 0

    def tick() -> None:
        ctx.progress(start + (end - start) * done / total_units)

    history: dict[str, Any] = {"train_loss": [], "stopped_early": False}
    if has_eval:
        history["eval_loss"] = []
        history["eval_accuracy"] = []
    best_loss = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch = epochs - 1
    stale = 0
    epoch = 0
    for epoch in range(epochs):
        module.train()
        order = torch.randperm(available, generator=generator)[:num_samples]
        total, count = 0.0, 0
        for first in range(0, num_samples, batch_size):
            index = order[first : first + batch_size]
            batch = {k: v[index].to(device) for k, v in data.items()}
            batch_labels = None if targets is None else targets[index].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(forward(module, batch), batch_labels)
            if extra_loss is not None:
                loss = loss + extra_loss(module)
            if not torch.isfinite(loss):
                raise InvalidParamsError(
                    f"training diverged (loss {float(loss.detach())} in epoch {epoch + 1}): "
                    f"lower lr (now {lr}), or check the train data for NaN/inf values"
                )
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
            count += len(index)
            done += 1
            tick()
        history["train_loss"].append(total / count)
        line = f"epoch {epoch + 1}/{epochs}: train loss {total / count:.4f}"
        if has_eval:
            assert eval_inputs is not None
            eval_loss, eval_acc = _evaluate(
                module, eval_inputs, eval_labels, loss_fn, forward, batch_size, eval_samples,
                device, tick,
            )  # fmt: skip
            done += eval_batches
            tick()
            history["eval_loss"].append(eval_loss)
            history["eval_accuracy"].append(eval_acc)
            line += f", eval loss {eval_loss:.4f}"
            if eval_acc is not None:
                line += f", eval accuracy {eval_acc:.4f}"
            if eval_loss < best_loss:
                best_loss, best_epoch, stale = eval_loss, epoch, 0
                best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            else:
                stale += 1
        ctx.log(line)
        if has_eval and patience is not None and stale >= patience:
            history["stopped_early"] = epoch + 1 < epochs
            break
    if best_state is not None and best_epoch != epoch:
        module.load_state_dict(best_state)
        ctx.log(f"restored the weights of epoch {best_epoch + 1} (lowest eval loss)")
    module.eval()
    history["epochs_run"] = epoch + 1
    history["best_epoch"] = best_epoch + 1
    ctx.progress(end)
    return history


def fit_supervised(
    model: LoadedModel,
    module: torch.nn.Module,
    data: TrainingData,
    ctx: StepContext,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    patience: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """:func:`train` of a pipeline model on its labelled data with :func:`supervised_loss`.

    The model's batch plan and forward, the train and eval arrays of ``data``; ``options``
    go to :func:`train` (``extra_loss``, ``weight_decay``, ``progress_range``, ...).
    """
    size, drop_last = batch_plan(model, batch_size, ctx)
    history = train(
        module,
        inputs=data.inputs,
        labels=data.labels,
        loss_fn=supervised_loss,
        epochs=epochs,
        lr=lr,
        batch_size=size,
        ctx=ctx,
        eval_inputs=data.eval_inputs,
        eval_labels=data.eval_labels,
        patience=patience,
        forward=model_forward(model),
        drop_last=drop_last,
        **options,
    )
    if patience is not None and data.eval_inputs is None:
        ctx.log("patience ignored: early stopping needs a labelled eval dataset", "warning")
    return history


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    params = []
    for p in module.parameters():
        if p.requires_grad and p.is_floating_point() and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def _num_samples(inputs: dict[str, np.ndarray], labels: np.ndarray | None, role: str) -> int:
    if not inputs:
        raise DatasetMismatchError(f"the {role} data has no input arrays", step="train")
    sizes = {len(v) for v in inputs.values()}
    if labels is not None:
        sizes.add(len(labels))
    if len(sizes) != 1 or 0 in sizes:
        raise DatasetMismatchError(
            f"the {role} inputs and labels disagree on the number of samples ({sorted(sizes)})",
            step="train",
        )
    return sizes.pop()


def _evaluate(
    module: torch.nn.Module,
    inputs: dict[str, np.ndarray],
    labels: np.ndarray | None,
    loss_fn: LossFn,
    forward: Forward,
    batch_size: int,
    n: int,
    device: torch.device,
    tick: Callable[[], None],
) -> tuple[float, float | None]:
    """Mean loss over the first ``n`` samples and, for integer labels of ``[N, C]``
    logits, accuracy."""
    import torch

    module.eval()
    total, correct = 0.0, 0
    classify = labels is not None and labels.ndim == 1 and labels.dtype.kind in "iu"
    with torch.no_grad():
        for first in range(0, n, batch_size):
            rows = slice(first, min(first + batch_size, n))
            batch = {k: _tensor(v[rows], device) for k, v in inputs.items()}
            target = None if labels is None else _tensor(labels[rows], device)
            outputs = forward(module, batch)
            total += float(loss_fn(outputs, target)) * (rows.stop - rows.start)
            if classify and target is not None:
                logits = primary_output(outputs)
                if logits.ndim == 2:
                    correct += int((logits.argmax(dim=1) == target).sum())
                else:
                    classify = False
            tick()
    return total / n, (correct / n if classify else None)


def loss_summary(history: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"(train loss a -> b)"`` and the history without the per-epoch losses, for a log line."""
    losses = history["train_loss"]
    text = f"(train loss {losses[0]:.4f} -> {losses[-1]:.4f})"
    return text, {k: v for k, v in history.items() if k != "train_loss"}


def train_through_quantizer(
    model: LoadedModel,
    module: torch.nn.Module,
    ctx: StepContext,
    *,
    layers: list[torch.nn.Module],
    quantize: Callable[[torch.Tensor], torch.Tensor],
    epochs: int,
    lr: float,
    batch_size: int,
    quantizer: str,
) -> None:
    """Train ``module`` with each of ``layers``' weights seen through ``quantize``
    (straight-through), on the labelled train data, and log it; the latent float weights
    are left in place for the caller to quantize."""
    from torch.nn.utils import parametrize

    for layer in layers:
        parametrize.register_parametrization(layer, "weight", straight_through(quantize))
    try:
        data = training_data(model, ctx, labels_required=True)
        history = fit_supervised(
            model,
            module,
            data,
            ctx,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            progress_range=(0.05, 0.85),
        )
    finally:
        for layer in layers:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    text, summary = loss_summary(history)
    ctx.log(
        f"trained {history['epochs_run']} epochs through the {quantizer} quantizer {text}",
        data=summary,
    )


def straight_through(quantize: Callable[[torch.Tensor], torch.Tensor]) -> torch.nn.Module:
    """A parametrization: the forward sees ``quantize(weight)``, the gradient reaches the
    latent float weight unchanged (the straight-through estimator)."""
    import torch

    class StraightThrough(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quantize = quantize

        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight + (self.quantize(weight) - weight).detach()

    return StraightThrough()
