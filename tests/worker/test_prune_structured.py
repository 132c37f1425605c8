"""prune.structured: channels really removed (parameters and MACs drop), on an MLP and on a
CNN with residual blocks, BatchNorm and a concatenation; with allocation 'sensitivity', one
fraction per channel group, each keeping the output cosine bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from tests import factories, factories_cnn
from tests.helpers import apply, saved, step_context, stock_module, stock_program
from worker.context import NullReporter, RecordingReporter
from worker.data import Dataset, load_dataset
from worker.errors import DatasetMismatchError, InvalidParamsError
from worker.formats import load_model
from worker.lifting import lift, relower
from worker.methods import get_method
from worker.metrics import measure_model
from worker.training import model_forward, supervised_loss, train

METHOD = "prune.structured"


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("structured")
    return {
        "pt2": factories_cnn.cnn_pt2(root / "cnn.pt2"),
        "half_width": factories.export_pt2(
            factories_cnn.cnn(width=16), factories_cnn.example_images(), root / "cnn16.pt2"
        ),
        "train": factories_cnn.images_npz(root / "train.npz"),
        "train_unlabelled": factories_cnn.images_npz(root / "train_x.npz", labels=False),
        "eval": factories_cnn.images_npz(root / "eval.npz", split="test"),
    }


def prune(path: Path, params: dict, tmp_path: Path, datasets=None, reporter=None):
    model = load_model(path, "pt2")
    return apply(METHOD, model, params, tmp_path, datasets=datasets, reporter=reporter)


def measured(path: Path, x: np.ndarray) -> dict:
    """Parameters and MACs as the job's metrics measure them (from the file)."""
    return measure_model(
        path, "pt2", inputs={"x": x}, batch_sizes=[], warmup=0, iterations=1, device="cpu",
        reporter=NullReporter(),
    )  # fmt: skip


def conv_channels(path: Path) -> dict[str, int]:
    weights = stock_program(path).state_dict
    return {k.removesuffix(".weight"): v.shape[0] for k, v in weights.items() if v.ndim == 4}


def test_local_pruning_of_the_cnn_gives_exactly_a_half_width_cnn(cnn, tmp_path: Path) -> None:
    """Every coupled group loses half its channels: the residual trunk (stem + both
    blocks' second convs), each block's inner conv and each concatenated branch; the
    result has the parameters and MACs of the same CNN built at half width."""
    out = saved(prune(cnn["pt2"], {"amount": 0.5}, tmp_path), tmp_path / "pruned.pt2")
    x = factories_cnn.digits_images()[2][:8]
    original, pruned, half = (measured(p, x) for p in (cnn["pt2"], out, cnn["half_width"]))
    assert pruned["parameters"] == half["parameters"] < 0.27 * original["parameters"]
    assert pruned["macs"] == half["macs"] < 0.27 * original["macs"]
    assert set(conv_channels(out).values()) == {16, 8}
    module = stock_module(out)
    with torch.no_grad():
        assert module(torch.from_numpy(x[:5])).shape == (5, 10)  # dynamic batch, head kept


@pytest.mark.parametrize(
    ("importance", "scope"),
    [("l1", "global"), ("l2", "local"), ("taylor", "global"), ("bn_scale", "local"),
     ("random", "global")],
)  # fmt: skip
def test_every_importance_shrinks_the_cnn(cnn, tmp_path: Path, importance: str, scope: str) -> None:
    datasets = {"train": load_dataset(cnn["train"])}
    params = {"amount": 0.4, "importance": importance, "scope": scope}
    out = saved(prune(cnn["pt2"], params, tmp_path, datasets), tmp_path / "pruned.pt2")
    x = factories_cnn.digits_images()[2][:8]
    before, after = measured(cnn["pt2"], x), measured(out, x)
    assert after["parameters"] < 0.6 * before["parameters"]
    assert after["macs"] < 0.6 * before["macs"]
    channels = conv_channels(out)
    assert all(0 < c < 32 for name, c in channels.items() if "branch" not in name)
    with torch.no_grad():
        assert stock_module(out)(torch.from_numpy(x)).shape == (8, 10)


