"""POST /v1/jobs and the engine refuse the same specs in the same words (worker.spec)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.factories import digits_npz, tiny_mlp_onnx, tiny_mlp_pt2
from worker.context import NullReporter
from worker.errors import EngineError
from worker.pipeline import PipelineSpec, run_pipeline

# (model format, pipeline, datasets given (role -> "labelled" | "unlabelled"), extra spec keys)
BAD_SPECS: dict[str, tuple[str, list[dict[str, Any]], dict[str, str], dict[str, Any]]] = {
    "unknown method": ("onnx", [{"method": "prune.nonsense"}], {}, {}),
    "amount out of range": (
        "pt2",
        [{"method": "prune.magnitude", "params": {"amount": 1.5}}],
        {},
        {},
    ),
    "unknown param": ("pt2", [{"method": "prune.magnitude", "params": {"amont": 0.5}}], {}, {}),
    "distill without train data": ("pt2", [{"method": "distill", "params": {"epochs": 1}}], {}, {}),
    "static int8 without calibration data": ("onnx", [{"method": "quantize.static"}], {}, {}),
    "taylor without labels": (
        "pt2",
        [{"method": "prune.structured", "params": {"amount": 0.5, "importance": "taylor"}}],
        {"train": "unlabelled"},
        {},
    ),
    "taylor without data": (
        "pt2",
        [{"method": "prune.structured", "params": {"amount": 0.5, "importance": "taylor"}}],
        {},
        {},
    ),
    "a format the method does not take": (
        "onnx",
        [{"method": "finetune"}],
        {"train": "labelled"},
        {},
    ),
    "an output format the model cannot become": (
        "onnx",
        [{"method": "quantize.dynamic"}],
        {},
        {"output_format": "pt2"},
    ),
    "a device the method does not run on": (
        "pt2",
        [{"method": "finetune", "params": {"epochs": 1}}],
        {"train": "labelled"},
        {"target": {"device": "gpu"}},
    ),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("parity")
    return {
        "pt2": tiny_mlp_pt2(d / "mlp.pt2"),
        "onnx": tiny_mlp_onnx(d / "mlp.onnx"),
        "labelled": digits_npz(d / "labelled.npz"),
        "unlabelled": digits_npz(d / "unlabelled.npz", labels=False),
    }


@pytest.fixture
def client(embedded: dict[str, str]) -> Any:
    from app.main import create_app

    with TestClient(create_app(run_reaper=False), raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {embedded['alice']}"
        yield c


def _upload(client: TestClient, kind: str, path: Path) -> str:
    with path.open("rb") as fh:
        answer = client.post(f"/v1/{kind}", files={"file": (path.name, fh)})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_the_api_and_the_engine_refuse_a_spec_alike(
    case: str, client: TestClient, files: dict[str, Path], tmp_path: Path
) -> None:
    fmt, pipeline, given, extra = BAD_SPECS[case]
    spec: dict[str, Any] = {
        "model_id": _upload(client, "models", files[fmt]),
        "pipeline": pipeline,
        "datasets": {
            role: _upload(client, "datasets", files[kind]) for role, kind in given.items()
        },
        **extra,
    }
    answer = client.post("/v1/jobs", json=spec)
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["title"] == "Invalid job spec" and body["errors"], body

    engine_spec = PipelineSpec(
        steps=[(step["method"], step.get("params", {})) for step in pipeline],
        output_format=extra.get("output_format", fmt),
        device=extra.get("target", {}).get("device", "cpu"),
    )
    datasets = {role: files[kind] for role, kind in given.items()}
    with pytest.raises(EngineError) as refused:
        run_pipeline(files[fmt], fmt, engine_spec, datasets, tmp_path / "work", NullReporter())
    assert refused.value.step == "validate"
    assert refused.value.message == body["detail"]
