"""finetune: supervised training of a pt2 model on the digits, with L1/L2 regularization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tests import factories
from tests.helpers import apply, saved, stock_module, stock_program
from worker.context import RecordingReporter
from worker.data import Dataset, load_dataset
from worker.errors import DatasetMismatchError, InvalidParamsError
from worker.formats import LoadedModel, load_model, save_model
from worker.methods import get_method


@pytest.fixture(scope="module")
def briefly_trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits MLP after one epoch (≈0.80 test accuracy), and the digits splits."""
    root = tmp_path_factory.mktemp("finetune")
    example = torch.from_numpy(factories.digits_arrays()[2][:4])
    return {
        "pt2": factories.export_pt2(factories.train_digits_mlp(epochs=1), example, root / "m.pt2"),
        "train": factories.digits_npz(root / "train.npz", split="train"),
        "eval": factories.digits_npz(root / "test.npz", split="test"),
    }


def finetune(
    model: LoadedModel, params: dict, tmp_path: Path, datasets: dict[str, Dataset], reporter=None
) -> LoadedModel:
    return apply("finetune", model, params, tmp_path, datasets=datasets, reporter=reporter)


def near_zero_fraction(program: torch.export.ExportedProgram) -> float:
    weights = [t.flatten() for t in program.state_dict.values() if t.ndim >= 2]
    return float((torch.cat(weights).abs() < 1e-3).float().mean())


def test_finetune_improves_accuracy_and_l1_pushes_weights_to_zero(
    briefly_trained: dict[str, Path], tmp_path: Path
) -> None:
    datasets = {"train": load_dataset(briefly_trained["train"])}
    before_program = stock_program(briefly_trained["pt2"])
    before = factories.digits_accuracy(before_program.module())
    assert before < 0.85

    results = {}
    for name, extra in {"plain": {}, "l1": {"l1": 1e-4}}.items():
        tuned = finetune(
            load_model(briefly_trained["pt2"], "pt2"), {"epochs": 3, "lr": 1e-3, **extra},
            tmp_path, datasets,
        )  # fmt: skip
        program = stock_program(saved(tuned, tmp_path / f"{name}.pt2"))
        results[name] = (factories.digits_accuracy(program.module()), near_zero_fraction(program))
        x = torch.from_numpy(factories.digits_arrays()[2][:3])
        assert program.module()(x).shape == (3, 10)  # the batch dim is still dynamic
        # re-exported with a few train samples, saved without them
        (example,), _ = program.example_inputs
        assert example.shape[1] == 64 and not example.any()
        assert tuned.program.example_inputs[0][0].any()  # type: ignore[union-attr]

    # Bound: three epochs of fine-tuning lift the one-epoch model by at least 5 points.
    assert results["plain"][0] >= before + 0.05
    assert results["l1"][0] >= before + 0.05
    # L1 drives many weights to (near) zero; plain training leaves about 1 % there.
    assert near_zero_fraction(before_program) < 0.03
    assert results["plain"][1] < 0.03
    assert results["l1"][1] > 0.15


def test_early_stopping_on_eval_and_the_log(
    briefly_trained: dict[str, Path], tmp_path: Path
) -> None:
    reporter = RecordingReporter()
    datasets = {
        "train": load_dataset(briefly_trained["train"]),
        "eval": load_dataset(briefly_trained["eval"]),
    }
    finetune(
        load_model(briefly_trained["pt2"], "pt2"),
        {"epochs": 2, "lr": 1e-3, "patience": 1, "batch_size": 64},
        tmp_path, datasets, reporter,
    )  # fmt: skip
    epochs = [e["message"] for e in reporter.logs if e["message"].startswith("epoch ")]
    assert len(epochs) == 2 and all("eval accuracy" in line for line in epochs)
    summary = next(e for e in reporter.logs if e["message"].startswith("fine-tuned"))
    assert summary["data"]["eval_accuracy"][-1] > 0.85
    fractions = [e["fraction"] for e in reporter.events]
    assert len(fractions) > 2 * 1347 // 64 and fractions == sorted(fractions)