def test_round_to_keeps_channel_counts_at_multiples(cnn, tmp_path: Path) -> None:
    reporter = RecordingReporter()
    model = prune(cnn["pt2"], {"amount": 0.3, "round_to": 8}, tmp_path, reporter=reporter)
    channels = conv_channels(saved(model, tmp_path / "pruned.pt2"))
    # 32 channels - 30% = 22.4, rounded down to 16; the 16-channel branches to 8
    assert channels == {
        "stem_0": 16, "block1_conv1": 16, "block1_conv2": 16, "block2_conv1": 16,
        "block2_conv2": 16, "branch_a": 8, "branch_b": 8,
    }  # fmt: skip
    summary = next(e for e in reporter.logs if e["message"].startswith("removed channels"))
    assert summary["data"]["channels"]["stem_0"] == [32, 16]


def test_ignored_layers_keep_their_channels(cnn, tmp_path: Path) -> None:
    params = {"amount": 0.5, "ignore": ["block1.conv1", "branch_b.weight"]}
    channels = conv_channels(saved(prune(cnn["pt2"], params, tmp_path), tmp_path / "p.pt2"))
    assert channels["block1_conv1"] == 32 and channels["branch_b"] == 16
    assert channels["block2_conv1"] == 16 and channels["branch_a"] == 8


def test_mlp_neurons_removed_and_accuracy_recovers_after_fine_tuning(files, tmp_path) -> None:
    pruned = prune(files["pt2"], {"amount": 0.5}, tmp_path)
    weights = pruned.program.state_dict
    assert [tuple(weights[f"{i}.weight"].shape) for i in (0, 2, 4)] == [
        (64, 64), (32, 64), (10, 32),
    ]  # fmt: skip
    assert sum(weights[k].numel() for k in pruned.program.graph_signature.parameters) == 6570
    assert pruned.inputs[0].is_dynamic(0)
    x_train, y_train, _, _ = factories.digits_arrays()
    before = factories.digits_accuracy(stock_module(saved(pruned, tmp_path / "pruned.pt2")))
    tuned = fine_tune(pruned, x_train, y_train, tmp_path, epochs=5)
    after = factories.digits_accuracy(stock_module(saved(tuned, tmp_path / "tuned.pt2")))
    assert after >= 0.94, (before, after)  # the unpruned MLP scores ~0.97


def test_cnn_accuracy_recovers_after_fine_tuning(cnn, tmp_path: Path) -> None:
    pruned = prune(cnn["pt2"], {"amount": 0.5, "importance": "l2"}, tmp_path)
    x_train, y_train, _, _ = factories_cnn.digits_images()
    before = factories_cnn.images_accuracy(stock_module(saved(pruned, tmp_path / "pruned.pt2")))
    # Seeded order, one thread: the same weights every run. lr 1e-3 for 3 epochs, not 3e-3
    # for 2: at 3e-3 the final accuracy swung from 0.80 to 0.97 with the shuffling seed, so
    # float-level differences between machines decided the outcome (0.9133 here). Measured
    # at 1e-3 over shuffling seeds 0-9: 0.949-0.964, seed 0 (this run) 0.9644.
    tuned = fine_tune(pruned, x_train, y_train, tmp_path, epochs=3, lr=1e-3)
    accuracy = factories_cnn.images_accuracy(stock_module(saved(tuned, tmp_path / "tuned.pt2")))
    # Pruned to half width the CNN falls from ~0.97 towards chance (0.10): 0.10-0.25 measured
    # on different machines, the trained fixture's floats deciding where in that range.
    assert before <= 0.4
    assert accuracy >= 0.93  # the unpruned CNN scores ~0.97


