"""Odd but possible input gets a 4xx that names the problem, on SQLite and on PostgreSQL
alike: NUL bytes (PostgreSQL cannot store them), ids and cursors that cannot be valid,
out-of-range query parameters, multipart bodies the parser refuses. And the client hears
the answer: an early refusal reads the rest of the body instead of resetting the connection.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.app.test_api import assert_problem, job_spec
from tests.factories import digits_npz, tiny_mlp_onnx

NUL = "\x00"
MODEL_ID = "mdl_0192aaaaaaaa0000000000000000"  # the shape of an id, naming nothing


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("files")
    return {"onnx": tiny_mlp_onnx(d / "mlp.onnx"), "npz": digits_npz(d / "digits.npz")}


@pytest.fixture
def api(db: str) -> Iterator[TestClient]:
    """The app on the `db` fixture's database (SQLite, then PostgreSQL), as alice."""
    from app.db import session_scope
    from app.keys import create_key
    from app.main import create_app

    with session_scope() as session:
        key = create_key(session, "alice")
    with TestClient(create_app(run_reaper=False), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        yield client


@pytest.fixture
def stored(api: TestClient, files: dict[str, Path]) -> dict[str, str]:
    """A real model, dataset and job, so that a refusal is not just a 404 in disguise."""
    with files["onnx"].open("rb") as fh:
        model = api.post("/v1/models", files={"file": ("m.onnx", fh)})
    with files["npz"].open("rb") as fh:
        dataset = api.post("/v1/datasets", files={"file": ("d.npz", fh)})
    assert model.status_code == 201 and dataset.status_code == 201, (model.text, dataset.text)
    job = api.post("/v1/jobs", json=job_spec(model.json()["id"]))
    assert job.status_code == 202, job.text
    return {"model": model.json()["id"], "dataset": dataset.json()["id"], "job": job.json()["id"]}


def cursor_of(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


# --- ids and text that the database cannot store or that cannot name anything ---------------

BAD_IDS = {"nul": "%00", "nul-inside": "mdl_%00x", "too-long": "m" * 41, "space": "mdl%20x"}
ID_ROUTES = [
    ("GET", "/v1/models/{id}"),
    ("DELETE", "/v1/models/{id}"),
    ("GET", "/v1/models/{id}/content"),
    ("GET", "/v1/datasets/{id}"),
    ("DELETE", "/v1/datasets/{id}"),
    ("GET", "/v1/datasets/{id}/content"),
    ("GET", "/v1/jobs/{id}"),
    ("POST", "/v1/jobs/{id}/cancel"),
    ("GET", "/v1/jobs/{id}/events"),
    ("GET", "/v1/jobs/{id}/artifacts/model"),
    ("GET", "/v1/jobs/{job}/artifacts/{id}"),
]


@pytest.mark.parametrize("bad", BAD_IDS.values(), ids=BAD_IDS.keys())
@pytest.mark.parametrize(("method", "route"), ID_ROUTES, ids=[f"{m} {r}" for m, r in ID_ROUTES])
def test_an_id_that_cannot_be_valid_is_422(
    api: TestClient, stored: dict[str, str], method: str, route: str, bad: str
) -> None:
    path = route.format(id=bad, job=stored["job"])
    body = assert_problem(api.request(method, path), 422)
    assert body["errors"][0]["loc"][0] == "path", body


@pytest.mark.parametrize("kind", ["models", "datasets"])
def test_a_name_with_nul_is_422_and_stores_nothing(
    api: TestClient, files: dict[str, Path], kind: str
) -> None:
    path = files["onnx" if kind == "models" else "npz"]
    with path.open("rb") as fh:
        answer = api.post(f"/v1/{kind}", files={"file": (path.name, fh)}, data={"name": "a\x00b"})
    body = assert_problem(answer, 422, "NUL")
    assert body["errors"] == [
        {"loc": ["body", "name"], "msg": "text cannot contain NUL (\\u0000) characters",
         "type": "value_error"}
    ]  # fmt: skip
    assert api.get(f"/v1/{kind}").json()["items"] == []


@pytest.mark.parametrize("kind", ["models", "datasets", "jobs"])
@pytest.mark.parametrize(
    "cursor",
    [cursor_of("mdl_\x00"), cursor_of(NUL), cursor_of("x_" + "a" * 40), "x" * 65, "!!!"],
    ids=["nul-after-prefix", "nul", "too-long-id", "too-long", "not-base64"],
)
def test_a_cursor_this_api_did_not_return_is_422(api: TestClient, kind: str, cursor: str) -> None:
    assert_problem(api.get(f"/v1/{kind}", params={"cursor": cursor}), 422, "cursor")


def _spec_with(where: str, stored: dict[str, str]) -> dict[str, Any]:
    spec = job_spec(stored["model"])
    if where == "model_id":
        spec["model_id"] = "mdl_\x00"
    elif where == "dataset":
        spec["datasets"] = {"eval": stored["dataset"] + NUL}
    elif where == "param":
        spec["pipeline"][0]["params"]["exclude"] = ["fc\x00"]
    elif where == "model-ref-param":
        spec["pipeline"] = [{"method": "distill", "params": {"teacher_model_id": "mdl_\x00"}}]
    elif where == "method":
        spec["pipeline"][0]["method"] = "prune.magnitude\x00"
    return spec


@pytest.mark.parametrize("where", ["model_id", "dataset", "param", "model-ref-param", "method"])
def test_nul_inside_a_job_spec_is_422_and_creates_nothing(
    api: TestClient, stored: dict[str, str], where: str
) -> None:
    body = assert_problem(api.post("/v1/jobs", json=_spec_with(where, stored)), 422)
    assert body["errors"], body
    assert [j["id"] for j in api.get("/v1/jobs").json()["items"]] == [stored["job"]]


# --- query parameters and headers out of range -----------------------------------------------


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ({"after": 10**30}, {}),
        ({"after": 2**63}, {}),
        ({"after": -1}, {}),
        ({"after": "x"}, {}),
        ({}, {"Last-Event-ID": str(2**63)}),
        ({}, {"Last-Event-ID": "-5"}),
        ({}, {"Last-Event-ID": "abc"}),
        ({}, {"Last-Event-ID": "9" * 30}),
    ],
    ids=["after-1e30", "after-2^63", "after-negative", "after-text", "leid-2^63", "leid-negative",
         "leid-text", "leid-30-digits"],
)  # fmt: skip
def test_an_event_position_out_of_range_is_422_before_the_stream(
    api: TestClient, stored: dict[str, str], query: dict[str, Any], headers: dict[str, str]
) -> None:
    answer = api.get(f"/v1/jobs/{stored['job']}/events", params=query, headers=headers)
    assert_problem(answer, 422)


