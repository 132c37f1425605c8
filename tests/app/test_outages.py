"""A dependency that is down is a 503 with Retry-After naming it, on every endpoint, logged
once per outage; the API recovers by itself. The outages are made without stopping any
real server: the app talks to PostgreSQL or S3 through a TCP proxy that a test cuts
(connections reset, new ones refused) and restores, or to a port where nothing listens.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.app.test_api import job_spec
from tests.conftest import free_port
from tests.factories import digits_npz, tiny_mlp_onnx

RETRY_AFTER = "5"


class Proxy:
    """Forwards 127.0.0.1:port to a server; `cut` is an outage, `restore` ends it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset the open ones (as a server that went away)."""
        assert self._listener is not None
        with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        if self._listener is not None:
            self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def assert_unavailable(answer: Any, part: str) -> None:
    assert answer.status_code == 503, (answer.status_code, answer.text)
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["retry-after"] == RETRY_AFTER
    body = answer.json()
    assert body["status"] == 503 and body["title"] == "Service unavailable", body
    assert f"{part} unavailable" in body["detail"], body


def outage_logs(caplog: pytest.LogCaptureFixture, part: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "squish.api" and r.getMessage().startswith(part)
    ]


@pytest.fixture(autouse=True)
def _fresh_outage_state() -> Iterator[None]:
    """Each test starts with every dependency up (the trackers are per process)."""
    from app.errors import OUTAGES

    for outage in OUTAGES:
        outage.ok()
    yield
    for outage in OUTAGES:
        outage.ok()


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mlp_onnx(tmp_path_factory.mktemp("outage") / "m.onnx")


@pytest.fixture(scope="module")
def npz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_npz(tmp_path_factory.mktemp("outage") / "d.npz")


def _every_endpoint(
    client: TestClient, onnx: Path, npz: Path, ids: dict[str, str]
) -> dict[str, Any]:
    """One request to each /v1 operation; uploads send their whole file."""
    model, job = ids.get("model", "mdl_x"), ids.get("job", "job_x")
    with onnx.open("rb") as fh:
        upload = client.post("/v1/models", files={"file": ("m.onnx", fh)})
    with npz.open("rb") as fh:
        dataset_upload = client.post("/v1/datasets", files={"file": ("d.npz", fh)})
    return {
        "POST /v1/models": upload,
        "POST /v1/datasets": dataset_upload,
        "GET /v1/models": client.get("/v1/models"),
        "GET /v1/models/{id}": client.get(f"/v1/models/{model}"),
        "GET /v1/models/{id}/content": client.get(f"/v1/models/{model}/content"),
        "DELETE /v1/models/{id}": client.delete(f"/v1/models/{model}"),
        "GET /v1/datasets": client.get("/v1/datasets"),
        "GET /v1/datasets/{id}": client.get("/v1/datasets/ds_x"),
        "POST /v1/jobs": client.post("/v1/jobs", json=job_spec(model)),
        "GET /v1/jobs": client.get("/v1/jobs"),
        "GET /v1/jobs/{id}": client.get(f"/v1/jobs/{job}"),
        "POST /v1/jobs/{id}/cancel": client.post(f"/v1/jobs/{job}/cancel"),
        "GET /v1/jobs/{id}/events": client.get(f"/v1/jobs/{job}/events"),
        "GET /v1/jobs/{id}/artifacts/model": client.get(f"/v1/jobs/{job}/artifacts/model"),
        "GET /v1/methods": client.get("/v1/methods"),
    }


# --- the database -----------------------------------------------------------------------------


def test_no_database_is_503_on_every_endpoint_logged_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    onnx_file: Path,
    npz_file: Path,
) -> None:
    """PostgreSQL configured on a port where nothing listens: nothing else is needed."""
    from tests.conftest import reset_caches

    for name in ("SQUISH_DATABASE_URL", "SQUISH_STORAGE_URL", "SQUISH_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SQUISH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv(
        "SQUISH_DATABASE_URL", f"postgresql+psycopg://squish@127.0.0.1:{free_port()}/squish"
    )
    reset_caches()
    from app.main import create_app

    caplog.set_level(logging.INFO, logger="squish")
    try:
        with TestClient(create_app(run_reaper=False), raise_server_exceptions=False) as client:
            client.headers["Authorization"] = "Bearer sq_some-key-no-database-can-check"
            answers = _every_endpoint(client, onnx_file, npz_file, {})
            ready = client.get("/readyz")
    finally:
        reset_caches()
    for route, answer in answers.items():
        assert answer.status_code == 503, route
        assert_unavailable(answer, "database")
    assert ready.status_code == 503 and "database" in ready.json()["detail"]
    # 15 requests failed: one line when the outage began, not one per request.
    assert len(outage_logs(caplog, "database unavailable")) == 1, caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert list((tmp_path / "data" / "tmp").glob("*")) == []  # no upload left behind


@pytest.fixture
def via_proxy(
    postgres_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Proxy, dict[str, str]]]:
    """The app's PostgreSQL database reached through a proxy; alice's key."""
    from sqlalchemy.engine import make_url

    from tests.conftest import _empty_tables, reset_caches

    url = make_url(postgres_database)
    proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
    for name in ("SQUISH_STORAGE_URL", "SQUISH_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SQUISH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv(
        "SQUISH_DATABASE_URL",
        url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
    )
    reset_caches()
    _empty_tables()
    from app.db import session_scope
    from app.keys import create_key

    with session_scope() as session:
        keys = {"alice": create_key(session, "alice")}
    try:
        yield proxy, keys
    finally:
        proxy.close()
        reset_caches()


@pytest.mark.services
def test_database_outage_is_503_then_recovers_without_a_restart(
    via_proxy: tuple[Proxy, dict[str, str]],
    caplog: pytest.LogCaptureFixture,
    onnx_file: Path,
    npz_file: Path,
) -> None:
    proxy, keys = via_proxy
    from app.keys import key_cache
    from app.main import create_app

    caplog.set_level(logging.INFO, logger="squish")
    with TestClient(create_app(run_reaper=False), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {keys['alice']}"
        with onnx_file.open("rb") as fh:
            model = client.post("/v1/models", files={"file": ("m.onnx", fh)}).json()
        job = client.post("/v1/jobs", json=job_spec(model["id"])).json()
        ids = {"model": model["id"], "job": job["id"]}

        proxy.cut()  # pooled connections reset, new ones refused
        answers = _every_endpoint(client, onnx_file, npz_file, ids)
        # The one route that needs no database once the key is in the cache.
        assert answers.pop("GET /v1/methods").status_code == 200
        key_cache.clear()  # a key not seen lately needs the database too
        answers["auth"] = client.get("/v1/methods")
        for route, answer in answers.items():
            assert answer.status_code == 503, (route, answer.text)
            assert_unavailable(answer, "database")

        proxy.restore()
        polled = client.get(f"/v1/jobs/{job['id']}")
        assert polled.status_code == 200, polled.text
        assert polled.json()["status"] == "queued"
        assert [m["id"] for m in client.get("/v1/models").json()["items"]] == [model["id"]]
        assert client.post("/v1/jobs", json=job_spec(model["id"])).status_code == 202

    assert len(outage_logs(caplog, "database unavailable")) == 1, caplog.text
    recovered = outage_logs(caplog, "database recovered")
    assert len(recovered) == 1 and f"{len(answers)} requests" in recovered[0], recovered
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]


@pytest.mark.services
def test_an_event_stream_ends_with_an_error_event_when_the_database_goes(
    via_proxy: tuple[Proxy, dict[str, str]], onnx_file: Path
) -> None:
    proxy, keys = via_proxy
    from app.main import create_app

    with TestClient(create_app(run_reaper=False), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {keys['alice']}"
        with onnx_file.open("rb") as fh:
            model = client.post("/v1/models", files={"file": ("m.onnx", fh)}).json()
        job = client.post("/v1/jobs", json=job_spec(model["id"])).json()
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            seen = []
            for line in lines:  # up to the queued event, then the stream waits for more
                seen.append(line)
                if line.startswith("data:"):
                    break
            proxy.cut()
            seen += list(lines)  # ends by itself: it must not hang or break
    text = "\n".join(seen)
    assert text.rstrip().endswith("}"), text
    last_event = text.split("\n\n")[-1].strip().splitlines()
    assert last_event[0] == "event: error", text
    assert '"status": 503' in last_event[1] and "database unavailable" in last_event[1]


# --- the object store -----------------------------------------------------------------------


@pytest.fixture
def s3_via_proxy(
    s3_endpoint: tuple[str, str],
    embedded: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[Proxy]:
    """The embedded configuration with its objects in S3 (moto), reached through a proxy."""
    from tests.app.conftest_s3 import FAKE_AWS_ENV
    from tests.conftest import reset_caches

    endpoint, bucket = s3_endpoint
    host, port = endpoint.removeprefix("http://").split(":")
    proxy = Proxy((host, int(port)))
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SQUISH_STORAGE_URL", f"s3://{bucket}/outage-{tmp_path.name}")
    monkeypatch.setenv("SQUISH_S3_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    reset_caches()
    try:
        yield proxy
    finally:
        proxy.close()


def test_storage_outage_is_503_leaves_nothing_and_recovers(
    s3_via_proxy: Proxy,
    embedded: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    onnx_file: Path,
    npz_file: Path,
    tmp_path: Path,
) -> None:
    from app.main import create_app

    proxy = s3_via_proxy
    caplog.set_level(logging.INFO, logger="squish")
    with TestClient(create_app(run_reaper=False), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {embedded['alice']}"
        with onnx_file.open("rb") as fh:
            model = client.post("/v1/models", files={"file": ("m.onnx", fh)})
        assert model.status_code == 201, model.text
        content = f"/v1/models/{model.json()['id']}/content"

        proxy.cut()
        started = time.monotonic()
        with onnx_file.open("rb") as fh:
            upload = client.post("/v1/models", files={"file": ("m2.onnx", fh)}, data={"name": "2"})
        with npz_file.open("rb") as fh:
            dataset = client.post("/v1/datasets", files={"file": ("d.npz", fh)})
        download = client.get(content)
        ranged = client.get(content, headers={"Range": "bytes=0-9"})
        ready = client.get("/readyz")
        during = time.monotonic() - started
        for answer in (upload, dataset, download, ranged):
            assert_unavailable(answer, "object storage")
        assert ready.status_code == 503 and "storage" in ready.json()["detail"]
        # The failed uploads left no row and no temporary file.
        assert [m["name"] for m in client.get("/v1/models").json()["items"]] == ["m.onnx"]
        assert client.get("/v1/datasets").json()["items"] == []
        assert list((tmp_path / "data" / "tmp").glob("*")) == []

        proxy.restore()
        again = client.get(content)
        assert again.status_code == 200 and again.content == onnx_file.read_bytes()
        with onnx_file.open("rb") as fh:
            retried = client.post("/v1/models", files={"file": ("m2.onnx", fh)})
        assert retried.status_code == 201, retried.text
        assert client.get("/readyz").status_code == 200

    assert during < 30, f"the 503s took {during:.1f} s"
    assert len(outage_logs(caplog, "object storage unavailable")) == 1, caplog.text
    assert len(outage_logs(caplog, "object storage recovered")) == 1, caplog.text


def test_the_outage_log_reminds_at_most_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    from app.errors import Outage

    caplog.set_level(logging.INFO, logger="squish")
    outage = Outage("thing", remind_s=0.2)
    error = ConnectionRefusedError("refused")
    for _ in range(50):
        outage.failed(error)
    time.sleep(0.25)
    outage.failed(error)
    outage.ok()
    outage.ok()
    assert outage_logs(caplog, "thing") == [
        "thing unavailable: answering 503 until it is back (ConnectionRefusedError: refused)",
        outage_logs(caplog, "thing still")[0],
        outage_logs(caplog, "thing recovered")[0],
    ]
    assert "51 requests" in outage_logs(caplog, "thing still")[0]
    assert "51 requests" in outage_logs(caplog, "thing recovered")[0]
    assert not outage.down and outage.total_failures == 51 and outage.outages == 1


# --- the classification ---------------------------------------------------------------------


def _wrapped(orig: BaseException, kind: Any) -> BaseException:
    """``orig`` as SQLAlchemy raises it: ``kind(...)`` from the driver's error."""
    try:
        try:
            raise orig
        except BaseException as exc:
            raise kind("SELECT 1", {}, exc) from exc
    except BaseException as wrapped:
        return wrapped