def fine_tune(model, x: np.ndarray, y: np.ndarray, tmp_path: Path, epochs: int, lr: float = 3e-3):
    module = lift(model)
    train(
        module, inputs={model.inputs[0].name: x}, labels=y, loss_fn=supervised_loss,
        epochs=epochs, lr=lr, batch_size=64, ctx=step_context(tmp_path, "finetune", step=1),
        forward=model_forward(model),
    )  # fmt: skip
    return relower(model, module)


class ScaledConvs(nn.Module):
    """conv -> ReLU -> x * scale (a bare [1, C, 1, 1] parameter) -> conv -> pool -> Linear."""

    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1))
        self.c2 = nn.ConvTranspose2d(8, 8, 2, stride=2) if transposed else nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(torch.relu(self.c1(x)) * self.scale).mean((2, 3)))


def test_parameters_outside_layers_are_pruned_with_their_channels(tmp_path: Path) -> None:
    example = factories_cnn.example_images()
    path = factories.export_pt2(ScaledConvs().eval(), example, tmp_path / "scaled.pt2")
    pruned = prune(path, {"amount": 0.5}, tmp_path)
    shapes = {k: tuple(v.shape) for k, v in pruned.program.state_dict.items()}
    assert shapes["scale"] == (1, 4, 1, 1) and shapes["c1.weight"] == (4, 1, 3, 3)
    assert shapes["c2.weight"] == (4, 4, 1, 1) and shapes["fc.weight"] == (10, 4)


def test_channels_coupled_to_unliftable_ops_are_left_alone(tmp_path: Path) -> None:
    """A transposed convolution stays an aten call: its channels cannot be cut safely."""
    example = factories_cnn.example_images()
    module = ScaledConvs(transposed=True).eval()
    path = factories.export_pt2(module, example, tmp_path / "transposed.pt2")
    with pytest.raises(InvalidParamsError, match="cannot lift into a layer"):
        prune(path, {"amount": 0.5}, tmp_path)


def test_static_batch_model_stays_static(files, tmp_path: Path) -> None:
    pruned = prune(files["pt2_static"], {"amount": 0.25}, tmp_path)
    assert pruned.static_batch == 4
    assert tuple(pruned.program.state_dict["0.weight"].shape) == (96, 64)


def test_taylor_needs_labelled_data(cnn, tmp_path: Path) -> None:
    unlabelled = {"calibration": load_dataset(cnn["train_unlabelled"])}
    with pytest.raises(InvalidParamsError, match=r"labelled data.*calibration dataset has no"):
        prune(cnn["pt2"], {"amount": 0.5, "importance": "taylor"}, tmp_path, unlabelled)
    with pytest.raises(InvalidParamsError, match="train or calibration dataset with a 'labels'"):
        prune(cnn["pt2"], {"amount": 0.5, "importance": "taylor"}, tmp_path)


def test_taylor_uses_labelled_calibration_data(files, tmp_path: Path) -> None:
    x, y, _, _ = factories.digits_arrays()
    data = {"calibration": Dataset({"inputs": x[:128]}, y[:128], 128)}
    reporter = RecordingReporter()
    prune(files["pt2"], {"amount": 0.5, "importance": "taylor"}, tmp_path, data, reporter)
    assert any("128 calibration samples" in e["message"] for e in reporter.logs)


def test_bn_scale_needs_batch_norm(files, tmp_path: Path) -> None:
    with pytest.raises(InvalidParamsError, match="this model has none"):
        prune(files["pt2"], {"amount": 0.5, "importance": "bn_scale"}, tmp_path)


def test_unknown_ignored_layer_is_refused_with_the_layer_names(files, tmp_path: Path) -> None:
    with pytest.raises(InvalidParamsError, match=r"\['conv9'\].*its layers are.*0, 2, 4"):
        prune(files["pt2"], {"amount": 0.5, "ignore": ["conv9"]}, tmp_path)