def test_the_largest_event_position_is_a_stream_that_ends(
    api: TestClient, stored: dict[str, str]
) -> None:
    from sqlalchemy import update

    from app.db import session_scope
    from app.orm import Job

    with session_scope() as session:
        session.execute(update(Job).where(Job.id == stored["job"]).values(status="cancelled"))
    answer = api.get(f"/v1/jobs/{stored['job']}/events", params={"after": 2**63 - 1})
    assert answer.status_code == 200, answer.text
    assert answer.text == "retry: 1000\n\n"


@pytest.mark.parametrize("limit", [0, -1, 201, 10**30, "many"])
@pytest.mark.parametrize("kind", ["models", "datasets", "jobs"])
def test_a_limit_out_of_range_is_422(api: TestClient, kind: str, limit: Any) -> None:
    assert_problem(api.get(f"/v1/{kind}", params={"limit": limit}), 422, "limit")


def test_an_idempotency_key_with_control_characters_is_422(
    api: TestClient, stored: dict[str, str]
) -> None:
    answer = api.post(
        "/v1/jobs", json=job_spec(stored["model"]), headers={"Idempotency-Key": "a\tb"}
    )
    assert_problem(answer, 422, "idempotency")


# --- multipart bodies the parser refuses -----------------------------------------------------


def _part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"Content-Disposition: {disposition}\r\n\r\n".encode() + value


def multipart(boundary: str, *parts: bytes) -> bytes:
    sep = f"--{boundary}\r\n".encode()
    body = b"".join(sep + part + b"\r\n" for part in parts)
    return body + f"--{boundary}--\r\n".encode()


