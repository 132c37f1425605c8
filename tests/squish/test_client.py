"""The SDK against the real application, served in process (tests/squish/conftest.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from squish import (
    ApiError,
    BadRequest,
    ChecksumMismatch,
    Client,
    Conflict,
    JobCancelled,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    ServerError,
    SquishError,
    TransportError,
    Unauthorized,
    ValidationFailed,
    WaitTimeout,
)
from squish.errors import error_from_response
from tests.squish.service import STEPS, InProcessWorker, Live, submit

REPO = Path(__file__).resolve().parents[2]
# Accepted by POST /v1/jobs (the API cannot see layers), refused by the engine at step 1.
FAILING = [
    ("prune.magnitude", {"amount": 0.5}),
    ("prune.structured", {"amount": 0.5, "importance": "bn_scale"}),
]


@pytest.fixture
def client(live: Live) -> Iterator[Client]:
    with Client(live.url, live.api_key, timeout=30.0, backoff=0.0) as c:
        yield c


def run_job(client: Client, model_files: dict[str, Path], *steps: tuple[str, dict]) -> dict:
    return submit(client, model_files, list(steps) or STEPS)


def finished_job(client: Client, worker: InProcessWorker, model_files: dict[str, Path]) -> dict:
    job = run_job(client, model_files)
    assert worker.run(job["id"]) == "succeeded"
    return client.wait(job["id"], poll_interval=0)


def observed_states(live: Live, job_id: str) -> list[tuple[Any, ...]]:
    """(status, progress, stage) after each change the job's events record, in order."""
    states: list[tuple[Any, ...]] = [("queued", 0.0, None)]
    for event in live.stored_events(job_id):
        data = event["data"] or {}
        if event["kind"] == "progress":
            states.append(("running", data["progress"], data["stage"]))
        elif event["kind"] == "status" and data["status"] == "running":
            states.append(("running", 0.0, "starting"))
        elif event["kind"] == "status" and data["status"] == "succeeded":
            states.append(("succeeded", 1.0, None))
    return states


# -- construction, import hygiene -----------------------------------------------------