@pytest.mark.parametrize(
    "params",
    [{"amount": 1.5}, {"amount": 0.0}, {}, {"amount": 0.5, "round_to": 0},
     {"amount": 0.5, "importance": "l3"}, {"amount": 0.5, "scope": "layer"},
     {"amount": 0.5, "unknown": 1}],
)  # fmt: skip
def test_bad_params_are_refused(params: dict) -> None:
    with pytest.raises(ValidationError):
        get_method(METHOD).validate_params(params, "pt2")


def test_declares_pt2_only_and_optional_data() -> None:
    method = get_method(METHOD)
    assert method.formats == {"pt2"}
    assert method.datasets_optional == {"calibration", "train", "eval"}
    assert not method.datasets_required


# --------------------------------------------------------------------------------------
# allocation: "sensitivity"


def output_cosine(original: Path, pruned: Path, data: Dataset) -> float:
    """Mean output cosine on the first 256 eval samples, what the allocation measures on."""
    from worker.measurement.fidelity import sample_cosines
    from worker.measurement.runs import run_model

    feeds = {"x": data.inputs["inputs"][:256]}
    before, after = run_model(original, "pt2", feeds, 64), run_model(pruned, "pt2", feeds, 64)
    return float(sample_cosines(before, after).mean())


def allocate(path: Path, params: dict, data: Dataset, tmp_path: Path) -> tuple[Path, dict, dict]:
    """Prune with allocation 'sensitivity': the saved model, its allocation event's data and
    the channels (before, after) of each changed layer."""
    reporter = RecordingReporter()
    params = {**params, "allocation": "sensitivity"}
    model = prune(path, params, tmp_path, {"eval": data}, reporter)
    event = next(e for e in reporter.logs if e["message"].startswith("sensitivity allocation"))
    channels = next(e for e in reporter.logs if e["message"].startswith("removed channels"))
    return saved(model, tmp_path / "sensitivity.pt2"), event["data"], channels["data"]["channels"]


def alone(path: Path, root: str, roots: list[str], fraction: float, tmp_path: Path) -> Path:
    """``root``'s group alone pruned by ``fraction``, through the method's own ``ignore``."""
    others = [r for r in roots if r != root]
    model = prune(path, {"amount": fraction, "ignore": others}, tmp_path)
    return saved(model, tmp_path / f"alone-{root}.pt2")


def test_sensitivity_gives_the_mlp_a_fraction_per_layer_within_the_bound(files, tmp_path) -> None:
    """The MLP's two prunable layers (the head is kept): layer 0 loses 0.45 of its 128
    neurons (cosine alone 0.9938), layer 2 0.25 of its 64 (0.9941). Together: 0.9893
    against 0.9543 for uniform 0.5 (measured; 8448 against 6570 parameters)."""
    path, data = files["pt2"], load_dataset(files["eval"])
    out, event, channels = allocate(path, {"amount": 0.5, "min_cosine": 0.99}, data, tmp_path)
    fractions, cosines = event["fractions"], event["cosines"]
    assert fractions == {"0": 0.45, "2": 0.25}
    assert channels == {"0": [128, 70], "2": [64, 48]}  # int(128 * 0.55), int(64 * 0.75)
    roots = list(fractions)
    for root, fraction in fractions.items():  # the bound, layer by layer, measured again
        measured = output_cosine(path, alone(path, root, roots, fraction, tmp_path), data)
        assert cosines[root] >= 0.99 and abs(measured - cosines[root]) < 1e-4, (root, measured)
        # the next fraction on the grid breaks it: 0.9897 (layer 0 at 0.5), 0.9800 (2 at 0.3)
        further = alone(path, root, roots, fraction + 0.05, tmp_path)
        assert output_cosine(path, further, data) < 0.99, root
    uniform = saved(prune(path, {"amount": 0.5}, tmp_path), tmp_path / "uniform.pt2")
    together, uniform_cosine = output_cosine(path, out, data), output_cosine(path, uniform, data)
    assert together >= uniform_cosine, (together, uniform_cosine)
    assert abs(together - 0.9893) < 0.002 and abs(uniform_cosine - 0.9543) < 0.002