def test_what_counts_as_a_database_outage() -> None:
    import psycopg
    import psycopg.errors
    from sqlalchemy import exc as sa

    from app.errors import database_outage

    outages = [
        _wrapped(psycopg.OperationalError("connection refused"), sa.OperationalError),
        _wrapped(psycopg.errors.AdminShutdown("terminating connection"), sa.OperationalError),
        _wrapped(psycopg.errors.TooManyConnections("too many clients"), sa.OperationalError),
        _wrapped(psycopg.errors.QueryCanceled("statement timeout"), sa.OperationalError),
        _wrapped(psycopg.InterfaceError("the connection is closed"), sa.InterfaceError),
        sa.TimeoutError("QueuePool limit of size 10 overflow 20 reached"),
        _wrapped(__import__("sqlite3").OperationalError("database is locked"), sa.OperationalError),
    ]
    not_outages = [
        _wrapped(psycopg.errors.UniqueViolation("duplicate key"), sa.IntegrityError),
        _wrapped(psycopg.DataError("text fields cannot contain NUL"), sa.DataError),
        _wrapped(psycopg.errors.UndefinedTable("no such table"), sa.ProgrammingError),
        _wrapped(__import__("sqlite3").OperationalError("no such table: job"), sa.OperationalError),
        ValueError("a bug"),
    ]
    assert [database_outage(e) for e in outages] == [True] * len(outages)
    assert [database_outage(e) for e in not_outages] == [False] * len(not_outages)


