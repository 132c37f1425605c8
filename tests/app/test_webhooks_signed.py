"""Signed webhooks: Standard Webhooks signatures checked by `squish.webhooks.verify` on what a
real receiver on 127.0.0.1 got, rotation with its overlap, the delivery log, and the URL guard
(at `POST /v1/jobs` and again before each delivery)."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from squish.webhooks import WebhookVerificationError, signature_headers, verify
from tests.app.test_lifecycle import add_model, cancel, create_job, job_row

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER = "whsec_" + base64.b64encode(b"o" * 32).decode()


# --- squish.webhooks.verify (no server) -------------------------------------------------


def test_verify_accepts_what_sign_made_and_refuses_every_change() -> None:
    body = json.dumps({"event": "job.succeeded", "job": {"id": "job_1"}}).encode()
    now = int(time.time())
    headers = signature_headers([SECRET], "msg_1", now, body)
    assert verify(SECRET, headers, body)["job"]["id"] == "job_1"
    assert verify(SECRET, {k.upper(): v for k, v in headers.items()}, body.decode())["event"]

    refusals = {
        "body": (headers, body.replace(b"succeeded", b"failed")),
        "id": ({**headers, "webhook-id": "msg_2"}, body),
        "timestamp": ({**headers, "webhook-timestamp": str(now + 1)}, body),
        "signature": ({**headers, "webhook-signature": "v1,AAAA"}, body),
        "no signature": ({k: v for k, v in headers.items() if k != "webhook-signature"}, body),
        "not seconds": ({**headers, "webhook-timestamp": "yesterday"}, body),
    }
    for what, (changed, changed_body) in refusals.items():
        with pytest.raises(WebhookVerificationError):
            verify(SECRET, changed, changed_body)
            pytest.fail(f"a changed {what} verified")
    with pytest.raises(WebhookVerificationError, match="another secret"):
        verify(OTHER, headers, body)
    with pytest.raises(WebhookVerificationError, match="replayed"):
        verify(SECRET, headers, body, now=now + 5 * 60 + 1)
    with pytest.raises(WebhookVerificationError, match="replayed"):
        verify(SECRET, headers, body, now=now - 5 * 60 - 1)
    assert verify(SECRET, headers, body, now=now + 5 * 60 - 1)
    with pytest.raises(WebhookVerificationError, match="whsec_"):
        verify("whsec_not base64!", headers, body)

    # Signed with two secrets (a rotation's overlap): either one verifies.
    both = signature_headers([OTHER, SECRET], "msg_1", now, body)
    assert len(both["webhook-signature"].split()) == 2
    assert verify(SECRET, both, body) and verify(OTHER, both, body)


# --- a real receiver --------------------------------------------------------------------


class Receiver:
    """Records each POST's headers and raw body; answers `status`."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.status = 204
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers.items()), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    hook.thread.start()
    try:
        yield hook
    finally:
        hook.server.shutdown()
        hook.server.server_close()


@pytest.fixture
def tenants(embedded: dict[str, str]) -> dict[str, str]:
    """alice's and bob's tenant ids (SQLite, embedded defaults: private addresses allowed)."""
    from app.db import session_scope
    from app.keys import get_or_create_tenant

    with session_scope() as session:
        return {name: get_or_create_tenant(session, name).id for name in ("alice", "bob")}


@pytest.fixture
def api(embedded: dict[str, str], tenants: dict[str, str]) -> Iterator[dict[str, Any]]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(run_reaper=False)) as client:
        yield {name: {"Authorization": f"Bearer {key}"} for name, key in embedded.items()} | {
            "client": client
        }


def finished_job(tenant_id: str, tmp_path: Path, url: str) -> str:
    """A job with a webhook that has just finished (cancelled: no worker needed)."""
    blob = tmp_path / f"model-{time.monotonic_ns()}.onnx"
    blob.write_bytes(b"never run")
    job_id = create_job(tenant_id, add_model(tenant_id, blob), webhook_url=url)
    cancel(job_id)
    return job_id