def test_sensitivity_on_the_cnn_keeps_the_residual_trunk_and_cuts_the_branches(cnn, tmp_path) -> None:  # fmt: skip
    """Five channel groups, by root layer: the residual trunk (stem.0 with both blocks'
    second convs) cannot lose even 5 % (cosine 0.922 < 0.95, measured), the inner convs
    lose 0.3, branch_a the whole amount (0.5), branch_b 0.35. Together: 0.880 against
    0.207 for uniform 0.5 (measured)."""
    path, data = cnn["pt2"], load_dataset(cnn["eval"])
    out, event, channels = allocate(path, {"amount": 0.5, "min_cosine": 0.95}, data, tmp_path)
    fractions, cosines = event["fractions"], event["cosines"]
    assert fractions == {
        "stem.0": 0.0, "block1.conv1": 0.3, "block2.conv1": 0.3, "branch_a": 0.5,
        "branch_b": 0.35,
    }  # fmt: skip
    assert len(set(fractions.values())) == 4 and max(fractions.values()) <= 0.5  # capped
    assert "stem_0" not in channels and "block1_conv2" not in channels  # the trunk is whole
    assert channels["block1_conv1"] == [32, 22] and channels["branch_b"] == [16, 10]
    roots = list(fractions)
    for root, fraction in fractions.items():  # the bound, group by group, measured again
        # a group left whole: its cosine is the one at the smallest fraction, which broke it
        tried = alone(path, root, roots, fraction or 0.05, tmp_path)
        measured = output_cosine(path, tried, data)
        assert abs(measured - cosines[root]) < 1e-4, (root, measured, cosines[root])
        assert (measured >= 0.95) == (fraction > 0), root
    uniform = saved(prune(path, {"amount": 0.5}, tmp_path), tmp_path / "uniform.pt2")
    together, uniform_cosine = output_cosine(path, out, data), output_cosine(path, uniform, data)
    assert together >= uniform_cosine, (together, uniform_cosine)
    assert abs(together - 0.880) < 0.01 and abs(uniform_cosine - 0.207) < 0.01


def test_sensitivity_without_inputs_is_refused(files, tmp_path: Path) -> None:
    """At POST /v1/jobs, through the method's needs, in the words prune.magnitude uses;
    in the engine, before any pruning."""
    from worker.spec import DatasetInfo, PipelineRequest, check_pipeline

    params = {"amount": 0.5, "allocation": "sensitivity"}

    def problems(method: str, datasets: dict) -> list:
        request = PipelineRequest("pt2", [(method, params)], datasets=datasets)
        return check_pipeline(request)

    (problem,) = problems(METHOD, {})
    assert problem.loc == ("datasets", "eval")
    assert problem.msg == (
        "prune.structured needs a eval or calibration dataset (allocation 'sensitivity' runs "
        "the model on real inputs); upload one and pass its id in datasets.eval"
    )
    (magnitude,) = problems("prune.magnitude", {})
    assert magnitude.msg == problem.msg.replace(METHOD, "prune.magnitude")
    assert problems(METHOD, {"calibration": DatasetInfo()}) == []
    assert problems(METHOD, {"train": DatasetInfo()}) != []  # train inputs are not used
    with pytest.raises(DatasetMismatchError, match="needs an eval or calibration dataset"):
        prune(files["pt2"], params, tmp_path)


def test_sensitivity_params_and_search_declaration() -> None:
    method = get_method(METHOD)
    assert method.validate_params({"amount": 0.5, "allocation": "sensitivity"}, "pt2")
    with pytest.raises(ValidationError, match="one fraction per group: use scope 'local'"):
        method.validate_params({"amount": 0.5, "allocation": "sensitivity", "scope": "global"})
    with pytest.raises(ValidationError):
        method.validate_params({"amount": 0.5, "min_cosine": 1.0})
    assert method.search is not None
    assert method.search.params["allocation"].grid() == ["uniform", "sensitivity"]
