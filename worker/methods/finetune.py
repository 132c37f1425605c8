"""``finetune``: supervised training on the job's ``train`` data, with L1/L2 regularization.

Typical uses: recover the accuracy a pruning or quantization step cost, or (with ``l1``)
push weights towards zero before ``prune.magnitude`` so that pruning removes less
information. pt2 models are lifted to real layers (``worker.lifting.lift``), trained with
the shared loop (``worker.training.train``: Adam, shuffled batches, early stopping on
``eval``) and exported again with the upload's input signature and dynamic dims; hf
models (their transformers module, fed the tokenized ``.jsonl`` or array data) are
trained in place and saved with ``save_pretrained``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from worker.methods.base import Method, MethodParams, Range, Searchable, SearchRole

if TYPE_CHECKING:
    import torch

    from worker.context import StepContext
    from worker.formats import LoadedModel


class FinetuneParams(MethodParams):
    """Supervised fine-tuning on the ``train`` dataset (inputs and labels).

    The loss is cross-entropy for classifiers (``[N, C]`` outputs, integer labels) and
    mean squared error for other targets, plus ``l1 * sum(|w|)`` over the weight
    matrices and kernels; ``l2`` is Adam's weight decay. With an ``eval`` dataset that has
    labels, the eval loss is measured after every epoch and the best epoch's weights are
    kept.

    Args:
        epochs: passes over the training data (at most; see ``patience``).
        lr: Adam's learning rate. Fine-tuning a trained model wants a small one.
        batch_size: samples per optimizer step (a model exported with a static batch size
            trains with that size instead).
        l1: coefficient of the L1 penalty ``l1 * sum(|w|)`` on weight matrices/kernels
            (not biases or norms); it drives weights to exactly-small values, so a later
            ``prune.magnitude`` removes less signal. Try 1e-5 to 1e-4.
        l2: L2 penalty (Adam weight decay) on every parameter.
        patience: stop after this many epochs without a lower eval loss (needs a
            labelled ``eval`` dataset); null trains every epoch.

    Example:
        ``{"method": "finetune", "params": {"epochs": 5, "lr": 0.001, "l1": 1e-5}}``
    """

    epochs: int = Field(default=3, ge=1, le=1000, description="Passes over the train data.")
    lr: float = Field(default=1e-3, gt=0.0, le=1.0, description="Adam learning rate.")
    batch_size: int = Field(default=32, ge=1, le=65536, description="Samples per optimizer step.")
    l1: float = Field(
        default=0.0,
        ge=0.0,
        description=(
            "L1 penalty coefficient: l1 * sum(|w|) over weight matrices and kernels; "
            "pushes weights towards zero before pruning (try 1e-5..1e-4)."
        ),
    )
    l2: float = Field(
        default=0.0, ge=0.0, description="L2 penalty: Adam weight decay on every parameter."
    )
    patience: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Early stopping: stop after this many epochs without a lower eval loss "
            "(needs a labelled eval dataset). null: train every epoch."
        ),
    )


def finetune(model: LoadedModel, params: FinetuneParams, ctx: StepContext) -> LoadedModel:
    """Train the model on ``train``; returns the re-exported, fine-tuned model."""
    from worker.lifting import lift, relower
    from worker.training import fit_supervised, loss_summary, trace_inputs, training_data

    data = training_data(model, ctx, labels_required=True)
    module = lift(model)
    ctx.progress(0.05)
    weights = regularized_weights(module)
    l1 = params.l1

    def l1_penalty(_: torch.nn.Module) -> torch.Tensor:
        return l1 * sum(w.abs().sum() for w in weights)  # type: ignore[return-value]

    history = fit_supervised(
        model,
        module,
        data,
        ctx,
        epochs=params.epochs,
        lr=params.lr,
        batch_size=params.batch_size,
        patience=params.patience,
        extra_loss=l1_penalty if l1 > 0 else None,
        weight_decay=params.l2,
        progress_range=(0.05, 0.9),
    )
    tuned = relower(model, module, example_inputs=trace_inputs(model, data.inputs))
    losses, summary = loss_summary(history)
    summary["final_train_loss"] = history["train_loss"][-1]
    ctx.log(f"fine-tuned for {history['epochs_run']} epochs {losses}", data=summary)
    ctx.progress(1.0)
    return tuned


def regularized_weights(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weight matrices and kernels (float parameters of rank >= 2) of ``module``."""
    seen: set[int] = set()
    weights = []
    for param in module.parameters():
        trainable = param.requires_grad and param.is_floating_point()
        if trainable and param.ndim >= 2 and id(param) not in seen:
            seen.add(id(param))
            weights.append(param)
    return weights


METHOD = Method(
    name="finetune",
    summary="Supervised fine-tuning on the train data with L1/L2 regularization.",
    params=FinetuneParams,
    formats=frozenset({"pt2", "hf"}),
    handler=finetune,
    datasets_required=frozenset({"train"}),
    datasets_optional=frozenset({"eval"}),
    devices=frozenset({"cpu"}),
    search=Searchable(SearchRole.recovery, {"epochs": Range(1, 5, step=1, integer=True)}),
)
