"""The search space: built from the registry's declarations, restricted, and proposing only
pipelines the job-spec check accepts."""

from __future__ import annotations

from typing import Any

import optuna
import pytest

from worker.contract import ModelFormat
from worker.methods import REGISTRY
from worker.schemas import LayerSensitivity
from worker.search.space import NONE, Recipe, SpaceError, build_space, space_problems
from worker.spec import DatasetInfo, PipelineRequest, check_pipeline

LABELLED = DatasetInfo(has_labels=True)
ALL_DATA = {"train": LABELLED, "calibration": LABELLED, "eval": LABELLED}
LAYERS = ["features.0", "features.3", "classifier"]
SENSITIVITY = {
    "features.0": LayerSensitivity(quantized_cosine=0.95),
    "features.3": LayerSensitivity(quantized_cosine=0.9999),
    "classifier": LayerSensitivity(quantized_cosine=0.97),
}


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(seed: int = 0) -> optuna.Study:
    return optuna.create_study(
        directions=["minimize", "minimize"], sampler=optuna.samplers.TPESampler(seed=seed)
    )


def _accepted(model_format: str, recipe: Recipe, datasets: dict[str, DatasetInfo]) -> list:
    request = PipelineRequest(
        model_format=model_format,
        steps=recipe.steps,
        output_format=recipe.output_format,
        datasets=datasets,
        layer_names=LAYERS,
    )
    return check_pipeline(request)


@pytest.mark.parametrize("name", sorted(n for n, m in REGISTRY.items() if m.search))
def test_every_declaration_names_real_params_with_defaults_inside(name: str) -> None:
    method = REGISTRY[name]
    assert method.search is not None
    for param, dist in method.search.params.items():
        assert param in method.params.model_fields, f"{name} searches unknown param {param}"
        default = method.search.defaults.get(param, method.params.model_fields[param].default)
        assert dist.contains(default), f"{name}.{param}: known-good {default!r} outside"
        for value in dist.grid():  # every value the search can try validates
            method.validate_params({**method.search.defaults, param: value})
    if method.search.exclude:
        assert "exclude" in method.params.model_fields


def test_recipes_of_a_search_are_pipelines_the_check_accepts() -> None:
    space = build_space("pt2", ALL_DATA, "cpu", layer_names=LAYERS).with_sensitivity(SENSITIVITY)
    study = _study()
    for params in space.known_good(SENSITIVITY):
        study.enqueue_trial(params)
    seen_roles: set[str] = set()
    for i in range(60):
        trial = study.ask()
        recipe = space.recipe(trial)
        assert recipe.steps, "a recipe always has a step"
        assert _accepted("pt2", recipe, ALL_DATA) == []
        for method, _ in recipe.steps:
            search = REGISTRY[method].search
            assert search is not None
            seen_roles.add(search.role)
        study.tell(trial, [i % 7, i % 3])
    assert seen_roles == {"structure", "recovery", "precision"}


def test_known_good_recipes_come_first_each_method_alone_with_its_defaults() -> None:
    space = build_space("pt2", ALL_DATA, "cpu", layer_names=LAYERS)
    with pytest.raises(ValueError, match="with_sensitivity"):
        space.known_good(SENSITIVITY)
    space = space.with_sensitivity(SENSITIVITY)
    study = _study()
    known = space.known_good(SENSITIVITY)
    for params in known:
        study.enqueue_trial(params)
    recipes = []
    for _ in known:
        trial = study.ask()
        recipes.append(space.recipe(trial))
        study.tell(trial, [1.0, 1.0])
    mixed = recipes[0]  # the sensitivity-derived mixed precision: sensitive layers float
    assert mixed.steps == [
        ("quantize.static", {"per_channel": True, "exclude": ["features.0", "classifier"]})
    ]
    singles = {recipe.steps[0][0]: recipe for recipe in recipes[1:]}
    assert all(len(recipe.steps) == 1 for recipe in recipes)
    searched = {n for n, m in REGISTRY.items() if m.search and m.search.role != "recovery"}
    assert set(singles) == searched
    assert singles["prune.magnitude"].steps == [
        ("prune.magnitude", {"amount": 0.5, "allocation": "uniform"})
    ]
    assert singles["quantize.dynamic"].output_format == ModelFormat.onnx
    assert "exclude" not in singles["quantize.static"].steps[0][1]


