"""distill: a small student learns the digits from a trained teacher (pt2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tests import factories
from tests.helpers import apply, saved, stock_module, stock_program
from worker.context import RecordingReporter
from worker.data import Dataset, load_dataset
from worker.errors import InvalidParamsError, UnsupportedError
from worker.formats import LoadedModel, load_model, save_model
from worker.methods import get_method
from worker.methods.distill import DistillParams, distillation_loss

STUDENT_PARAMETERS = 64 * 32 + 32 + 32 * 10 + 10


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained teacher (64→128→64→10), an untrained student (64→32→10), the digits."""
    root = tmp_path_factory.mktemp("distill")
    example = torch.from_numpy(factories.digits_arrays()[2][:4])
    return {
        "teacher": factories.export_pt2(factories.train_digits_mlp(), example, root / "t.pt2"),
        "student": factories.export_pt2(factories.mlp((32,)), example, root / "s.pt2"),
        "wide_student": factories.export_pt2(factories.mlp((64,)), example, root / "w.pt2"),
        "onnx_teacher": factories.export_onnx(factories.mlp((8,)), example, root / "t.onnx"),
        "five_classes": factories.export_pt2(
            factories.mlp((8,), classes=5), example, root / "c.pt2"
        ),
        "train": factories.digits_npz(root / "train.npz", split="train"),
        "eval": factories.digits_npz(root / "test.npz", split="test"),
    }


def distill(
    model: LoadedModel,
    params: dict,
    tmp_path: Path,
    datasets: dict[str, Dataset],
    *,
    original: Path,
    models: dict[str, tuple[Path, str]] | None = None,
    reporter=None,
) -> LoadedModel:
    return apply(
        "distill", model, params, tmp_path, datasets=datasets, reporter=reporter,
        original=(original, "pt2"), models=models,
    )  # fmt: skip


def parameter_count(model: LoadedModel) -> int:
    assert model.program is not None
    return sum(t.numel() for t in model.program.state_dict.values())


