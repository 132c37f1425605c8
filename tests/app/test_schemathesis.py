"""Schemathesis over the served /openapi.json, on SQLite and on PostgreSQL: generated
requests (valid and invalid ones, random ids and real ones) never get a 5xx, never a
status, content type, header or body the document does not declare, and every event
stream arrives whole. Bounded: about 30 cases per operation, some 550 in all, under 30 s
on each database."""

from __future__ import annotations

import os
import secrets
from collections import Counter
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis

from tests.conftest import reset_caches
from tests.factories import digits_npz, tiny_mlp_onnx

EXAMPLES = {"positive": 15, "seeded": 12, "negative": 10}  # per operation and variant


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)]
)
def configured(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The embedded configuration for the module, on SQLite or on a PostgreSQL database."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("SQUISH_"):
                patch.delenv(name)
        patch.setenv("SQUISH_DATA_DIR", str(tmp_path_factory.mktemp("fuzz") / "data"))
        if request.param == "postgresql":
            from tests.conftest import _empty_tables

            patch.setenv("SQUISH_DATABASE_URL", request.getfixturevalue("postgres_database"))
            reset_caches()
            _empty_tables()
        else:
            reset_caches()
            from app.migrate import upgrade

            upgrade()
        try:
            yield request.param
        finally:
            reset_caches()


@pytest.fixture(scope="module")
def seeded(configured: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A key, a model, a dataset and a finished job with events and an artifact."""
    from sqlalchemy import update

    from app.db import session_scope
    from app.keys import create_key
    from app.main import create_app
    from app.orm import Artifact, Job
    from tests.app.test_api import job_spec

    folder = tmp_path_factory.mktemp("seed")
    with session_scope() as session:
        key = create_key(session, "fuzz")
    from fastapi.testclient import TestClient

    with TestClient(create_app(run_reaper=False)) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        with tiny_mlp_onnx(folder / "m.onnx").open("rb") as fh:
            model = client.post("/v1/models", files={"file": ("m.onnx", fh)}).json()
        with digits_npz(folder / "d.npz").open("rb") as fh:
            dataset = client.post("/v1/datasets", files={"file": ("d.npz", fh)}).json()
        job = client.post("/v1/jobs", json=job_spec(model["id"])).json()
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    with session_scope() as session:  # the uploaded model, published as the job's artifact
        session.execute(update(Job).where(Job.id == job["id"]).values(status="cancelled"))
        session.add(
            Artifact(
                id="art_" + secrets.token_hex(8), job_id=job["id"], name="model",
                filename="m.onnx", media_type="application/octet-stream",
                size_bytes=model["size_bytes"], sha256=model["sha256"],
                storage_key=f"tenants/{key_tenant(key)}/{model['sha256']}",
            )
        )  # fmt: skip
    return {
        "key": key,
        "model_id": model["id"],
        "dataset_id": dataset["id"],
        "job_id": job["id"],
        "name": "model",
    }


def key_tenant(key: str) -> str:
    from app.keys import key_cache

    tenant = key_cache.tenant_for(key)
    assert tenant is not None
    return tenant


@pytest.fixture(scope="module")
def served(seeded: dict[str, str]) -> Iterator[str]:
    from app.main import create_app
    from tests.squish.service import serving

    with serving(create_app(run_reaper=False)) as url:
        yield url


def _sse_is_whole(text: str) -> bool:
    """Every event ends with its blank line, and a stream that ended early says why."""
    if not text.endswith("\n\n"):
        return False
    blocks = [b for b in text.split("\n\n") if b]
    return all(line.partition(":")[0] in ("id", "event", "data", "retry", "")
               for block in blocks for line in block.splitlines())  # fmt: skip


def test_generated_requests_get_declared_answers_and_no_5xx(
    served: str, seeded: dict[str, str]
) -> None:
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json")
    auth = {"Authorization": f"Bearer {seeded['key']}"}
    statuses: Counter[int] = Counter()
    streams = 0

    def check(case: Any) -> None:
        nonlocal streams
        response = case.call(base_url=served, headers=auth, timeout=30)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=checks, headers=auth)
        # schemathesis' headers: each name with the list of its values
        if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
            streams += 1
            assert _sse_is_whole(response.text), response.text[-500:]

    cases = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        params = {p.name for p in operation.path_parameters}
        variants: list[tuple[str, dict[str, Any]]] = [
            ("positive", {}),
            ("negative", {"generation_mode": GenerationMode.NEGATIVE}),
        ]
        if params and operation.method.upper() != "DELETE":  # keep the seeded rows
            variants.append(("seeded", {"path_parameters": {p: seeded[p] for p in params}}))
        for variant, options in variants:

            @settings(
                max_examples=EXAMPLES[variant],
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
                phases=[hypothesis.Phase.generate, hypothesis.Phase.shrink],
            )
            @given(case=operation.as_strategy(**options))
            def run(case: Any) -> None:
                check(case)

            before = sum(statuses.values())
            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                if variant != "negative":  # an operation without input has nothing to negate
                    raise
            cases += sum(statuses.values()) - before
    assert cases >= 300, cases
    assert not [s for s in statuses if s >= 500], statuses
    assert streams > 0 and statuses[404] and statuses[422] and statuses[200], statuses