def allow_private(monkeypatch: pytest.MonkeyPatch, allowed: bool) -> None:
    from app.settings import get_settings

    monkeypatch.setenv("SQUISH_WEBHOOK_ALLOW_PRIVATE", "true" if allowed else "false")
    get_settings.cache_clear()


def test_a_delivery_is_signed_with_the_tenants_secret_and_logged(
    api: dict[str, Any], tenants: dict[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    from worker import tasks

    client = api["client"]
    job_id = finished_job(tenants["alice"], tmp_path, receiver.url)
    assert tasks.deliver_webhook(job_id) == "delivered"

    secret = client.get("/v1/webhook-secret", headers=api["alice"]).json()["secret"]
    assert secret.startswith("whsec_")
    assert client.get("/v1/webhook-secret", headers=api["alice"]).json()["secret"] == secret
    [(headers, body)] = receiver.requests
    event = verify(secret, headers, body)
    assert event["event"] == "job.cancelled" and event["job"]["id"] == job_id
    assert headers["Content-Type"] == "application/json"
    bob_secret = client.get("/v1/webhook-secret", headers=api["bob"]).json()["secret"]
    with pytest.raises(WebhookVerificationError):
        verify(bob_secret, headers, body)  # one tenant's secret does not verify another's

    [delivery] = client.get(f"/v1/jobs/{job_id}/deliveries", headers=api["alice"]).json()["items"]
    assert delivery["webhook_id"] == headers["webhook-id"]
    assert (delivery["event"], delivery["attempt"], delivery["outcome"]) == (
        "job.cancelled",
        1,
        "delivered",
    )
    assert delivery["status_code"] == 204 and delivery["error"] is None
    assert delivery["duration_ms"] >= 0
    # Another tenant's job is not found, as everywhere.
    answer = client.get(f"/v1/jobs/{job_id}/deliveries", headers=api["bob"])
    assert answer.status_code == 404


def test_failed_attempts_are_logged_and_retried_with_the_same_webhook_id(
    api: dict[str, Any], tenants: dict[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    from worker import tasks

    receiver.status = 500
    job_id = finished_job(tenants["alice"], tmp_path, receiver.url)
    assert tasks.deliver_webhook(job_id) == "retrying"
    due = job_row(job_id).webhook_next_at
    assert due is not None
    set_due_now(job_id)
    receiver.status = 200
    assert tasks.deliver_webhook(job_id) == "delivered"
    items = api["client"].get(f"/v1/jobs/{job_id}/deliveries", headers=api["alice"]).json()["items"]
    assert [(d["attempt"], d["outcome"], d["status_code"]) for d in items] == [
        (1, "failed", 500),
        (2, "delivered", 200),
    ]
    assert items[0]["error"] == "HTTP 500"
    ids = {headers["webhook-id"] for headers, _ in receiver.requests}
    assert len(receiver.requests) == 2 and len(ids) == 1  # a retry is the same message


def set_due_now(job_id: str) -> None:
    from app.db import session_scope, utcnow
    from app.orm import Job

    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(webhook_next_at=utcnow()))


def test_a_rotated_secret_keeps_verifying_for_24_hours(
    api: dict[str, Any], tenants: dict[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    from app.db import session_scope, utcnow
    from app.orm import WebhookSecret
    from app.webhook_secrets.service import ROTATION_OVERLAP_S
    from worker import tasks

    client, alice = api["client"], api["alice"]
    old = client.get("/v1/webhook-secret", headers=alice).json()["secret"]
    rotated = client.post("/v1/webhook-secret/rotate", headers=alice)
    assert rotated.status_code == 200
    new = rotated.json()["secret"]
    assert new != old and client.get("/v1/webhook-secret", headers=alice).json()["secret"] == new
    overlap = rotated.json()["previous_expires_at"]
    assert overlap is not None

    first = finished_job(tenants["alice"], tmp_path, receiver.url)
    assert tasks.deliver_webhook(first) == "delivered"
    headers, body = receiver.requests[-1]
    assert len(headers["webhook-signature"].split()) == 2
    assert verify(old, headers, body) and verify(new, headers, body)

    # 24 h later the old secret has expired: deliveries carry the new signature only.
    with session_scope() as session:
        session.execute(
            update(WebhookSecret)
            .where(WebhookSecret.secret == old)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    second = finished_job(tenants["alice"], tmp_path, receiver.url)
    assert tasks.deliver_webhook(second) == "delivered"
    headers, body = receiver.requests[-1]
    assert len(headers["webhook-signature"].split()) == 1
    assert verify(new, headers, body)
    with pytest.raises(WebhookVerificationError):
        verify(old, headers, body)
    assert ROTATION_OVERLAP_S == 24 * 3600


# --- the URL guard ----------------------------------------------------------------------


def job_body(tenant_id: str, tmp_path: Path, url: str) -> dict[str, Any]:
    blob = tmp_path / "m.onnx"
    blob.write_bytes(b"never run")
    return {
        "model_id": add_model(tenant_id, blob),
        "pipeline": [{"method": "quantize.dynamic", "params": {}}],
        "webhook_url": url,
    }


def test_private_webhook_urls_are_refused_at_submission_unless_allowed(
    api: dict[str, Any], tenants: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, alice = api["client"], api["alice"]
    body = job_body(tenants["alice"], tmp_path, "http://localhost:9/hook")
    allow_private(monkeypatch, False)
    refused = {
        "http://localhost:9/hook": "127.0.0.1",  # a name that resolves to loopback
        "http://127.0.0.1:8000/v1/jobs": "loopback",
        "http://10.1.2.3/hook": "private",
        "http://169.254.169.254/latest/meta-data": "link-local",
        "http://[::1]/hook": "loopback",
        "http://[::ffff:192.168.0.1]/hook": "private",
        "http://224.0.0.1/hook": "multicast",
        "http://0.0.0.0/hook": "0.0.0.0",
        "ftp://example.com/hook": "URL scheme",
    }
    for url, words in refused.items():
        answer = client.post("/v1/jobs", headers=alice, json={**body, "webhook_url": url})
        assert answer.status_code == 422, (url, answer.text)
        problem = answer.json()
        assert words in problem["detail"], (url, problem)
        assert problem["errors"][0]["loc"][-1] == "webhook_url"
    assert client.get("/v1/jobs", headers=alice).json()["items"] == []
    # A public address is taken (checked without DNS: an IP literal).
    public = client.post(
        "/v1/jobs", headers=alice, json={**body, "webhook_url": "http://93.184.216.34/h"}
    )
    assert public.status_code == 202, public.text
    # The operator allows private addresses: the same URL is taken.
    allow_private(monkeypatch, True)
    allowed = client.post("/v1/jobs", headers=alice, json=body)
    assert allowed.status_code == 202, allowed.text


def test_the_guard_is_checked_again_before_each_delivery(
    api: dict[str, Any],
    tenants: dict[str, str],
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker import tasks

    # Taken while allowed (or while the name resolved elsewhere), refused when delivered.
    job_id = finished_job(tenants["alice"], tmp_path, f"http://localhost:{receiver.port}/hook")
    allow_private(monkeypatch, False)
    assert tasks.deliver_webhook(job_id) == "retrying"
    assert receiver.requests == []  # nothing was sent
    [attempt] = (
        api["client"].get(f"/v1/jobs/{job_id}/deliveries", headers=api["alice"]).json()["items"]
    )
    assert attempt["outcome"] == "refused" and attempt["status_code"] is None
    assert "not sent" in attempt["error"] and "127.0.0.1" in attempt["error"]


def test_a_delivery_goes_to_the_address_that_was_checked(
    api: dict[str, Any],
    tenants: dict[str, str],
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DNS is asked once per try, by the check; the POST connects to the address it
    approved (a second answer, e.g. a rebinding to an internal address, is never used)."""
    from app import netguard
    from worker import tasks

    real = socket.getaddrinfo
    answers = iter(["127.0.0.1", "10.0.0.9"])  # the second answer would be refused

    def resolve(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.example.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), 0))]
        return real(host, *args, **kwargs)

    job_id = finished_job(
        tenants["alice"], tmp_path, f"http://hooks.example.test:{receiver.port}/h"
    )
    allow_private(monkeypatch, False)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    # This receiver stands in for a public one: its loopback address counts as public here.
    checked = netguard._forbidden
    monkeypatch.setattr(
        netguard, "_forbidden", lambda a: None if str(a) == "127.0.0.1" else checked(a)
    )
    assert tasks.deliver_webhook(job_id) == "delivered"
    [(headers, _body)] = receiver.requests
    assert headers["Host"] == f"hooks.example.test:{receiver.port}"
    pinned = netguard.pin("https://u:p@hooks.example.test:8443/x?y=1", "2001:db8::1")
    assert pinned == netguard.Pinned(
        "https://u:p@[2001:db8::1]:8443/x?y=1", "hooks.example.test:8443", "hooks.example.test"
    )


def test_check_url_refuses_a_host_with_any_private_address() -> None:
    from app.netguard import UrlRefused, UrlUnresolvable, check_url

    def resolver(*addresses: str) -> Any:
        def resolve(host: str, port: int, **_kw: Any) -> list[tuple[Any, ...]]:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

        return resolve

    check_url("https://hooks.example.com/x", allow_private=False, resolve=resolver("93.184.216.34"))
    with pytest.raises(UrlRefused, match=r"10\.0\.0\.7"):
        check_url(
            "https://hooks.example.com/x",
            allow_private=False,
            resolve=resolver("93.184.216.34", "10.0.0.7"),
        )
    with pytest.raises(UrlRefused, match="non-global"):  # shared address space (CGNAT)
        check_url("http://100.64.0.1/", allow_private=False)

    def nxdomain(host: str, port: int, **_kw: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(UrlUnresolvable) as info:
        check_url("http://nowhere.invalid/", allow_private=False, resolve=nxdomain)
    assert not info.value.temporary
    with pytest.raises(UrlRefused, match="scheme"):
        check_url("file:///etc/passwd", allow_private=True)
    check_url("http://127.0.0.1/", allow_private=True)


def test_private_addresses_are_allowed_by_default_only_in_embedded_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.settings import Settings

    monkeypatch.delenv("SQUISH_WEBHOOK_ALLOW_PRIVATE", raising=False)
    assert Settings(broker_url="").webhook_allow_private is True
    assert Settings(broker_url="redis://redis:6379/0").webhook_allow_private is False
    assert (
        Settings(
            broker_url="redis://redis:6379/0", webhook_allow_private=True
        ).webhook_allow_private
        is True
    )
    assert Settings(broker_url="", webhook_allow_private=False).webhook_allow_private is False


def test_secrets_are_made_once_and_rotated_on_both_databases(db: str) -> None:
    """Racing first uses agree on one secret (the partial unique index); a rotation keeps
    the old one signing beside the new one."""
    from sqlalchemy.exc import IntegrityError

    from app.db import session_scope
    from app.errors import Conflict
    from app.keys import get_or_create_tenant
    from app.webhook_secrets import service

    with session_scope() as session:
        tenant_id = get_or_create_tenant(session, "alice").id
    made: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def first_use() -> None:
        try:
            start.wait()
            with session_scope() as session:
                made.append(service.current_secret(session, tenant_id).secret)
        except (IntegrityError, Conflict) as exc:  # the loser of a race may be told to retry
            errors.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with session_scope() as session:
        current = service.current_secret(session, tenant_id).secret
    assert set(made) <= {current} and len(made) + len(errors) == 4

    with session_scope() as session:
        new, expires_at = service.rotate(session, tenant_id)
    assert expires_at is not None and new.secret != current
    with session_scope() as session:
        assert service.signing_secrets(session, tenant_id) == [new.secret, current]
