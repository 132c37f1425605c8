"""The method registry: torch-free, self-describing, self-validating params."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.methods import REGISTRY, all_methods, get_method
from worker.methods.base import UnknownMethodError

REPO = Path(__file__).resolve().parents[2]

# A valid params dict for every method; a new method must add one here.
EXAMPLES = {
    "prune.magnitude": {"amount": 0.3, "scope": "global", "layers": ["0."], "include_bias": True},
    "finetune": {"epochs": 2, "lr": 0.001, "batch_size": 16, "l1": 1e-5, "l2": 1e-4, "patience": 2},
    "distill": {
        "temperature": 4.0,
        "alpha": 0.7,
        "epochs": 3,
        "features": [{"student": "layer1.0.conv1", "teacher": "layer1.0.conv1", "weight": 0.5}],
        "teacher_model_id": "mdl_t",
        "student_model_id": "mdl_s",
    },
    "lowrank": {"energy": 0.95, "min_features": 8},
    "quantize.dynamic": {"dtype": "int8", "per_channel": False, "symmetric": True},
    "prune.structured": {
        "amount": 0.5,
        "importance": "taylor",
        "scope": "global",
        "round_to": 8,
        "ignore": ["block1.conv1"],
    },
    "prune.activation": {
        "amount": 0.3,
        "max_samples": 256,
        "batch_size": 32,
        "round_to": 4,
        "ignore": ["0"],
    },
    "prune.semi_structured": {"layers": ["0."], "min_features": 32},
    "quantize.static": {"calibrate_method": "entropy", "max_samples": 256},
    "quantize.half": {"dtype": "bf16"},
    "quantize.weight_only": {"bits": 4, "group_size": 32, "symmetric": False},
    "quantize.qat": {"weight_bits": 4, "group_size": 64, "epochs": 2, "patience": 1},
    "quantize.binary": {"mode": "ternary", "epochs": 3, "keep_first_last": False},
    "clip": {"mode": "percentile", "percentile": 99.5, "epochs": 0, "lr": 1e-4, "batch_size": 16},
    "quantize.log": {
        "bits": 3,
        "epochs": 2,
        "lr": 1e-4,
        "batch_size": 32,
        "keep_first_last": False,
    },
}


def test_registry_imports_no_torch_or_onnx() -> None:
    code = (
        "import sys, worker.methods, worker.methods.base, worker.errors\n"
        "worker.methods.REGISTRY['prune.magnitude'].describe()\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'torchao') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_every_method_has_an_example() -> None:
    assert sorted(REGISTRY) == sorted(EXAMPLES)
    assert [m.name for m in all_methods()] == sorted(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_params_round_trip_and_describe_themselves(name: str) -> None:
    method = get_method(name)
    params = method.params.model_validate(EXAMPLES[name])
    assert method.params.model_validate(params.model_dump()) == params
    assert method.params.model_validate_json(params.model_dump_json()) == params
    schema = method.params.model_json_schema()
    assert schema["properties"], name
    for prop, body in schema["properties"].items():
        assert body.get("description"), f"{name}.{prop} has no description"
    doc = method.params.__doc__ or ""
    assert "Args:" in doc and "Example:" in doc
    for prop in schema["properties"]:
        assert f"{prop}:" in doc, f"{name}: docstring does not document {prop}"
    described = method.describe()
    assert described["name"] == name and described["params_schema"] == schema
    assert set(described["formats"]) <= {"pt2", "onnx", "hf"}


@pytest.mark.parametrize(
    "params",
    [{"amount": 1.5}, {"amount": 0.0}, {"amount": 1.0}, {"amount": 0.5, "colour": "red"},
     {"amount": 0.5, "scope": "row"}, {}],
)  # fmt: skip
def test_bad_prune_params_are_refused(params: dict) -> None:
    with pytest.raises(ValidationError):
        get_method("prune.magnitude").validate_params(params)


def test_bad_quantize_params_are_refused() -> None:
    method = get_method("quantize.dynamic")
    with pytest.raises(ValidationError):
        method.validate_params({"dtype": "int4"})
    with pytest.raises(ValidationError):
        method.validate_params({"bits": 8})
    # Asymmetric weights: ONNX Runtime does them, torchao's x86 quantizer does not.
    assert method.validate_params({"symmetric": False}, "onnx").symmetric is False
    with pytest.raises(ValidationError, match=r"symmetric=false is not supported for pt2"):
        method.validate_params({"symmetric": False}, "pt2")


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(UnknownMethodError, match=r"prune\.magnitude"):
        get_method("prune.telepathic")


def test_iterative_magnitude_example_round_trips() -> None:
    method = get_method("prune.magnitude")
    example = {
        "amount": 0.8,
        "scope": "global",
        "steps": 3,
        "epochs_per_step": 2,
        "lr": 0.001,
        "batch_size": 64,
    }
    params = method.params.model_validate(example)
    assert method.params.model_validate(params.model_dump()) == params
    assert "train" in method.requires(params)