def test_a_static_batch_model_trains_with_its_batch_size(files, tmp_path: Path) -> None:
    reporter = RecordingReporter()
    x, y, _, _ = factories.digits_arrays()
    data = {"train": Dataset({"inputs": x[:64]}, y[:64], 64)}
    tuned = finetune(
        load_model(files["pt2_static"], "pt2"), {"epochs": 1, "batch_size": 32}, tmp_path,
        data, reporter,
    )  # fmt: skip
    assert tuned.inputs[0].shape == (4, 64)
    assert any("static batch size of 4" in e["message"] for e in reporter.logs)
    program = stock_program(saved(tuned, tmp_path / "static.pt2"))
    assert program.module()(torch.from_numpy(x[:4])).shape == (4, 10)


def test_missing_or_unlabelled_train_data_is_refused(files, tmp_path: Path) -> None:
    model = load_model(files["pt2"], "pt2")
    with pytest.raises(InvalidParamsError, match="needs a train dataset"):
        finetune(model, {}, tmp_path, {})
    x = factories.digits_arrays()[0]
    with pytest.raises(DatasetMismatchError, match="labels"):
        finetune(model, {}, tmp_path, {"train": Dataset({"inputs": x}, None, len(x))})
    wrong = np.zeros((10, 32), np.float32)
    with pytest.raises(DatasetMismatchError, match="does not fit"):
        finetune(model, {}, tmp_path, {"train": Dataset({"inputs": wrong}, np.zeros(10), 10)})


def test_params_are_validated() -> None:
    method = get_method("finetune")
    assert method.datasets_required == {"train"}
    assert "eval" in method.datasets_optional
    for bad in ({"l1": -1}, {"l2": -0.1}, {"epochs": 0}, {"lr": 0}, {"patience": 0}, {"x": 1}):
        with pytest.raises(ValidationError):
            method.validate_params(bad, "pt2")
    params = method.validate_params({"l1": 1e-5}, "pt2")
    assert method.validate_params(params.model_dump(mode="json"), "pt2") == params
    schema = method.describe()["params_schema"]["properties"]
    assert all(field.get("description") for field in schema.values())


def stock_hf(path: Path, tmp_path: Path) -> torch.nn.Module:
    """An hf artifact loaded with transformers' own Auto class from the unzipped folder."""
    import zipfile

    from transformers import AutoModelForSequenceClassification

    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(path) as zf:
        zf.extractall(folder)
    return AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()


def test_finetune_trains_a_hugging_face_classifier(tmp_path: Path) -> None:
    from tests import factories_text

    source = factories_text.tiny_bert_hf_zip(tmp_path / "untrained.zip", trained=False)
    model = load_model(source, "hf")
    texts = factories_text.sentiment_jsonl(tmp_path / "train.jsonl", split="train")
    before = factories_text.text_accuracy(model.module, model.tokenizer)
    tuned = finetune(
        model, {"epochs": 2, "lr": 3e-3}, tmp_path, {"train": load_dataset(texts, model)}
    )
    out = tmp_path / "tuned.zip"
    save_model(tuned, out)
    module = stock_hf(out, tmp_path)
    after = factories_text.text_accuracy(module, model.tokenizer)
    assert before < 0.6  # an untrained binary classifier is at chance
    assert after >= 0.9, after  # two epochs learn the (easy) synthetic sentiment task


def test_finetune_trains_a_cnn_with_batchnorm(tmp_path: Path) -> None:
    from tests import factories_cnn

    source = factories_cnn.cnn_pt2(tmp_path / "cnn.pt2", trained=False)
    before = factories_cnn.images_accuracy(stock_module(source))
    train_set = load_dataset(factories_cnn.images_npz(tmp_path / "train.npz", split="train"))
    tuned = finetune(
        load_model(source, "pt2"), {"epochs": 2, "lr": 3e-3}, tmp_path, {"train": train_set}
    )
    program = stock_program(saved(tuned, tmp_path / "tuned.pt2"))
    running_means = [v for k, v in program.state_dict.items() if k.endswith("running_mean")]
    running_means += [v for k, v in program.constants.items() if k.endswith("running_mean")]
    assert running_means and all(float(m.abs().sum()) > 0 for m in running_means)
    assert before < 0.2
    assert factories_cnn.images_accuracy(program.module()) >= 0.85
