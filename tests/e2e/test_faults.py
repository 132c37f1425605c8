"""Outages on real processes: `squish api` and `squish worker` on a private PostgreSQL
cluster (started by this module with initdb, on a free port), an S3 endpoint (moto, behind
a port this module takes down), the folder broker. 127.0.0.1 only, bounded in time and
traffic; the machine's shared PostgreSQL is never touched.

- PostgreSQL stopped for 20 s under polling and submitting clients: every answer is 200/202
  or 503 with Retry-After naming the database, none is 500 or a cut connection; the API
  recovers without a restart; no job is lost; the SDK waits the outage out.
- The S3 endpoint down during an upload and during a job's artifact upload: the upload
  answers 503 and leaves nothing; the job waits 25 s and more for storage and succeeds
  without computing again.
- 10 SIGKILLs of the worker mid-job: the folders they leave are gone once the worker is
  back, and every job succeeds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, require
from tests.e2e.conftest import base_env
from tests.e2e.outages import Endpoint, PrivatePostgres, postgres_bin
from tests.e2e.service import Service
from tests.e2e.test_service import slow_spec
from tests.factories import export_onnx, mlp, tiny_mlp_onnx
from worker.measurement.timing_lock import LOCK_FILES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("faults"),
]  # one worker: it times private servers' outages

BUCKET = "squish-faults"
QUICK = {"batch_sizes": [1], "warmup": 0, "iterations": 1}
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Faulty:
    """The service and the dependencies this module takes down."""

    service: Service
    postgres: PrivatePostgres
    s3: Endpoint
    s3_client: Any
    work_dir: Path
    workers: int = 0
    events: list[str] = field(default_factory=list)

    def start_worker(self) -> None:
        self.workers += 1
        self.service.spawn("worker", "worker", "--queues", "cpu", "--name", f"w{self.workers}@%h")

    def objects(self) -> set[str]:
        listed = self.s3_client.list_objects_v2(Bucket=BUCKET)
        return {item["Key"] for item in listed.get("Contents", [])}


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    import boto3
    from moto.server import ThreadedMotoServer

    require("PostgreSQL server programs", bool(postgres_bin("initdb") and postgres_bin("pg_ctl")))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's line per request
    if os.geteuid() == 0:
        require("runuser (to run PostgreSQL as its own user)", bool(shutil.which("runuser")))
    root = tmp_path_factory.mktemp("faults")
    postgres = PrivatePostgres()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    aws = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    service: Service | None = None
    try:
        postgres.init()
        moto.start()
        s3 = Endpoint(moto.get_host_and_port())
        s3.start()
        s3_client = boto3.client(
            "s3", endpoint_url=s3.url, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip
        s3_client.create_bucket(Bucket=BUCKET)
        port = free_port()
        env = base_env(root / "data") | aws | {
            "SQUISH_DATABASE_URL": postgres.url,
            "SQUISH_STORAGE_URL": f"s3://{BUCKET}",
            "SQUISH_S3_ENDPOINT_URL": s3.url,
            "SQUISH_PORT": str(port),
            "SQUISH_WORK_DIR": str(root / "work"),
            "SQUISH_WORK_SWEEP_INTERVAL_S": "2",
            "SQUISH_MAX_ATTEMPTS": "20",  # the SIGKILL test kills some jobs several times
        }  # fmt: skip
        setup = Service(env, root, port, api_key="")
        setup.run("db", "upgrade")
        key = setup.run("keys", "create", "--tenant", "faults").strip().splitlines()[-1]
        service = Service(env, root, port, key)
        faulty = Faulty(service, postgres, s3, s3_client, root / "work")
        service.spawn("api", "api")
        faulty.start_worker()
        service.wait_ready()
        yield faulty
    finally:
        if service is not None:
            service.stop()
        postgres.remove()
        moto.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    d = tmp_path_factory.mktemp("fault-files")
    wide = mlp(hidden=(1024, 1024, 1024), in_features=1024, classes=1024)
    return {
        "onnx": tiny_mlp_onnx(d / "digits.onnx"),
        "late": tiny_mlp_onnx(d / "late.onnx", trained=False),
        "wide": export_onnx(wide, torch.randn(2, 1024), d / "wide.onnx"),
    }


def quick_spec(model_id: str) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "pipeline": [{"method": "quantize.dynamic", "params": {}}],
        "evaluate": QUICK,
    }


@dataclass
class Answer:
    at: float
    what: str
    status: int | None  # None: no answer (connection refused, reset, timed out)
    retry_after: str | None = None
    detail: str = ""
    error: str = ""


class Traffic:
    """Clients polling and submitting in threads, each answer recorded with its time."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.answers: list[Answer] = []
        self.accepted: dict[str, str] = {}  # Idempotency-Key -> job id
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _send(
        self, http: httpx.Client, what: str, method: str, path: str, **kw: Any
    ) -> tuple[Answer, Any]:
        at = time.monotonic()
        body: Any = None
        try:
            response = http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            answer = Answer(at, what, None, error=f"{type(exc).__name__}: {exc}")
        else:
            body = response.json()
            detail = str(body.get("detail", "")) if response.is_error else ""
            retry_after = response.headers.get("Retry-After")
            answer = Answer(at, what, response.status_code, retry_after, detail)
        with self._lock:
            self.answers.append(answer)
        return answer, body

    def _client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.service.api_key}"}
        return httpx.Client(base_url=self.service.url, headers=headers, timeout=30)

    def poll(self, job_id: str, every: float = 0.25) -> None:
        def run() -> None:
            with self._client() as http:
                while not self.stopped.wait(every):
                    self._send(http, "poll", "GET", f"/v1/jobs/{job_id}")
                    self._send(http, "list", "GET", "/v1/jobs", params={"limit": 5})

        self._start(run)

    def submit(self, spec: dict[str, Any], every: float = 2.0) -> None:
        """A new job every `every` s; a 503 is answered by sending the same key again."""

        def run() -> None:
            with self._client() as http:
                while not self.stopped.wait(every):
                    key = uuid.uuid4().hex
                    for _ in range(60):
                        answer, job = self._send(http, "submit", "POST", "/v1/jobs", json=spec,
                                                 headers={"Idempotency-Key": key})  # fmt: skip
                        if answer.status in (200, 202):
                            self.accepted[key] = job["id"]
                            break
                        time.sleep(1.0)

        self._start(run)

    def _start(self, target: Any) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self.stopped.set()
        for thread in self._threads:
            thread.join(timeout=90)

    def between(self, start: float, end: float) -> list[Answer]:
        return [a for a in self.answers if start <= a.at < end]


