"""Run squish as real processes (API, Celery workers) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

SQUISH = str(Path(sys.executable).with_name("squish"))


class Service:
    def __init__(self, env: dict[str, str], log_dir: Path, port: int, api_key: str) -> None:
        self.env = env
        self.log_dir = log_dir
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.api_key = api_key
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60
        )

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [SQUISH, *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def run(self, *args: str) -> str:
        done = subprocess.run(
            [SQUISH, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} exited: {self.logs(name)}"
            try:
                last = httpx.get(self.url + "/readyz", timeout=5)
                if last.status_code == 200:
                    return
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.3)
        raise AssertionError(f"squish not ready: {last}")

    def logs(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        self.http.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    # --- API helpers -------------------------------------------------------------------
    def upload(self, path: Path, kind: str = "models", **fields: str) -> dict[str, Any]:
        with path.open("rb") as fh:
            response = self.http.post(f"/v1/{kind}", files={"file": (path.name, fh)}, data=fields)
        assert response.status_code == 201, response.text
        return response.json()

    def create_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post("/v1/jobs", json=spec)
        assert response.status_code == 202, response.text
        return response.json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.http.get(f"/v1/jobs/{job_id}").json()

    def wait_job(self, job_id: str, until: set[str], timeout: float = 240) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in until:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still {job.get('status')} ({job.get('stage')}): {job}")

    def wait_model_inspected(self, model_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        model: dict[str, Any] = {}
        while time.monotonic() < deadline:
            model = self.http.get(f"/v1/models/{model_id}").json()
            if model["inspection_status"] != "pending":
                return model
            time.sleep(0.3)
        raise AssertionError(f"model {model_id} not inspected: {model}")
