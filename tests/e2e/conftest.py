"""squish as real processes: embedded (`squish serve`) and production-like (PostgreSQL,
Redis, an S3 endpoint, `squish api` plus two `squish worker` processes)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import POSTGRES_URL, REDIS_URL, free_port, port_open, require
from tests.e2e.service import Service

FAST_RECOVERY = {
    "SQUISH_HEARTBEAT_TIMEOUT_S": "6",
    "SQUISH_HEARTBEAT_INTERVAL_S": "1",
    "SQUISH_REAPER_INTERVAL_S": "0.5",
    "SQUISH_CANCEL_GRACE_S": "3",
    "SQUISH_REQUEUE_AFTER_S": "30",
}


def base_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQUISH_")}
    env.update(FAST_RECOVERY)
    env["SQUISH_DATA_DIR"] = str(data_dir)
    env["TORCHAO_FORCE_SKIP_LOADING_SO_FILES"] = "1"
    env["SQUISH_WEBHOOK_ALLOW_PRIVATE"] = "true"  # the tests' receivers listen on 127.0.0.1
    return env


@pytest.fixture(scope="session")
def embedded_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("embedded")
    port = free_port()
    key = "sq_test_" + secrets.token_hex(16)
    env = base_env(root / "data") | {"SQUISH_PORT": str(port), "SQUISH_API_KEY": key}
    service = Service(env, root, port, key)
    proc = service.spawn("serve", "serve")
    try:
        service.wait_ready()
        yield service
    finally:
        # Ctrl-C: the API and its worker both stop.
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.stop()
            raise AssertionError("squish serve did not stop on SIGINT") from None
        _gone, alive = psutil.wait_procs(children, timeout=15)
        for p in alive:
            p.kill()
        service.http.close()
        assert not alive, f"processes left after Ctrl-C: {alive}"


@pytest.fixture(scope="session")
def production_service(
    tmp_path_factory: pytest.TempPathFactory, s3_endpoint: tuple[str, str]
) -> Iterator[Service]:
    import psycopg
    import redis

    require("PostgreSQL", port_open("127.0.0.1", 5432), "127.0.0.1:5432")
    require("Redis", port_open("127.0.0.1", 6379), "127.0.0.1:6379")
    endpoint, bucket = s3_endpoint
    root = tmp_path_factory.mktemp("production")
    dbname = "squish_e2e_" + secrets.token_hex(4)
    admin_url = (
        POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)[0]
        + "/postgres"
    )
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    redis.Redis.from_url(REDIS_URL).flushdb()
    port = free_port()
    env = base_env(root / "data") | {
        "SQUISH_DATABASE_URL": POSTGRES_URL.rsplit("/", 1)[0] + f"/{dbname}",
        "SQUISH_BROKER_URL": REDIS_URL,
        "SQUISH_STORAGE_URL": f"s3://{bucket}/e2e-{dbname}",
        "SQUISH_S3_ENDPOINT_URL": endpoint,
        "SQUISH_PORT": str(port),
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    service = Service(env, root, port, api_key="")
    service.run("db", "upgrade")
    key = service.run("keys", "create", "--tenant", "prod").strip().splitlines()[-1]
    service = Service(env, root, port, key)
    service.spawn("api", "api")
    service.spawn("worker-1", "worker", "--queues", "cpu", "--name", "w1@%h")
    service.spawn("worker-2", "worker", "--queues", "cpu", "--name", "w2@%h")
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@pytest.fixture(scope="session", params=["embedded", "production"])
def service(request: pytest.FixtureRequest) -> Service:
    return request.getfixturevalue(f"{request.param}_service")
