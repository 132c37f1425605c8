"""The result cache: the same model bytes, datasets, normalized spec and engine version
answer at once from a succeeded job of the same tenant, with nothing sent to a worker."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select

from tests.factories import digits_npz, tiny_mlp_onnx

QUICK = {"batch_sizes": [1], "warmup": 0, "iterations": 1}
STEPS = [{"method": "quantize.dynamic", "params": {}}]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cache")
    return {
        "model": tiny_mlp_onnx(d / "mlp.onnx", trained=False),
        "eval": digits_npz(d / "eval.npz"),
    }


@pytest.fixture
def api(embedded: dict[str, str]) -> Iterator[dict[str, TestClient]]:
    from app.main import create_app

    with TestClient(create_app(run_reaper=False)) as alice:
        bob = TestClient(alice.app)
        alice.headers["Authorization"] = f"Bearer {embedded['alice']}"
        bob.headers["Authorization"] = f"Bearer {embedded['bob']}"
        yield {"alice": alice, "bob": bob}


def sent() -> list[tuple[str, str]]:
    """Take the job messages waiting in the embedded broker's cpu queue: (task, id); the
    uploads' inspections are left out."""
    from app.queue import INSPECT_MODEL, get_celery

    messages = []
    with get_celery().connection_for_read() as conn:
        simple = conn.SimpleQueue("cpu", no_ack=True)
        try:
            while True:
                message = simple.get_nowait()
                if message.headers["task"] != INSPECT_MODEL:
                    messages.append((message.headers["task"], message.payload[0][0]))
        except queue.Empty:
            pass
        finally:
            simple.close()
    return messages


def upload(client: TestClient, path: Path, kind: str = "models") -> str:
    with path.open("rb") as fh:
        answer = client.post(f"/v1/{kind}", files={"file": (path.name, fh)})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def post(client: TestClient, model_id: str, eval_id: str, **extra: Any) -> Any:
    body = {
        "model_id": model_id,
        "pipeline": STEPS,
        "datasets": {"eval": eval_id},
        "evaluate": QUICK,
        **extra,
    }
    return client.post("/v1/jobs", json=body)


def run(job_id: str) -> None:
    from worker import tasks

    assert tasks.run_job(job_id) == "succeeded"


def events(job_id: str) -> list[dict[str, Any]]:
    from app.db import session_scope
    from app.orm import JobEvent

    with session_scope() as session:
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id))
        return [{"kind": e.kind, "message": e.message, "data": e.data} for e in rows]


def deleted_source_and_inputs(client: TestClient, ran: dict[str, Any]) -> None:
    """Delete the model and dataset, and the source job with its objects unless in use."""
    from app.db import session_scope
    from app.files import delete_if_unused
    from app.orm import Artifact, Job
    from app.storage import get_store

    assert client.delete(f"/v1/models/{ran['model_id']}").status_code == 204
    assert client.delete(f"/v1/datasets/{ran['eval_id']}").status_code == 204
    source_id = ran["job"]["id"]
    with session_scope() as session:
        keys = list(
            session.scalars(select(Artifact.storage_key).where(Artifact.job_id == source_id))
        )
        session.execute(delete(Job).where(Job.id == source_id))
        session.flush()
        for key in keys:
            delete_if_unused(session, get_store(), key)


@pytest.fixture
def ran(api: dict[str, TestClient], files: dict[str, Path]) -> dict[str, Any]:
    """Alice's succeeded job (it ran), her model and eval dataset."""
    alice = api["alice"]
    model_id, eval_id = upload(alice, files["model"]), upload(alice, files["eval"], "datasets")
    job = post(alice, model_id, eval_id).json()
    assert job["status"] == "queued" and job["cached_from"] is None
    sent()
    run(job["id"])
    done = alice.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded"
    return {"job": done, "model_id": model_id, "eval_id": eval_id}


