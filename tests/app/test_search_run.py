"""Whole searches through the real tasks, in this process: every message the service sends
(run job, step, trial, finish) is taken from the embedded broker and run, as one worker
would, until none is left. The engine is the real one, on the tiny digits MLP."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.app.test_api import upload
from tests.factories import digits_npz, tiny_mlp_onnx
from tests.helpers import task_handlers

QUICK = {"batch_sizes": [1], "warmup": 0, "iterations": 2}


@pytest.fixture
def client(embedded: dict[str, str]) -> Any:
    from app.main import create_app

    with TestClient(create_app(run_reaper=False), raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {embedded['alice']}"
        yield c


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("search-run")
    return {"model": tiny_mlp_onnx(d / "mlp.onnx"), "eval": digits_npz(d / "eval.npz")}


def take_messages() -> list[tuple[str, str]]:
    from app.queue import get_celery

    found = []
    with get_celery().connection_for_read() as conn:
        simple = conn.SimpleQueue("cpu", no_ack=True)
        try:
            while True:
                message = simple.get_nowait()
                found.append((message.headers["task"], message.payload[0][0]))
        except queue.Empty:
            pass
        finally:
            simple.close()
    return found


def drain(limit: int = 200, before: Any = None) -> list[str]:
    """Run every message as a worker would, until none is left; returns the tasks run."""
    handlers = task_handlers()
    ran: list[str] = []
    while len(ran) < limit:
        messages = take_messages()
        if not messages:
            return ran
        for task, obj_id in messages:
            if before is not None:
                before(task, obj_id)
            handlers[task](obj_id)
            ran.append(task)
    raise AssertionError(f"the search did not end within {limit} tasks: {ran[-10:]}")


def submit(client: TestClient, files: dict[str, Path], **search: Any) -> str:
    model = upload(client, files["model"]).json()
    data = upload(client, files["eval"], "datasets").json()
    drain()  # the model's inspection: its layer names
    body = {
        "model_id": model["id"],
        "search": {"seed": 0, **search},
        "datasets": {"eval": data["id"]},
        "evaluate": QUICK,
    }
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def trial_events(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from app.db import session_scope
    from app.orm import JobEvent

    with session_scope() as session:
        rows = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "trial")
        ).all()
        return [dict(row.data or {}) for row in rows]


def test_a_search_finds_a_feasible_recipe_verified_on_the_held_out_split(
    client: TestClient, files: dict[str, Path]
) -> None:
    job_id = submit(
        client,
        files,
        constraints={"cosine_similarity": 0.9},
        methods=["quantize.dynamic", "quantize.half", "prune.magnitude"],
        budget={"max_trials": 2, "parallel_trials": 2},
    )
    drain()
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    search = job["metrics"]["search"]
    assert [t["number"] for t in search["trials"]] == [0, 1]
    assert search["met"] is True and search["best"] in search["pareto"]
    best = search["trials"][search["best"]]
    assert best["feasible"] and best["holdout"]["feasible"]
    assert search["holdout"]["n"] == search["holdout_split"] > 0
    assert search["search_split"] > search["holdout_split"]
    # The job's own figures are the chosen trial's; its model and each Pareto trial's are there.
    assert job["metrics"]["compressed"] == best["metrics"]["compressed"]
    names = {a["name"] for a in job["artifacts"]}
    assert {"model", "report"} <= names
    assert {f"trial-{n}" for n in search["pareto"]} <= names
    download = client.get(f"/v1/jobs/{job_id}/artifacts/model")
    assert download.status_code == 200 and len(download.content) > 0
    kinds = [(e["trial"], e["event"]) for e in trial_events(client, job_id)]
    for number in range(2):
        assert (number, "started") in kinds
        assert (number, "finished") in kinds or (number, "failed") in kinds


def test_contradictory_bounds_end_as_constraints_unmet_with_the_closest_model(
    client: TestClient, files: dict[str, Path]
) -> None:
    job_id = submit(
        client,
        files,
        constraints={"size_bytes": 1},
        methods=["quantize.dynamic"],
        budget={"max_trials": 1, "parallel_trials": 1},
    )
    drain()
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "constraints_unmet"
    assert "size_bytes" in job["error"]["message"] and "closest" in job["error"]["message"]
    search = job["metrics"]["search"]
    assert search["met"] is False and search["trials"]
    (unmet,) = search["unmet"]
    assert unmet["constraint"] == "size_bytes" and unmet["closest"] > 1
    assert client.get(f"/v1/jobs/{job_id}/artifacts/model").status_code == 200


def test_a_search_cancelled_between_trials_stops_them_all(
    client: TestClient, files: dict[str, Path]
) -> None:
    job_id = submit(client, files, budget={"max_trials": 6, "parallel_trials": 2})
    cancelled: list[str] = []

    def cancel_at_the_first_trial(task: str, _obj_id: str) -> None:
        if task == "squish.run_trial" and not cancelled:
            cancelled.append(task)
            assert client.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)

    drain(before=cancel_at_the_first_trial)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled"
    from app.db import session_scope
    from app.search import trials as state

    with session_scope() as session:
        statuses = {t.status for t in state.trials_of(session, job_id)}
    assert statuses == {"cancelled"}


def test_a_claimed_trial_reads_running_before_the_next_search_step(
    client: TestClient, files: dict[str, Path]
) -> None:
    from app.db import session_scope
    from app.orm import SearchTrial
    from app.search import trials as state

    job_id = submit(client, files, budget={"max_trials": 2, "parallel_trials": 2})
    claimed: list[int] = []

    def claim_the_first_trial(task: str, obj_id: str) -> None:
        if task != "squish.run_trial" or claimed:
            return
        with session_scope() as session:
            assert state.claim_trial(session, int(obj_id), "another-worker")
            claimed.append(session.get(SearchTrial, int(obj_id)).number)
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "running"
        polled = {t["number"]: t["status"] for t in job["metrics"]["search"]["trials"]}
        assert polled[claimed[0]] == "running"
        assert set(polled.values()) <= {"queued", "running"}
        (listed,) = [j for j in client.get("/v1/jobs").json()["items"] if j["id"] == job_id]
        assert listed["metrics"]["search"]["trials"] == job["metrics"]["search"]["trials"]
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)

    drain(before=claim_the_first_trial)
    assert claimed
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled"
    assert {t["status"] for t in job["metrics"]["search"]["trials"]} == {"cancelled"}
