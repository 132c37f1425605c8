"""The SDK against the in-memory fake API (tests/squish/fake_server.py)."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

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
from tests.squish.fake_server import API_KEY, FakeServer, running_server

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with running_server() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeServer) -> FakeServer:
    server.reset()
    return server


@pytest.fixture
def client(fake: FakeServer) -> Iterator[Client]:
    with Client(fake.url, API_KEY, timeout=5.0, backoff=0.0) as c:
        yield c


def write_model(tmp_path: Path, size: int = 300_000, name: str = "net.pt2") -> Path:
    path = tmp_path / name
    path.write_bytes((bytes(range(251)) * (size // 251 + 1))[:size])
    return path


def run_job(client: Client, tmp_path: Path, *steps: tuple[str, dict]) -> dict:
    model = client.upload_model(write_model(tmp_path))
    return client.create_job(model["id"], list(steps) or [("prune.magnitude", {"amount": 0.5})])


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
    fake: FakeServer, tmp_path: Path
) -> None:
    path = write_model(tmp_path, size=1_500_000)
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

    with Client(fake.url, API_KEY, transport=Recording(), backoff=0.0) as c:
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


def test_model_get_download_and_delete(client: Client, tmp_path: Path) -> None:
    path = write_model(tmp_path, name="tiny.onnx", size=5000)
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
    fake: FakeServer, client: Client, tmp_path: Path
) -> None:
    ids = [client.upload_model(write_model(tmp_path, size=100 + i))["id"] for i in range(5)]
    assert [m["id"] for m in client.list_models(limit=2)] == ids
    pages = fake.state.requests_to("GET", "/v1/models")
    assert [r.query for r in pages] == ["limit=2", "limit=2&cursor=2", "limit=2&cursor=4"]


def test_datasets_round_trip(client: Client, tmp_path: Path) -> None:
    data = tmp_path / "calib.npz"
    data.write_bytes(b"PK\x03\x04" + b"\0" * 1000)
    dataset = client.upload_dataset(data, name="calibration set")
    assert dataset["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert dataset["name"] == "calibration set"
    assert client.get_dataset(dataset["id"])["id"] == dataset["id"]
    assert [d["id"] for d in client.list_datasets()] == [dataset["id"]]
    client.delete_dataset(dataset["id"])
    assert list(client.list_datasets()) == []


# -- errors -----------------------------------------------------------------------------


def test_each_status_raises_its_own_class_with_a_readable_message(
    fake: FakeServer, client: Client, tmp_path: Path
) -> None:
    fake.state.inject("GET", "/v1/models", 400)
    with pytest.raises(BadRequest) as bad:
        list(client.list_models())
    assert bad.value.status == 400

    with (
        Client(fake.url, "wrong-key", backoff=0.0) as stranger,
        pytest.raises(Unauthorized) as unauth,
    ):
        stranger.get_model("mdl_x")
    assert "401 Unauthorized: missing or unknown API key" in str(unauth.value)

    with pytest.raises(NotFound) as missing:
        client.get_job("job_nope")
    assert str(missing.value) == "404 Not found: no job 'job_nope'"

    fake.state.max_upload_bytes = 10
    with pytest.raises(PayloadTooLarge):
        client.upload_model(write_model(tmp_path, size=100))
    fake.state.max_upload_bytes = 1 << 20

    model = client.upload_model(write_model(tmp_path, size=100))
    with pytest.raises(ValidationFailed) as invalid:
        client.create_job(model["id"], [("prune.magnitude", {"amount": 1.5}), ("nope", {})])
    text = str(invalid.value)
    assert text == (
        "422 Invalid job spec\n"
        "  - pipeline.0.params.amount: must be between 0 and 1\n"
        "  - pipeline.1.method: unknown method 'nope'"
    )
    assert invalid.value.errors[0]["loc"] == ["pipeline", 0, "params", "amount"]
    assert invalid.value.problem["status"] == 422

    job = client.create_job(model["id"], [("prune.magnitude", {})])
    client.wait(job["id"], poll_interval=0)
    with pytest.raises(Conflict) as conflict:
        client.cancel_job(job["id"])
    assert "already succeeded" in str(conflict.value)

    fake.state.inject("GET", "/v1/models/.*", 500)
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
    fake: FakeServer, client: Client, tmp_path: Path
) -> None:
    model = client.upload_model(write_model(tmp_path, size=100))
    fake.state.inject("GET", f"/v1/models/{model['id']}", 503, 502)
    assert client.get_model(model["id"])["id"] == model["id"]
    assert len(fake.state.requests_to("GET", f"/v1/models/{model['id']}")) == 3


def test_a_get_whose_body_is_cut_off_is_retried(
    fake: FakeServer, client: Client, tmp_path: Path
) -> None:
    model = client.upload_model(write_model(tmp_path, size=100))
    fake.state.cut("GET", f"/v1/models/{model['id']}", 10)
    assert client.get_model(model["id"]) == model
    assert len(fake.state.requests_to("GET", f"/v1/models/{model['id']}")) == 2


def test_an_upload_whose_response_is_cut_off_is_not_sent_twice(
    fake: FakeServer, client: Client, tmp_path: Path
) -> None:
    fake.state.cut("POST", "/v1/models", 10)
    with pytest.raises(TransportError, match=r"POST .*/v1/models"):
        client.upload_model(write_model(tmp_path, size=100))
    assert len(fake.state.requests_to("POST", "/v1/models")) == 1


def test_retries_run_out_into_server_error(fake: FakeServer, tmp_path: Path) -> None:
    with Client(fake.url, API_KEY, retries=2, backoff=0.0) as c:
        fake.state.inject("GET", "/v1/methods", 503, 503, 503, 503)
        with pytest.raises(ServerError) as err:
            c.methods()
    assert err.value.status == 503
    assert len(fake.state.requests_to("GET", "/v1/methods")) == 3


def test_deletes_and_uploads_are_not_retried_on_5xx(
    fake: FakeServer, client: Client, tmp_path: Path
) -> None:
    fake.state.inject("POST", "/v1/models", 503)
    with pytest.raises(ServerError):
        client.upload_model(write_model(tmp_path, size=100))
    assert len(fake.state.requests_to("POST", "/v1/models")) == 1


def test_connection_refused_becomes_transport_error_after_retries() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens
    with (
        Client(f"http://127.0.0.1:{port}", API_KEY, retries=2, backoff=0.0) as c,
        pytest.raises(TransportError) as err,
    ):
        c.health()
    assert isinstance(err.value.__cause__, httpx.ConnectError)


# -- jobs -------------------------------------------------------------------------------


def test_create_job_retried_after_a_lost_response_makes_one_job(
    fake: FakeServer, client: Client, tmp_path: Path
) -> None:
    model = client.upload_model(write_model(tmp_path, size=100))
    fake.state.lose_next_create_response = True
    job = client.create_job(
        model["id"],
        [{"method": "prune.magnitude", "params": {"amount": 0.25}}, ("quantize.dynamic", None)],
        target={"device": "cpu"},
        evaluate={"batch_sizes": [1, 32]},
    )
    assert len(fake.state.jobs) == 1
    assert job["id"] in fake.state.jobs
    creates = fake.state.requests_to("POST", "/v1/jobs")
    assert len(creates) == 2
    keys = {r.headers["idempotency-key"] for r in creates}
    assert len(keys) == 1 and all(keys)
    assert job["spec"]["pipeline"] == [
        {"method": "prune.magnitude", "params": {"amount": 0.25}},
        {"method": "quantize.dynamic", "params": {}},
    ]
    # Each create_job call has its own key: a second call is a second job.
    client.create_job(model["id"], [("prune.magnitude", {})])
    assert len(fake.state.jobs) == 2


def test_an_explicit_idempotency_key_returns_the_same_job(client: Client, tmp_path: Path) -> None:
    model = client.upload_model(write_model(tmp_path, size=100))
    first = client.create_job(model["id"], [("prune.magnitude", {})], idempotency_key="ci-run-7")
    again = client.create_job(model["id"], [("prune.magnitude", {})], idempotency_key="ci-run-7")
    assert again["id"] == first["id"]


def test_a_malformed_pipeline_step_is_refused_before_sending(client: Client) -> None:
    with pytest.raises(ValueError, match="method"):
        client.create_job("mdl_1", [{"params": {}}])
    with pytest.raises(ValueError):
        client.create_job("mdl_1", ["prune.magnitude"])  # type: ignore[list-item]


def test_wait_reports_each_change_and_returns_the_finished_job(
    client: Client, tmp_path: Path
) -> None:
    job = run_job(client, tmp_path, ("prune.magnitude", {"amount": 0.5}), ("quantize.dynamic", {}))
    seen: list[tuple] = []
    done = client.wait(
        job["id"],
        poll_interval=0,
        on_progress=lambda j: seen.append((j["status"], j["progress"], j["stage"])),
    )
    assert done["status"] == "succeeded"
    assert seen == [
        ("queued", 0.0, None),
        ("running", 0.0, "prune.magnitude"),
        ("running", 0.5, "quantize.dynamic"),
        ("succeeded", 1.0, None),
    ]
    assert {a["name"] for a in done["artifacts"]} == {"model", "report"}


def test_wait_raises_job_failed_with_the_error(client: Client, tmp_path: Path) -> None:
    job = run_job(client, tmp_path, ("prune.magnitude", {}), ("test.fail", {}))
    with pytest.raises(JobFailed) as failed:
        client.wait(job["id"], poll_interval=0)
    assert failed.value.job["error"]["code"] == "method_failed"
    assert str(failed.value) == (
        f"job {job['id']} failed: method_failed: test.fail always fails (step 1)"
    )
    # Or, without raising, the failed job comes back.
    assert client.wait(job["id"], raise_on_failure=False)["status"] == "failed"


def test_cancel_then_wait_raises_job_cancelled(client: Client, tmp_path: Path) -> None:
    job = run_job(client, tmp_path)
    cancelled = client.cancel_job(job["id"])
    assert cancelled["status"] == "cancelled"
    with pytest.raises(JobCancelled):
        client.wait(job["id"], poll_interval=0)


def test_wait_times_out(fake: FakeServer, client: Client, tmp_path: Path) -> None:
    job = run_job(client, tmp_path, *[("prune.magnitude", {})] * 50)
    with pytest.raises(WaitTimeout) as timeout:
        client.wait(job["id"], timeout=0.05, poll_interval=0.02)
    assert timeout.value.job["status"] == "running"
    assert "keeps running on the server" in str(timeout.value)


def test_list_jobs_filters_by_status(client: Client, tmp_path: Path) -> None:
    ok = run_job(client, tmp_path)
    client.wait(ok["id"], poll_interval=0)
    queued = run_job(client, tmp_path)
    assert [j["id"] for j in client.list_jobs(status="queued")] == [queued["id"]]
    assert [j["id"] for j in client.list_jobs(status="succeeded", limit=1)] == [ok["id"]]
    assert {j["id"] for j in client.list_jobs()} == {ok["id"], queued["id"]}


# -- events -----------------------------------------------------------------------------


def test_events_stream_to_the_terminal_status(client: Client, tmp_path: Path) -> None:
    job = run_job(client, tmp_path, ("prune.magnitude", {}), ("quantize.dynamic", {}))
    events = list(client.events(job["id"]))
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["kind"] == "status" and events[0]["data"] == {"status": "queued"}
    assert events[-1]["kind"] == "status" and events[-1]["data"]["status"] == "succeeded"
    assert {e["kind"] for e in events} == {"status", "progress", "log"}
    stages = [e["data"]["stage"] for e in events if e["kind"] == "progress"]
    assert stages == ["prune.magnitude", "quantize.dynamic"]


def test_events_reconnect_with_last_event_id_after_a_drop(
    fake: FakeServer, client: Client, tmp_path: Path
) -> None:
    job = run_job(client, tmp_path, ("prune.magnitude", {}), ("quantize.dynamic", {}))
    fake.state.drop_events_after = 3
    events = list(client.events(job["id"]))
    ids = [e["id"] for e in events]
    assert ids == list(range(1, len(ids) + 1))  # nothing lost, nothing repeated
    assert events[-1]["data"]["status"] == "succeeded"
    streams = fake.state.requests_to("GET", f"/v1/jobs/{job['id']}/events")
    assert len(streams) == 2
    assert "last-event-id" not in streams[0].headers
    assert streams[1].headers["last-event-id"] == "3"


def test_events_reconnect_when_the_server_ends_the_stream_early(
    fake: FakeServer, client: Client, tmp_path: Path
) -> None:
    job = run_job(client, tmp_path)
    fake.state.drop_events_after = 2
    fake.state.drop_events_cleanly = True
    ids = [e["id"] for e in client.events(job["id"])]
    assert ids == list(range(1, len(ids) + 1))
    streams = fake.state.requests_to("GET", f"/v1/jobs/{job['id']}/events")
    assert [s.headers.get("last-event-id") for s in streams] == [None, "2"]


def test_events_resume_from_a_given_id_and_end_for_a_finished_job(
    client: Client, tmp_path: Path
) -> None:
    job = run_job(client, tmp_path)
    everything = list(client.events(job["id"]))
    tail = list(client.events(job["id"], last_event_id=everything[-3]["id"]))
    assert tail == everything[-2:]
    assert list(client.events(job["id"], last_event_id=everything[-1]["id"])) == []


# -- artifacts --------------------------------------------------------------------------


def finished_job(client: Client, tmp_path: Path) -> dict:
    job = run_job(client, tmp_path)
    return client.wait(job["id"], poll_interval=0)


def test_download_artifact_verifies_and_renames(
    fake: FakeServer, client: Client, tmp_path: Path
) -> None:
    job = finished_job(client, tmp_path)
    out = client.download_artifact(job["id"], "model", tmp_path / "out" / "small.pt2")
    assert out == tmp_path / "out" / "small.pt2"
    assert out.read_bytes() == fake.state.artifacts[(job["id"], "model")]
    assert not (tmp_path / "out" / "small.pt2.part").exists()
    report = client.download_artifact(job["id"], "report", tmp_path / "report.json")
    assert b"compressed" in report.read_bytes()


def test_download_artifact_resumes_a_partial_file_with_range(
    fake: FakeServer, client: Client, tmp_path: Path
) -> None:
    job = finished_job(client, tmp_path)
    content = fake.state.artifacts[(job["id"], "model")]
    out = tmp_path / "small.pt2"
    Path(f"{out}.part").write_bytes(content[:1000])
    client.download_artifact(job["id"], "model", out)
    assert out.read_bytes() == content
    gets = fake.state.requests_to("GET", f"/v1/jobs/{job['id']}/artifacts/model")
    assert [r.headers.get("range") for r in gets] == ["bytes=1000-"]


def test_a_download_cut_off_midway_resumes_where_it_broke(
    fake: FakeServer, client: Client, tmp_path: Path
) -> None:
    job = finished_job(client, tmp_path)
    fake.state.cut("GET", f"/v1/jobs/{job['id']}/artifacts/model", 20_000)
    out = client.download_artifact(job["id"], "model", tmp_path / "small.pt2")
    assert out.read_bytes() == fake.state.artifacts[(job["id"], "model")]
    gets = fake.state.requests_to("GET", f"/v1/jobs/{job['id']}/artifacts/model")
    assert [r.headers.get("range") for r in gets] == [None, "bytes=20000-"]
    assert gets[0].headers["accept-encoding"] == "identity"


def test_download_artifact_without_resume_starts_over(
    fake: FakeServer, client: Client, tmp_path: Path
) -> None:
    job = finished_job(client, tmp_path)
    out = tmp_path / "small.pt2"
    Path(f"{out}.part").write_bytes(b"garbage")
    client.download_artifact(job["id"], "model", out, resume=False)
    assert out.read_bytes() == fake.state.artifacts[(job["id"], "model")]
    gets = fake.state.requests_to("GET", f"/v1/jobs/{job['id']}/artifacts/model")
    assert [r.headers.get("range") for r in gets] == [None]


def test_a_corrupt_partial_file_fails_the_checksum_and_is_removed(
    fake: FakeServer, client: Client, tmp_path: Path
) -> None:
    job = finished_job(client, tmp_path)
    out = tmp_path / "small.pt2"
    Path(f"{out}.part").write_bytes(b"X" * 1000)
    with pytest.raises(ChecksumMismatch) as mismatch:
        client.download_artifact(job["id"], "model", out)
    assert mismatch.value.expected == job["artifacts"][0]["sha256"]
    assert not out.exists() and not Path(f"{out}.part").exists()
    # The next attempt starts from scratch and succeeds.
    client.download_artifact(job["id"], "model", out)
    assert out.read_bytes() == fake.state.artifacts[(job["id"], "model")]


def test_a_wrong_published_sha_raises_checksum_mismatch(
    fake: FakeServer, client: Client, tmp_path: Path
) -> None:
    fake.state.corrupt_sha = True
    job = finished_job(client, tmp_path)
    with pytest.raises(ChecksumMismatch, match="does not match the published 0000"):
        client.download_artifact(job["id"], "model", tmp_path / "small.pt2")
    assert not (tmp_path / "small.pt2").exists()


def test_a_missing_artifact_is_not_found(client: Client, tmp_path: Path) -> None:
    job = run_job(client, tmp_path)
    with pytest.raises(NotFound, match="has no artifact 'model'"):
        client.download_artifact(job["id"], "model", tmp_path / "x.pt2")


def test_an_oversized_partial_file_is_discarded(
    fake: FakeServer, client: Client, tmp_path: Path
) -> None:
    job = finished_job(client, tmp_path)
    content = fake.state.artifacts[(job["id"], "model")]
    out = tmp_path / "small.pt2"
    Path(f"{out}.part").write_bytes(content + b"extra")
    client.download_artifact(job["id"], "model", out)
    assert out.read_bytes() == content