ONNX_PART = _part("file", b"\x08\x07" * 8, "m.onnx")
BOUNDARY = "squishtestboundary"
MALFORMED = {
    "boundary-2000": (
        {"boundary": "b" * 2000},
        multipart("b" * 2000, ONNX_PART),
        400,
        "boundary",
    ),
    "no-boundary": ({"boundary": None}, b"--x--\r\n", 400, "boundary"),
    "too-many-parts": (
        {},
        multipart(BOUNDARY, *[_part(f"f{i}", b"v") for i in range(19)], ONNX_PART),
        400,
        "too many form parts",
    ),
    "empty-part": ({}, multipart(BOUNDARY, b"", ONNX_PART), 400, "content-disposition"),
    "empty-parts-only": ({}, multipart(BOUNDARY, b"", b""), 400, "content-disposition"),
    "no-file-part": ({}, multipart(BOUNDARY, _part("name", b"x")), 400, "no file part"),
    "no-parts": ({}, f"--{BOUNDARY}--\r\n".encode(), 400, "no file part"),
    "empty-body": ({}, b"", 400, "closing boundary"),
    "unterminated": ({}, multipart(BOUNDARY, ONNX_PART)[:-30], 400, "closing boundary"),
    "empty-file": ({}, multipart(BOUNDARY, _part("file", b"", "m.onnx")), 422, "empty"),
    "two-files": ({}, multipart(BOUNDARY, ONNX_PART, ONNX_PART), 400, "exactly one file"),
    "field-4kb": (
        {},
        multipart(BOUNDARY, _part("name", b"n" * 5000), ONNX_PART),
        400,
        "longer than",
    ),
    "not-multipart": ({"type": "application/json"}, b"{}", 415, "multipart/form-data"),
}


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("kind", ["models", "datasets"])
def test_a_multipart_body_the_parser_refuses_is_4xx_naming_the_problem(
    api: TestClient, kind: str, case: tuple[dict[str, Any], bytes, int, str]
) -> None:
    options, body, status, words = case
    content_type = options.get("type", "multipart/form-data")
    boundary = options.get("boundary", BOUNDARY)
    if content_type.startswith("multipart") and boundary is not None:
        content_type += f"; boundary={boundary}"
    answer = api.post(f"/v1/{kind}", content=body, headers={"Content-Type": content_type})
    if kind == "datasets" and words == "empty":
        words = "empty"  # the dataset check says "the dataset file is empty"
    assert_problem(answer, status, words)
    assert api.get(f"/v1/{kind}").json()["items"] == []


# --- the client hears the answer: no connection reset ----------------------------------------


@pytest.fixture
def served(embedded: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The app under uvicorn on a free port (resets happen between real sockets only)."""
    monkeypatch.setenv("SQUISH_MAX_UPLOAD_BYTES", str(16 << 20))
    from app.main import create_app
    from app.settings import get_settings
    from tests.squish.service import serving

    get_settings.cache_clear()
    with serving(create_app(run_reaper=False)) as url:
        yield url


BIG = 8 << 20  # far more than the socket buffers hold: the server must read it to answer


def _early_answers(key: str) -> dict[str, tuple[dict[str, str], bytes, int]]:
    multi = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    auth = {"Authorization": f"Bearer {key}"}
    return {
        "no-key": (multi, multipart(BOUNDARY, _part("file", b"x" * BIG, "m.onnx")), 401),
        "field-too-long": (
            {**multi, **auth},
            multipart(BOUNDARY, _part("name", b"n" * BIG), ONNX_PART),
            400,
        ),
        "too-many-parts": (
            {**multi, **auth},
            multipart(BOUNDARY, *[_part(f"f{i}", b"v") for i in range(20)], b"x" * BIG),
            400,
        ),
        "too-large": (
            {**multi, **auth},
            multipart(BOUNDARY, _part("file", b"x" * (20 << 20), "m.onnx")),
            413,
        ),
        "not-multipart": ({"Content-Type": "text/plain", **auth}, b"x" * BIG, 415),
        "boundary-2000": (
            {"Content-Type": f"multipart/form-data; boundary={'b' * 2000}", **auth},
            multipart("b" * 2000, _part("file", b"x" * BIG, "m.onnx")),
            400,
        ),
    }


@pytest.mark.parametrize("case", ["no-key", "field-too-long", "too-many-parts", "too-large",
                                  "not-multipart", "boundary-2000"])  # fmt: skip
def test_an_early_refusal_reaches_the_client_instead_of_a_reset(
    served: str, embedded: dict[str, str], case: str
) -> None:
    headers, body, status = _early_answers(embedded["alice"])[case]
    for attempt in range(3):  # a reset is a race: give it several chances to show
        answer = httpx.post(f"{served}/v1/models", content=body, headers=headers, timeout=30)
        assert answer.status_code == status, (attempt, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"


def test_a_huge_declared_body_is_refused_at_once_without_reading_it(served: str) -> None:
    """Content-Length past the drain bound: answered at once, and the connection closed."""
    host, port = served.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 10737418240\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nExpect: 100-continue\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 401"), answer[:200]
    assert b"connection: close" in head
