"""worker.lifting: exported programs as trainable modules with real layers, and back."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from tests import factories, factories_cnn
from tests.helpers import stock_module
from worker.errors import UnsupportedError
from worker.formats import LoadedModel, load_model, pt2_model_from_program, save_model
from worker.lifting import lift, lifted_name, relower

CNN_CONVS = {
    "stem_0", "block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2", "branch_a",
    "branch_b",
}  # fmt: skip
CNN_BNS = {"stem_1", "block1_bn1", "block1_bn2", "block2_bn1", "block2_bn2"}


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lifting")
    return {
        "pt2": factories_cnn.cnn_pt2(root / "cnn.pt2"),
        "pt2_static": factories_cnn.cnn_pt2(root / "cnn_static.pt2", dynamic_batch=False),
    }


def layers_of(module: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in module.named_children()}


def program_output(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.program.module()(x)


@pytest.mark.parametrize("key", ["pt2", "pt2_static"])
def test_lifted_mlp_has_real_layers_and_the_same_outputs(files, key: str) -> None:
    model = load_model(files[key], "pt2")
    lifted = lift(model)
    assert layers_of(lifted) == {"0": nn.Linear, "2": nn.Linear, "4": nn.Linear}
    _, _, x_test, _ = factories.digits_arrays()
    batches = [4] if key == "pt2_static" else [4, 1, 37]
    for batch in batches:
        x = torch.from_numpy(x_test[:batch])
        with torch.no_grad():
            assert torch.equal(lifted(x), program_output(model, x))


@pytest.mark.parametrize("key", ["pt2", "pt2_static"])
def test_lifted_cnn_has_real_layers_and_the_same_outputs(cnn_files, key: str) -> None:
    model = load_model(cnn_files[key], "pt2")
    lifted = lift(model)
    layers = layers_of(lifted)
    assert {n for n, t in layers.items() if t is nn.Conv2d} == CNN_CONVS
    assert {n for n, t in layers.items() if t is nn.BatchNorm2d} == CNN_BNS
    assert layers["head"] is nn.Linear
    assert not [n for n in lifted.graph.nodes if n.op == "get_attr"]  # every weight lifted
    assert not lifted.training
    _, _, x_test, _ = factories_cnn.digits_images()
    for batch in [4] if key == "pt2_static" else [4, 2, 29]:
        x = torch.from_numpy(x_test[:batch])
        with torch.no_grad():
            assert torch.equal(lifted(x), program_output(model, x))


def test_decomposed_programs_lift_too(tmp_path: Path) -> None:
    """Core-aten programs spell Linear as addmm(b, x, permute(w)) and flatten as a view
    with the channel count as a literal: both become layers that survive pruning."""
    module = factories_cnn.train_digits_cnn()
    example = factories_cnn.example_images()
    ep = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deepcopy of a tree spec
        ep = ep.run_decompositions()
    ops = {str(n.target) for n in ep.graph.nodes}
    assert {"aten.addmm.default", "aten.convolution.default", "aten.view.default"} <= ops
    model = pt2_model_from_program(ep)
    lifted = lift(model)
    layers = layers_of(lifted)
    assert layers["head"] is nn.Linear and {n for n, t in layers.items() if t is nn.Conv2d} == (
        CNN_CONVS
    )
    x = factories_cnn.example_images(9)
    with torch.no_grad():
        assert torch.allclose(lifted(x), program_output(model, x), atol=1e-5)
    prune_half(lifted, example)
    with torch.no_grad():
        assert lifted(x).shape == (9, 10)


def test_lifted_module_trains_and_leaves_the_program_alone(files) -> None:
    model = load_model(files["pt2"], "pt2")
    before = {k: v.clone() for k, v in model.program.state_dict.items()}
    lifted = lift(model)
    params = list(lifted.parameters())
    assert params and all(p.requires_grad for p in params)
    x_train, y_train, _, _ = factories.digits_arrays()
    x, y = torch.from_numpy(x_train[:256]), torch.from_numpy(y_train[:256])
    opt = torch.optim.SGD(lifted.parameters(), lr=0.5)
    lifted.train()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lifted(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(lifted.get_parameter("0.weight"), before["0.weight"])
    for name, value in model.program.state_dict.items():
        assert torch.equal(value, before[name]), name


def test_lifted_batch_norm_follows_train_and_eval_modes(cnn_files) -> None:
    lifted = lift(load_model(cnn_files["pt2"], "pt2"))
    bn = lifted.get_submodule("stem_1")
    mean_before = bn.running_mean.clone()
    x = factories_cnn.example_images(32) * 3.0
    lifted.train()
    lifted(x)
    assert not torch.equal(bn.running_mean, mean_before)  # batch statistics are tracked
    lifted.eval()
    frozen = bn.running_mean.clone()
    lifted(x)
    assert torch.equal(bn.running_mean, frozen)


def prune_half(lifted: nn.Module, example: torch.Tensor) -> None:
    pruner = tp.pruner.MetaPruner(
        lifted,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[lifted.get_submodule("head")],
    )
    pruner.step()


def test_dependency_graph_sees_residual_and_concat_couplings(cnn_files) -> None:
    lifted = lift(load_model(cnn_files["pt2"], "pt2"))
    example = factories_cnn.example_images()
    graph = tp.DependencyGraph().build_dependency(lifted, example_inputs=example)
    stem = lifted.get_submodule("stem_0")
    group = graph.get_pruning_group(stem, tp.prune_conv_out_channels, idxs=[0, 1])
    names = {module: name for name, module in lifted.named_children()}
    coupled = {names.get(dep.target.module) for dep, _ in group}
    # the residual adds tie the stem to the second conv/BN of both blocks
    assert {"stem_1", "block1_conv2", "block1_bn2", "block2_conv2", "block2_bn2"} <= coupled
    assert "block1_conv1" in coupled  # its input channels
    branch_b = lifted.get_submodule("branch_b")
    group = graph.get_pruning_group(branch_b, tp.prune_conv_out_channels, idxs=[0])
    head_inputs = [idxs for dep, idxs in group if dep.target.module is lifted.get_submodule("head")]
    assert [int(i) for i in head_inputs[0]] == [16]  # concat offset: branch_a has 16 channels


@pytest.mark.parametrize("key", ["pt2", "pt2_static"])
def test_relower_after_pruning_keeps_the_signature(cnn_files, tmp_path: Path, key: str) -> None:
    model = load_model(cnn_files[key], "pt2")
    lifted = lift(model)
    example = factories_cnn.example_images()
    prune_half(lifted, example)
    assert lifted.get_submodule("stem_0").out_channels == 16
    relowered = relower(model, lifted)
    assert relowered.inputs == model.inputs or key == "pt2"  # symbol names may differ
    assert [s.is_dynamic(0) for s in relowered.inputs] == [key == "pt2"]
    assert relowered.outputs[0].shape[1:] == (10,)
    weights = relowered.program.state_dict
    assert tuple(weights["stem_0.weight"].shape) == (16, 1, 3, 3)
    assert tuple(weights["head.weight"].shape) == (10, 16)
    out = tmp_path / "pruned.pt2"
    save_model(relowered, out)
    reloaded = stock_module(out)
    for batch in [4] if key == "pt2_static" else [4, 11]:
        x = factories_cnn.example_images(batch)
        with torch.no_grad():
            assert torch.allclose(reloaded(x), lifted(x), atol=1e-5)


def test_relower_keeps_weights_of_unlowered_layers(files) -> None:
    """A lifted layer swapped for another module type (as quantizers do) is exported too."""
    model = load_model(files["pt2"], "pt2")
    lifted = lift(model)

    class Scaled(nn.Module):
        def __init__(self, inner: nn.Linear) -> None:
            super().__init__()
            self.inner = inner
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * self.scale

    setattr(lifted, "2", Scaled(lifted.get_submodule("2")))
    relowered = relower(model, lifted)
    assert {"2.inner.weight", "2.scale", "0.weight"} <= set(relowered.program.state_dict)
    x = torch.from_numpy(factories.digits_arrays()[2][:5])
    with torch.no_grad():
        assert torch.allclose(relowered.program.module()(x), lifted(x), atol=1e-5)


def test_relower_uses_given_example_inputs(files) -> None:
    model = load_model(files["pt2"], "pt2")
    x = factories.digits_arrays()[2][:3]
    relowered = relower(model, lift(model), example_inputs={model.inputs[0].name: x})
    assert relowered.inputs[0].is_dynamic(0)
    with torch.no_grad():
        out = relowered.program.module()(torch.from_numpy(x))
    np.testing.assert_allclose(out.numpy(), program_output(model, torch.from_numpy(x)).numpy())


def test_onnx_models_cannot_be_lifted() -> None:
    with pytest.raises(UnsupportedError, match="no PyTorch module form"):
        lift(LoadedModel("onnx", [], [], proto=None))


def test_lifted_names() -> None:
    assert lifted_name("layer1.0.conv1.weight") == "layer1_0_conv1"
    assert lifted_name("0.weight") == "0"
    assert lifted_name("proj") == "proj"


def test_hf_models_are_their_own_module(tmp_path: Path) -> None:
    from tests import factories_text

    model = load_model(factories_text.tiny_bert_hf_zip(tmp_path / "bert.zip", trained=False), "hf")
    module = lift(model)
    assert module is model.module and isinstance(module, nn.Module)
    replaced = relower(model, module)
    assert replaced.format == "hf" and replaced.module is module
    assert replaced.inputs == model.inputs and replaced is not model
