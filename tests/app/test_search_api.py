"""A search job at the HTTP API (DESIGN §10): accepted and normalized, or refused with 422."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from tests.app.test_api import assert_problem, upload
from tests.factories import digits_npz, tiny_mlp_onnx


@pytest.fixture
def client(embedded: dict[str, str]) -> Any:
    from app.main import create_app

    with TestClient(create_app(run_reaper=False), raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {embedded['alice']}"
        yield c


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("search-files")
    return {
        "onnx": tiny_mlp_onnx(d / "mlp.onnx", trained=False),
        "labelled": digits_npz(d / "digits.npz"),
        "unlabelled": digits_npz(d / "unlabelled.npz", labels=False),
    }


@pytest.fixture
def ids(client: TestClient, files: dict[str, Path]) -> dict[str, str]:
    return {
        "model": upload(client, files["onnx"]).json()["id"],
        "labelled": upload(client, files["labelled"], "datasets").json()["id"],
        "unlabelled": upload(client, files["unlabelled"], "datasets").json()["id"],
    }


def search_job(ids: dict[str, str], eval_role: str | None = "labelled", **search: Any) -> dict:
    body: dict[str, Any] = {"model_id": ids["model"], "search": search}
    if eval_role is not None:
        body["datasets"] = {"eval": ids[eval_role]}
    return body


def test_a_search_job_is_accepted_with_its_defaults(
    client: TestClient, ids: dict[str, str]
) -> None:
    body = search_job(ids, constraints={"accuracy_drop": 0.01}, seed=3)
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    search = job["spec"]["search"]
    assert search["objectives"] == ["latency", "size"]
    assert search["budget"] == {"max_trials": 24, "max_seconds": 3600, "parallel_trials": 2}
    assert search["strategy"] == "tpe" and search["seed"] == 3
    assert search["holdout_fraction"] == 0.3
    assert search["constraints"]["accuracy_drop"] == 0.01
    assert "pipeline" not in job["spec"] and job["spec"]["output_format"] is None
    assert job["status"] == "queued" and job["queue"] == "cpu"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"pipeline": [{"method": "quantize.dynamic"}]}, ["exactly one", "pipeline", "search"]),
        ({"search": None}, ["exactly one"]),
        ({"output_format": "onnx"}, ["search.runtimes"]),
        ({"search": {"budget": {"max_trials": 0}}}, ["max_trials"]),
        ({"search": {"budget": {"max_trials": 501}}}, ["max_trials"]),
        ({"search": {"budget": {"parallel_trials": 65}}}, ["parallel_trials"]),
        ({"search": {"budget": {"max_seconds": 1}}}, ["max_seconds"]),
        ({"search": {"objectives": ["speed"]}}, ["objectives"]),
        ({"search": {"objectives": ["size", "size"]}}, ["once"]),
        ({"search": {"objectives": []}}, ["objectives"]),
        ({"search": {"constraints": {"latency": 1}}}, ["latency"]),
        ({"search": {"strategy": "annealing"}}, ["strategy"]),
        ({"search": {"holdout_fraction": 0.9}}, ["holdout_fraction"]),
        ({"search": {"methods": ["prune.nonsense"]}}, ["unknown method"]),
        ({"search": {"methods": ["distill"]}}, ["distill", "onnx", "train"]),
        ({"search": {"runtimes": ["inductor"]}}, ["inductor", "not reachable"]),
        ({"search": {"constraints": {"latency_ms": {"batch_8": 1.0}}}}, ["batch size 8"]),
    ],
)
def test_impossible_searches_are_422(
    client: TestClient, ids: dict[str, str], change: dict[str, Any], words: list[str]
) -> None:
    body = {**search_job(ids), **change}
    body = {key: value for key, value in body.items() if value is not None}
    response = client.post("/v1/jobs", json=body)
    problem = assert_problem(response, 422, *words)
    assert problem.get("errors")
    assert client.get("/v1/jobs").json()["items"] == []


def test_accuracy_needs_labels_and_a_search_needs_eval_data(
    client: TestClient, ids: dict[str, str]
) -> None:
    unlabelled = search_job(ids, "unlabelled", constraints={"accuracy_drop": 0.01})
    problem = assert_problem(
        client.post("/v1/jobs", json=unlabelled), 422, "accuracy_drop", "cosine_similarity"
    )
    assert ["search", "constraints", "accuracy_drop"] in [e["loc"] for e in problem["errors"]]
    objective = search_job(ids, "unlabelled", objectives=["accuracy"])
    assert_problem(client.post("/v1/jobs", json=objective), 422, "accuracy", "fidelity")
    without_eval = search_job(ids, None, constraints={"cosine_similarity": 0.99})
    problem = assert_problem(client.post("/v1/jobs", json=without_eval), 422, "eval dataset")
    assert ["datasets", "eval"] in [e["loc"] for e in problem["errors"]]
    fidelity = search_job(ids, "unlabelled", constraints={"cosine_similarity": 0.99})
    assert client.post("/v1/jobs", json=fidelity).status_code == 202


def test_contradictory_bounds_are_accepted(client: TestClient, ids: dict[str, str]) -> None:
    # They end as constraints_unmet, never as a 422, a 500 or a hang.
    body = search_job(ids, constraints={"size_bytes": 1, "cosine_similarity": 1.0})
    assert client.post("/v1/jobs", json=body).status_code == 202


def test_a_running_search_shows_its_trials(client: TestClient, ids: dict[str, str]) -> None:
    from app.db import session_scope
    from app.orm import Job

    job = client.post("/v1/jobs", json=search_job(ids)).json()
    running = {
        "search": {
            "objectives": ["latency", "size"],
            "trials": [
                {
                    "number": 0,
                    "pipeline": [{"method": "quantize.dynamic", "params": {}}],
                    "output_format": "onnx",
                    "runtime": "onnxruntime",
                    "status": "running",
                }
            ],
            "pareto": [],
        }
    }
    with session_scope() as session:
        session.execute(
            update(Job).where(Job.id == job["id"]).values(status="running", metrics=running)
        )
    polled = client.get(f"/v1/jobs/{job['id']}")
    assert polled.status_code == 200, polled.text
    assert polled.json()["metrics"]["search"]["trials"][0]["status"] == "running"