def _client_error(status: int, code: str) -> Any:
    from botocore.exceptions import ClientError

    response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "PutObject")  # type: ignore[arg-type]


def test_what_counts_as_a_storage_outage() -> None:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        ConnectionClosedError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    from app.errors import storage_outage
    from app.storage import StorageError, StorageUnavailable
    from app.storage.s3 import outage

    def upload_failed(cause: BaseException) -> BaseException:
        try:
            try:
                raise cause
            except BaseException:
                raise S3UploadFailedError("Failed to upload") from None
        except S3UploadFailedError as exc:
            exc.__context__ = cause
            return exc

    outages = [
        EndpointConnectionError(endpoint_url="http://s3"),
        ConnectionClosedError(endpoint_url="http://s3"),
        ReadTimeoutError(endpoint_url="http://s3"),
        _client_error(503, "SlowDown"),
        _client_error(500, "InternalError"),
        _client_error(400, "RequestTimeout"),
        upload_failed(_client_error(503, "ServiceUnavailable")),
    ]
    not_outages = [
        _client_error(404, "NoSuchKey"),
        _client_error(403, "AccessDenied"),
        _client_error(400, "InvalidArgument"),
        NoCredentialsError(),
        upload_failed(_client_error(403, "AccessDenied")),
    ]
    assert [outage(e) for e in outages] == [True] * len(outages)
    assert [outage(e) for e in not_outages] == [False] * len(not_outages)
    assert storage_outage(StorageUnavailable("down"))
    assert not storage_outage(StorageError("bucket missing"))
