"""Streaming multipart uploads through a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.uploads import (
    FORM_OVERHEAD_BYTES,
    MAX_FIELD_BYTES,
    UploadError,
    _SpoolFile,
    receive_multipart,
)

MiB = 1 << 20
MAX_BYTES = 4 * MiB
BOUNDARY = "test-boundary-93c1"


def make_app(tmp_dir: Path) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(UploadError)
    async def upload_error(_: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse(
            {"title": exc.title, "status": exc.status, "detail": exc.detail},
            status_code=exc.status,
            media_type="application/problem+json",
        )

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, Any]:
        form = await receive_multipart(request, tmp_dir=tmp_dir, max_bytes=MAX_BYTES)
        assert form.file is not None
        on_disk = form.file.path.read_bytes()
        form.file.path.unlink()  # what a caller does after storing the file
        return {
            "fields": form.fields,
            "filename": form.file.filename,
            "size": form.file.size,
            "sha256": form.file.sha256,
            "disk_sha256": hashlib.sha256(on_disk).hexdigest(),
            "in_tmp_dir": form.file.path.parent == tmp_dir,
        }

    return app


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp_dir = tmp_path_factory.mktemp("uploads")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(tmp_dir), log_level="warning", lifespan="off", ws="none")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", tmp_dir
    srv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def url(server: tuple[str, Path]) -> str:
    return server[0] + "/upload"


@pytest.fixture
def tmp_dir(server: tuple[str, Path]) -> Path:
    return server[1]


def part_header(name: str, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()


def field(name: str, value: str) -> bytes:
    return part_header(name) + value.encode() + b"\r\n"


END = f"--{BOUNDARY}--\r\n".encode()


def blocks(size: int, seed: int = 0) -> Iterator[bytes]:
    """A deterministic pseudo-random file of ``size`` bytes, generated 64 KiB at a time."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048
    for offset in range(0, size, len(block)):
        yield block[: min(len(block), size - offset)]


def file_sha256(size: int, seed: int = 0) -> str:
    digest = hashlib.sha256()
    for chunk in blocks(size, seed):
        digest.update(chunk)
    return digest.hexdigest()


def multipart(
    file_size: int, *, fields: dict[str, str] | None = None, filename: str = "model.pt2"
) -> tuple[Iterator[bytes], int]:
    head = b"".join(field(k, v) for k, v in (fields or {}).items())
    head += part_header("file", filename)
    tail = b"\r\n" + END

    def gen() -> Iterator[bytes]:
        yield head
        yield from blocks(file_size)
        yield tail

    return gen(), len(head) + file_size + len(tail)


def post(
    url: str, body: Iterator[bytes] | bytes, length: int | None, content_type: str | None = None
) -> httpx.Response:
    headers = {"content-type": content_type or f"multipart/form-data; boundary={BOUNDARY}"}
    if length is not None:
        headers["content-length"] = str(length)
    with httpx.Client(timeout=30) as client:
        return client.post(url, content=body, headers=headers)


