"""The shared training loop (worker/training.py) on the digits, with plain torch modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests import factories
from tests.helpers import step_context
from worker.context import RecordingReporter
from worker.errors import DatasetMismatchError, InvalidParamsError, JobCancelled
from worker.training import primary_output, supervised_loss, train


def digits() -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray], np.ndarray]:
    x_train, y_train, x_test, y_test = factories.digits_arrays()
    return {"x": x_train}, y_train, {"x": x_test}, y_test


def test_training_from_scratch_learns_the_digits(tmp_path: Path) -> None:
    inputs, labels, _, _ = digits()
    model = factories.mlp((32,))
    before = factories.digits_accuracy(model)
    history = train(
        model, inputs=inputs, labels=labels, loss_fn=supervised_loss, epochs=4, lr=1e-2,
        batch_size=64, ctx=step_context(tmp_path),
    )  # fmt: skip
    assert before < 0.2  # an untrained 10-class model is at chance
    assert factories.digits_accuracy(model) > 0.9
    assert history["epochs_run"] == 4
    assert history["train_loss"][-1] < history["train_loss"][0] / 3
    assert not model.training  # left in eval mode


def test_same_seed_same_weights_and_progress_after_every_batch(tmp_path: Path) -> None:
    inputs, labels, _, _ = digits()
    results = []
    for _ in range(2):
        model = factories.mlp((16,))
        reporter = RecordingReporter()
        train(
            model, inputs=inputs, labels=labels, loss_fn=supervised_loss, epochs=2, lr=1e-2,
            batch_size=100, ctx=step_context(tmp_path, reporter=reporter),
        )  # fmt: skip
        results.append((model.state_dict(), reporter.events))
    (first, events), (second, _) = results
    for name in first:
        assert torch.equal(first[name], second[name])
    batches = 2 * -(-len(labels) // 100)
    fractions = [e["fraction"] for e in events]
    assert len(fractions) >= batches
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_early_stopping_restores_the_best_epoch(tmp_path: Path) -> None:
    inputs, labels, eval_inputs, eval_labels = digits()
    # Eval labels unrelated to the inputs: fitting the train set makes eval loss worse.
    noise = np.random.default_rng(0).permutation(eval_labels)
    model = factories.mlp((32,))
    history = train(
        model, inputs=inputs, labels=labels, loss_fn=supervised_loss, epochs=30, lr=1e-2,
        batch_size=64, ctx=step_context(tmp_path), eval_inputs=eval_inputs, eval_labels=noise,
        patience=2,
    )  # fmt: skip
    assert history["stopped_early"]
    assert history["epochs_run"] < 30
    assert history["epochs_run"] == history["best_epoch"] + 2
    # The restored weights are those of the best epoch: their eval loss is the minimum.
    with torch.no_grad():
        logits = model(torch.from_numpy(eval_inputs["x"]))
        final = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(noise)))
    assert final == pytest.approx(min(history["eval_loss"]), rel=1e-5)
    assert len(history["eval_accuracy"]) == history["epochs_run"]


def test_eval_accuracy_is_recorded_for_classifiers(tmp_path: Path) -> None:
    inputs, labels, eval_inputs, eval_labels = digits()
    model = factories.mlp((32,))
    history = train(
        model, inputs=inputs, labels=labels, loss_fn=supervised_loss, epochs=3, lr=1e-2,
        batch_size=64, ctx=step_context(tmp_path), eval_inputs=eval_inputs, eval_labels=eval_labels,
    )  # fmt: skip
    assert history["eval_accuracy"][-1] == pytest.approx(factories.digits_accuracy(model))


def test_extra_loss_and_weight_decay_shrink_the_weights(tmp_path: Path) -> None:
    inputs, labels, _, _ = digits()
    norms = {}
    variants: dict[str, dict[str, Any]] = {
        "plain": {},
        "l1": {"extra_loss": lambda m: 1e-2 * sum(p.abs().sum() for p in m.parameters())},
        "l2": {"weight_decay": 0.5},
    }
    for name, kwargs in variants.items():
        model = factories.mlp((32,))
        train(
            model, inputs=inputs, labels=labels, loss_fn=supervised_loss, epochs=2, lr=1e-2,
            batch_size=64, ctx=step_context(tmp_path), **kwargs,
        )  # fmt: skip
        with torch.no_grad():
            norms[name] = float(sum(p.abs().sum() for p in model.parameters()))
    assert norms["l1"] < 0.5 * norms["plain"]
    assert norms["l2"] < 0.5 * norms["plain"]


def test_a_cancelled_job_stops_within_one_batch(tmp_path: Path) -> None:
    class CancelAfter(RecordingReporter):
        def progress(self, fraction: float, stage: str | None = None) -> None:
            super().progress(fraction, stage)
            if len(self.events) >= 3:
                raise JobCancelled("cancelled")

    inputs, labels, _, _ = digits()
    model = factories.mlp((16,))
    reporter = CancelAfter()
    with pytest.raises(JobCancelled):
        train(
            model, inputs=inputs, labels=labels, loss_fn=supervised_loss, epochs=50, lr=1e-2,
            batch_size=8, ctx=step_context(tmp_path, reporter=reporter),
        )  # fmt: skip
    assert len(reporter.events) == 3


def test_custom_forward_and_unlabelled_loss(tmp_path: Path) -> None:
    """Without labels, a loss that needs none trains (e.g. matching a fixed target model)."""
    inputs, _, _, _ = digits()
    target = factories.train_digits_mlp()
    model = factories.mlp()

    def forward(module: torch.nn.Module, batch: dict[str, torch.Tensor]):
        with torch.no_grad():
            wanted = target(batch["x"])
        return module(batch["x"]), wanted

    def loss(outputs, labels):
        assert labels is None
        mine, wanted = outputs
        return torch.nn.functional.mse_loss(mine, wanted)

    history = train(
        model, inputs=inputs, labels=None, loss_fn=loss, epochs=3, lr=1e-2, batch_size=64,
        ctx=step_context(tmp_path), forward=forward,
    )  # fmt: skip
    assert history["train_loss"][-1] < 0.3 * history["train_loss"][0]
    assert factories.digits_accuracy(model) > 0.85


def test_supervised_loss_cross_entropy_or_mse() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    classes = torch.tensor([0, 2])
    expected = torch.nn.functional.cross_entropy(logits, classes)
    assert torch.allclose(supervised_loss(logits, classes), expected)
    one_hot = torch.nn.functional.one_hot(classes, 3)
    assert torch.allclose(supervised_loss(logits, one_hot), expected)
    targets = torch.zeros(2, 3)
    assert torch.allclose(supervised_loss(logits, targets), (logits**2).mean())
    assert torch.allclose(supervised_loss((logits, "extra"), classes), expected)
    with pytest.raises(InvalidParamsError, match="needs labels"):
        supervised_loss(logits, None)
    with pytest.raises(DatasetMismatchError, match="do not fit"):
        supervised_loss(logits, torch.tensor([0, 1, 2]))


def test_primary_output_of_hugging_face_style_outputs() -> None:
    class Output:
        logits = torch.ones(2, 2)

    assert primary_output(Output()) is Output.logits
    assert primary_output({"a": torch.zeros(1)}).shape == (1,)
    with pytest.raises(InvalidParamsError):
        primary_output(("no", "tensor"))


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    inputs, labels, _, _ = digits()
    model = factories.mlp((8,))
    common: dict[str, Any] = {"loss_fn": supervised_loss, "epochs": 1, "lr": 1e-2, "batch_size": 8}
    with pytest.raises(DatasetMismatchError, match="disagree"):
        train(model, inputs=inputs, labels=labels[:-1], ctx=step_context(tmp_path), **common)
    with pytest.raises(InvalidParamsError, match="epochs"):
        train(
            model, inputs=inputs, labels=labels, ctx=step_context(tmp_path),
            **{**common, "epochs": 0},
        )  # fmt: skip
    broken = inputs["x"].copy()
    broken[:, 3] = np.nan
    with pytest.raises(InvalidParamsError, match="diverged"):
        train(model, inputs={"x": broken}, labels=labels, ctx=step_context(tmp_path), **common)
