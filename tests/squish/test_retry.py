"""The SDK and CLI retry what is safe to repeat while the server is unavailable, for a
bounded time, and say what they wait for (against the real application, in process)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from squish import Client, RetryNotice, ServiceUnavailable, TransportError
from squish.cli import cli
from squish.errors import retry_after_seconds
from tests.conftest import free_port
from tests.squish.service import STEPS, Live

OUTAGE = {
    "title": "Service unavailable",
    "status": 503,
    "detail": "database unavailable; retry in 1 s",  # as app/errors.py words it
}


class Outage(httpx.BaseTransport):
    """The network to the live server, except that the next `count` requests get a 503."""

    def __init__(self, count: int, retry_after: str | None = "1") -> None:
        self.count = count
        self.retry_after = retry_after
        self.real = httpx.HTTPTransport()
        self.seen: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(f"{request.method} {request.url.path}")
        if self.count == 0:
            return self.real.handle_request(request)
        self.count -= 1
        headers = {"Content-Type": "application/problem+json"}
        if self.retry_after is not None:
            headers["Retry-After"] = self.retry_after
        request.read()
        return httpx.Response(503, json=OUTAGE, headers=headers)

    def close(self) -> None:
        self.real.close()


def recorder() -> tuple[list[RetryNotice], Any]:
    notices: list[RetryNotice] = []
    return notices, notices.append


@pytest.fixture
def client(live: Live) -> Iterator[Client]:
    with Client(live.url, live.api_key, backoff=0.0) as c:
        yield c


# -- what is waited for, and how long -------------------------------------------------


def test_a_503_is_retried_after_its_retry_after_and_the_wait_is_announced(live: Live) -> None:
    notices, on_retry = recorder()
    outage = Outage(2, retry_after="1")
    start = time.monotonic()
    with Client(live.url, live.api_key, transport=outage, on_retry=on_retry) as c:
        methods = c.methods()
    took = time.monotonic() - start
    assert methods and outage.seen == ["GET /v1/methods"] * 3
    assert [(n.reason, n.status, n.delay, n.retry) for n in notices] == [
        ("database unavailable", 503, 1.0, 1),
        ("database unavailable", 503, 1.0, 2),
    ]
    assert str(notices[0]) == "database unavailable, retrying in 1 s\u2026"
    assert notices[0].method == "GET" and notices[0].url == f"{live.url}/v1/methods"
    assert 2.0 <= took < 5.0


def test_without_retry_after_the_backoff_doubles(live: Live) -> None:
    notices, on_retry = recorder()
    with Client(
        live.url, live.api_key, backoff=0.1, transport=Outage(3, None), on_retry=on_retry
    ) as c:
        c.methods()
    assert [n.delay for n in notices] == pytest.approx([0.1, 0.2, 0.4])


def test_retries_stop_once_retry_for_is_spent(live: Live) -> None:
    notices, on_retry = recorder()
    start = time.monotonic()
    with (
        Client(
            live.url, live.api_key, retry_for=2.5, transport=Outage(100), on_retry=on_retry
        ) as c,
        pytest.raises(ServiceUnavailable) as err,
    ):
        c.methods()
    took = time.monotonic() - start
    # Two waits of 1 s fit in 2.5 s; a third would end past it, so the 503 is raised.
    assert len(notices) == 2 and 2.0 <= took < 3.5
    assert err.value.status == 503 and err.value.retry_after == 1.0
    assert "database unavailable" in str(err.value)


def test_retry_for_0_or_retries_0_turn_retries_off(live: Live) -> None:
    for options in ({"retry_for": 0.0}, {"retries": 0}):
        outage = Outage(1)
        with (
            Client(live.url, live.api_key, transport=outage, **options) as c,  # type: ignore[arg-type]
            pytest.raises(ServiceUnavailable),
        ):
            c.methods()
        assert len(outage.seen) == 1


def test_by_default_the_wait_is_logged(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="squish.client"),
        Client(live.url, live.api_key, transport=Outage(1, "0")) as c,
    ):
        c.methods()
    assert f"GET {live.url}/v1/methods: database unavailable, retrying in 0 s" in caplog.text


def test_an_http_date_retry_after_is_understood() -> None:
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 28 <= (retry_after_seconds(later) or 0) <= 31
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


# -- which requests are repeated --------------------------------------------------------


def test_create_job_is_retried_on_503_and_makes_one_job(
    live: Live, client: Client, model_files: dict[str, Path]
) -> None:
    model = client.upload_model(model_files["pt2"])
    live.faults.inject("POST", "/v1/jobs", 503, 503)
    job = client.create_job(model["id"], STEPS)
    creates = live.faults.requests_to("POST", "/v1/jobs")
    assert len(creates) == 3 and len({r.headers["idempotency-key"] for r in creates}) == 1
    assert live.job_ids() == [job["id"]]


def test_an_upload_is_sent_again_from_the_start_after_a_503(
    live: Live, client: Client, model_files: dict[str, Path]
) -> None:
    live.faults.inject("POST", "/v1/models", 503)
    model = client.upload_model(model_files["pt2"])
    assert len(live.faults.requests_to("POST", "/v1/models")) == 2
    assert live.model_ids() == [model["id"]]
    assert model["sha256"] == hashlib.sha256(model_files["pt2"].read_bytes()).hexdigest()
    live.faults.inject("POST", "/v1/datasets", 503)
    client.upload_dataset(model_files["eval"])
    assert len(live.faults.requests_to("POST", "/v1/datasets")) == 2
    assert len(live.dataset_ids()) == 1


def test_an_upload_whose_connection_never_opened_is_sent_when_the_server_comes_up(
    live: Live, model_files: dict[str, Path]
) -> None:
    port = free_port()
    notices, on_retry = recorder()
    forwarder = threading.Timer(1.5, Forwarder.start, args=(port, live.url))
    forwarder.start()
    try:
        with Client(f"http://127.0.0.1:{port}", live.api_key, backoff=0.25, on_retry=on_retry) as c:
            model = c.upload_model(model_files["pt2"])
    finally:
        forwarder.join()
        Forwarder.stop_all()
    assert live.model_ids() == [model["id"]]
    assert notices and all(n.status is None for n in notices)
    assert notices[0].reason.startswith(f"cannot reach 127.0.0.1:{port} (")


def test_a_delete_is_retried_on_503(
    live: Live, client: Client, model_files: dict[str, Path]
) -> None:
    model = client.upload_model(model_files["pt2"])
    live.faults.inject("DELETE", f"/v1/models/{model['id']}", 503, 503)
    client.delete_model(model["id"])
    assert len(live.faults.requests_to("DELETE", f"/v1/models/{model['id']}")) == 3
    assert live.model_ids() == []


def test_a_delete_whose_answer_was_lost_is_done(
    live: Live, client: Client, model_files: dict[str, Path]
) -> None:
    model = client.upload_model(model_files["pt2"])
    live.faults.lose_response("DELETE", f"/v1/models/{model['id']}")
    client.delete_model(model["id"])  # the retry's 404 means the first attempt deleted it
    assert len(live.faults.requests_to("DELETE", f"/v1/models/{model['id']}")) == 2
    assert live.model_ids() == []
    with pytest.raises(Exception, match="404"):
        client.delete_model(model["id"])  # a plain 404 is still an error


# -- the CLI says what it waits for -----------------------------------------------------


def test_the_cli_says_what_it_waits_for_on_stderr(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    import squish.cli

    real = squish.cli.Client

    def flaky(*args: Any, **kwargs: Any) -> Client:
        return real(*args, **kwargs, transport=Outage(2, "1"))

    monkeypatch.setattr(squish.cli, "Client", flaky)
    result = CliRunner().invoke(
        cli, ["--url", live.url, "--api-key", live.api_key, "methods", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert result.stderr == "database unavailable, retrying in 1 s\u2026\n" * 2
    assert '"quantize.dynamic"' in result.stdout


def test_the_cli_gives_up_on_an_unreachable_server_after_retry_for() -> None:
    start = time.monotonic()
    result = CliRunner().invoke(cli, ["--url", "http://127.0.0.1:9", "--retry-for", "1", "methods"])
    took = time.monotonic() - start
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and took < 5
    # Backoff 0.5 s: one wait fits in 1 s, the next (1 s) would not.
    assert lines[0].startswith("cannot reach 127.0.0.1:9 (")
    assert lines[0].endswith("), retrying in 0.5 s\u2026")
    assert lines[-1].startswith("error: GET http://127.0.0.1:9/v1/methods:")
    assert len(lines) == 2


def test_a_transport_error_is_raised_after_the_budget(live: Live) -> None:
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with (
        Client(f"http://127.0.0.1:{port}", live.api_key, retry_for=1.2, backoff=0.2) as c,
        pytest.raises(TransportError),
    ):
        c.health()
    # Waits of 0.2 + 0.4 fit in 1.2 s; the next (0.8) would not.
    assert time.monotonic() - start < 2.0


# -- a TCP forwarder that starts late ---------------------------------------------------


class Forwarder(socketserver.ThreadingTCPServer):
    """127.0.0.1:port → the live server: the server as it 'comes up' at `start`."""

    daemon_threads = True
    allow_reuse_address = True
    running: list[Forwarder] = []

    def __init__(self, port: int, target_url: str) -> None:
        self.target = httpx.URL(target_url)
        super().__init__(("127.0.0.1", port), _Pipe)

    @classmethod
    def start(cls, port: int, target_url: str) -> None:
        server = cls(port, target_url)
        cls.running.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()

    @classmethod
    def stop_all(cls) -> None:
        while cls.running:
            server = cls.running.pop()
            server.shutdown()
            server.server_close()


class _Pipe(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.server, Forwarder)
        target = self.server.target
        upstream = socket.create_connection((target.host, target.port or 80))
        client: socket.socket = self.request

        def pump(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        back.start()
        pump(client, upstream)
        back.join(timeout=30)
        upstream.close()