def assert_empty(tmp_dir: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while list(tmp_dir.iterdir()):
        if time.monotonic() > deadline:
            pytest.fail(f"temporary upload files left behind: {list(tmp_dir.iterdir())}")
        time.sleep(0.02)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_upload_streams_file_with_hash(url: str, tmp_dir: Path, chunked: bool):
    size = 3 * MiB + 12345
    body, length = multipart(size, fields={"name": "resnet", "format": "pt2"})
    response = post(url, body, None if chunked else length)
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["size"] == size
    assert got["sha256"] == file_sha256(size) == got["disk_sha256"]
    assert got["fields"] == {"name": "resnet", "format": "pt2"}
    assert got["filename"] == "model.pt2"
    assert got["in_tmp_dir"]
    assert_empty(tmp_dir)


def test_file_of_exactly_the_limit_is_accepted(url: str):
    body, length = multipart(MAX_BYTES)
    response = post(url, body, length)
    assert response.status_code == 200, response.text
    assert response.json()["size"] == MAX_BYTES


def test_empty_file_and_unnamed_file(url: str):
    body = part_header("file") + b"\r\n" + END
    response = post(url, body, len(body))
    assert response.status_code == 200, response.text
    assert response.json()["size"] == 0
    assert response.json()["filename"] is None
    assert response.json()["sha256"] == hashlib.sha256(b"").hexdigest()


def test_filename_is_reduced_to_its_last_component(url: str):
    body, length = multipart(10, filename="../../etc/passwd")
    assert post(url, body, length).json()["filename"] == "passwd"


def test_413_from_content_length(url: str, tmp_dir: Path):
    body, length = multipart(MAX_BYTES + FORM_OVERHEAD_BYTES + 1)
    response = post(url, body, length)
    assert response.status_code == 413
    assert str(MAX_BYTES) in response.json()["detail"]
    assert_empty(tmp_dir)


def test_413_from_content_length_before_reading_the_body(server: tuple[str, Path]):
    port = int(server[0].rsplit(":", 1)[1])
    request = (
        f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {10 * 1024 * MiB}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)  # and no body at all
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")


def test_413_when_file_exceeds_limit_within_overhead(url: str, tmp_dir: Path):
    body, length = multipart(MAX_BYTES + 1)
    response = post(url, body, length)
    assert response.status_code == 413
    assert_empty(tmp_dir)


def test_413_chunked_counted_while_streaming(url: str, tmp_dir: Path):
    body, _ = multipart(3 * MAX_BYTES)
    response = post(url, body, None)
    assert response.status_code == 413
    assert_empty(tmp_dir)


def test_client_disconnect_mid_upload_leaves_nothing(server: tuple[str, Path], tmp_dir: Path):
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    head = part_header("file", "model.pt2")
    total = len(head) + 3 * MiB + len(END) + 2
    request = (
        f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {total}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request + head)
        for chunk in blocks(1 * MiB):
            sock.sendall(chunk)
        deadline = time.monotonic() + 5
        while not list(tmp_dir.iterdir()):  # the upload is under way
            assert time.monotonic() < deadline, "the server never started writing the file"
            time.sleep(0.01)
    assert_empty(tmp_dir)


def test_507_when_the_disk_is_full(url: str, tmp_dir: Path, monkeypatch: pytest.MonkeyPatch):
    def disk_full(fd: int, views: list[memoryview]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("app.uploads._writev_all", disk_full)
    body, length = multipart(3 * MiB)
    response = post(url, body, length)
    assert response.status_code == 507
    assert_empty(tmp_dir)


def test_400_without_file_part(url: str, tmp_dir: Path):
    body = field("name", "x") + END
    response = post(url, body, len(body))
    assert response.status_code == 400
    assert "'file'" in response.json()["detail"]
    assert_empty(tmp_dir)


def test_400_for_file_under_another_name(url: str):
    body = part_header("model", "m.pt2") + b"data\r\n" + END
    response = post(url, body, len(body))
    assert response.status_code == 400
    assert "'file'" in response.json()["detail"]


def test_400_for_two_file_parts(url: str, tmp_dir: Path):
    body = part_header("file", "a") + b"aaa\r\n" + part_header("file", "b") + b"bbb\r\n" + END
    response = post(url, body, len(body))
    assert response.status_code == 400
    assert "exactly one" in response.json()["detail"]
    assert_empty(tmp_dir)


def test_400_for_truncated_multipart(url: str, tmp_dir: Path):
    body = part_header("file", "m") + os.urandom(1000)  # no closing boundary
    response = post(url, body, len(body))
    assert response.status_code == 400
    assert "closing boundary" in response.json()["detail"]
    assert_empty(tmp_dir)


def test_400_for_garbage_body(url: str, tmp_dir: Path):
    body = b"this is not multipart at all" * 10
    response = post(url, body, len(body))
    assert response.status_code == 400
    assert_empty(tmp_dir)


def test_400_for_huge_text_field(url: str, tmp_dir: Path):
    body = field("name", "n" * (MAX_FIELD_BYTES + 1)) + part_header("file") + b"x\r\n" + END
    response = post(url, body, len(body))
    assert response.status_code == 400
    assert "'name'" in response.json()["detail"]
    assert_empty(tmp_dir)


def test_400_without_boundary(url: str):
    response = post(url, b"x", 1, content_type="multipart/form-data")
    assert response.status_code == 400


def test_415_for_non_multipart_body(url: str, tmp_dir: Path):
    response = post(url, b'{"file": "x"}', 13, content_type="application/json")
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["detail"]
    assert_empty(tmp_dir)


def test_spool_file_many_buffers_and_preallocated_tail(tmp_path: Path):
    # A client that trickles tiny TCP segments yields thousands of views per batch.
    pieces = [bytes([i % 251]) * (i % 7) for i in range(3000)]
    path = tmp_path / "out"
    spool = _SpoolFile(os.open(path, os.O_WRONLY | os.O_CREAT))
    spool.write_batch([memoryview(p) for p in pieces[:1000]])
    spool.write_batch([memoryview(p) for p in pieces[1000:]])
    spool.close()
    assert path.read_bytes() == b"".join(pieces), "the preallocated tail is truncated away"
    assert spool.digest.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()
