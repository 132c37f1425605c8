"""Upload throughput and server memory: one large multipart upload through uvicorn.

A tiny FastAPI app that only calls ``app.uploads.receive_multipart`` runs in its
own uvicorn process (uvloop + httptools, as in production) on 127.0.0.1; the
client streams a generated file from a generator with httpx, and a sampler
thread records the server's RSS with psutil every 10 ms.

    python -m benchmarks.upload --size-mib 1024
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.uploads import UploadError, receive_multipart

REPO_ROOT = Path(__file__).resolve().parent.parent
BOUNDARY = "squish-bench-boundary-7f3a9c"
BLOCK = 1 << 20


def create_app(tmp_dir: Path, max_bytes: int) -> FastAPI:
    """The measured app: receive the upload, answer with what was received, drop the file."""
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/upload")
    async def upload(request: Request) -> JSONResponse:
        try:
            form = await receive_multipart(request, tmp_dir=tmp_dir, max_bytes=max_bytes)
        except UploadError as exc:
            return JSONResponse(
                {"title": exc.title, "status": exc.status, "detail": exc.detail},
                status_code=exc.status,
            )
        assert form.file is not None
        form.file.path.unlink()
        return JSONResponse({"size": form.file.size, "sha256": form.file.sha256})

    return app


def _serve(port: int, tmp_dir: Path, max_bytes: int) -> None:
    import uvicorn

    uvicorn.run(
        create_app(tmp_dir, max_bytes),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pattern() -> bytes:
    return os.urandom(BLOCK)


def multipart_body(size_bytes: int, block: bytes) -> tuple[bytes, bytes]:
    """The bytes around the file content for one ``file`` part and a ``name`` field."""
    head = (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="name"\r\n\r\n'
        "bench\r\n"
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="file"; filename="bench.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    return head, tail


def file_chunks(size_bytes: int, block: bytes) -> Iterator[bytes]:
    full, rest = divmod(size_bytes, len(block))
    for _ in range(full):
        yield block
    if rest:
        yield block[:rest]


def expected_sha256(size_bytes: int, block: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in file_chunks(size_bytes, block):
        digest.update(chunk)
    return digest.hexdigest()


def _cpu_seconds(times: Any) -> float:
    return float(times.user + times.system)


class _RssSampler(threading.Thread):
    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


def _upload(client: httpx.Client, url: str, size_bytes: int, block: bytes, chunked: bool) -> Any:
    head, tail = multipart_body(size_bytes, block)

    def body() -> Iterator[bytes]:
        yield head
        yield from file_chunks(size_bytes, block)
        yield tail

    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    if not chunked:
        headers["content-length"] = str(len(head) + size_bytes + len(tail))
    response = client.post(url, content=body(), headers=headers)
    response.raise_for_status()
    return response.json()


def bench_upload(size_bytes: int, *, chunked: bool = False) -> dict[str, Any]:
    """Upload ``size_bytes`` through a fresh uvicorn server; MB/s and server RSS growth."""
    block = _pattern()
    want_sha = expected_sha256(size_bytes, block)
    tmp_dir = Path(tempfile.mkdtemp(prefix="squish-bench-upload-"))
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.upload",
            "--serve",
            str(port),
            "--tmp-dir",
            str(tmp_dir),
            "--max-bytes",
            str(size_bytes),
        ],
        cwd=REPO_ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=httpx.Timeout(600.0, connect=5.0)) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if client.get(f"{base}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("benchmark upload server did not start")
                time.sleep(0.05)
            # Warm up: lazy imports and first-request allocations are not upload cost.
            _upload(client, f"{base}/upload", 8 * BLOCK, block, chunked)
            sampler = _RssSampler(server.pid)
            baseline = sampler.process.memory_info().rss
            server_cpu_before = sampler.process.cpu_times()
            client_cpu_before = psutil.Process().cpu_times()
            sampler.start()
            started = time.perf_counter()
            result = _upload(client, f"{base}/upload", size_bytes, block, chunked)
            seconds = time.perf_counter() - started
            peak = sampler.stop()
            server_cpu = _cpu_seconds(sampler.process.cpu_times()) - _cpu_seconds(server_cpu_before)
            client_cpu = _cpu_seconds(psutil.Process().cpu_times()) - _cpu_seconds(
                client_cpu_before
            )
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {
        "size_bytes": size_bytes,
        "chunked": chunked,
        "seconds": round(seconds, 3),
        "mb_per_s": round(size_bytes / seconds / 1e6, 1),
        "mib_per_s": round(size_bytes / seconds / (1 << 20), 1),
        "server_rss_baseline_bytes": baseline,
        "server_rss_peak_bytes": peak,
        "server_rss_growth_bytes": peak - baseline,
        "server_rss_growth_mib": round((peak - baseline) / (1 << 20), 1),
        "server_cpu_s": round(server_cpu, 2),
        "client_cpu_s": round(client_cpu, 2),
        "cpus": os.cpu_count(),
        "sha256_ok": result["sha256"] == want_sha and result["size"] == size_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--chunked", action="store_true", help="no Content-Length")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--tmp-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--max-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve, args.tmp_dir, args.max_bytes)
        return
    print(json.dumps(bench_upload(args.size_mib << 20, chunked=args.chunked), indent=2))


if __name__ == "__main__":
    main()