def wait_until(predicate: Any, timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def job_events(faulty: Faulty, job_id: str) -> list[str]:
    """The job's event messages as the database holds them (the stream would wait for more)."""
    import psycopg

    url = faulty.postgres.url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT message FROM job_event WHERE job_id = %s ORDER BY id", (job_id,)
        ).fetchall()
    return [row[0] for row in rows]


# --- PostgreSQL -----------------------------------------------------------------------------


def test_a_database_outage_answers_503_and_loses_no_job(
    faulty: Faulty, files: dict[str, Path]
) -> None:
    from squish import Client, RetryNotice

    service = faulty.service
    api_pid = service.procs["api"].pid
    earlier = {j["id"] for j in service.http.get("/v1/jobs", params={"limit": 100}).json()["items"]}
    model = service.upload(files["onnx"])
    wide = service.upload(files["wide"])
    running = service.create_job(slow_spec(wide["id"]))  # runs through the outage
    service.wait_job(running["id"], {"running"}, timeout=90)
    traffic = Traffic(service)
    traffic.poll(running["id"])
    traffic.submit(quick_spec(model["id"]))
    time.sleep(3)

    notices: list[RetryNotice] = []
    sdk_job: dict[str, Any] = {}

    def sdk_submit() -> None:
        with Client(service.url, service.api_key, retry_for=90, on_retry=notices.append) as sq:
            sdk_job.update(sq.create_job(model["id"], [("quantize.dynamic", {})], evaluate=QUICK))

    down = time.monotonic()
    faulty.postgres.stop()
    sdk = threading.Thread(target=sdk_submit, daemon=True)
    time.sleep(2)
    sdk.start()
    time.sleep(18)  # 20 s down
    up = time.monotonic()
    faulty.postgres.start()
    faulty.events.append(f"postgres down {up - down:.1f} s")
    sdk.join(timeout=90)
    time.sleep(8)
    traffic.stop()
    end = time.monotonic()

    answers = traffic.answers
    unanswered = [a for a in answers if a.status is None]
    assert not unanswered, unanswered[:5]  # every request got an answer
    statuses = {a.status for a in answers}
    assert statuses <= {200, 202, 503}, statuses
    unavailable = [a for a in answers if a.status == 503]
    during = traffic.between(down + 1, up)
    assert len(during) >= 20 and all(a.status == 503 for a in during)
    assert all(a.retry_after and a.retry_after.isdigit() for a in unavailable)
    assert all(a.detail.startswith("database unavailable") for a in unavailable)
    # Recovered without a restart: the same API process answers again within seconds.
    recovered_at = min(a.at for a in answers if a.at > up and a.status == 200)
    assert recovered_at - up < 10
    assert all(a.status in (200, 202) for a in traffic.between(recovered_at + 2, end))
    assert service.procs["api"].pid == api_pid and service.procs["api"].poll() is None

    # The SDK waited the outage out, saying why; its job was created once.
    assert sdk_job and notices and all(n.reason == "database unavailable" for n in notices)
    # No job lost: each accepted submission is one job, and every job finishes.
    listed = service.http.get("/v1/jobs", params={"limit": 100}).json()["items"]
    items = [item for item in listed if item["id"] not in earlier]
    expected = {running["id"], sdk_job["id"], *traffic.accepted.values()}
    assert {item["id"] for item in items} == expected
    assert len(expected) == 2 + len(traffic.accepted)
    for item in items:
        done = service.wait_job(item["id"], TERMINAL, timeout=240)
        assert done["status"] == "succeeded", done
    # The job running through the outage was not started again.
    assert service.job(running["id"])["attempts"] == 1
    print(
        f"database outage {up - down:.1f} s: {len(answers)} answers, {len(unavailable)} x 503, "
        f"0 x 500, 0 unanswered; recovered {recovered_at - up:.1f} s after the restart; "
        f"{len(items)} jobs, all succeeded; SDK waited {len(notices)} times"
    )


