"""End to end through real processes: upload, job on a real Celery worker, poll, download.

Each test runs twice: on embedded defaults (`squish serve`) and on PostgreSQL + Redis + S3
with `squish api` and two `squish worker` processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from tests.e2e.service import SQUISH, Service
from tests.factories import (
    digits_arrays,
    digits_npz,
    export_onnx,
    mlp,
    tiny_mlp_onnx,
    tiny_mlp_pt2,
    write_npz,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("redis"),
]  # one worker: shares the Redis database with test_reaper_backoff


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    d = tmp_path_factory.mktemp("e2e-files")
    wide = mlp(hidden=(1024, 1024, 1024), in_features=1024, classes=1024)
    return {
        "pt2": tiny_mlp_pt2(d / "digits.pt2"),
        "onnx": tiny_mlp_onnx(d / "digits.onnx"),
        "npz": digits_npz(d / "digits.npz"),
        "wide": export_onnx(wide, torch.randn(2, 1024), d / "wide.onnx"),
    }


def pipeline(amount: float = 0.5) -> list[dict[str, Any]]:
    return [
        {"method": "prune.magnitude", "params": {"amount": amount}},
        {"method": "quantize.dynamic", "params": {}},
    ]


def slow_spec(model_id: str) -> dict[str, Any]:
    """A job that runs several seconds: latency of a 4M-parameter MLP at batch 256.

    Never answered from the result cache: each one must run.
    """
    return {
        "model_id": model_id,
        "cache": False,
        "pipeline": [{"method": "quantize.dynamic", "params": {}}],
        "evaluate": {"batch_sizes": [256], "warmup": 2, "iterations": 400},
    }


def run_stock(path: Path, fmt: str, x: np.ndarray) -> np.ndarray:
    if fmt == "pt2":
        import torch
        import torchao  # noqa: F401  (registers the quantized ops the program uses)

        module = torch.export.load(str(path)).module()
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_walkthrough(service: Service, files: dict[str, Path], fmt: str, tmp_path: Path) -> None:
    model = service.upload(files[fmt], name=f"digits-{fmt}")
    dataset = service.upload(files["npz"], "datasets", name="digits-test")
    job = service.create_job(
        {
            "model_id": model["id"],
            "pipeline": pipeline(),
            "datasets": {"eval": dataset["id"]},
            "evaluate": {"batch_sizes": [1, 32]},
        }
    )
    assert job["status"] == "queued"
    done = service.wait_job(job["id"], {"succeeded", "failed", "cancelled"})
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["started_at"] and done["finished_at"]

    metrics = done["metrics"]
    original, compressed = metrics["original"], metrics["compressed"]
    for side in (original, compressed):
        for name in (
            "size_bytes",
            "size_bytes_gzip",
            "parameters",
            "nonzero_parameters",
            "sparsity",
            "latency_ms",
            "accuracy",
        ):
            assert name in side, (name, side)
        assert side["latency_ms"]["batch_1"]["p50"] <= side["latency_ms"]["batch_1"]["p95"]
        assert "batch_32" in side["latency_ms"]
    assert compressed["sparsity"] >= 0.45
    assert compressed["size_bytes"] < original["size_bytes"]
    assert abs(compressed["accuracy"] - original["accuracy"]) <= 0.01 + 1e-9
    assert metrics["fidelity"]["top1_agreement"] >= 0.95
    assert metrics["ratios"]["size"] == pytest.approx(
        original["size_bytes"] / compressed["size_bytes"], rel=1e-6
    )
    assert set(metrics["ratios"]["speedup"]) == {"batch_1", "batch_32"}

    artifacts = {a["name"]: a for a in done["artifacts"]}
    assert set(artifacts) >= {"model", "report"}
    assert artifacts["model"]["size_bytes"] == compressed["size_bytes"]
    data = service.http.get(artifacts["model"]["url"]).content
    assert hashlib.sha256(data).hexdigest() == artifacts["model"]["sha256"]
    out = tmp_path / f"compressed.{fmt}"
    out.write_bytes(data)
    _, _, x_test, y_test = digits_arrays()
    accuracy = float((run_stock(out, fmt, x_test).argmax(1) == y_test).mean())
    assert accuracy == pytest.approx(compressed["accuracy"], abs=0.002)
    report = service.http.get(artifacts["report"]["url"]).json()
    assert report["metrics"]["compressed"]["size_bytes"] == compressed["size_bytes"]

    events = service.http.get(f"/v1/jobs/{job['id']}/events").text
    assert "event: status" in events and '"running"' in events and "succeeded" in events
    inspected = service.wait_model_inspected(model["id"])
    assert inspected["inspection_status"] == "ready" and inspected["info"]["parameters"] > 10_000


def test_dataset_that_does_not_fit_fails_the_job_and_keeps_the_data(
    service: Service, files: dict[str, Path], tmp_path: Path
) -> None:
    model = service.upload(files["onnx"])
    wrong = service.upload(
        write_npz(tmp_path / "wrong.npz", np.zeros((8, 32), np.float32)), "datasets"
    )
    job = service.create_job(
        {"model_id": model["id"], "pipeline": pipeline(), "datasets": {"eval": wrong["id"]}}
    )
    done = service.wait_job(job["id"], {"succeeded", "failed"})
    assert done["status"] == "failed"
    assert done["error"]["code"] == "dataset_mismatch"
    assert "32" in done["error"]["message"] and "64" in done["error"]["message"]
    assert (
        service.http.get(f"/v1/models/{model['id']}/content").content == files["onnx"].read_bytes()
    )
    assert service.http.get(f"/v1/datasets/{wrong['id']}").status_code == 200


def test_cancel_stops_a_running_job_within_seconds(
    service: Service, files: dict[str, Path]
) -> None:
    model = service.upload(files["wide"])
    job = service.create_job(slow_spec(model["id"]))
    service.wait_job(job["id"], {"running"}, timeout=60)
    time.sleep(1.0)
    response = service.http.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    cancelled_at = time.monotonic()
    # The worker is free again within seconds: a quick job starts running promptly.
    quick = service.create_job(
        {"model_id": service.upload(files["onnx"])["id"], "pipeline": pipeline()}
    )
    service.wait_job(quick["id"], {"running", "succeeded"}, timeout=30)
    assert time.monotonic() - cancelled_at < 15
    assert service.wait_job(quick["id"], {"succeeded", "failed"})["status"] == "succeeded"
    final = service.job(job["id"])
    assert final["status"] == "cancelled" and final["artifacts"] == []


def test_a_killed_worker_does_not_leave_the_job_running(
    service: Service, files: dict[str, Path]
) -> None:
    model = service.upload(files["wide"])
    job = service.create_job(slow_spec(model["id"]))
    running = service.wait_job(job["id"], {"running"}, timeout=60)
    time.sleep(1.0)
    pid = int(running["worker"].split(":")[1])
    victim = psutil.Process(pid)
    master = victim.parent()
    owner = next((name for name, p in service.procs.items() if p.pid == master.pid), None)
    if owner is not None and owner.startswith("worker"):
        service.kill(owner)  # the whole worker (master and pool process), SIGKILL
    else:
        os.kill(pid, signal.SIGKILL)  # embedded: the pool process running the job
    done = service.wait_job(job["id"], {"succeeded", "failed"}, timeout=240)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    events = service.http.get(f"/v1/jobs/{job['id']}/events").text
    assert "stopped responding" in events


def test_webhook_is_posted_when_the_job_finishes(service: Service, files: dict[str, Path]) -> None:
    received: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        model = service.upload(files["onnx"])
        url = f"http://127.0.0.1:{server.server_port}/hook"
        job = service.create_job(
            {"model_id": model["id"], "pipeline": pipeline(), "webhook_url": url}
        )
        assert service.wait_job(job["id"], {"succeeded", "failed"})["status"] == "succeeded"
        deadline = time.monotonic() + 20
        while not received and time.monotonic() < deadline:
            time.sleep(0.2)
        assert received and received[0]["event"] == "job.succeeded"
        assert received[0]["job"]["id"] == job["id"]
    finally:
        server.shutdown()


def test_sdk_and_cli_against_the_real_service(
    embedded_service: Service, files: dict[str, Path], tmp_path: Path
) -> None:
    import subprocess

    import onnxruntime as ort

    from squish.client import Client

    service = embedded_service
    stages: list[str] = []
    with Client(service.url, api_key=service.api_key) as sq:
        model = sq.upload_model(files["onnx"])
        data = sq.upload_dataset(files["npz"])
        job = sq.create_job(
            model["id"],
            [("prune.magnitude", {"amount": 0.5}), ("quantize.dynamic", {})],
            datasets={"eval": data["id"]},
        )
        done = sq.wait(
            job["id"], poll_interval=0.2, on_progress=lambda j: stages.append(j["status"])
        )
        out = sq.download_artifact(job["id"], "model", tmp_path / "sdk.onnx")
    assert done["status"] == "succeeded" and "running" in stages
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])

    env = dict(service.env, SQUISH_URL=service.url, SQUISH_API_KEY=service.api_key)
    cli_out = tmp_path / "cli.onnx"
    result = subprocess.run(
        [
            SQUISH,
            "compress",
            str(files["onnx"]),
            "--method",
            "prune.magnitude",
            "--param",
            "amount=0.5",
            "--method",
            "quantize.dynamic",
            "--dataset",
            f"eval={files['npz']}",
            "--out",
            str(cli_out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert cli_out.exists() and "accuracy" in result.stdout.lower()
    ort.InferenceSession(str(cli_out), providers=["CPUExecutionProvider"])

    bad = subprocess.run(
        [
            SQUISH,
            "compress",
            str(files["onnx"]),
            "--method",
            "prune.magnitude",
            "--param",
            "amount=1.5",
            "--out",
            str(tmp_path / "x.onnx"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "amount" in (bad.stdout + bad.stderr)
    listed = subprocess.run(
        [SQUISH, "jobs", "list"], env=env, capture_output=True, text=True, check=False
    )
    assert listed.returncode == 0 and job["id"] in listed.stdout
