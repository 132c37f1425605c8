"""exclude: layers named as info.layer_names lists them (or re: patterns) are left as they
were by every method that takes it, applied with the libraries' own means, and
metrics.layers says which layers each step changed and which it kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from tests.helpers import saved, step_context, stock_weights
from worker.context import RecordingReporter, StepContext
from worker.data import load_dataset
from worker.errors import InvalidParamsError
from worker.formats import LoadedModel, inspect_model, layer_names, load_model
from worker.layers import resolve_exclude
from worker.methods import get_method
from worker.pipeline import PipelineSpec, run_pipeline
from worker.spec import PipelineRequest, check_pipeline

PT2_LAYERS = [
    "0",
    "2",
    "4",
]  # the digits MLP: Linear(64, 128), ReLU, Linear(128, 64), ReLU, Linear(64, 10)


def run(method: str, model: LoadedModel, params: dict, tmp_path: Path, **data) -> tuple:
    """The step's model and its context (what it recorded per layer)."""
    spec = get_method(method)
    ctx: StepContext = step_context(tmp_path, method, datasets=data)
    return spec.handler(model, spec.validate_params(params, model.format), ctx), ctx


def statuses(ctx: StepContext) -> dict[str, str]:
    return {name: str(entry.status) for name, entry in ctx.layers.items()}


@pytest.fixture(scope="module")
def calibration(files: dict[str, Path]) -> object:
    return load_dataset(files["calibration"], load_model(files["pt2"], "pt2"))


# -- names, patterns and the spec check (torch-free) ----------------------------------------


def test_names_and_patterns_resolve_against_the_layers() -> None:
    names = ["features.0", "features.3", "classifier"]
    resolved = resolve_exclude(["classifier", "re:^features\\.0$", "re:nothing", "fc"], names)
    assert resolved.excluded == {"classifier", "features.0"}
    assert resolved.unknown == ("re:nothing", "fc")
    # after a step lifted and re-exported the model, its layers are named features_0, ...
    lifted = resolve_exclude(
        ["features.0", "classifier", "features.9"], ["features_0", "classifier"]
    )
    assert lifted.excluded == {"features_0", "classifier"}
    assert lifted.unknown == ("features.9",)


def test_exclude_is_one_field_type_on_every_method_that_takes_it() -> None:
    methods = [
        "quantize.static", "quantize.dynamic", "quantize.weight_only", "prune.magnitude",
        "prune.structured", "prune.activation", "prune.semi_structured",
    ]  # fmt: skip
    schemas = [get_method(m).params.model_json_schema()["properties"]["exclude"] for m in methods]
    assert all(schema == schemas[0] for schema in schemas)
    params = get_method("prune.magnitude").params
    with pytest.raises(ValidationError, match="not a regular expression"):
        params.model_validate({"amount": 0.5, "exclude": ["re:(unclosed"]})
    with pytest.raises(ValidationError, match="not empty strings"):
        params.model_validate({"amount": 0.5, "exclude": [" "]})


def test_the_spec_check_names_unknown_layers_with_the_real_ones() -> None:
    steps = [("prune.magnitude", {"amount": 0.5, "exclude": ["0", "fc9", "re:^7"]})]
    problems = check_pipeline(PipelineRequest("pt2", steps, layer_names=PT2_LAYERS))
    assert [p.loc for p in problems] == [("pipeline", 0, "params", "exclude")]
    assert "'fc9', 're:^7'" in problems[0].msg and "its layers are 0, 2, 4" in problems[0].msg
    # Unknown layers (a model not inspected yet): checked when the step runs.
    assert check_pipeline(PipelineRequest("pt2", steps)) == []
    # A step on the converted ONNX model names ONNX nodes: checked when it runs.
    onnx_side = [("quantize.dynamic", {"exclude": ["node_linear"]})]
    request = PipelineRequest("pt2", onnx_side, output_format="onnx", layer_names=PT2_LAYERS)
    assert check_pipeline(request) == []