def test_loss_matches_a_hand_computation() -> None:
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 2])
    tau, alpha = 2.0, 0.3

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]

    p_t = softmax(teacher.numpy() / tau)
    p_s = softmax(student.numpy() / tau)
    kl_teacher_student = float(np.mean(np.sum(p_t * np.log(p_t / p_s), axis=1)))
    kl_student_teacher = float(np.mean(np.sum(p_s * np.log(p_s / p_t), axis=1)))
    log_probs = np.log(softmax(student.numpy()))
    ce = float(-np.mean(log_probs[[0, 1], [0, 2]]))
    expected = alpha * tau**2 * kl_teacher_student + (1 - alpha) * ce

    got = distillation_loss(student, teacher, labels, temperature=tau, alpha=alpha)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # The KL direction is teacher ‖ student (the other one differs on these numbers).
    assert abs(kl_teacher_student - kl_student_teacher) > 0.005
    # Without labels: the soft term alone, with its τ² factor.
    soft = distillation_loss(student, teacher, None, temperature=tau, alpha=alpha)
    assert float(soft) == pytest.approx(tau**2 * kl_teacher_student, rel=1e-5)
    # alpha = 0 is plain cross-entropy; identical logits have no soft loss.
    hard = distillation_loss(student, teacher, labels, temperature=tau, alpha=0.0)
    assert float(hard) == pytest.approx(ce, rel=1e-5)
    same = distillation_loss(teacher, teacher, None, temperature=tau, alpha=1.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    # Rows of a [N, T, C] output are averaged like a batch of N*T.
    stacked = distillation_loss(
        student.reshape(1, 2, 3), teacher.reshape(1, 2, 3), None, temperature=tau, alpha=1.0
    )
    assert float(stacked) == pytest.approx(float(soft), rel=1e-6)


def test_a_small_student_learns_from_the_teacher(zoo: dict[str, Path], tmp_path: Path) -> None:
    teacher_accuracy = factories.digits_accuracy(stock_module(zoo["teacher"]))
    student_before = factories.digits_accuracy(stock_module(zoo["student"]))
    datasets = {"train": load_dataset(zoo["train"]), "eval": load_dataset(zoo["eval"])}
    # The pipeline's model is the student; the teacher is another uploaded model.
    result = distill(
        load_model(zoo["student"], "pt2"),
        {"temperature": 4.0, "alpha": 0.7, "epochs": 12, "lr": 1e-2, "teacher_model_id": "T"},
        tmp_path, datasets, original=zoo["student"], models={"T": (zoo["teacher"], "pt2")},
    )  # fmt: skip
    assert parameter_count(result) == STUDENT_PARAMETERS  # the student, not the teacher
    module = stock_module(saved(result, tmp_path / "student.pt2"))
    after = factories.digits_accuracy(module)
    assert teacher_accuracy > 0.96
    assert student_before < 0.2
    # Bound: a 2.4k-parameter student within 3 points of its 13k-parameter teacher.
    assert after >= teacher_accuracy - 0.03, (after, teacher_accuracy)
    assert module(torch.from_numpy(factories.digits_arrays()[2][:5])).shape == (5, 10)


def test_uploaded_student_without_labels_uses_soft_targets_only(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    x, _, x_test, _ = factories.digits_arrays()
    datasets = {
        "train": Dataset({"inputs": x}, None, len(x)),
        "eval": Dataset({"inputs": x_test}, None, len(x_test)),
    }
    reporter = RecordingReporter()
    # The pipeline's model is the teacher (as uploaded: the default teacher); the
    # uploaded student replaces it.
    result = distill(
        load_model(zoo["teacher"], "pt2"),
        {"alpha": 0.5, "epochs": 3, "lr": 1e-2, "patience": 1, "student_model_id": "S"},
        tmp_path, datasets, original=zoo["teacher"], models={"S": (zoo["student"], "pt2")},
        reporter=reporter,
    )  # fmt: skip
    assert parameter_count(result) == STUDENT_PARAMETERS
    messages = [e["message"] for e in reporter.logs]
    assert any("no labels: pure soft-target distillation (alpha 1" in m for m in messages)
    assert any("teacher: the input model as uploaded" in m for m in messages)
    assert factories.digits_accuracy(stock_module(saved(result, tmp_path / "s.pt2"))) > 0.8


def _layer_outputs(path: Path, hidden: tuple[int, ...], upto: int) -> torch.Tensor:
    """Output of layer ``upto`` of a saved MLP, rebuilt as an nn.Sequential."""
    program = stock_program(path)
    module = factories.mlp(hidden)
    assert isinstance(module, torch.nn.Sequential)
    module.load_state_dict(dict(program.state_dict))
    x = torch.from_numpy(factories.digits_arrays()[2])
    with torch.no_grad():
        return module[: upto + 1](x)  # type: ignore[no-any-return]


def test_feature_transfer_matches_intermediate_outputs(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    datasets = {"train": load_dataset(zoo["train"])}
    target = _layer_outputs(zoo["teacher"], (128, 64), 3)  # after the second ReLU: [N, 64]
    gaps = {}
    for name, features in {
        "none": [],
        # a module name and a graph node name; widths 64 and 64
        "features": [{"student": "relu", "teacher": "relu_1", "weight": 10.0}],
    }.items():
        result = distill(
            load_model(zoo["wide_student"], "pt2"),
            {"epochs": 3, "lr": 1e-2, "teacher_model_id": "T", "features": features},
            tmp_path, datasets, original=zoo["wide_student"],
            models={"T": (zoo["teacher"], "pt2")},
        )  # fmt: skip
        path = tmp_path / f"{name}.pt2"
        module = stock_module(saved(result, path))
        graph = stock_program(path).graph
        assert not [n for n in graph.nodes if "tap" in n.name]  # the recorders are gone
        assert module(torch.from_numpy(factories.digits_arrays()[2][:2])).shape == (2, 10)
        hidden = _layer_outputs(path, (64,), 1)
        gaps[name] = float(torch.nn.functional.mse_loss(hidden, target))
    assert gaps["features"] < 0.35 * gaps["none"], gaps  # the MSE term cuts the gap 3x+


def test_features_of_different_widths_get_a_projection(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    datasets = {"train": load_dataset(zoo["train"]).head(256)}
    reporter = RecordingReporter()
    result = distill(
        load_model(zoo["student"], "pt2"),
        {"epochs": 1, "teacher_model_id": "T", "features": [{"student": "0", "teacher": "2"}]},
        tmp_path, datasets, original=zoo["student"], models={"T": (zoo["teacher"], "pt2")},
        reporter=reporter,
    )  # fmt: skip
    # 32-wide student layer vs 64-wide teacher layer: trained through a projection that
    # is not part of the result.
    assert parameter_count(result) == STUDENT_PARAMETERS


def test_unknown_feature_names_are_refused_with_the_layer_list(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    datasets = {"train": load_dataset(zoo["train"]).head(64)}
    with pytest.raises(
        InvalidParamsError, match=r"student has no layer .* 'encoder.3'.*layers are 0, 2"
    ):
        distill(
            load_model(zoo["student"], "pt2"),
            {"epochs": 1, "teacher_model_id": "T", "features": [{"student": "encoder.3", "teacher": "2"}]},
            tmp_path, datasets, original=zoo["student"], models={"T": (zoo["teacher"], "pt2")},
        )  # fmt: skip


def test_teachers_that_cannot_teach_are_refused(zoo: dict[str, Path], tmp_path: Path) -> None:
    datasets = {"train": load_dataset(zoo["train"]).head(64)}
    models = {"O": (zoo["onnx_teacher"], "onnx"), "C": (zoo["five_classes"], "pt2")}
    student = load_model(zoo["student"], "pt2")
    with pytest.raises(UnsupportedError, match="teacher is a onnx model"):
        distill(
            student, {"teacher_model_id": "O"}, tmp_path, datasets, original=zoo["student"],
            models=models,
        )  # fmt: skip
    with pytest.raises(InvalidParamsError, match="logits of one shape"):
        distill(
            student, {"teacher_model_id": "C"}, tmp_path, datasets, original=zoo["student"],
            models=models,
        )  # fmt: skip
    with pytest.raises(InvalidParamsError, match="needs a train dataset"):
        distill(student, {}, tmp_path, {}, original=zoo["teacher"])


def test_params_are_validated() -> None:
    method = get_method("distill")
    assert method.model_refs == ("teacher_model_id", "student_model_id")
    assert method.datasets_required == {"train"}
    bad: list[dict[str, Any]] = [
        {"temperature": 0},
        {"alpha": 1.5},
        {"alpha": -0.1},
        {"epochs": 0},
        {"features": [{"student": "a", "teacher": "b", "weight": 0}]},
        {"features": [{"student": "a", "teacher": "b", "extra": 1}]},
        {"features": [{"student": "", "teacher": "b"}]},
    ]
    for params in bad:
        with pytest.raises(ValidationError):
            method.validate_params(params, "pt2")
    valid = method.validate_params(
        {"temperature": 2, "features": [{"student": "a", "teacher": "b"}]}, "pt2"
    )
    assert isinstance(valid, DistillParams)
    assert method.validate_params(valid.model_dump(mode="json"), "pt2") == valid
    assert valid.features[0].weight == 1.0 and valid.alpha == 0.7
    schema = method.describe()["params_schema"]
    assert all(f.get("description") for f in schema["properties"].values())


def test_a_hugging_face_student_learns_from_a_hugging_face_teacher(tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    from tests import factories_text

    teacher_zip = factories_text.tiny_bert_hf_zip(tmp_path / "teacher.zip")
    tokenizer = factories_text.tiny_tokenizer()
    config = factories_text._config(tokenizer.vocab_size)
    config.num_hidden_layers, config.intermediate_size = 1, 32  # half the layers
    torch.manual_seed(1)
    student = BertForSequenceClassification(config).eval()
    folder = factories_text.save_folder(student, tokenizer, tmp_path / "student")
    student_zip = factories_text.zip_folder(folder, tmp_path / "student.zip")
    teacher = load_model(teacher_zip, "hf")
    texts = factories_text.sentiment_jsonl(tmp_path / "train.jsonl", split="train")
    datasets = {"train": load_dataset(texts, teacher)}
    teacher_accuracy = factories_text.text_accuracy(teacher.module, teacher.tokenizer)
    before = factories_text.text_accuracy(student, tokenizer)

    params = {"temperature": 2.0, "epochs": 3, "lr": 3e-3, "student_model_id": "S"}
    result = apply(
        "distill", teacher, params, tmp_path, datasets=datasets,
        original=(teacher_zip, "hf"), models={"S": (student_zip, "hf")},
    )  # fmt: skip
    out = tmp_path / "distilled.zip"
    save_model(result, out)
    reloaded_student = load_model(out, "hf")
    assert reloaded_student.module is not None
    assert reloaded_student.module.config.num_hidden_layers == 1  # type: ignore[union-attr]
    after = factories_text.text_accuracy(reloaded_student.module, tokenizer)
    assert before < 0.6 and teacher_accuracy > 0.95
    # Bound: the half-depth student gets within 5 points of its teacher.
    assert after >= teacher_accuracy - 0.05, (after, teacher_accuracy)


def test_structured_pruning_then_distillation_of_a_residual_cnn(tmp_path: Path) -> None:
    """prune.structured -> distill: the pruned CNN (BatchNorm, residual blocks, concat)
    learns back from the original, with a feature term across different widths."""
    from tests import factories_cnn

    teacher_path = factories_cnn.cnn_pt2(tmp_path / "cnn.pt2")
    train_set = load_dataset(factories_cnn.images_npz(tmp_path / "train.npz", split="train"))
    datasets = {"train": train_set, "calibration": train_set}
    teacher_accuracy = factories_cnn.images_accuracy(stock_module(teacher_path))

    def step(name: str, model: LoadedModel, params: dict) -> LoadedModel:
        original = (teacher_path, "pt2")
        return apply(name, model, params, tmp_path, datasets=datasets, original=original)

    pruned = step("prune.structured", load_model(teacher_path, "pt2"), {"amount": 0.5})
    pruned_accuracy = factories_cnn.images_accuracy(stock_module(saved(pruned, tmp_path / "p.pt2")))
    # block2.bn2: 16 channels in the student, 32 in the teacher: a learned projection.
    feature = {"student": "block2.bn2", "teacher": "block2.bn2", "weight": 1.0}
    params = {"epochs": 4, "lr": 3e-3, "temperature": 4.0, "alpha": 0.5, "features": [feature]}
    student = step("distill", pruned, params)
    assert parameter_count(student) == parameter_count(pruned)  # no projection left in
    after = factories_cnn.images_accuracy(stock_module(saved(student, tmp_path / "s.pt2")))
    assert pruned_accuracy < 0.6
    # Bound: the 4x smaller CNN gets back within 3 points of the original.
    assert after >= teacher_accuracy - 0.03, (after, teacher_accuracy)
