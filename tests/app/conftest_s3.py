"""pytest plugin: a real S3 endpoint (moto's server) on 127.0.0.1 for the whole session.

Register it once in tests/conftest.py with ``pytest_plugins = ["tests.app.conftest_s3"]``;
then any test can take the ``s3_endpoint`` fixture, ``(endpoint_url, bucket)``. The
server speaks the S3 HTTP API, so boto3 talks to it exactly as to MinIO or AWS.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer

BUCKET = "squish-test"
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never pick up a developer's real profile or config.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[tuple[str, str]]:
    """Start moto's S3 server on a free port, create a bucket, yield ``(endpoint_url, bucket)``."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in FAKE_AWS_ENV.items():
            patch.setenv(name, value)
        for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
            patch.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint_url = f"http://{host}:{port}"
            client = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
        except Exception as exc:
            server.stop()
            pytest.fail(f"the moto S3 server did not come up: {exc!r}")
        try:
            yield endpoint_url, BUCKET
        finally:
            server.stop()