def test_methods_and_runtimes_restrict_the_space() -> None:
    space = build_space(
        "pt2", ALL_DATA, "cpu", methods=["prune.structured", "quantize.dynamic"],
        runtimes=["onnxruntime"],
    )  # fmt: skip
    assert space.output_formats == ("onnx",)
    assert space.structure == ("prune.structured",)
    assert space.recovery == ()
    assert space.precision == {"onnx": ("quantize.dynamic",)}
    study = _study(seed=1)
    for _ in range(15):
        trial = study.ask()
        recipe = space.recipe(trial)
        assert {m for m, _ in recipe.steps} <= {"prune.structured", "quantize.dynamic"}
        assert recipe.output_format == "onnx"
        study.tell(trial, [1.0, 2.0])


def test_recovery_needs_train_data_and_static_quantization_calibration() -> None:
    space = build_space("pt2", {"eval": LABELLED}, "cpu")
    assert space.recovery == ()
    assert all("quantize.static" not in names for names in space.precision.values())
    assert "prune.activation" not in space.structure


def test_a_methods_entry_that_does_not_fit_is_refused_with_why() -> None:
    problems = space_problems(
        "onnx", {"eval": LABELLED}, "cpu",
        methods=["distill", "prune.structured", "nope", "clip", "quantize.dynamic"],
    )  # fmt: skip
    by_loc = {p.loc: p.msg for p in problems}
    assert "distill does not accept onnx models" in by_loc[("search", "methods", 0)]
    assert "needs a train dataset" in by_loc[("search", "methods", 0)]
    assert "prune.structured does not accept onnx" in by_loc[("search", "methods", 1)]
    assert "unknown method 'nope'" in by_loc[("search", "methods", 2)]
    assert "clip is not searched" in by_loc[("search", "methods", 3)]
    assert ("search", "methods", 4) not in by_loc
    problems = space_problems("onnx", {}, "cpu", runtimes=["inductor", "warp", "onnxruntime"])
    by_loc = {p.loc: p.msg for p in problems}
    assert "'inductor' is not reachable from a onnx model" in by_loc[("search", "runtimes", 0)]
    assert "unknown runtime 'warp'" in by_loc[("search", "runtimes", 1)]
    with pytest.raises(SpaceError):
        build_space("onnx", {}, "cpu", methods=["distill"])


def test_an_empty_space_says_why() -> None:
    # onnx on gpu workers: only half precision and weight-only int8 run there
    problems = space_problems("onnx", {}, "gpu", methods=["quantize.dynamic"])
    assert [p.loc for p in problems] == [("search", "methods", 0)]
    assert "does not run on gpu" in problems[0].msg
    problems = space_problems("onnx", {}, "cpu", runtimes=["torch"])
    assert problems and "not reachable" in problems[0].msg


def test_recipe_json_key_and_prefixes() -> None:
    recipe = Recipe(
        steps=[("prune.structured", {"amount": 0.3}), ("distill", {"epochs": 4}),
               ("quantize.dynamic", {"per_channel": True})],
        output_format="onnx",
    )  # fmt: skip
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert recipe.runtime == "onnxruntime"
    same = Recipe.from_json({"output_format": "onnx", "pipeline": [
        {"params": {"amount": 0.3}, "method": "prune.structured"},
        {"method": "distill", "params": {"epochs": 4}},
        {"method": "quantize.dynamic", "params": {"per_channel": True}},
    ]})  # fmt: skip
    assert same.key() == recipe.key()
    other: Any = Recipe(steps=[*recipe.steps[:2], ("quantize.static", {})], output_format="aoti")
    # quantize.dynamic runs on the converted ONNX model: only the first two are a prefix
    assert [len(steps) for _, steps in recipe.prefixes("pt2")] == [1, 2]
    assert [k for k, _ in other.prefixes("pt2")][:2] == [k for k, _ in recipe.prefixes("pt2")]
    assert len(other.prefixes("pt2")) == 3
    assert other.key() != recipe.key()


def test_grid_lists_every_parameter_a_recipe_suggests() -> None:
    space = build_space("pt2", ALL_DATA, "cpu", layer_names=LAYERS).with_sensitivity(SENSITIVITY)
    grid = space.grid()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(40):
        trial = study.ask()
        space.recipe(trial)
        assert set(trial.params) <= set(grid)
        for name, value in trial.params.items():
            assert value in grid[name] or name.endswith((".amount", ".rank_ratio"))
        study.tell(trial, 1.0)
    assert grid["precision.onnx"][0] == NONE