def test_inspection_lists_module_paths_and_node_names(files: dict[str, Path]) -> None:
    assert inspect_model(files["pt2"], "pt2")["layer_names"] == PT2_LAYERS
    onnx_names = inspect_model(files["onnx"], "onnx")["layer_names"]
    model = load_model(files["onnx"], "onnx")
    assert model.proto is not None
    gemms = [n.name for n in model.proto.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert onnx_names == gemms


# -- quantization ---------------------------------------------------------------------------


def test_static_int8_leaves_an_excluded_layer_float(
    files: dict[str, Path], calibration: object, tmp_path: Path
) -> None:
    model, ctx = run(
        "quantize.static", load_model(files["pt2"], "pt2"), {"exclude": ["4"]}, tmp_path,
        calibration=calibration,
    )  # fmt: skip
    weights = stock_weights(saved(model, tmp_path / "q.pt2"))
    assert weights["4.weight"].dtype == np.float32  # torchao's module-name config left it
    assert "0.weight" not in weights and "2.weight" not in weights  # int8 constants now
    assert statuses(ctx) == {"0": "changed", "2": "changed", "4": "kept"}
    assert ctx.layers["0"].dtype == "int8" and ctx.layers["4"].reason == "excluded"


def test_an_upload_layer_name_still_excludes_it_after_a_step_re_exported_the_model(
    tmp_path: Path,
) -> None:
    from tests import factories_cnn
    from worker.lifting import lift, relower

    upload = load_model(factories_cnn.cnn_pt2(tmp_path / "cnn.pt2", trained=False), "pt2")
    relowered = relower(upload, lift(upload))  # as after pruning or training
    assert "stem.0" in layer_names(upload) and "stem_0" in layer_names(relowered)
    images = factories_cnn.images_npz(tmp_path / "images.npz", "train")
    model, ctx = run(
        "quantize.static", relowered, {"exclude": ["stem.0"]}, tmp_path,
        calibration=load_dataset(images, relowered),
    )  # fmt: skip
    weights = stock_weights(saved(model, tmp_path / "q.pt2"))
    assert weights["stem_0.weight"].dtype == np.float32  # the quantizer left the stem float
    assert "block1_conv1.weight" not in weights  # an int8 constant now
    assert ctx.layers["stem_0"].reason == "excluded"


def test_dynamic_int8_takes_patterns(files: dict[str, Path], tmp_path: Path) -> None:
    model, ctx = run(
        "quantize.dynamic", load_model(files["pt2"], "pt2"), {"exclude": ["re:^0$"]}, tmp_path
    )
    weights = stock_weights(saved(model, tmp_path / "q.pt2"))
    assert weights["0.weight"].dtype == np.float32 and "2.weight" not in weights
    assert statuses(ctx) == {"0": "kept", "2": "changed", "4": "changed"}


def test_onnx_runtime_skips_the_excluded_nodes(
    files: dict[str, Path], calibration: object, tmp_path: Path
) -> None:
    onnx_model = load_model(files["onnx"], "onnx")
    first, *rest = layer_names(onnx_model)
    for method, extra in (
        ("quantize.dynamic", {}),
        ("quantize.static", {"calibration": calibration}),
    ):
        model, ctx = run(
            method, load_model(files["onnx"], "onnx"), {"exclude": [first]}, tmp_path, **extra
        )
        assert model.proto is not None
        # ORT may rewrite the Gemm into <name>_MatMul + <name>_Add, but leaves it float
        node = next(n for n in model.proto.graph.node if n.name in (first, f"{first}_MatMul"))
        assert node.op_type in ("Gemm", "MatMul")
        weights = {t.name: t for t in model.proto.graph.initializer}
        assert all(weights[i].data_type == 1 for i in node.input[1:] if i in weights)
        assert statuses(ctx) == {first: "kept", **{name: "changed" for name in rest}}, method


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_weight_only_skips_the_excluded_layers(
    fmt: str, files: dict[str, Path], tmp_path: Path
) -> None:
    source = load_model(files[fmt], fmt)
    last = layer_names(source)[-1]
    model, ctx = run("quantize.weight_only", source, {"exclude": [last]}, tmp_path)
    assert ctx.layers[last].status == "kept" and ctx.layers[last].reason == "excluded"
    changed = [n for n, e in ctx.layers.items() if e.status == "changed"]
    assert len(changed) == 2 and last not in changed
    if fmt == "pt2":
        weights = stock_weights(saved(model, tmp_path / "w.pt2"))
        matrices = {n: w.dtype for n, w in weights.items() if w.ndim == 2 and w.shape[1] > 1}
        assert [n for n, dtype in matrices.items() if dtype == np.float32] == ["4.weight"]
        assert sum(dtype == np.int8 for dtype in matrices.values()) == 2
    else:
        assert model.proto is not None
        ops = [n.op_type for n in model.proto.graph.node]
        assert ops.count("MatMulNBits") == 2 and "MatMul" in ops  # the excluded layer


# -- pruning --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_magnitude_pruning_keeps_the_excluded_layers_dense(
    fmt: str, files: dict[str, Path], tmp_path: Path
) -> None:
    source = load_model(files[fmt], fmt)
    first = layer_names(source)[0]
    before = stock_weights(saved(source, tmp_path / f"before.{fmt}"))
    model, ctx = run("prune.magnitude", source, {"amount": 0.5, "exclude": [first]}, tmp_path)
    after = stock_weights(saved(model, tmp_path / f"after.{fmt}"))
    matrices = [n for n, w in before.items() if w.ndim == 2]
    first_weight = next(n for n in matrices if np.array_equal(after[n], before[n]))
    assert np.count_nonzero(after[first_weight]) == before[first_weight].size
    others = [n for n in matrices if n != first_weight]
    assert all(abs((after[n] == 0).mean() - 0.5) < 0.01 for n in others)
    assert ctx.layers[first].status == "kept" and ctx.layers[first].reason == "excluded"
    assert all(
        e.status == "changed" and e.sparsity == pytest.approx(0.5, abs=0.01)
        for n, e in ctx.layers.items()
        if n != first
    )


