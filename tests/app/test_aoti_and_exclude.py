"""POST /v1/jobs: output_format aoti and per-layer exclude, refused with what to change
(422) in the engine's own words, and accepted specs normalized."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from tests.factories import tiny_mlp_onnx, tiny_mlp_pt2
from worker.context import NullReporter
from worker.errors import EngineError
from worker.pipeline import PipelineSpec, run_pipeline

pytestmark = [pytest.mark.xdist_group("aoti-api")]  # one worker: its module fixture compiles once


@pytest.fixture
def client(embedded: dict[str, str]) -> Any:
    from app.main import create_app

    with TestClient(create_app(run_reaper=False), raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {embedded['alice']}"
        yield c


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("files")
    return {"pt2": tiny_mlp_pt2(d / "mlp.pt2"), "onnx": tiny_mlp_onnx(d / "mlp.onnx")}


def _inspected(client: TestClient, path: Path) -> dict[str, Any]:
    """Upload ``path`` and give its row the info a worker's inspection writes."""
    from app.db import session_scope
    from app.orm import MLModel
    from worker.formats import inspect_model

    with path.open("rb") as fh:
        model = client.post("/v1/models", files={"file": (path.name, fh)}).json()
    info = inspect_model(path, model["format"])
    with session_scope() as session:
        session.execute(
            update(MLModel)
            .where(MLModel.id == model["id"])
            .values(info=info, inspection_status="ready")
        )
    return {**model, "info": info}


def _post(client: TestClient, model_id: str, steps: list[dict[str, Any]], **extra: Any) -> Any:
    return client.post("/v1/jobs", json={"model_id": model_id, "pipeline": steps, **extra})


def test_the_model_resource_lists_its_layer_names(
    client: TestClient, files: dict[str, Path]
) -> None:
    pt2 = _inspected(client, files["pt2"])
    read = client.get(f"/v1/models/{pt2['id']}").json()
    assert read["info"]["layer_names"] == ["0", "2", "4"]
    onnx = _inspected(client, files["onnx"])
    names = client.get(f"/v1/models/{onnx['id']}").json()["info"]["layer_names"]
    assert len(names) == 3 and all(isinstance(n, str) and n for n in names)


def test_exclude_naming_no_layer_is_422_with_the_real_names(
    client: TestClient, files: dict[str, Path], tmp_path: Path
) -> None:
    model = _inspected(client, files["pt2"])
    steps = [{"method": "quantize.dynamic", "params": {"exclude": ["fc9", "re:^2$"]}}]
    answer = _post(client, model["id"], steps)
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["errors"][0]["loc"] == ["pipeline", 0, "params", "exclude"]
    assert "'fc9'" in body["detail"] and "its layers are 0, 2, 4" in body["detail"]
    assert "re:^2$" not in body["errors"][0]["msg"]  # the pattern matched a layer
    # The engine refuses it in the same words, before running anything.
    spec = PipelineSpec(steps=[("quantize.dynamic", steps[0]["params"])], output_format="pt2")
    with pytest.raises(EngineError) as refused:
        run_pipeline(files["pt2"], "pt2", spec, {}, tmp_path, NullReporter())
    assert refused.value.step == "validate" and refused.value.message == body["detail"]


def test_exclude_is_accepted_by_name_and_pattern_and_kept_in_the_spec(
    client: TestClient, files: dict[str, Path]
) -> None:
    model = _inspected(client, files["pt2"])
    steps = [
        {"method": "prune.magnitude", "params": {"amount": 0.5, "exclude": ["0"]}},
        {"method": "quantize.static", "params": {"exclude": ["re:^4$"]}},
    ]
    data = _inspected_dataset(client, files)
    answer = _post(client, model["id"], steps, datasets={"calibration": data})
    assert answer.status_code == 202, answer.text
    pipeline = answer.json()["spec"]["pipeline"]
    assert [s["params"]["exclude"] for s in pipeline] == [["0"], ["re:^4$"]]


def _inspected_dataset(client: TestClient, files: dict[str, Path]) -> str:
    from tests.factories import digits_npz

    path = digits_npz(files["pt2"].parent / "calibration.npz", split="train")
    with path.open("rb") as fh:
        return str(client.post("/v1/datasets", files={"file": (path.name, fh)}).json()["id"])


def test_a_model_not_inspected_yet_leaves_exclude_to_the_worker(
    client: TestClient, files: dict[str, Path]
) -> None:
    with files["pt2"].open("rb") as fh:
        model = client.post("/v1/models", files={"file": ("mlp.pt2", fh)}).json()
    assert model["inspection_status"] == "pending"
    steps = [{"method": "prune.magnitude", "params": {"amount": 0.5, "exclude": ["fc9"]}}]
    assert _post(client, model["id"], steps).status_code == 202


def test_a_bad_exclude_pattern_is_422(client: TestClient, files: dict[str, Path]) -> None:
    model = _inspected(client, files["pt2"])
    steps = [{"method": "prune.magnitude", "params": {"amount": 0.5, "exclude": ["re:("]}}]
    answer = _post(client, model["id"], steps)
    assert answer.status_code == 422 and "not a regular expression" in answer.text


def test_aoti_is_made_from_pt2_and_hf_models_and_for_cpu_workers(
    client: TestClient, files: dict[str, Path]
) -> None:
    steps = [{"method": "prune.magnitude", "params": {"amount": 0.5}}]
    onnx = _inspected(client, files["onnx"])
    answer = _post(client, onnx["id"], steps, output_format="aoti")
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["errors"][0]["loc"] == ["output_format"]
    assert "aoti is made from pt2 or hf models" in body["detail"]

    pt2 = _inspected(client, files["pt2"])
    job = _post(client, pt2["id"], steps, output_format="aoti")
    assert job.status_code == 202, job.text
    assert job.json()["spec"]["output_format"] == "aoti"
    assert job.json()["spec"]["target"]["runtime"] == "inductor"
    on_gpu = _post(client, pt2["id"], steps, output_format="aoti", target={"device": "gpu"})
    assert on_gpu.status_code == 422 and "cpu workers only" in on_gpu.text
    torch_runtime = _post(
        client, pt2["id"], steps, output_format="aoti", target={"runtime": "torch"}
    )
    assert torch_runtime.status_code == 422 and "'inductor'" in torch_runtime.text


def test_an_aoti_package_cannot_be_uploaded(client: TestClient, files: dict[str, Path]) -> None:
    with files["pt2"].open("rb") as fh:
        answer = client.post(
            "/v1/models", files={"file": ("model.aoti.pt2", fh)}, data={"format": "aoti"}
        )
    assert answer.status_code == 422, answer.text
    assert "unknown model format 'aoti'" in answer.json()["detail"]
    assert client.get("/v1/models").json()["items"] == []