def test_importing_the_sdk_and_cli_pulls_in_no_server_or_engine_package() -> None:
    code = (
        "import squish.client, squish.cli, sys; "
        "bad={'torch','fastapi','sqlalchemy','numpy','pydantic','app'} & set(sys.modules); "
        "assert not bad, bad; "
        # the CLI shares the engine's standard-library contract (formats, roles, statuses)
        "engine={m for m in sys.modules if m.split('.')[0] == 'worker'}; "
        "assert engine <= {'worker', 'worker.contract'}, engine"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQUISH_URL", "http://squish.example:9000/")
    monkeypatch.setenv("SQUISH_API_KEY", "k-env")
    with Client() as c:
        assert c.base_url == "http://squish.example:9000"
        assert c._http.headers["Authorization"] == "Bearer k-env"
    monkeypatch.delenv("SQUISH_URL")
    monkeypatch.delenv("SQUISH_API_KEY")
    with Client() as c:
        assert c.base_url == "http://127.0.0.1:8000"
        assert "Authorization" not in c._http.headers


def test_health_ready_and_methods(client: Client) -> None:
    assert client.health()["status"] == "ok"
    assert client.ready()["status"] == "ok"
    methods = {m["name"]: m for m in client.methods()}
    assert "prune.magnitude" in methods
    assert methods["distill"]["datasets_required"] == ["train"]


# -- models and datasets ------------------------------------------------------------------


def test_upload_streams_the_file_and_the_server_sha_matches(
    live: Live, model_files: dict[str, Path]
) -> None:
    path = model_files["big_pt2"]
    assert path.stat().st_size > 1_500_000
    chunk_sizes: list[int] = []

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if request.method == "POST":
                original = request.stream

                def chunks() -> Iterator[bytes]:
                    for chunk in original:  # type: ignore[union-attr]
                        chunk_sizes.append(len(chunk))
                        yield chunk

                request.stream = _IterStream(chunks())
            return super().handle_request(request)

    with Client(live.url, live.api_key, transport=Recording(), backoff=0.0) as c:
        model = c.upload_model(path, name="my net")
    assert model["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model["size_bytes"] == path.stat().st_size
    assert model["name"] == "my net"
    assert model["format"] == "pt2"
    # The body went out in pieces, none of them the whole file.
    assert sum(chunk_sizes) > path.stat().st_size
    assert max(chunk_sizes) < path.stat().st_size // 4


class _IterStream(httpx.SyncByteStream):
    def __init__(self, it: Iterator[bytes]) -> None:
        self._it = it

    def __iter__(self) -> Iterator[bytes]:
        yield from self._it


def test_model_get_download_and_delete(
    client: Client, model_files: dict[str, Path], tmp_path: Path
) -> None:
    path = model_files["onnx"]
    model = client.upload_model(path)
    assert model["format"] == "onnx"
    assert client.get_model(model["id"]) == model
    out = client.download_model(model["id"], tmp_path / "copy" / "tiny.onnx")
    assert out.read_bytes() == path.read_bytes()
    assert not out.with_name("tiny.onnx.part").exists()
    client.delete_model(model["id"])
    with pytest.raises(NotFound):
        client.get_model(model["id"])


def test_list_models_follows_cursors_across_pages(
    live: Live, client: Client, model_files: dict[str, Path]
) -> None:
    from app.pagination import encode_cursor

    ids = [client.upload_model(model_files["pt2"])["id"] for _ in range(5)]
    newest_first = ids[::-1]
    assert [m["id"] for m in client.list_models(limit=2)] == newest_first
    pages = live.faults.requests_to("GET", "/v1/models")
    assert [r.query for r in pages] == [
        "limit=2",
        f"limit=2&cursor={encode_cursor(newest_first[1])}",
        f"limit=2&cursor={encode_cursor(newest_first[3])}",
    ]


def test_datasets_round_trip(client: Client, model_files: dict[str, Path], tmp_path: Path) -> None:
    data = shutil.copyfile(model_files["calibration"], tmp_path / "calib.npz")
    dataset = client.upload_dataset(data, name="calibration set")
    assert dataset["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert dataset["name"] == "calibration set"
    assert client.get_dataset(dataset["id"])["id"] == dataset["id"]
    assert [d["id"] for d in client.list_datasets()] == [dataset["id"]]
    client.delete_dataset(dataset["id"])
    assert list(client.list_datasets()) == []


# -- errors -----------------------------------------------------------------------------


def test_each_status_raises_its_own_class_with_a_readable_message(
    live: Live,
    client: Client,
    worker: InProcessWorker,
    model_files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.settings import get_settings

    live.faults.inject("GET", "/v1/models", 400)
    with pytest.raises(BadRequest) as bad:
        list(client.list_models())
    assert bad.value.status == 400

    with (
        Client(live.url, "wrong-key", backoff=0.0) as stranger,
        pytest.raises(Unauthorized) as unauth,
    ):
        stranger.get_model("mdl_x")
    problem = unauth.value.problem
    assert problem["title"] == "Invalid API key"
    assert str(unauth.value) == f"401 Invalid API key: {problem['detail']}"

    with pytest.raises(NotFound) as missing:
        client.get_job("job_nope")
    assert str(missing.value) == "404 Not found: No job 'job_nope'."

    monkeypatch.setenv("SQUISH_MAX_UPLOAD_BYTES", "10")
    get_settings.cache_clear()
    with pytest.raises(PayloadTooLarge):
        client.upload_model(model_files["pt2"])
    monkeypatch.delenv("SQUISH_MAX_UPLOAD_BYTES")
    get_settings.cache_clear()

    model = client.upload_model(model_files["pt2"])
    with pytest.raises(ValidationFailed) as invalid:
        client.create_job(model["id"], [("prune.magnitude", {"amount": 1.5}), ("nope", {})])
    errors = invalid.value.errors
    assert {tuple(e["loc"]): e["msg"].split(";")[0] for e in errors} == {
        ("pipeline", 0, "params", "amount"): "Input should be less than 1",
        ("pipeline", 1, "method"): "unknown method 'nope'",
    }
    # The detail only repeats the field errors, so the message is the title and the list.
    assert str(invalid.value) == "\n".join(
        ["422 Invalid job spec"]
        + [f"  - {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors]
    )
    assert invalid.value.problem["status"] == 422

    job = run_job(client, model_files)
    worker.run(job["id"])
    client.wait(job["id"], poll_interval=0)
    with pytest.raises(Conflict) as conflict:
        client.cancel_job(job["id"])
    assert "already succeeded" in str(conflict.value)

    live.faults.inject("GET", "/v1/models/.*", 500)
    with pytest.raises(ServerError) as server_error:
        client.get_model(model["id"])
    assert server_error.value.status == 500
    assert all(isinstance(e, SquishError) for e in (bad.value, conflict.value, server_error.value))


def test_a_detail_that_says_more_than_the_field_errors_is_kept() -> None:
    error = ValidationFailed(
        422,
        "Invalid job spec",
        "distill needs a train dataset",
        [{"loc": ["body", "datasets", "train"], "msg": "required by distill"}],
    )
    assert str(error) == (
        "422 Invalid job spec: distill needs a train dataset\n"
        "  - datasets.train: required by distill"
    )
    assert repr(error) == (
        "ValidationFailed(status=422, title='Invalid job spec', "
        "detail='distill needs a train dataset')"
    )


def test_a_non_json_error_body_still_gives_a_readable_error() -> None:
    response = httpx.Response(418, text="I'm a teapot, not squish")
    error = error_from_response(response)
    assert type(error) is ApiError
    assert str(error) == "418 I'm a teapot: I'm a teapot, not squish"


def test_get_is_retried_on_503_then_succeeds(
    live: Live, client: Client, model_files: dict[str, Path]
) -> None:
    model = client.upload_model(model_files["pt2"])
    live.faults.inject("GET", f"/v1/models/{model['id']}", 503, 502)
    assert client.get_model(model["id"])["id"] == model["id"]
    assert len(live.faults.requests_to("GET", f"/v1/models/{model['id']}")) == 3


def test_a_get_whose_body_is_cut_off_is_retried(
    live: Live, client: Client, model_files: dict[str, Path]
) -> None:
    model = client.upload_model(model_files["pt2"])
    live.faults.cut("GET", f"/v1/models/{model['id']}", 10)
    assert client.get_model(model["id"]) == model
    assert len(live.faults.requests_to("GET", f"/v1/models/{model['id']}")) == 2


def test_an_upload_whose_response_is_cut_off_is_not_sent_twice(
    live: Live, client: Client, model_files: dict[str, Path]
) -> None:
    live.faults.cut("POST", "/v1/models", 10)
    with pytest.raises(TransportError, match=r"POST .*/v1/models"):
        client.upload_model(model_files["pt2"])
    assert len(live.faults.requests_to("POST", "/v1/models")) == 1
    assert len(live.model_ids()) == 1  # the server stored it once; only the answer was lost


def test_retries_run_out_into_server_error(live: Live) -> None:
    with Client(live.url, live.api_key, retries=2, backoff=0.0) as c:
        live.faults.inject("GET", "/v1/methods", 503, 503, 503, 503)
        with pytest.raises(ServerError) as err:
            c.methods()
    assert err.value.status == 503
    assert len(live.faults.requests_to("GET", "/v1/methods")) == 3


def test_uploads_and_cancels_are_not_retried_when_the_server_may_have_acted(
    live: Live, client: Client, model_files: dict[str, Path]
) -> None:
    # A 502/504 comes from a gateway that may have passed the upload on: not repeated.
    # (A 503 is: see tests/squish/test_retry.py.)
    for status in (502, 504):
        live.faults.inject("POST", "/v1/models", status)
        with pytest.raises(ServerError):
            client.upload_model(model_files["pt2"])
    assert len(live.faults.requests_to("POST", "/v1/models")) == 2
    assert live.model_ids() == []
    model = client.upload_model(model_files["pt2"])
    job = client.create_job(model["id"], STEPS)
    live.faults.inject("POST", f"/v1/jobs/{job['id']}/cancel", 503)
    with pytest.raises(ServerError):
        client.cancel_job(job["id"])
    assert len(live.faults.requests_to("POST", f"/v1/jobs/{job['id']}/cancel")) == 1


def test_connection_refused_becomes_transport_error_after_retries() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens
    with (
        Client(f"http://127.0.0.1:{port}", "key", retries=2, backoff=0.0) as c,
        pytest.raises(TransportError) as err,
    ):
        c.health()
    assert isinstance(err.value.__cause__, httpx.ConnectError)


# -- jobs -------------------------------------------------------------------------------


def test_create_job_retried_after_a_lost_response_makes_one_job(
    live: Live, client: Client, model_files: dict[str, Path]
) -> None:
    model = client.upload_model(model_files["pt2"])
    live.faults.lose_response("POST", "/v1/jobs")
    job = client.create_job(
        model["id"],
        [{"method": "prune.magnitude", "params": {"amount": 0.25}}, ("quantize.dynamic", None)],
        target={"device": "cpu"},
        evaluate={"batch_sizes": [1, 32]},
    )
    assert live.job_ids() == [job["id"]]
    creates = live.faults.requests_to("POST", "/v1/jobs")
    assert len(creates) == 2
    keys = {r.headers["idempotency-key"] for r in creates}
    assert len(keys) == 1 and all(keys)
    assert json.loads(creates[0].body)["pipeline"] == [
        {"method": "prune.magnitude", "params": {"amount": 0.25}},
        {"method": "quantize.dynamic", "params": {}},
    ]
    assert [s["method"] for s in job["spec"]["pipeline"]] == ["prune.magnitude", "quantize.dynamic"]
    assert job["spec"]["pipeline"][0]["params"]["amount"] == 0.25
    # Each create_job call has its own key: a second call is a second job.
    client.create_job(model["id"], STEPS)
    assert len(live.job_ids()) == 2


def test_an_explicit_idempotency_key_returns_the_same_job(
    client: Client, model_files: dict[str, Path]
) -> None:
    model = client.upload_model(model_files["pt2"])
    first = client.create_job(model["id"], STEPS, idempotency_key="ci-run-7")
    again = client.create_job(model["id"], STEPS, idempotency_key="ci-run-7")
    assert again["id"] == first["id"]


def test_a_malformed_pipeline_step_is_refused_before_sending(client: Client) -> None:
    with pytest.raises(ValueError, match="method"):
        client.create_job("mdl_1", [{"params": {}}])
    with pytest.raises(ValueError):
        client.create_job("mdl_1", ["prune.magnitude"])  # type: ignore[list-item]


def test_wait_reports_each_change_and_returns_the_finished_job(
    live: Live, client: Client, worker: InProcessWorker, model_files: dict[str, Path]
) -> None:
    job = run_job(client, model_files)
    seen: list[tuple] = []

    def on_progress(j: dict) -> None:
        seen.append((j["status"], j["progress"], j["stage"]))
        if len(seen) == 1:  # the first reading is of the queued job; now a worker takes it
            worker.serve(lockstep=True)

    done = client.wait(job["id"], poll_interval=0, on_progress=on_progress)
    assert done["status"] == "succeeded"
    # Each state the worker committed, once, in order (the worker waited for a poll).
    expected = observed_states(live, job["id"])
    assert [(s[0], s[2]) for s in seen] == [(s[0], s[2]) for s in expected]
    assert [s[1] for s in seen] == pytest.approx([s[1] for s in expected], abs=1e-4)
    stages = [stage for _, _, stage in seen]
    assert stages[0] is None and stages[-1] is None  # queued, then succeeded
    assert stages.index("prune.magnitude") < stages.index("quantize.dynamic")
    assert {a["name"] for a in done["artifacts"]} == {"model", "report", "card"}


def test_wait_raises_job_failed_with_the_error(
    client: Client, worker: InProcessWorker, model_files: dict[str, Path]
) -> None:
    job = run_job(client, model_files, *FAILING)
    assert worker.run(job["id"]) == "failed"
    with pytest.raises(JobFailed) as failed:
        client.wait(job["id"], poll_interval=0)
    error = failed.value.job["error"]
    assert error["code"] == "invalid_params" and error["step"] == "prune.structured"
    assert "has none" in error["message"]
    assert str(failed.value) == (
        f"job {job['id']} failed: invalid_params: {error['message']} (step prune.structured)"
    )
    # Or, without raising, the failed job comes back.
    assert client.wait(job["id"], raise_on_failure=False)["status"] == "failed"


def test_cancel_then_wait_raises_job_cancelled(
    client: Client, model_files: dict[str, Path]
) -> None:
    job = run_job(client, model_files)
    cancelled = client.cancel_job(job["id"])
    assert cancelled["status"] == "cancelled"
    with pytest.raises(JobCancelled):
        client.wait(job["id"], poll_interval=0)


def test_wait_times_out(live: Live, client: Client, model_files: dict[str, Path]) -> None:
    job = run_job(client, model_files)
    live.claim(job["id"])  # a worker holds it and never finishes
    with pytest.raises(WaitTimeout) as timeout:
        client.wait(job["id"], timeout=0.05, poll_interval=0.02)
    assert timeout.value.job["status"] == "running"
    assert "keeps running on the server" in str(timeout.value)


def test_list_jobs_filters_by_status(
    client: Client, worker: InProcessWorker, model_files: dict[str, Path]
) -> None:
    ok = finished_job(client, worker, model_files)
    queued = run_job(client, model_files)
    assert [j["id"] for j in client.list_jobs(status="queued")] == [queued["id"]]
    assert [j["id"] for j in client.list_jobs(status="succeeded", limit=1)] == [ok["id"]]
    assert {j["id"] for j in client.list_jobs()} == {ok["id"], queued["id"]}


# -- events -----------------------------------------------------------------------------


def test_events_stream_to_the_terminal_status(
    live: Live, client: Client, worker: InProcessWorker, model_files: dict[str, Path]
) -> None:
    job = run_job(client, model_files)
    worker.serve()  # the job runs while the stream is open
    events = list(client.events(job["id"]))
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert [e["id"] for e in events] == [e["id"] for e in live.stored_events(job["id"])]
    assert events[0]["kind"] == "status" and events[0]["data"] == {"status": "queued"}
    assert events[-1]["kind"] == "status" and events[-1]["data"]["status"] == "succeeded"
    assert {e["kind"] for e in events} == {"status", "progress", "log"}
    stages = [e["data"]["stage"] for e in events if e["kind"] == "progress"]
    methods = [s for s in dict.fromkeys(stages) if s in ("prune.magnitude", "quantize.dynamic")]
    assert methods == ["prune.magnitude", "quantize.dynamic"]


def test_events_reconnect_with_last_event_id_after_a_drop(
    live: Live, client: Client, worker: InProcessWorker, model_files: dict[str, Path]
) -> None:
    job = finished_job(client, worker, model_files)
    live.faults.drop_events(3)
    events = list(client.events(job["id"]))
    ids = [e["id"] for e in events]
    assert ids == [e["id"] for e in live.stored_events(job["id"])]  # nothing lost or repeated
    assert events[-1]["data"]["status"] == "succeeded"
    streams = live.faults.requests_to("GET", f"/v1/jobs/{job['id']}/events")
    assert len(streams) == 2
    assert "last-event-id" not in streams[0].headers
    assert streams[1].headers["last-event-id"] == str(ids[2])


def test_events_reconnect_when_the_server_ends_the_stream_early(
    live: Live, client: Client, worker: InProcessWorker, model_files: dict[str, Path]
) -> None:
    job = finished_job(client, worker, model_files)
    live.faults.drop_events(2, cleanly=True)
    ids = [e["id"] for e in client.events(job["id"])]
    assert ids == [e["id"] for e in live.stored_events(job["id"])]
    streams = live.faults.requests_to("GET", f"/v1/jobs/{job['id']}/events")
    assert [s.headers.get("last-event-id") for s in streams] == [None, str(ids[1])]


def test_events_resume_from_a_given_id_and_end_for_a_finished_job(
    client: Client, worker: InProcessWorker, model_files: dict[str, Path]
) -> None:
    job = finished_job(client, worker, model_files)
    everything = list(client.events(job["id"]))
    tail = list(client.events(job["id"], last_event_id=everything[-3]["id"]))
    assert tail == everything[-2:]
    assert list(client.events(job["id"], last_event_id=everything[-1]["id"])) == []


# -- artifacts --------------------------------------------------------------------------


def test_download_artifact_verifies_and_renames(
    live: Live,
    client: Client,
    worker: InProcessWorker,
    model_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    job = finished_job(client, worker, model_files)
    out = client.download_artifact(job["id"], "model", tmp_path / "out" / "small.pt2")
    assert out == tmp_path / "out" / "small.pt2"
    assert out.read_bytes() == live.artifact_bytes(job["id"], "model", tmp_path)
    assert not (tmp_path / "out" / "small.pt2.part").exists()
    report = client.download_artifact(job["id"], "report", tmp_path / "report.json")
    assert b"compressed" in report.read_bytes()


def test_download_artifact_resumes_a_partial_file_with_range(
    live: Live,
    client: Client,
    worker: InProcessWorker,
    model_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    job = finished_job(client, worker, model_files)
    content = live.artifact_bytes(job["id"], "model", tmp_path)
    out = tmp_path / "small.pt2"
    Path(f"{out}.part").write_bytes(content[:1000])
    client.download_artifact(job["id"], "model", out)
    assert out.read_bytes() == content
    gets = live.faults.requests_to("GET", f"/v1/jobs/{job['id']}/artifacts/model")
    assert [r.headers.get("range") for r in gets] == ["bytes=1000-"]


def test_a_download_cut_off_midway_resumes_where_it_broke(
    live: Live,
    client: Client,
    worker: InProcessWorker,
    model_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    job = finished_job(client, worker, model_files)
    model = next(a for a in job["artifacts"] if a["name"] == "model")
    assert model["size_bytes"] > 20_000
    live.faults.cut("GET", f"/v1/jobs/{job['id']}/artifacts/model", 20_000)
    out = client.download_artifact(job["id"], "model", tmp_path / "small.pt2")
    assert out.read_bytes() == live.artifact_bytes(job["id"], "model", tmp_path)
    gets = live.faults.requests_to("GET", f"/v1/jobs/{job['id']}/artifacts/model")
    assert [r.headers.get("range") for r in gets] == [None, "bytes=20000-"]
    assert gets[0].headers["accept-encoding"] == "identity"


def test_download_artifact_without_resume_starts_over(
    live: Live,
    client: Client,
    worker: InProcessWorker,
    model_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    job = finished_job(client, worker, model_files)
    out = tmp_path / "small.pt2"
    Path(f"{out}.part").write_bytes(b"garbage")
    client.download_artifact(job["id"], "model", out, resume=False)
    assert out.read_bytes() == live.artifact_bytes(job["id"], "model", tmp_path)
    gets = live.faults.requests_to("GET", f"/v1/jobs/{job['id']}/artifacts/model")
    assert [r.headers.get("range") for r in gets] == [None]


def test_a_corrupt_partial_file_fails_the_checksum_and_is_removed(
    live: Live,
    client: Client,
    worker: InProcessWorker,
    model_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    job = finished_job(client, worker, model_files)
    out = tmp_path / "small.pt2"
    Path(f"{out}.part").write_bytes(b"X" * 1000)
    with pytest.raises(ChecksumMismatch) as mismatch:
        client.download_artifact(job["id"], "model", out)
    model = next(a for a in job["artifacts"] if a["name"] == "model")
    assert mismatch.value.expected == model["sha256"]
    assert not out.exists() and not Path(f"{out}.part").exists()
    # The next attempt starts from scratch and succeeds.
    client.download_artifact(job["id"], "model", out)
    assert out.read_bytes() == live.artifact_bytes(job["id"], "model", tmp_path)


def test_a_wrong_published_sha_raises_checksum_mismatch(
    live: Live,
    client: Client,
    worker: InProcessWorker,
    model_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    live.faults.corrupt_sha = True
    job = finished_job(client, worker, model_files)
    with pytest.raises(ChecksumMismatch, match="does not match the published 0000"):
        client.download_artifact(job["id"], "model", tmp_path / "small.pt2")
    assert not (tmp_path / "small.pt2").exists()


def test_a_missing_artifact_is_not_found(
    client: Client, model_files: dict[str, Path], tmp_path: Path
) -> None:
    job = run_job(client, model_files)
    with pytest.raises(NotFound, match="has no artifact 'model'"):
        client.download_artifact(job["id"], "model", tmp_path / "x.pt2")


def test_an_oversized_partial_file_is_discarded(
    live: Live,
    client: Client,
    worker: InProcessWorker,
    model_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    job = finished_job(client, worker, model_files)
    content = live.artifact_bytes(job["id"], "model", tmp_path)
    out = tmp_path / "small.pt2"
    Path(f"{out}.part").write_bytes(content + b"extra")
    client.download_artifact(job["id"], "model", out)
    assert out.read_bytes() == content
