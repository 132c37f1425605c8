"""The HTTP contract of DESIGN §4, in process, on embedded defaults (no worker runs here)."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from tests.factories import digits_npz, tiny_mlp_onnx, tiny_mlp_pt2, write_npz


@pytest.fixture
def client(embedded: dict[str, str]) -> Any:
    from app.main import create_app

    with TestClient(create_app(run_reaper=False), raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {embedded['alice']}"
        yield c


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("files")
    return {
        "pt2": tiny_mlp_pt2(d / "mlp.pt2"),
        "onnx": tiny_mlp_onnx(d / "mlp.onnx"),
        "npz": digits_npz(d / "digits.npz"),
    }


def upload(client: TestClient, path: Path, kind: str = "models", **fields: str) -> Any:
    with path.open("rb") as fh:
        return client.post(f"/v1/{kind}", files={"file": (path.name, fh)}, data=fields)


def assert_problem(response: Any, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    for word in words:
        assert word.lower() in (body["detail"] + body["title"]).lower(), body
    return body


def job_spec(model_id: str, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model_id": model_id,
        "pipeline": [
            {"method": "prune.magnitude", "params": {"amount": 0.5}},
            {"method": "quantize.dynamic", "params": {}},
        ],
    }
    spec.update(extra)
    return spec


def test_api_process_does_not_import_torch() -> None:
    code = (
        "import sys, app.main; app.main.create_app(); "
        "sys.exit('torch' in sys.modules or 'onnxruntime' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["checks"]) == {"database", "storage", "broker"}
    assert "squish_http_requests" in client.get("/metrics").text


def test_auth_required(client: TestClient) -> None:
    assert_problem(client.get("/v1/models", headers={"Authorization": ""}), 401, "bearer")
    assert_problem(
        client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401, "not valid"
    )
    assert_problem(client.get("/v1/models", headers={"Authorization": "Basic abc"}), 401, "bearer")


def test_upload_read_download_delete_model(client: TestClient, files: dict[str, Path]) -> None:
    for fmt in ("pt2", "onnx"):
        created = upload(client, files[fmt], name=f"mlp-{fmt}")
        assert created.status_code == 201, created.text
        model = created.json()
        assert model["format"] == fmt and model["name"] == f"mlp-{fmt}"
        assert model["size_bytes"] == files[fmt].stat().st_size
        assert model["inspection_status"] == "pending"
        assert client.get(f"/v1/models/{model['id']}").json()["sha256"] == model["sha256"]
        content = client.get(f"/v1/models/{model['id']}/content")
        assert content.content == files[fmt].read_bytes()
        part = client.get(f"/v1/models/{model['id']}/content", headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == files[fmt].read_bytes()[10:20]
        assert client.delete(f"/v1/models/{model['id']}").status_code == 204
        assert_problem(client.get(f"/v1/models/{model['id']}"), 404)


def test_pagination_with_cursor(client: TestClient, files: dict[str, Path]) -> None:
    ids = {upload(client, files["npz"], "datasets", name=f"d{i}").json()["id"] for i in range(5)}
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/datasets", params=params).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)
    assert_problem(client.get("/v1/datasets", params={"cursor": "garbage!"}), 422, "cursor")


def test_dataset_info(client: TestClient, files: dict[str, Path]) -> None:
    dataset = upload(client, files["npz"], "datasets").json()
    assert dataset["format"] == "npz"
    assert dataset["info"]["has_labels"] is True
    assert dataset["info"]["arrays"]["inputs"]["shape"][1] == 64


def test_bad_uploads_are_refused_and_leave_nothing(client: TestClient, tmp_path: Path) -> None:
    import torch

    pickled = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    body = assert_problem(upload(client, pickled), 422, "torch.export")
    assert "unpickl" in body["detail"].lower()

    raw_pickle = tmp_path / "raw.pkl"
    raw_pickle.write_bytes(pickle.dumps({"a": 1}))
    assert_problem(upload(client, raw_pickle), 422)

    good = tiny_mlp_pt2(tmp_path / "ok.pt2")
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert_problem(upload(client, truncated), 422)

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x07not a model at all" * 100)
    assert_problem(upload(client, garbage), 422)

    assert_problem(upload(client, good, format="onnx"), 422, "onnx")
    assert_problem(upload(client, good, format="keras"), 422)

    bad_npz = tmp_path / "bad.npz"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("inputs.npy", b"not npy")
    bad_npz.write_bytes(buf.getvalue())
    assert_problem(upload(client, bad_npz, "datasets"), 422)

    mismatched = write_npz(
        tmp_path / "mismatch.npz", np.zeros((5, 64), "float32"), np.zeros(4, "int64")
    )
    assert_problem(upload(client, mismatched, "datasets"), 422)

    assert_problem(
        client.post("/v1/models", content=b"x", headers={"Content-Type": "text/plain"}), 415
    )
    assert_problem(client.post("/v1/models", files={"other": ("a", b"x")}), 400, "file")

    assert client.get("/v1/models").json()["items"] == []
    assert client.get("/v1/datasets").json()["items"] == []
    from app.settings import get_settings

    objects = get_settings().data_dir / "objects"
    assert not objects.exists() or not [p for p in objects.rglob("*") if p.is_file()]
    tmp = get_settings().data_dir / "tmp"
    assert not tmp.exists() or not list(tmp.iterdir())


def test_upload_over_limit_is_413(
    embedded: dict[str, str], monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    from app.main import create_app
    from tests.conftest import reset_caches

    monkeypatch.setenv("SQUISH_MAX_UPLOAD_BYTES", "1000")
    reset_caches()
    with TestClient(create_app(run_reaper=False)) as c:
        c.headers["Authorization"] = f"Bearer {embedded['alice']}"
        assert_problem(upload(c, files["pt2"]), 413)


def test_tenants_are_isolated(
    client: TestClient, embedded: dict[str, str], files: dict[str, Path]
) -> None:
    model = upload(client, files["pt2"]).json()
    dataset = upload(client, files["npz"], "datasets").json()
    job = client.post("/v1/jobs", json=job_spec(model["id"])).json()
    bob = {"Authorization": f"Bearer {embedded['bob']}"}
    for path in (
        f"/v1/models/{model['id']}",
        f"/v1/models/{model['id']}/content",
        f"/v1/datasets/{dataset['id']}",
        f"/v1/jobs/{job['id']}",
        f"/v1/jobs/{job['id']}/events",
        f"/v1/jobs/{job['id']}/artifacts/model",
    ):
        assert_problem(client.get(path, headers=bob), 404)
    assert_problem(client.delete(f"/v1/models/{model['id']}", headers=bob), 404)
    assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel", headers=bob), 404)
    assert_problem(client.post("/v1/jobs", json=job_spec(model["id"]), headers=bob), 404)
    assert client.get("/v1/models", headers=bob).json()["items"] == []
    assert client.get("/v1/jobs", headers=bob).json()["items"] == []


def test_create_job_normalizes_and_is_idempotent(
    client: TestClient, files: dict[str, Path]
) -> None:
    model = upload(client, files["onnx"]).json()
    response = client.post(
        "/v1/jobs", json=job_spec(model["id"]), headers={"Idempotency-Key": "k1"}
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["queue"] == "cpu"
    assert job["spec"]["pipeline"][0]["params"]["scope"] in {"layer", "global"}
    assert job["spec"]["output_format"] == "onnx"
    assert job["spec"]["target"]["runtime"] == "onnxruntime"
    again = client.post("/v1/jobs", json=job_spec(model["id"]), headers={"Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    assert len(client.get("/v1/jobs").json()["items"]) == 1
    other = job_spec(model["id"], evaluate={"batch_sizes": [4]})
    assert_problem(
        client.post("/v1/jobs", json=other, headers={"Idempotency-Key": "k1"}), 422, "idempotency"
    )


def test_gpu_jobs_route_to_the_gpu_queue(client: TestClient, files: dict[str, Path]) -> None:
    model = upload(client, files["onnx"]).json()
    spec = job_spec(
        model["id"],
        target={"device": "gpu"},
        pipeline=[{"method": "prune.magnitude", "params": {"amount": 0.3}}],
    )
    job = client.post("/v1/jobs", json=spec).json()
    assert job["queue"] == "gpu"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"pipeline": [{"method": "prune.nonsense"}]}, ["unknown method", "prune.magnitude"]),
        ({"pipeline": [{"method": "prune.magnitude", "params": {"amount": 1.5}}]}, ["amount"]),
        (
            {"pipeline": [{"method": "prune.magnitude", "params": {"amount": 0.5, "bogus": 1}}]},
            ["bogus"],
        ),
        ({"pipeline": []}, ["pipeline"]),
        ({"output_format": "hf"}, ["output_format"]),
        ({"target": {"runtime": "onnxruntime"}}, ["runtime"]),
        ({"target": {"device": "tpu"}}, ["device"]),
        ({"evaluate": {"batch_sizes": [0]}}, ["batch size"]),
        ({"webhook_url": "not a url"}, ["webhook_url"]),
        ({"surprise": True}, ["surprise"]),
    ],
)
def test_impossible_specs_are_422(
    client: TestClient, files: dict[str, Path], change: dict[str, Any], words: list[str]
) -> None:
    model = upload(client, files["pt2"]).json()
    body = assert_problem(
        client.post("/v1/jobs", json=job_spec(model["id"], **change)), 422, *words
    )
    assert body.get("errors")
    assert client.get("/v1/jobs").json()["items"] == []


def test_unknown_references_are_404(client: TestClient, files: dict[str, Path]) -> None:
    assert_problem(client.post("/v1/jobs", json=job_spec("mdl_nope")), 404, "model")
    model = upload(client, files["pt2"]).json()
    spec = job_spec(model["id"], datasets={"eval": "ds_nope"})
    assert_problem(client.post("/v1/jobs", json=spec), 404, "dataset")


def test_cancel_and_conflicts(client: TestClient, files: dict[str, Path]) -> None:
    model = upload(client, files["pt2"]).json()
    job = client.post("/v1/jobs", json=job_spec(model["id"])).json()
    assert_problem(client.delete(f"/v1/models/{model['id']}"), 409, "cancel")
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "cancelled")
    listed = client.get("/v1/jobs", params={"status": "cancelled"}).json()["items"]
    assert [j["id"] for j in listed] == [job["id"]]
    assert client.get("/v1/jobs", params={"status": "queued"}).json()["items"] == []
    events = client.get(f"/v1/jobs/{job['id']}/events").text
    assert "event: status" in events and "cancelled" in events
    resumed = client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "999999"}).text
    assert "cancelled" not in resumed
    assert_problem(client.get(f"/v1/jobs/{job['id']}/artifacts/model"), 404, "artifact")
    assert client.delete(f"/v1/models/{model['id']}").status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}").json()["model_id"] is None


def test_finished_job_cannot_be_cancelled(client: TestClient, files: dict[str, Path]) -> None:
    from app.db import session_scope
    from app.orm import Job

    model = upload(client, files["pt2"]).json()
    job = client.post("/v1/jobs", json=job_spec(model["id"])).json()
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job["id"]).values(status="succeeded"))
    assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "succeeded")


def test_methods_publish_json_schema(client: TestClient) -> None:
    items = {m["name"]: m for m in client.get("/v1/methods").json()["items"]}
    assert {"prune.magnitude", "quantize.dynamic"} <= set(items)
    schema = items["prune.magnitude"]["params_schema"]
    assert schema["properties"]["amount"]["description"]
    assert set(items["quantize.dynamic"]["formats"]) == {"onnx", "pt2"}
    # What a search varies is published beside the params (None: the method is not searched).
    searched = items["prune.magnitude"]["search"]
    assert searched["role"] == "structure"
    amount = searched["params"]["amount"]
    assert schema["properties"]["amount"]["exclusiveMinimum"] < amount["low"] < amount["high"] < 1
    assert items["quantize.binary"]["search"] is None


def test_range_requests(client: TestClient, files: dict[str, Path]) -> None:
    model = upload(client, files["onnx"]).json()
    url = f"/v1/models/{model['id']}/content"
    data = files["onnx"].read_bytes()
    tail = client.get(url, headers={"Range": "bytes=-5"})
    assert tail.status_code == 206 and tail.content == data[-5:]
    assert tail.headers["content-range"] == f"bytes {len(data) - 5}-{len(data) - 1}/{len(data)}"
    open_ended = client.get(url, headers={"Range": f"bytes={len(data) - 3}-"})
    assert open_ended.content == data[-3:]
    assert_problem(client.get(url, headers={"Range": f"bytes={len(data)}-"}), 416)
    assert_problem(client.get(url, headers={"Range": "bytes=1-2,4-5"}), 416)


def test_format_specific_params_and_methods_are_422(
    client: TestClient, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = upload(client, files["pt2"]).json()
    spec = job_spec(
        model["id"], pipeline=[{"method": "quantize.dynamic", "params": {"symmetric": False}}]
    )
    assert_problem(client.post("/v1/jobs", json=spec), 422, "symmetric")

    from worker import methods
    from worker.methods.base import Method

    onnx_only = Method(
        name="test.onnx_only",
        summary="accepts only ONNX",
        params=methods.get_method("prune.magnitude").params,
        formats=frozenset({"onnx"}),
        handler=methods.get_method("prune.magnitude").handler,
        datasets_required=frozenset({"train"}),
    )
    monkeypatch.setitem(methods.REGISTRY, onnx_only.name, onnx_only)
    spec = job_spec(model["id"], pipeline=[{"method": "test.onnx_only", "params": {"amount": 0.5}}])
    assert_problem(client.post("/v1/jobs", json=spec), 422, "does not accept pt2", "onnx")
    onnx_model = upload(client, files["onnx"]).json()
    spec = job_spec(
        onnx_model["id"], pipeline=[{"method": "test.onnx_only", "params": {"amount": 0.5}}]
    )
    assert_problem(client.post("/v1/jobs", json=spec), 422, "train dataset")
    spec["target"] = {"device": "gpu"}
    spec["pipeline"] = [{"method": "quantize.dynamic", "params": {}}]
    assert_problem(client.post("/v1/jobs", json=spec), 422, "does not run on gpu")


def test_models_named_in_params_are_checked_and_protected(
    client: TestClient, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import Field

    from worker import methods
    from worker.methods.base import Method, MethodParams

    class TeacherParams(MethodParams):
        teacher_model_id: str | None = Field(None, description="Another uploaded model.")

    with_teacher = Method(
        name="test.with_teacher",
        summary="names another model",
        params=TeacherParams,
        formats=frozenset({"pt2", "onnx"}),
        handler=methods.get_method("prune.magnitude").handler,
        model_refs=("teacher_model_id",),
    )
    monkeypatch.setitem(methods.REGISTRY, with_teacher.name, with_teacher)
    student = upload(client, files["pt2"]).json()
    teacher = upload(client, files["onnx"]).json()
    step = {"method": "test.with_teacher", "params": {"teacher_model_id": "mdl_missing"}}
    assert_problem(
        client.post("/v1/jobs", json=job_spec(student["id"], pipeline=[step])), 404, "mdl_missing"
    )
    step["params"]["teacher_model_id"] = teacher["id"]
    job = client.post("/v1/jobs", json=job_spec(student["id"], pipeline=[step])).json()
    assert job["spec"]["models"] == {teacher["id"]: "onnx"}
    assert_problem(client.delete(f"/v1/models/{teacher['id']}"), 409, "cancel")
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert client.delete(f"/v1/models/{teacher['id']}").status_code == 204


# --------------------------------------------------------------------------------------
# Hugging Face models and output_format


@pytest.fixture(scope="module")
def text_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests import factories_text

    d = tmp_path_factory.mktemp("text")
    return {
        "hf": factories_text.tiny_bert_hf_zip(d / "bert.zip", trained=False),
        "jsonl": factories_text.sentiment_jsonl(d / "reviews.jsonl"),
    }


def test_hf_upload_and_download(client: TestClient, text_files: dict[str, Path]) -> None:
    created = upload(client, text_files["hf"], name="bert")
    assert created.status_code == 201, created.text
    model = created.json()
    assert model["format"] == "hf" and model["inspection_status"] == "pending"
    content = client.get(f"/v1/models/{model['id']}/content")
    assert content.content == text_files["hf"].read_bytes()
    assert content.headers["content-type"] == "application/zip"
    assert f'filename="{model["id"]}.zip"' in content.headers["content-disposition"]
    dataset = upload(client, text_files["jsonl"], "datasets").json()
    assert dataset["format"] == "jsonl" and dataset["info"]["has_labels"] is True


def test_hf_pickled_weights_are_refused(client: TestClient, tmp_path: Path) -> None:
    from tests import factories_text

    folder = tmp_path / "bert"
    model, tokenizer = factories_text.tiny_bert_classifier(trained=False)
    factories_text.save_folder(model, tokenizer, folder)
    path = factories_text.zip_folder(
        folder, tmp_path / "bert.zip", extra={"pytorch_model.bin": pickle.dumps({"w": 1})}
    )
    body = assert_problem(upload(client, path), 422, "safe_serialization=True")
    assert "NOT unpickled" in body["detail"]
    assert client.get("/v1/models").json()["items"] == []


def test_output_format_onnx_from_pt2_and_hf(
    client: TestClient, files: dict[str, Path], text_files: dict[str, Path]
) -> None:
    pt2 = upload(client, files["pt2"]).json()
    # quantize.dynamic runs on the converted ONNX model, so ONNX Runtime's options apply.
    steps = [
        {"method": "prune.magnitude", "params": {"amount": 0.5}},
        {"method": "quantize.dynamic", "params": {"symmetric": False}},
    ]
    response = client.post(
        "/v1/jobs", json=job_spec(pt2["id"], pipeline=steps, output_format="onnx")
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["spec"]["output_format"] == "onnx"
    assert job["spec"]["target"]["runtime"] == "onnxruntime"
    assert job["spec"]["pipeline"][1]["params"]["symmetric"] is False
    assert_problem(
        client.post("/v1/jobs", json=job_spec(pt2["id"], pipeline=steps)), 422, "symmetric"
    )

    hf = upload(client, text_files["hf"]).json()
    data = upload(client, text_files["jsonl"], "datasets").json()
    spec = job_spec(hf["id"], datasets={"eval": data["id"]})
    assert_problem(client.post("/v1/jobs", json=spec), 422, "hf models", "output_format to 'onnx'")
    spec["output_format"] = "onnx"
    job = client.post("/v1/jobs", json=spec).json()
    assert job["status"] == "queued" and job["spec"]["datasets"] == {"eval": data["id"]}
    assert job["spec"]["target"]["runtime"] == "onnxruntime"
    only_prune = job_spec(hf["id"], pipeline=steps[:1], datasets={"eval": data["id"]})
    job = client.post("/v1/jobs", json=only_prune).json()
    assert job["spec"]["output_format"] == "hf" and job["spec"]["target"]["runtime"] == "torch"


def test_impossible_format_combinations_are_422(
    client: TestClient, files: dict[str, Path], text_files: dict[str, Path]
) -> None:
    onnx_model = upload(client, files["onnx"]).json()
    body = assert_problem(
        client.post("/v1/jobs", json=job_spec(onnx_model["id"], output_format="pt2")),
        422,
        "output_format",
    )
    assert body["errors"][0]["loc"] == ["output_format"]
    pt2 = upload(client, files["pt2"]).json()
    spec = job_spec(pt2["id"], output_format="onnx", target={"runtime": "torch"})
    assert_problem(client.post("/v1/jobs", json=spec), 422, "onnxruntime")
    text = upload(client, text_files["jsonl"], "datasets").json()
    spec = job_spec(pt2["id"], datasets={"calibration": text["id"]})
    assert_problem(client.post("/v1/jobs", json=spec), 422, "Hugging Face")
    hf = upload(client, text_files["hf"]).json()
    reversed_steps = [
        {"method": "quantize.dynamic", "params": {}},
        {"method": "prune.magnitude", "params": {"amount": 0.5}},
    ]
    spec = job_spec(hf["id"], pipeline=reversed_steps, output_format="onnx")
    assert_problem(client.post("/v1/jobs", json=spec), 422, "move it to the end")
    assert client.get("/v1/jobs").json()["items"] == []