# --- S3 -------------------------------------------------------------------------------------


def test_a_storage_outage_answers_503_and_the_job_waits_it_out(
    faulty: Faulty, files: dict[str, Path], tmp_path: Path
) -> None:
    service = faulty.service
    wide = service.upload(files["wide"])
    before = faulty.objects()
    job = service.create_job(slow_spec(wide["id"]))
    wait_until(lambda: service.job(job["id"])["stage"] == "measure", 180, "the job to measure")

    # An upload under way when the endpoint goes down: the API answers, and keeps nothing.
    upload: dict[str, Any] = {}
    body = files["late"].read_bytes()

    def slow_upload() -> None:
        boundary = secrets.token_hex(8)
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"late.onnx\"\r\nContent-Type: application/octet-stream\r\n\r\n")  # fmt: skip

        def chunks() -> Iterator[bytes]:
            yield head.encode()
            for i in range(0, len(body), 4096):
                yield body[i : i + 4096]
                time.sleep(2.0 / (len(body) / 4096))  # about 2 s in all
            yield f"\r\n--{boundary}--\r\n".encode()

        with httpx.Client(timeout=120) as http:
            response = http.post(
                f"{service.url}/v1/models", content=chunks(),
                headers={"Authorization": f"Bearer {service.api_key}",
                         "Content-Type": f"multipart/form-data; boundary={boundary}"},
            )  # fmt: skip
        upload.update(status=response.status_code, headers=dict(response.headers),
                      body=response.json())  # fmt: skip

    uploader = threading.Thread(target=slow_upload, daemon=True)
    uploader.start()
    time.sleep(0.5)
    down = time.monotonic()
    faulty.s3.stop()
    uploader.join(timeout=120)
    assert upload["status"] == 503, upload
    assert upload["headers"]["retry-after"].isdigit()
    assert upload["body"]["detail"].startswith("object storage unavailable")
    content = service.http.get(f"/v1/models/{wide['id']}/content")
    assert content.status_code == 503 and content.headers["retry-after"].isdigit()
    assert service.http.get(f"/v1/jobs/{job['id']}").status_code == 200  # the database is up

    # The job reaches its artifact upload while storage is down, and waits.
    def waiting_for_storage() -> bool:
        return any(
            message.startswith("object storage unavailable while storing")
            for message in job_events(faulty, job["id"])
        )

    wait_until(waiting_for_storage, 180, "the worker to wait for storage")
    first_wait = time.monotonic()
    time.sleep(25)  # 25 s of the worker's upload failing
    assert service.job(job["id"])["status"] == "running"
    up = time.monotonic()
    faulty.s3.start()
    done = service.wait_job(job["id"], TERMINAL, timeout=120)
    succeeded = time.monotonic()
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1  # not computed again
    events = job_events(faulty, job["id"])
    assert events.count("stage: load") == 1  # the engine ran once
    waits = [e for e in events if e.startswith("object storage unavailable")]
    assert len(waits) >= 3
    artifact = next(a for a in done["artifacts"] if a["name"] == "model")
    data = service.http.get(artifact["url"]).content
    assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
    # The upload during the outage left no model and no object.
    listed = service.http.get("/v1/models", params={"limit": 100}).json()["items"]
    assert "late.onnx" not in [m["name"] for m in listed]
    stored = faulty.objects()
    assert not any(hashlib.sha256(body).hexdigest() in key for key in stored)
    new_objects = stored - before  # the job's artifacts only
    assert new_objects and all(
        any(a["sha256"] in key for a in done["artifacts"]) for key in new_objects
    )
    print(
        f"storage outage {up - down:.1f} s (the job's upload failing for {up - first_wait:.1f} s,"
        f" {len(waits)} waits): upload 503, content 503, job succeeded"
        f" {succeeded - up:.1f} s after storage came back, attempt 1"
    )


