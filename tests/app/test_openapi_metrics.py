"""The job's metrics are typed: /openapi.json documents them, stored rows read back as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from tests.factories import tiny_mlp_onnx

LATENCY = {"p50": 0.05, "p95": 0.07, "mean": 0.055}
# The shape run_pipeline writes: unmeasured figures absent (no macs or sparsity on the
# compressed side, no top1 in the step), nulls inside params kept, and a key this API
# does not know yet (a newer worker's), which must come back untouched.
STORED = {
    "original": {
        "size_bytes": 70000,
        "size_bytes_gzip": 64000,
        "parameters": 17226,
        "nonzero_parameters": 17226,
        "sparsity": 0.0,
        "macs": 16896,
        "latency_ms": {"batch_1": LATENCY, "batch_16": LATENCY},
        "peak_memory_bytes": 1200000,
        "accuracy": 0.95,
    },
    "compressed": {
        "size_bytes": 20000,
        "size_bytes_gzip": 9000,
        "parameters": 17226,
        "nonzero_parameters": 8700,
        "latency_ms": {"batch_1": LATENCY},
    },
    "fidelity": {"cosine_similarity": 0.99, "mse": 0.01, "max_abs_error": 0.4},
    "ratios": {"size": 3.5, "speedup": {"batch_1": 1.0}},
    "steps": [
        {
            "method": "prune.magnitude",
            "params": {"amount": 0.5, "exclude": None},
            "seconds": 0.25,
            "format": "onnx",
            "size_bytes": 70000,
            "latency_ms": {"batch_1": LATENCY},
            "latency_iterations": 5,
            "fidelity": {"cosine_similarity": 0.995, "mse": 0.005, "max_abs_error": 0.2},
        }
    ],
    "layers": {"fc1": {"status": "changed"}},
}
# A job finished before per-step metrics existed.
STORED_WITHOUT_STEPS = {
    "original": {"size_bytes": 10, "latency_ms": {"batch_1": LATENCY}},
    "compressed": {"size_bytes": 5},
    "ratios": {},
}


@pytest.fixture
def client(embedded: dict[str, str]) -> Any:
    from app.main import create_app

    with TestClient(create_app(run_reaper=False), raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {embedded['alice']}"
        yield c


def _properties(components: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in components, sorted(components)
    return components[name]["properties"]


def test_openapi_documents_every_metric(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    components = document["components"]["schemas"]
    job = next(v for k, v in components.items() if k.startswith("JobOut"))
    refs = [s.get("$ref") for s in job["properties"]["metrics"]["anyOf"]]
    assert "#/components/schemas/PipelineMetrics" in refs
    assert "#/components/schemas/SearchProgress" in refs  # a running search: its trials so far
    search = _properties(components, "SearchMetrics")
    assert {"trials", "pareto", "best", "met", "unmet", "sensitivity", "holdout"} <= set(search)

    top = components["PipelineMetrics"]
    assert set(top["properties"]) == {
        "original", "compressed", "fidelity", "ratios", "steps", "hardware", "layers",
        "conversion", "search",
    }  # fmt: skip
    assert set(top["required"]) == {"original", "compressed", "ratios"}
    assert set(_properties(components, "HardwareInfo")) == {"cpu", "gpu"}
    assert {"arch", "instruction_sets", "vnni", "int8_overflows"} <= set(
        _properties(components, "CpuInfo")
    )
    figures = {
        "size_bytes", "size_bytes_gzip", "parameters", "nonzero_parameters", "sparsity",
        "macs", "latency_ms",
    }  # fmt: skip
    model = _properties(components, "ModelMetrics")
    assert set(model) == figures | {"peak_memory_bytes", "accuracy"}
    assert model["latency_ms"]["additionalProperties"] == {"$ref": "#/components/schemas/Latency"}
    assert set(_properties(components, "Latency")) == {"p50", "p95", "mean"}
    assert set(_properties(components, "Fidelity")) == {
        "top1_agreement", "cosine_similarity", "mse", "max_abs_error",
    }  # fmt: skip
    ratios = _properties(components, "Ratios")
    assert set(ratios) == {"size", "speedup"}
    assert ratios["speedup"]["additionalProperties"] == {"type": "number"}
    step = _properties(components, "StepMetrics")
    assert set(step) == figures | {
        "method", "params", "seconds", "format", "latency_iterations", "fidelity", "accuracy",
        "layers",
    }  # fmt: skip
    assert set(_properties(components, "LayerMetrics")) == {
        "status", "dtype", "sparsity", "clipped", "reason", "steps",
    }  # fmt: skip
    compiled = _properties(components, "Conversion")["compiled"]
    assert compiled["$ref"] == "#/components/schemas/CompileFigures"
    # A figure that was not measured is absent, never null: none is documented as nullable.
    for name in (
        "ModelMetrics",
        "Fidelity",
        "Ratios",
        "StepMetrics",
        "PipelineMetrics",
        "LayerMetrics",
        "Conversion",
        "CompileFigures",
    ):
        for field, prop in components[name]["properties"].items():
            assert "null" not in str(prop) and "default" not in prop, (name, field, prop)
        assert components[name]["properties"]
        assert all(prop.get("description") for prop in components[name]["properties"].values())


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mlp_onnx(tmp_path_factory.mktemp("model") / "mlp.onnx")


@pytest.mark.parametrize("stored", [STORED, STORED_WITHOUT_STEPS], ids=["steps", "old-row"])
def test_stored_metrics_read_back_exactly_as_written(
    client: TestClient, onnx_model: Path, stored: dict[str, Any]
) -> None:
    from app.db import session_scope
    from app.orm import Job

    with onnx_model.open("rb") as fh:
        uploaded = client.post("/v1/models", files={"file": ("mlp.onnx", fh)})
    assert uploaded.status_code == 201, uploaded.text
    step = {"method": "prune.magnitude", "params": {"amount": 0.5}}
    created = client.post("/v1/jobs", json={"model_id": uploaded.json()["id"], "pipeline": [step]})
    assert created.status_code == 202, created.text
    job = created.json()
    with session_scope() as session:
        session.execute(
            update(Job).where(Job.id == job["id"]).values(status="succeeded", metrics=stored)
        )
    polled = client.get(f"/v1/jobs/{job['id']}")
    assert polled.status_code == 200, polled.text
    assert polled.json()["metrics"] == stored
    listed = client.get("/v1/jobs").json()["items"]
    assert [j["metrics"] for j in listed if j["id"] == job["id"]] == [stored]


def test_the_metric_models_need_neither_numpy_nor_torch() -> None:
    code = (
        "import sys, worker.schemas; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('numpy', 'torch', 'onnxruntime', 'onnx', 'transformers')); "
        "assert not heavy, heavy"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=root
    )
    assert done.returncode == 0, done.stderr