def test_the_same_job_again_is_answered_from_the_cache_and_nothing_runs(
    api: dict[str, TestClient], ran: dict[str, Any], files: dict[str, Path]
) -> None:
    from app.queue import DELIVER_WEBHOOK

    alice, source = api["alice"], ran["job"]
    # The same bytes uploaded again (a new model id) and a webhook: still the same result.
    again = upload(alice, files["model"])
    answer = post(alice, again, ran["eval_id"], webhook_url="http://127.0.0.1:9/hook")
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert job["status"] == "succeeded" and job["cached_from"] == source["id"]
    assert job["progress"] == 1.0 and job["worker"] is None and job["attempts"] == 0
    assert job["metrics"] == source["metrics"]
    assert {(a["name"], a["sha256"]) for a in job["artifacts"]} == {
        (a["name"], a["sha256"]) for a in source["artifacts"]
    }
    assert all(a["url"].startswith(f"/v1/jobs/{job['id']}/") for a in job["artifacts"])
    # Nothing ran: no run message, one event saying so; the webhook is owed like any job's.
    assert sent() == [(DELIVER_WEBHOOK, job["id"])]
    (event,) = events(job["id"])
    assert event["kind"] == "status" and "served from cache" in event["message"]
    assert event["data"]["status"] == "succeeded"
    assert event["data"]["cached_from"] == source["id"]
    polled = alice.get(f"/v1/jobs/{job['id']}").json()
    assert polled["cached_from"] == source["id"] and polled["status"] == "succeeded"
    downloads = {a["name"]: alice.get(a["url"]).content for a in job["artifacts"]}
    assert downloads["model"] == alice.get(f"/v1/jobs/{source['id']}/artifacts/model").content

    # Deleting the source job, its model and its dataset leaves the cached job whole.
    assert alice.delete(f"/v1/models/{again}").status_code == 204
    deleted_source_and_inputs(alice, ran)
    assert alice.get(f"/v1/jobs/{source['id']}").status_code == 404
    kept = alice.get(f"/v1/jobs/{job['id']}").json()
    assert kept["status"] == "succeeded" and kept["cached_from"] == source["id"]
    for artifact in kept["artifacts"]:
        download = alice.get(artifact["url"])
        assert download.status_code == 200 and download.content == downloads[artifact["name"]]


def test_cache_false_another_tenant_and_another_spec_run_afresh(
    api: dict[str, TestClient], ran: dict[str, Any], files: dict[str, Path]
) -> None:
    from app.queue import RUN_JOB

    alice, bob = api["alice"], api["bob"]
    forced = post(alice, ran["model_id"], ran["eval_id"], cache=False).json()
    assert forced["status"] == "queued" and forced["cached_from"] is None
    other_params = post(
        alice,
        ran["model_id"],
        ran["eval_id"],
        pipeline=[{"method": "quantize.dynamic", "params": {"per_channel": False}}],
    ).json()
    more_batches = post(
        alice, ran["model_id"], ran["eval_id"], evaluate={**QUICK, "batch_sizes": [1, 2]}
    ).json()
    # Bob's upload of the same bytes, with the same spec: never Alice's result.
    bobs = post(bob, upload(bob, files["model"]), upload(bob, files["eval"], "datasets")).json()
    fresh = (forced, other_params, more_batches, bobs)
    assert {j["status"] for j in fresh} == {"queued"}
    assert {j["cached_from"] for j in fresh} == {None}
    assert sorted(sent()) == sorted((RUN_JOB, j["id"]) for j in fresh)


def test_cache_must_be_a_boolean(api: dict[str, TestClient], files: dict[str, Path]) -> None:
    alice = api["alice"]
    model_id, eval_id = upload(alice, files["model"]), upload(alice, files["eval"], "datasets")
    for value in ("yes", 1, None, "false"):
        answer = post(alice, model_id, eval_id, cache=value)
        assert answer.status_code == 422, answer.text
        assert answer.json()["errors"][0]["loc"][-1] == "cache"


def test_a_search_is_cached_by_the_same_key(
    api: dict[str, TestClient], files: dict[str, Path]
) -> None:
    from sqlalchemy import update

    from app.db import session_scope
    from app.orm import Job

    alice = api["alice"]
    model_id, eval_id = upload(alice, files["model"]), upload(alice, files["eval"], "datasets")
    body = {
        "model_id": model_id,
        "search": {"objectives": ["size"], "budget": {"max_trials": 2}, "seed": 0},
        "datasets": {"eval": eval_id},
        "evaluate": QUICK,
    }
    first = alice.post("/v1/jobs", json=body)
    assert first.status_code == 202, first.text
    assert first.json()["status"] == "queued"
    # Succeeded, as the search's finishing task records it (the search runs elsewhere).
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == first.json()["id"])
            .values(status="succeeded", finished_at=Job.created_at)
        )
    again = alice.post("/v1/jobs", json=body).json()
    assert again["status"] == "succeeded" and again["cached_from"] == first.json()["id"]
    changed = alice.post("/v1/jobs", json={**body, "search": {**body["search"], "seed": 1}}).json()
    assert changed["status"] == "queued"