def test_structured_pruning_keeps_the_channels_of_excluded_layers(
    files: dict[str, Path], tmp_path: Path
) -> None:
    model, ctx = run(
        "prune.structured", load_model(files["pt2"], "pt2"), {"amount": 0.5, "exclude": ["0"]},
        tmp_path,
    )  # fmt: skip
    weights = stock_weights(saved(model, tmp_path / "s.pt2"))
    assert weights["0.weight"].shape == (128, 64)  # torch-pruning's ignored_layers kept it
    assert weights["2.weight"].shape == (32, 128)  # its own outputs halved
    assert statuses(ctx) == {"0": "kept", "2": "changed", "4": "changed"}  # 4: fewer inputs


def test_activation_pruning_keeps_the_channels_of_excluded_layers(
    files: dict[str, Path], calibration: object, tmp_path: Path
) -> None:
    model, ctx = run(
        "prune.activation", load_model(files["pt2"], "pt2"), {"amount": 0.5, "exclude": ["2"]},
        tmp_path, calibration=calibration,
    )  # fmt: skip
    weights = stock_weights(saved(model, tmp_path / "a.pt2"))
    assert weights["0.weight"].shape == (64, 64) and weights["2.weight"].shape == (64, 64)
    assert ctx.layers["2"].status == "changed"  # not its outputs, but its inputs shrank
    assert ctx.layers["4"].status == "kept"


def test_semi_structured_pruning_leaves_excluded_layers_dense(
    files: dict[str, Path], tmp_path: Path
) -> None:
    model, ctx = run(
        "prune.semi_structured", load_model(files["pt2"], "pt2"), {"exclude": ["2"]}, tmp_path
    )
    weights = stock_weights(saved(model, tmp_path / "ss.pt2"))
    assert np.count_nonzero(weights["2.weight"]) == weights["2.weight"].size
    assert (weights["0.weight"] == 0).mean() == 0.5
    assert ctx.layers["0"].sparsity == 0.5 and ctx.layers["2"].reason == "excluded"


def test_a_name_unknown_to_the_model_the_step_gets_is_refused_with_the_real_names(
    files: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(InvalidParamsError, match=r"'fc1'.*its layers are 0, 2, 4"):
        run(
            "prune.magnitude",
            load_model(files["pt2"], "pt2"),
            {"amount": 0.5, "exclude": ["fc1"]},
            tmp_path,
        )


# -- metrics.layers -------------------------------------------------------------------------


def test_metrics_say_per_layer_what_the_job_changed_and_kept(
    files: dict[str, Path], tmp_path: Path
) -> None:
    steps = [
        ("prune.magnitude", {"amount": 0.5, "exclude": ["0"]}),
        ("quantize.dynamic", {"exclude": ["4"]}),
    ]
    spec = PipelineSpec(steps=steps, output_format="pt2")
    result = run_pipeline(files["pt2"], "pt2", spec, {}, tmp_path, RecordingReporter())
    metrics = result.metrics
    first, second = (step["layers"] for step in metrics["steps"])
    assert first["0"] == {"status": "kept", "reason": "excluded"}
    assert first["2"]["status"] == "changed" and first["2"]["sparsity"] == pytest.approx(
        0.5, abs=0.01
    )
    assert second["4"] == {"status": "kept", "reason": "excluded"}
    layers = metrics["layers"]
    assert layers["0"] == {"status": "changed", "dtype": "int8", "steps": [1]}
    assert layers["2"]["status"] == "changed" and layers["2"]["steps"] == [0, 1]
    assert layers["4"]["status"] == "changed" and layers["4"]["steps"] == [0]


def test_merged_layers_keep_an_earlier_steps_figures_a_later_change_did_not_report() -> None:
    from worker.layers import merge_layers
    from worker.schemas import StepMetrics

    def step(index: int, layers: dict[str, dict[str, object]]) -> StepMetrics:
        return StepMetrics.model_validate(
            {"method": "m", "params": {}, "seconds": 0.1, "format": "pt2", "layers": layers}
        )

    merged = merge_layers(
        [
            step(0, {"fc1": {"status": "changed", "dtype": "float32", "sparsity": 0.5, "steps": [0]}}),
            step(1, {"fc1": {"status": "changed", "dtype": "int8", "steps": [1]},
                     "fc2": {"status": "kept", "reason": "excluded"}}),
        ]
    )  # fmt: skip
    assert merged is not None
    assert merged["fc1"].dtype == "int8" and merged["fc1"].sparsity == 0.5
    assert merged["fc1"].steps == [0, 1]
    assert merged["fc2"].status == "kept" and merged["fc2"].sparsity is None
