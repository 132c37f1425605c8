"""Benchmarks of the squish service, run as real processes on 127.0.0.1.

Each benchmark starts what it measures (``squish serve``, ``squish api``, ``squish worker``)
on a free port, in its own temporary data directory and process group, and stops all of it
in a ``finally`` — also when the benchmark fails. Every figure returned is measured here;
nothing is estimated.

- :func:`bench_service_upload`: one large ``.npz`` through ``POST /v1/datasets`` of
  ``squish api`` on embedded defaults; MB/s and the API process's RSS growth.
- :func:`bench_pickup_embedded` / :func:`bench_pickup_production`: ``POST /v1/jobs`` →
  ``running`` on an idle worker, from the job's own ``created_at`` / ``started_at``.
- :func:`bench_get`: ``GET /v1/jobs/{id}`` under N keep-alive connections against
  PostgreSQL (``wrk`` when on PATH, else a multiprocess asyncio load generator).
- :func:`bench_e2e`: a ≥ 10 s ``quantize.dynamic`` job through ``squish serve`` against
  the same pipeline called in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
TERMINAL = {"succeeded", "failed", "cancelled"}

POSTGRES_SERVER_URL = os.environ.get(
    "SQUISH_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432"
).rstrip("/")
REDIS_URL = os.environ.get("SQUISH_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")

PRUNE_JOB: dict[str, Any] = {
    "pipeline": [{"method": "prune.magnitude", "params": {"amount": 0.3}}],
    "evaluate": {"batch_sizes": [1], "warmup": 0, "iterations": 1},
}


class BenchError(RuntimeError):
    """A benchmark could not measure what it was asked to (the message says why)."""


def _squish_bin() -> str:
    sibling = Path(sys.executable).with_name("squish")
    if sibling.exists():
        return str(sibling)
    found = shutil.which("squish")
    if not found:
        raise BenchError("the `squish` console script is not installed (run `make install`)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def ts(value: str) -> float:
    """A server timestamp (ISO 8601) as POSIX seconds."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def base_env(data_dir: Path, port: int | None, **extra: str) -> dict[str, str]:
    """The environment of a squish process: no inherited SQUISH_*, torchao's .so skipped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQUISH_")}
    env["TORCHAO_FORCE_SKIP_LOADING_SO_FILES"] = "1"
    env["SQUISH_DATA_DIR"] = str(data_dir)
    env["SQUISH_HOST"] = "127.0.0.1"
    if port is not None:
        env["SQUISH_PORT"] = str(port)
    env.update(extra)
    return env


# --- processes -----------------------------------------------------------------------------


class Processes:
    """Processes this benchmark started, each the leader of its own process group."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        if name in self.procs:
            raise BenchError(f"process {name!r} is already running")
        with (self.log_dir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                args,
                env=env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def logs(self, name: str, tail: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode}:\n{self.logs(name)}")

    def stop(self, name: str, timeout: float = 20) -> None:
        """SIGTERM the process group, wait, then SIGKILL whatever of the group is left."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
        # Children (uvicorn workers, Celery pool processes) share the group: none outlives it.
        _kill_group(proc)

    def kill(self, name: str) -> None:
        """SIGKILL the process group at once, as a machine losing the process would."""
        proc = self.procs.pop(name, None)
        if proc is not None:
            _kill_group(proc)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


class Service:
    """One running squish (its processes) and an authenticated client for it."""

    def __init__(self, procs: Processes, port: int, api_key: str) -> None:
        self.procs = procs
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.api_key = api_key
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(600.0, connect=10.0),
        )

    def close(self) -> None:
        self.http.close()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            self.procs.check_alive()
            try:
                last = httpx.get(self.url + "/readyz", timeout=5)
                if last.status_code == 200:
                    return
                last = f"{last.status_code} {last.text[:300]}"
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.2)
        raise BenchError(f"squish at {self.url} not ready after {timeout:.0f}s: {last}")

    def upload(self, path: Path, kind: str, **fields: str) -> dict[str, Any]:
        with path.open("rb") as fh:
            response = self.http.post(
                f"/v1/{kind}",
                files={"file": (path.name, fh, "application/octet-stream")},
                data=fields,
            )
        if response.status_code != 201:
            raise BenchError(
                f"upload of {path.name} answered {response.status_code}: {response.text[:500]}"
            )
        return dict(response.json())

    def create_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post("/v1/jobs", json=spec)
        if response.status_code != 202:
            raise BenchError(
                f"POST /v1/jobs answered {response.status_code}: {response.text[:500]}"
            )
        return dict(response.json())

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/jobs/{job_id}")
        response.raise_for_status()
        return dict(response.json())

    def wait_job(self, job_id: str, poll_s: float, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in TERMINAL:
                if job["status"] != "succeeded":
                    raise BenchError(f"job {job_id} {job['status']}: {job.get('error')}")
                return job
            time.sleep(poll_s)
        raise BenchError(
            f"job {job_id} still {job.get('status')} ({job.get('stage')}) after {timeout:.0f}s"
        )

    def wait_model_inspected(self, model_id: str, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        model: dict[str, Any] = {}
        while time.monotonic() < deadline:
            model = self.http.get(f"/v1/models/{model_id}").json()
            if model["inspection_status"] != "pending":
                if model["inspection_status"] != "ready":
                    raise BenchError(
                        f"model {model_id} inspection: {model.get('inspection_error')}"
                    )
                return model
            time.sleep(0.1)
        raise BenchError(f"model {model_id} still pending inspection after {timeout:.0f}s")


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"squish-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def embedded_serve(root: Path, key: str | None = None) -> Iterator[Service]:
    """``squish serve`` (API + Celery worker, SQLite, folder broker, local objects) with its
    data in ``root/data`` (a second start on the same ``root`` finds what the first left)."""
    procs = Processes(root)
    port = free_port()
    key = key or "sq_bench_" + secrets.token_hex(16)
    env = base_env(root / "data", port, SQUISH_API_KEY=key)
    service = Service(procs, port, key)
    try:
        procs.spawn("serve", [_squish_bin(), "serve"], env)
        service.wait_ready()
        yield service
    finally:
        service.close()
        procs.stop_all()


class ProductionStack:
    """PostgreSQL (a fresh database, dropped at the end) + Redis + a local object folder;
    ``squish api`` and ``squish worker`` processes started on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs = Processes(root)
        self.dbname = "squish_bench_" + secrets.token_hex(4)
        self.admin_url = (
            POSTGRES_SERVER_URL.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
        )
        self.env: dict[str, str] = {}
        self.api_key = ""
        self.service: Service | None = None
        self._created = False

    @staticmethod
    def unavailable() -> str | None:
        from urllib.parse import urlsplit

        pg = urlsplit(POSTGRES_SERVER_URL.replace("postgresql+psycopg", "postgresql"))
        rd = urlsplit(REDIS_URL)
        if not port_open(pg.hostname or "127.0.0.1", pg.port or 5432):
            return f"PostgreSQL not reachable at {pg.hostname}:{pg.port}"
        if not port_open(rd.hostname or "127.0.0.1", rd.port or 6379):
            return f"Redis not reachable at {rd.hostname}:{rd.port}"
        return None

    def __enter__(self) -> ProductionStack:
        import psycopg
        import redis

        try:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.dbname}"')
            self._created = True
            redis.Redis.from_url(REDIS_URL).flushdb()
            self.env = base_env(
                self.root / "data",
                None,
                SQUISH_DATABASE_URL=f"{POSTGRES_SERVER_URL}/{self.dbname}",
                SQUISH_BROKER_URL=REDIS_URL,
                SQUISH_STORAGE_URL=f"file://{self.root / 'objects'}",
            )
            self._run("db", "upgrade")
            self.api_key = self._run("keys", "create", "--tenant", "bench").strip().splitlines()[-1]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _run(self, *args: str) -> str:
        done = subprocess.run(
            [_squish_bin(), *args],
            env=self.env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if done.returncode != 0:
            raise BenchError(f"squish {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def start_api(self, workers: int = 1) -> Service:
        self.stop_api()
        port = free_port()
        env = dict(self.env, SQUISH_PORT=str(port))
        self.procs.spawn("api", [_squish_bin(), "api", "--workers", str(workers)], env)
        self.service = Service(self.procs, port, self.api_key)
        self.service.wait_ready()
        return self.service

    def stop_api(self) -> None:
        if self.service is not None:
            self.service.close()
            self.service = None
        self.procs.stop("api")

    def start_worker(self, name: str = "worker") -> None:
        """A ``squish worker`` on the cpu queue (concurrency 1), as process ``name``."""
        self.procs.spawn(
            name, [_squish_bin(), "worker", "--queues", "cpu", "--name", f"{name}@%h"], self.env
        )

    def stop_worker(self, name: str = "worker") -> None:
        self.procs.stop(name)

    def __exit__(self, *exc: object) -> None:
        import psycopg
        import redis

        try:
            if self.service is not None:
                self.service.close()
            self.procs.stop_all()
        finally:
            if self._created:
                with psycopg.connect(self.admin_url, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
                with contextlib.suppress(Exception):
                    redis.Redis.from_url(REDIS_URL).flushdb()


class CpuWatch:
    """Where the host's CPU went during a measurement: all cores, and processes that are
    neither this benchmark (this process and its descendants) nor PostgreSQL — another
    workload on a shared machine skews every figure, so the results say how much there was."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.host0 = psutil.cpu_times()
        self.procs0 = self._snapshot()

    @staticmethod
    def _snapshot() -> dict[int, tuple[str, float]]:
        out: dict[int, tuple[str, float]] = {}
        for proc in psutil.process_iter(["name"]):
            with contextlib.suppress(psutil.Error):
                out[proc.pid] = (proc.info["name"] or "?", _cpu_s(proc))
        return out

    def result(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        host1 = psutil.cpu_times()
        busy = sum(
            getattr(host1, f) - getattr(self.host0, f)
            for f in ("user", "system", "nice", "irq", "softirq", "steal")
            if hasattr(host1, f)
        )
        ours = {os.getpid()}
        with contextlib.suppress(psutil.Error):
            ours |= {p.pid for p in psutil.Process().children(recursive=True)}
        others: dict[str, float] = {}
        for pid, (name, cpu1) in self._snapshot().items():
            if pid in ours or name.startswith("postgres") or pid not in self.procs0:
                continue
            delta = cpu1 - self.procs0[pid][1]
            if delta > 0:
                others[name] = others.get(name, 0.0) + delta
        top = sorted(others.items(), key=lambda kv: -kv[1])[:3]
        steal = getattr(host1, "steal", 0.0) - getattr(self.host0, "steal", 0.0)
        return {
            "wall_s": round(wall, 2),
            "host_busy_cores": round(busy / wall, 2),
            "steal_cores": round(steal / wall, 2),
            "other_processes_cores": round(sum(others.values()) / wall, 2),
            "other_processes_top": {
                name: round(cpu / wall, 2) for name, cpu in top if cpu / wall >= 0.01
            },
            "cpus": psutil.cpu_count(),
        }


def cpu_note(watch: dict[str, Any]) -> str:
    """One line for the table: how busy the host was and how much of it was not ours."""
    top = ", ".join(f"{k} {v}" for k, v in watch["other_processes_top"].items())
    steal = (
        f", VM steal {watch['steal_cores']} cores" if watch.get("steal_cores", 0) >= 0.05 else ""
    )
    shared = "SHARED HOST: " if watch["other_processes_cores"] >= 0.25 else ""
    return (
        f"{shared}host busy {watch['host_busy_cores']}/{watch['cpus']} cores, other workloads "
        f"{watch['other_processes_cores']} cores" + (f" ({top})" if top else "") + steal
    )


# --- 1. upload ------------------------------------------------------------------------------


def write_npz_dataset(path: Path, size_bytes: int, features: int = 1024) -> dict[str, Any]:
    """A valid ``.npz`` of about ``size_bytes``: float32 ``inputs [rows, features]`` and
    int64 ``labels [rows]``, streamed to disk in 4 MiB blocks (never whole in memory)."""
    rows = max(1, (size_bytes - 4096) // (features * 4 + 8))
    block_rows = max(1, (4 * MiB) // (features * 4))
    block = np.random.default_rng(0).standard_normal((block_rows, features), dtype=np.float32)
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
        "fortran_order": False,
        "shape": (rows, features),
    }
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("inputs.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_1_0(fh, header)
            left = rows
            while left:
                n = min(left, block_rows)
                fh.write(block[:n].tobytes())
                left -= n
        with zf.open("labels.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, (np.arange(rows) % 10).astype(np.int64))
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 * MiB):
            digest.update(chunk)
    return {
        "rows": rows,
        "features": features,
        "size_bytes": path.stat().st_size,
        "sha256": digest.hexdigest(),
    }


class RssSampler(threading.Thread):
    """Peak RSS of one process, sampled every ``interval_s``."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.process.memory_info().rss)
                self.samples += 1
            self._stop_event.wait(self.interval_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def bench_service_upload(size_bytes: int) -> dict[str, Any]:
    """Stream a ~``size_bytes`` ``.npz`` from a file object through ``POST /v1/datasets``."""
    with workdir("upload") as root:
        data = root / "bench.npz"
        t0 = time.perf_counter()
        written = write_npz_dataset(data, size_bytes)
        write_s = time.perf_counter() - t0
        warm = root / "warmup.npz"
        write_npz_dataset(warm, 1 * MiB)
        procs = Processes(root)
        port = free_port()
        key = "sq_bench_" + secrets.token_hex(16)
        env = base_env(root / "data", port, SQUISH_API_KEY=key)
        service = Service(procs, port, key)
        try:
            api = procs.spawn("api", [_squish_bin(), "api", "--migrate"], env)
            service.wait_ready()
            # Warm up: lazy imports and first-request allocations are not upload cost.
            service.upload(warm, "datasets", name="warmup")
            sampler = RssSampler(api.pid, 0.02)
            server = sampler.process
            baseline = server.memory_info().rss
            server_cpu0, client_cpu0 = _cpu_s(server), _cpu_s(psutil.Process())
            sampler.start()
            watch = CpuWatch()
            started = time.perf_counter()
            with data.open("rb") as fh:
                response = service.http.post(
                    "/v1/datasets",
                    files={"file": (data.name, fh, "application/octet-stream")},
                    data={"name": "bench-upload"},
                )
            seconds = time.perf_counter() - started
            peak = sampler.stop()
            cpu = watch.result()
            server_cpu = _cpu_s(server) - server_cpu0
            client_cpu = _cpu_s(psutil.Process()) - client_cpu0
            if response.status_code != 201:
                raise BenchError(
                    f"POST /v1/datasets answered {response.status_code}: {response.text[:500]}"
                )
            body = response.json()
        finally:
            service.close()
            procs.stop_all()
    return {
        "endpoint": "POST /v1/datasets",
        "server": "squish api (1 process), embedded defaults",
        "size_bytes": written["size_bytes"],
        "arrays": {"inputs": [written["rows"], written["features"]], "labels": [written["rows"]]},
        "file_write_s": round(write_s, 2),
        "seconds": round(seconds, 3),
        "mb_per_s": round(written["size_bytes"] / seconds / 1e6, 1),
        "server_rss_baseline_bytes": baseline,
        "server_rss_peak_bytes": peak,
        "server_rss_growth_bytes": peak - baseline,
        "server_rss_growth_mib": round((peak - baseline) / MiB, 1),
        "rss_samples": sampler.samples,
        "rss_interval_s": 0.02,
        "server_cpu_s": round(server_cpu, 2),
        "client_cpu_s": round(client_cpu, 2),
        "host_cpu": cpu,
        "sha256_ok": body.get("sha256") == written["sha256"]
        and body.get("size_bytes") == written["size_bytes"],
    }


def bench_raw_upload(size_bytes: int) -> dict[str, Any]:
    """``benchmarks.upload.bench_upload``: the multipart parser alone, in a minimal app."""
    from benchmarks.upload import bench_upload

    return bench_upload(size_bytes)


# --- 2. job pickup ---------------------------------------------------------------------------


def tiny_onnx(path: Path) -> Path:
    from tests.factories import tiny_mlp_onnx

    return tiny_mlp_onnx(path)


def measure_pickup(
    service: Service, model_path: Path, jobs: int, gap_s: float = 0.5
) -> dict[str, Any]:
    """Sequential prune jobs on an idle worker: ``started_at - created_at`` of each."""
    model = service.upload(model_path, "models", name="bench-tiny")
    service.wait_model_inspected(model["id"])
    time.sleep(gap_s)
    latencies: list[float] = []
    job_id = ""
    watch = CpuWatch()
    for _ in range(jobs):
        job = service.create_job({"model_id": model["id"], **PRUNE_JOB})
        done = service.wait_job(job["id"], poll_s=0.1)
        latencies.append(ts(done["started_at"]) - ts(done["created_at"]))
        job_id = done["id"]
        time.sleep(gap_s)  # the task has returned and acked: the worker is idle again
    return {
        "jobs": jobs,
        "p50_s": round(percentile(latencies, 50), 4),
        "p95_s": round(percentile(latencies, 95), 4),
        "min_s": round(min(latencies), 4),
        "max_s": round(max(latencies), 4),
        "samples_s": [round(x, 4) for x in latencies],
        "gap_between_jobs_s": gap_s,
        "host_cpu": watch.result(),
        "last_job_id": job_id,
        "model_id": model["id"],
    }


def bench_pickup_embedded(jobs: int) -> dict[str, Any]:
    with workdir("pickup-embedded") as root:
        model_path = tiny_onnx(root / "tiny.onnx")
        with embedded_serve(root) as service:
            result = measure_pickup(service, model_path, jobs)
    result["topology"] = "squish serve: SQLite, folder broker, local objects, 1 worker"
    return result


def bench_pickup_production(stack: ProductionStack, jobs: int) -> dict[str, Any]:
    model_path = tiny_onnx(stack.root / "tiny.onnx")
    service = stack.start_api(1)
    stack.start_worker()
    try:
        result = measure_pickup(service, model_path, jobs)
    finally:
        stack.stop_worker()
        stack.stop_api()
    result["topology"] = "squish api + 1 squish worker: PostgreSQL, Redis, local objects"
    return result


# --- 3. GET /v1/jobs/{id} under load -----------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise BenchError(f"cannot read wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)\s*$", out, re.M)
        if m:
            result[f"p{pct}_ms"] = round(_ms(m.group(1)), 3)
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if m:
        result["requests"] = int(m.group(1))
        result["duration_s"] = round(_ms(m.group(2) + m.group(3)) / 1e3, 3)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        result["req_per_s"] = round(float(m.group(1)), 1)
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    if "req_per_s" not in result or "p99_ms" not in result:
        raise BenchError(f"could not parse wrk output:\n{out}")
    return result


def load_wrk(
    url: str, api_key: str, connections: int, duration_s: float, threads: int
) -> dict[str, Any]:
    argv = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
        "--latency", "--timeout", "5s", "-H", f"Authorization: Bearer {api_key}", url,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    result = parse_wrk(done.stdout)
    result["generator"] = f"wrk ({threads} thread{'s' if threads > 1 else ''})"
    return result


def _py_load_worker(
    port: int, path: str, api_key: str, connections: int, duration_s: float, queue: Any
) -> None:
    """One load process: ``connections`` keep-alive HTTP/1.1 connections, closed loop."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {api_key}\r\nAccept: application/json\r\n\r\n"
    ).encode()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0

    async def one_connection(end: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if m is None:
                    raise BenchError("response without Content-Length")
                await reader.readexactly(int(m.group(1)))
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
        finally:
            writer.close()

    async def main() -> None:
        end = time.perf_counter() + duration_s
        await asyncio.gather(*(one_connection(end) for _ in range(connections)))

    asyncio.run(main())
    queue.put((np.asarray(latencies, dtype=np.float64).tobytes(), statuses, errors))


def load_python(
    port: int, path: str, api_key: str, connections: int, duration_s: float, processes: int
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    per = [
        connections // processes + (1 if i < connections % processes else 0)
        for i in range(processes)
    ]
    workers = [
        ctx.Process(
            target=_py_load_worker, args=(port, path, api_key, n, duration_s, queue), daemon=True
        )
        for n in per
        if n
    ]
    started = time.perf_counter()
    for w in workers:
        w.start()
    try:
        parts = [queue.get(timeout=duration_s + 60) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
    elapsed = time.perf_counter() - started
    lat = np.concatenate([np.frombuffer(p[0], dtype=np.float64) for p in parts]) * 1e3
    statuses: dict[int, int] = {}
    for p in parts:
        for code, n in p[1].items():
            statuses[code] = statuses.get(code, 0) + n
    requests = int(lat.size)
    return {
        "generator": f"python asyncio, {len(workers)} processes (wrk not on PATH)",
        "requests": requests,
        "duration_s": round(duration_s, 3),
        "wall_s_with_process_start": round(elapsed, 3),
        "req_per_s": round(requests / duration_s, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3) if requests else None,
        "p90_ms": round(float(np.percentile(lat, 90)), 3) if requests else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 3) if requests else None,
        "non_2xx": sum(n for code, n in statuses.items() if not 200 <= code < 400),
        "socket_errors": sum(p[2] for p in parts),
    }


def run_load(
    service: Service, path: str, connections: int, duration_s: float, generator: str
) -> dict[str, Any]:
    use_wrk = generator == "wrk" or (generator == "auto" and shutil.which("wrk"))
    if generator == "wrk" and not shutil.which("wrk"):
        raise BenchError("--load-generator wrk, but wrk is not on PATH")
    if use_wrk:
        return load_wrk(service.url + path, service.api_key, connections, duration_s, threads=1)
    return load_python(service.port, path, service.api_key, connections, duration_s, processes=2)


def prepare_job(stack: ProductionStack, job_id: str | None) -> str:
    """A finished job to read (metrics and artifacts included): the given one, or a new one."""
    if job_id:
        return job_id
    model_path = tiny_onnx(stack.root / "tiny-get.onnx")
    service = stack.start_api(1)
    stack.start_worker()
    try:
        model = service.upload(model_path, "models", name="bench-get")
        service.wait_model_inspected(model["id"])
        job = service.create_job({"model_id": model["id"], **PRUNE_JOB})
        return str(service.wait_job(job["id"], poll_s=0.1)["id"])
    finally:
        stack.stop_worker()
        stack.stop_api()


def bench_get(
    stack: ProductionStack,
    job_id: str,
    api_workers: int,
    connections: int,
    duration_s: float,
    generator: str,
) -> dict[str, Any]:
    """``GET /v1/jobs/{id}`` with ``squish api --workers N`` on PostgreSQL; no worker running."""
    service = stack.start_api(api_workers)
    path = f"/v1/jobs/{job_id}"
    try:
        response = service.http.get(path)
        if response.status_code != 200:
            raise BenchError(f"GET {path} answered {response.status_code}: {response.text[:300]}")
        body_bytes = len(response.content)
        # Warm-up (not reported): every API process opens its pool and fills its caches.
        run_load(service, path, connections, min(2.0, duration_s), generator)
        api = psutil.Process(stack.procs.procs["api"].pid)
        group = [api, *api.children(recursive=True)]
        cpu0 = sum(_cpu_s(p) for p in group)
        watch = CpuWatch()
        result = run_load(service, path, connections, duration_s, generator)
        result["api_cpu_s"] = round(sum(_cpu_s(p) for p in group) - cpu0, 2)
        result["host_cpu"] = watch.result()
        if result["requests"]:
            result["api_cpu_ms_per_request"] = round(
                result["api_cpu_s"] * 1e3 / result["requests"], 3
            )
    finally:
        stack.stop_api()
    result.update(
        {
            "api_workers": api_workers,
            "connections": connections,
            "job_id": job_id,
            "response_bytes": body_bytes,
        }
    )
    return result


# --- 4. end-to-end overhead --------------------------------------------------------------------


def _run_in_process(model_path: Path, spec: Any, work: Path) -> tuple[float, Any]:
    from worker.context import NullReporter
    from worker.pipeline import run_pipeline

    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    result = run_pipeline(
        model_path, "onnx", spec, datasets={}, work_dir=work, reporter=NullReporter()
    )
    return time.perf_counter() - t0, result


def _latency_mean_s(metrics: dict[str, Any], key: str) -> float:
    return (
        float(metrics["original"]["latency_ms"][key]["mean"])
        + float(metrics["compressed"]["latency_ms"][key]["mean"])
    ) / 1e3


def bench_e2e(
    target_s: float = 12.0,
    hidden: tuple[int, ...] = (1024, 1024, 1024),
    features: int = 1024,
    classes: int = 1024,
    batch: int = 256,
    warmup: int = 2,
    calibration_iterations: int = 10,
) -> dict[str, Any]:
    """A ``quantize.dynamic`` job through ``squish serve`` vs the same pipeline in-process.

    1. A short calibration job through the service gives the normalized spec (every
       default filled in) and the cost of one timed iteration; the iteration count is
       chosen so that the pipeline takes about ``target_s``.
    2. In-process run A1, service job B, in-process run A2; the ratio divides B by the
       mean of A1 and A2, so that drift of the host's speed during the benchmark favours
       neither side. The service stays up, idle, during A1 and A2 (an idle ``squish
       serve`` uses well under 1 % of a core), so that B finds its worker warm.
    """
    import torch

    from tests.factories import export_onnx, mlp
    from worker.pipeline import PipelineSpec

    key = f"batch_{batch}"
    with workdir("e2e") as root:
        model_path = export_onnx(
            mlp(hidden=hidden, in_features=features, classes=classes),
            torch.randn(2, features),
            root / "e2e.onnx",
        )
        step = {"method": "quantize.dynamic", "params": {}}

        def body(model_id: str, iterations: int) -> dict[str, Any]:
            return {
                "model_id": model_id,
                "pipeline": [step],
                "evaluate": {"batch_sizes": [batch], "warmup": warmup, "iterations": iterations},
            }

        with embedded_serve(root / "serve") as service:
            model = service.upload(model_path, "models", name="bench-e2e")
            service.wait_model_inspected(model["id"])
            cal_job = service.create_job(body(model["id"], calibration_iterations))
            cal = service.wait_job(cal_job["id"], poll_s=0.2, timeout=600)
            per_iter = _latency_mean_s(cal["metrics"], key)
            cal_run_s = ts(cal["finished_at"]) - ts(cal["started_at"])
            fixed = max(0.0, cal_run_s - per_iter * (calibration_iterations + warmup))
            iterations = int(min(10_000, max(1, math.ceil((target_s - fixed) / per_iter))))

            spec = cal["spec"]
            steps = [(s["method"], s["params"]) for s in spec["pipeline"]]
            pipeline_spec = PipelineSpec(
                steps=steps,
                output_format=spec["output_format"],
                device=spec["target"]["device"],
                batch_sizes=list(spec["evaluate"]["batch_sizes"]),
                warmup=int(spec["evaluate"]["warmup"]),
                iterations=iterations,
            )
            local: list[dict[str, Any]] = []

            def in_process(tag: str) -> None:
                watch = CpuWatch()
                seconds, result = _run_in_process(model_path, pipeline_spec, root / tag)
                report_s = float(json.loads(result.report_path.read_text())["seconds"])
                local.append(
                    {
                        "run": tag,
                        "seconds": round(seconds, 3),
                        "pipeline_s": round(report_s, 3),
                        "latency_ms": {
                            "original": result.metrics["original"]["latency_ms"][key],
                            "compressed": result.metrics["compressed"]["latency_ms"][key],
                        },
                        "host_cpu": watch.result(),
                    }
                )

            in_process("A1")
            time.sleep(0.5)
            watch = CpuWatch()
            t0 = time.perf_counter()
            job = service.create_job(body(model["id"], iterations))
            done = service.wait_job(job["id"], poll_s=0.2, timeout=600)
            client_s = time.perf_counter() - t0
            service_cpu = watch.result()
            report = service.http.get(f"/v1/jobs/{job['id']}/artifacts/report")
            report.raise_for_status()
            worker_pipeline_s = float(report.json()["seconds"])
            if [(s["method"], s["params"]) for s in done["spec"]["pipeline"]] != steps:
                raise BenchError(
                    f"the job's normalized pipeline changed: {done['spec']['pipeline']}"
                )
            in_process("A2")

    local_s = sum(run["seconds"] for run in local) / len(local)
    server_s = ts(done["finished_at"]) - ts(done["created_at"])
    return {
        "model": f"MLP {features}->{'->'.join(map(str, hidden))}->{classes} "
        f"(ONNX, {model['size_bytes'] / MiB:.1f} MiB)",
        "steps": [[m, p] for m, p in steps],
        "batch_sizes": pipeline_spec.batch_sizes,
        "warmup": pipeline_spec.warmup,
        "iterations": iterations,
        "calibration": {
            "job_id": cal["id"],
            "iterations": calibration_iterations,
            "run_s": round(cal_run_s, 3),
            "per_iteration_s": round(per_iter, 5),
            "fixed_s": round(fixed, 3),
        },
        "job_id": done["id"],
        "service_s": round(server_s, 3),
        "service_queue_s": round(ts(done["started_at"]) - ts(done["created_at"]), 3),
        "service_run_s": round(ts(done["finished_at"]) - ts(done["started_at"]), 3),
        "service_pipeline_s": round(worker_pipeline_s, 3),
        "client_s": round(client_s, 3),
        "in_process_runs": local,
        "in_process_s": round(local_s, 3),
        "in_process_spread": round(
            (max(r["seconds"] for r in local) - min(r["seconds"] for r in local)) / local_s, 3
        ),
        "ratio_server": round(server_s / local_s, 4),
        "ratio_client": round(client_s / local_s, 4),
        "host_cpu_service_run": service_cpu,
        "latency_ms_service": {
            "original": done["metrics"]["original"]["latency_ms"][key],
            "compressed": done["metrics"]["compressed"]["latency_ms"][key],
        },
    }


# --- result cache: POST -> succeeded for a spec answered from the cache ------------------------


def bench_cache(rounds: int) -> dict[str, Any]:
    """``squish serve``: one job runs, then ``rounds`` alternating pairs of the same spec
    answered from the cache and run afresh (``"cache": false``), each timed from the POST
    to a GET that reads ``succeeded``; each cached job is checked to have run nowhere."""
    with workdir("cache") as root:
        model_path = tiny_onnx(root / "tiny.onnx")
        with embedded_serve(root) as service:
            model = service.upload(model_path, "models", name="bench-cache")
            service.wait_model_inspected(model["id"])
            spec = {"model_id": model["id"], **PRUNE_JOB}
            source = service.wait_job(service.create_job(spec)["id"], poll_s=0.05)
            ran = {source["id"]}  # a cached job answers from the latest that ran
            cached_s: list[float] = []
            fresh_s: list[float] = []
            post_s: list[float] = []
            proofs: list[bool] = []
            for _ in range(rounds):
                for cache in (True, False):
                    t0 = time.perf_counter()
                    response = service.http.post("/v1/jobs", json={**spec, "cache": cache})
                    posted = time.perf_counter() - t0
                    if response.status_code != 202:
                        raise BenchError(f"POST /v1/jobs answered {response.status_code}")
                    job = service.wait_job(response.json()["id"], poll_s=0.01)
                    elapsed = time.perf_counter() - t0
                    if not cache:
                        fresh_s.append(elapsed)
                        ran.add(job["id"])
                        continue
                    cached_s.append(elapsed)
                    post_s.append(posted)
                    events = service.http.get(
                        f"/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"}
                    ).text
                    proofs.append(
                        job["cached_from"] in ran
                        and job["attempts"] == 0
                        and job["started_at"] == job["finished_at"]
                        and events.count("event: ") == 1
                        and "served from cache" in events
                    )
    return {
        "rounds": rounds,
        "cached_p50_s": round(percentile(cached_s, 50), 4),
        "cached_p95_s": round(percentile(cached_s, 95), 4),
        "cached_max_s": round(max(cached_s), 4),
        "cached_post_p50_s": round(percentile(post_s, 50), 4),
        "fresh_p50_s": round(percentile(fresh_s, 50), 4),
        "fresh_min_s": round(min(fresh_s), 4),
        "ratio_fresh_over_cached_p50": round(percentile(fresh_s, 50) / percentile(cached_s, 50), 1),
        "cached_samples_s": [round(x, 4) for x in cached_s],
        "fresh_samples_s": [round(x, 4) for x in fresh_s],
        "nothing_ran": all(proofs),
        "topology": "squish serve: SQLite, folder broker, local objects, 1 worker",
    }