# --- SIGKILL --------------------------------------------------------------------------------


def test_ten_sigkills_mid_job_leave_no_work_folder_once_the_worker_is_back(
    faulty: Faulty, files: dict[str, Path]
) -> None:
    service = faulty.service
    wide = service.upload(files["wide"])
    jobs = [service.create_job(slow_spec(wide["id"])) for _ in range(4)]
    leaked_per_kill = []
    for _kill in range(10):
        running, pid = wait_running(service, [j["id"] for j in jobs], timeout=180)
        inputs = f"squish-job-{running}-{pid}/input.onnx"
        wait_until(
            lambda inputs=inputs: any(faulty.work_dir.glob(inputs)),
            60,
            "the inputs in the job's folder",
        )
        time.sleep(1.0)
        service.kill("worker")  # SIGKILL, master and pool process
        leaked_per_kill.append(len(list(faulty.work_dir.glob("squish-job-*"))))
        faulty.start_worker()
    assert all(n >= 1 for n in leaked_per_kill), leaked_per_kill  # what SIGKILL leaves
    for job in jobs:
        done = service.wait_job(job["id"], TERMINAL, timeout=400)
        assert done["status"] == "succeeded", done
    wait_until(lambda: not any(faulty.work_dir.glob("squish-*")), 30, "the sweep")
    assert [p.name for p in faulty.work_dir.iterdir() if not p.match(LOCK_FILES)] == []
    attempts = [service.job(j["id"])["attempts"] for j in jobs]
    assert sum(attempts) == 10 + len(jobs)  # each kill cost exactly one attempt
    print(
        f"10 SIGKILLs: folders left right after each kill {leaked_per_kill}, 0 once the worker"
        f" was back; {len(jobs)} jobs succeeded, attempts {attempts}"
    )


def wait_running(service: Service, job_ids: list[str], timeout: float) -> tuple[str, int]:
    """A job running on the current worker (not the row a killed one left): (id, pool pid)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        master = psutil.Process(service.procs["worker"].pid)
        pool = {child.pid for child in master.children(recursive=True)}
        for job_id in job_ids:
            job = service.job(job_id)
            pid = int((job.get("worker") or "::").split(":")[1] or 0)
            if job["status"] == "running" and job["stage"] != "starting" and pid in pool:
                return job_id, pid
        time.sleep(0.2)
    raise AssertionError(f"no job running on the current worker after {timeout:g} s")
