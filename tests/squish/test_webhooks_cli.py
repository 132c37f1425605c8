"""The SDK's and the CLI's webhook commands against the live application: read and rotate the
signing secret, list a job's delivery attempts, verify what a receiver got with the secret."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from squish import Client
from squish.cli import cli
from squish.webhooks import verify
from tests.app.test_webhooks_signed import Receiver, finished_job
from tests.squish.service import Live


def fields(stdout: str) -> list[list[str]]:
    return [line.split(None, 1) for line in stdout.splitlines()]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    hook.thread.start()
    try:
        yield hook
    finally:
        hook.server.shutdown()
        hook.server.server_close()


def test_secret_show_rotate_and_deliveries(
    live: Live, receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.db import session_scope
    from app.keys import get_or_create_tenant
    from worker import tasks

    monkeypatch.delenv("SQUISH_URL", raising=False)
    monkeypatch.delenv("SQUISH_API_KEY", raising=False)
    runner = CliRunner()

    def squish(*args: str) -> Any:
        return runner.invoke(cli, ["--url", live.url, "--api-key", live.api_key, *args])

    with Client(live.url, live.api_key, backoff=0.0) as client:
        shown = squish("webhook-secret", "show", "--json")
        assert shown.exit_code == 0, shown.output
        secret = json.loads(shown.stdout)["secret"]
        assert secret == client.webhook_secret()["secret"]
        assert ["secret", secret] in fields(squish("webhook-secret", "show").stdout)

        rotated = squish("webhook-secret", "rotate")
        assert rotated.exit_code == 0, rotated.output
        new = client.webhook_secret()["secret"]
        assert new != secret and ["secret", new] in fields(rotated.stdout)
        assert "previous signs until" in rotated.stdout
        newer = client.rotate_webhook_secret()
        assert newer["secret"] != new and newer["previous_expires_at"]

        with session_scope() as session:
            tenant_id = get_or_create_tenant(session, "alice").id
        job_id = finished_job(tenant_id, tmp_path, receiver.url)
        none = squish("jobs", "deliveries", job_id)
        assert none.exit_code == 0 and "no webhook delivery attempts" in none.stdout
        assert tasks.deliver_webhook(job_id) == "delivered"
        [(headers, body)] = receiver.requests
        for each in (secret, new, newer["secret"]):  # both rotations are within 24 h
            assert verify(each, headers, body)["job"]["id"] == job_id

        [delivery] = client.list_deliveries(job_id)
        assert delivery["outcome"] == "delivered" and delivery["status_code"] == 204
        listed = squish("jobs", "deliveries", job_id)
        assert listed.exit_code == 0, listed.output
        header, row = listed.stdout.splitlines()
        assert header.split() == ["ATTEMPT", "OUTCOME", "STATUS", "MS", "AT", "ERROR"]
        assert row.split()[:3] == ["1", "delivered", "204"]
        assert json.loads(squish("jobs", "deliveries", job_id, "--json").stdout) == [delivery]
        missing = squish("jobs", "deliveries", "job_nope")
        assert missing.exit_code == 2 and "404" in missing.stderr
