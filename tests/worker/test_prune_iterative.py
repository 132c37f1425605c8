"""prune.magnitude with an iterative schedule: prune -> fine-tune rounds to `amount`."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tests import factories
from tests.helpers import apply, saved, step_context, stock_module, stock_program
from worker.context import RecordingReporter
from worker.data import Dataset, load_dataset
from worker.errors import InvalidParamsError, UnsupportedError
from worker.formats import LoadedModel, load_model, save_model
from worker.methods import get_method

WEIGHTS = ("0.weight", "2.weight", "4.weight")


def prune(
    model: LoadedModel, params: dict, tmp_path: Path, datasets: dict[str, Dataset], reporter=None
) -> LoadedModel:
    return apply("prune.magnitude", model, params, tmp_path, datasets=datasets, reporter=reporter)


def test_the_cubic_schedule_ends_at_amount() -> None:
    params = get_method("prune.magnitude").validate_params({"amount": 0.8, "steps": 4}, "pt2")
    schedule = params.schedule()  # type: ignore[attr-defined]
    expected = [0.8 * (1 - (1 - t / 4) ** 3) for t in (1, 2, 3, 4)]
    assert schedule == pytest.approx(expected)
    assert schedule[-1] == pytest.approx(0.8)
    assert all(a < b for a, b in itertools.pairwise(schedule))
    # Fast at first, slow at the end (Zhu & Gupta).
    assert schedule[0] > 0.8 / 4 and schedule[3] - schedule[2] < schedule[1] - schedule[0]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_iterative_pruning_reaches_amount_with_masks_held(
    files, tmp_path: Path, scope: str
) -> None:
    x, y, _, _ = factories.digits_arrays()
    datasets = {"train": Dataset({"inputs": x[:400]}, y[:400], 400)}
    reporter = RecordingReporter()
    result = prune(
        load_model(files["pt2"], "pt2"),
        {"amount": 0.7, "scope": scope, "steps": 3, "epochs_per_step": 1},
        tmp_path, datasets, reporter,
    )  # fmt: skip
    program = stock_program(saved(result, tmp_path / "pruned.pt2"))
    weights = {k: program.state_dict[k].detach().numpy() for k in WEIGHTS}
    if scope == "layer":
        for w in weights.values():
            assert 1 - np.count_nonzero(w) / w.size == pytest.approx(round(0.7 * w.size) / w.size)
    else:
        total = sum(w.size for w in weights.values())
        assert sum(w.size - np.count_nonzero(w) for w in weights.values()) == round(0.7 * total)
    for bias in ("0.bias", "2.bias", "4.bias"):
        assert np.count_nonzero(program.state_dict[bias].detach().numpy()) > 0
    rounds = [e["data"] for e in reporter.logs if e["message"].startswith("round ")]
    assert len(rounds) == 3
    # Measured after each fine-tuning, before folding: pruned weights stayed exactly zero.
    for record in rounds:
        assert record["sparsity"] == pytest.approx(record["target_sparsity"], abs=2e-3)
    assert program.module()(torch.from_numpy(x[:3])).shape == (3, 10)  # dynamic batch kept


def test_iterative_80_percent_beats_one_shot(files, tmp_path: Path) -> None:
    datasets = {"train": load_dataset(files["calibration"])}  # the digits train split
    one_shot = prune(load_model(files["pt2"], "pt2"), {"amount": 0.8}, tmp_path, datasets)
    one_shot_accuracy = factories.digits_accuracy(stock_module(saved(one_shot, tmp_path / "a.pt2")))
    iterative = prune(
        load_model(files["pt2"], "pt2"),
        {"amount": 0.8, "steps": 3, "epochs_per_step": 2, "lr": 3e-3, "batch_size": 64},
        tmp_path, datasets,
    )  # fmt: skip
    program = stock_program(saved(iterative, tmp_path / "b.pt2"))
    iterative_accuracy = factories.digits_accuracy(program.module())
    sparsity = [
        1 - int(torch.count_nonzero(program.state_dict[k])) / program.state_dict[k].numel()
        for k in WEIGHTS
    ]
    assert sparsity == pytest.approx([0.8] * 3, abs=1e-3)
    # Bound: one-shot 80 % without fine-tuning loses ~30 points on this MLP; gradual
    # pruning with fine-tuning stays above 93 % and at least 15 points better.
    assert iterative_accuracy >= 0.93, iterative_accuracy
    assert iterative_accuracy >= one_shot_accuracy + 0.15, (iterative_accuracy, one_shot_accuracy)


def test_one_step_is_the_one_shot_method_and_needs_no_data(files, tmp_path: Path) -> None:
    method = get_method("prune.magnitude")
    one = method.validate_params({"amount": 0.5}, "pt2")
    many = method.validate_params({"amount": 0.5, "steps": 2}, "pt2")
    assert method.requires(one) == frozenset()
    assert method.requires(many) == {"train"}
    assert "train" in method.datasets_optional
    model = load_model(files["pt2"], "pt2")
    assert prune(model, {"amount": 0.5}, tmp_path, {}) is model  # edited in place, no training


def test_iterative_needs_a_trainable_format_and_labelled_train_data(files, tmp_path: Path) -> None:
    method = get_method("prune.magnitude")
    with pytest.raises(ValidationError, match="onnx models cannot be trained"):
        method.validate_params({"amount": 0.5, "steps": 3}, "onnx")
    assert method.validate_params({"amount": 0.5, "steps": 1}, "onnx")
    params = method.validate_params({"amount": 0.5, "steps": 3})  # no format context
    ctx = step_context(tmp_path, "prune.magnitude")
    with pytest.raises(UnsupportedError, match="onnx models cannot be trained"):
        method.handler(load_model(files["onnx"], "onnx"), params, ctx)
    with pytest.raises(InvalidParamsError, match="needs a train dataset"):
        prune(load_model(files["pt2"], "pt2"), {"amount": 0.5, "steps": 2}, tmp_path, {})
    for bad in (
        {"amount": 0.5, "steps": 0},
        {"amount": 0.5, "epochs_per_step": 0},
        {"amount": 0.5, "lr": 0},
    ):
        with pytest.raises(ValidationError):
            method.validate_params(bad, "pt2")


def test_iterative_pruning_of_a_hugging_face_classifier(tmp_path: Path) -> None:
    from tests import factories_text

    source = factories_text.tiny_bert_hf_zip(tmp_path / "bert.zip")
    model = load_model(source, "hf")
    texts = factories_text.sentiment_jsonl(tmp_path / "train.jsonl", split="train")
    result = prune(
        model, {"amount": 0.8, "steps": 2, "epochs_per_step": 1, "lr": 3e-3}, tmp_path,
        {"train": load_dataset(texts, model)},
    )  # fmt: skip
    out = tmp_path / "pruned.zip"
    save_model(result, out)
    pruned = load_model(out, "hf")
    assert pruned.module is not None
    linears = [m for m in pruned.module.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 6 + 2  # q, k, v, attention out, intermediate, output; pooler, head
    for layer in linears:
        w = layer.weight
        assert 1 - int(torch.count_nonzero(w)) / w.numel() == pytest.approx(
            round(0.8 * w.numel()) / w.numel()
        )
    assert factories_text.text_accuracy(pruned.module, pruned.tokenizer) >= 0.9
