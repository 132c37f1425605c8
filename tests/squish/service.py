"""The real squish application served in process for the SDK and CLI tests.

`serving` runs an ASGI app with uvicorn on a free 127.0.0.1 port in a thread. `Live` is
that server plus direct reads of its database and object store, so tests can check what
the server did independently of the SDK. `InProcessWorker` runs queued jobs through the
Celery task function itself (`worker.tasks.run_job`: claim, fetch, engine, store, finish),
in this process. `EngineRuns` memoizes the engine (`worker.pipeline.run_pipeline`): each
distinct input is compressed and measured once per test session, and later jobs with the
same input replay its reporter calls, artifact and report (the engine has its own tests;
here it would cost seconds per job, mostly measuring peak memory in fresh processes).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from tests.squish.faults import Faults

# The pipeline of every job here that must succeed (the CLI's compress test spells it out
# on the command line): one engine run per session serves them all.
STEPS: list[tuple[str, dict[str, Any]]] = [
    ("prune.magnitude", {"amount": 0.5, "scope": "global"}),
    ("quantize.dynamic", {"dtype": "int8"}),
]
BATCH_SIZES = [1, 32]


def submit(
    client: Any, files: dict[str, Path], steps: list[tuple[str, dict[str, Any]]] = STEPS
) -> Any:
    """Upload the digits MLP and its calibration and eval data; create a job of ``steps``
    (``cache: false``: these tests follow a run, never an answer from the result cache)."""
    model = client.upload_model(files["pt2"])
    datasets = {role: client.upload_dataset(files[role])["id"] for role in ("calibration", "eval")}
    return client.create_job(
        model["id"], steps, datasets=datasets, evaluate={"batch_sizes": BATCH_SIZES}, cache=False
    )


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve ``app`` on a free 127.0.0.1 port in a thread; yields its base URL."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,  # a free port, read back once the server listens
        log_config=None,
        log_level="critical",
        access_log=False,
        lifespan="on",
        ws="none",
        http="h11",
        loop="asyncio",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="squish-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the squish test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@dataclass
class Live:
    """The application at ``url`` (behind `faults`), and what its database and store hold."""

    url: str
    api_key: str
    faults: Faults

    def job_ids(self) -> list[str]:
        from sqlalchemy import select

        from app.db import session_scope
        from app.orm import Job

        with session_scope(read_only=True) as session:
            return list(session.scalars(select(Job.id).order_by(Job.id)))

    def model_ids(self) -> list[str]:
        from sqlalchemy import select

        from app.db import session_scope
        from app.orm import MLModel

        with session_scope(read_only=True) as session:
            return list(session.scalars(select(MLModel.id).order_by(MLModel.id)))

    def dataset_ids(self) -> list[str]:
        from sqlalchemy import select

        from app.db import session_scope
        from app.orm import Dataset

        with session_scope(read_only=True) as session:
            return list(session.scalars(select(Dataset.id).order_by(Dataset.id)))

    def stored_events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's events as the database holds them, oldest first."""
        from sqlalchemy import select

        from app.db import session_scope
        from app.orm import JobEvent

        with session_scope(read_only=True) as session:
            rows = session.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            )
            return [{"id": e.id, "kind": e.kind, "data": e.data} for e in rows]

    def artifact_bytes(self, job_id: str, name: str, tmp: Path) -> bytes:
        """The artifact as the object store holds it."""
        from sqlalchemy import select

        from app.db import session_scope
        from app.orm import Artifact
        from app.storage import get_store

        with session_scope(read_only=True) as session:
            key = session.scalar(
                select(Artifact.storage_key).where(Artifact.job_id == job_id, Artifact.name == name)
            )
        assert key is not None, f"job {job_id} has no artifact {name!r}"
        path = tmp / f"stored-{job_id}-{name}"
        get_store().get_to_file(key, path)
        return path.read_bytes()

    def claim(self, job_id: str) -> None:
        """Mark the job running for a worker that never reports back (lifecycle.claim)."""
        from app.db import session_scope
        from app.jobs import lifecycle

        with session_scope() as session:
            assert lifecycle.claim(session, job_id, "test-host:1:silent")


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _Recorder:
    """Forwards the engine's reporter calls and keeps them for replays."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def progress(self, fraction: float, stage: str | None = None) -> None:
        self.calls.append(("progress", (fraction, stage)))
        self.inner.progress(fraction, stage)

    def log(self, message: str, level: str = "info", data: dict | None = None) -> None:
        self.calls.append(("log", (message, level, data)))
        self.inner.log(message, level, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class _Outcome:
    calls: list[tuple[str, tuple[Any, ...]]]
    result: Any = None  # a worker.pipeline.PipelineResult, paths under the session's folder
    error: BaseException | None = None


class EngineRuns:
    """``run_pipeline``, computed once per distinct input in a session and replayed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.outcomes: dict[str, _Outcome] = {}

    def wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def run_pipeline(
            model_path: Path,
            model_format: str,
            spec: Any,
            datasets: dict[str, Path],
            work_dir: Path,
            reporter: Any,
        ) -> Any:
            key = self._key(model_path, model_format, spec, datasets)
            outcome = self.outcomes.get(key)
            if outcome is None:
                outcome = self._run(
                    key, real, model_path, model_format, spec, datasets, work_dir, reporter
                )
            else:
                for name, args in outcome.calls:
                    getattr(reporter, name)(*args)
            if outcome.error is not None:
                raise copy.copy(outcome.error)
            return self._copy_out(outcome.result, Path(work_dir))

        return run_pipeline

    def _run(self, key: str, real: Callable[..., Any], model_path: Path, model_format: str, spec: Any, datasets: dict[str, Path], work_dir: Path, reporter: Any) -> _Outcome:  # fmt: skip
        from worker.errors import EngineError, JobCancelled

        recorder = _Recorder(reporter)
        try:
            result = real(model_path, model_format, spec, datasets, work_dir, recorder)
        except JobCancelled:
            raise
        except EngineError as exc:
            outcome = _Outcome(recorder.calls, error=exc)
        else:
            saved = self.folder / key
            saved.mkdir(parents=True, exist_ok=True)
            outcome = _Outcome(recorder.calls, result=self._copy_out(result, saved))
        self.outcomes[key] = outcome
        return outcome

    @staticmethod
    def _copy_out(result: Any, folder: Path) -> Any:
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name in ("artifact_path", "report_path"):
            source = Path(getattr(result, name))
            paths[name] = folder / source.name
            if source != paths[name]:
                shutil.copyfile(source, paths[name])
        return dataclasses.replace(result, **paths)

    @staticmethod
    def _key(model_path: Path, model_format: str, spec: Any, datasets: dict[str, Path]) -> str:
        parts: list[Any] = [_sha256(model_path), model_format]
        for f in dataclasses.fields(spec):
            value = getattr(spec, f.name)
            if f.name == "models":  # other uploaded models: by content, not by path
                value = sorted((ref, _sha256(p), fmt) for ref, (p, fmt) in value.items())
            parts.append((f.name, value))
        parts.append(sorted((role, _sha256(p)) for role, p in datasets.items()))
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class InProcessWorker:
    """Runs jobs with the Celery task function in this process, one at a time.

    `run` runs one job now. `serve` starts a thread that runs every queued job as it
    appears, like a worker consuming the queue; with ``lockstep`` each change it commits
    waits until a poll of the job that began after it has ended (`faults.PollGate`), so a
    polling client sees every state the job goes through.
    """

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lockstep = False
        self._listener: Callable[..., None] | None = None

    def run(self, job_id: str) -> str:
        from worker.tasks import run_job

        return str(run_job(job_id))

    def serve(self, *, lockstep: bool = False) -> None:
        from sqlalchemy import event
        from sqlalchemy.orm import Session

        assert self._thread is None, "already serving"
        self._lockstep = lockstep
        self._thread = threading.Thread(target=self._loop, name="squish-test-worker", daemon=True)
        if lockstep:

            def after_commit(_session: Session) -> None:
                if threading.current_thread() is self._thread and not self._stop.is_set():
                    self.faults.gate.wait_for_a_poll()

            self._listener = after_commit
            event.listen(Session, "after_commit", after_commit)
        self._thread.start()

    def stop(self) -> None:
        from sqlalchemy import event
        from sqlalchemy.orm import Session

        self._stop.set()
        self.faults.gate.open()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        if self._listener is not None:
            event.remove(Session, "after_commit", self._listener)
            self._listener = None

    def _loop(self) -> None:
        from sqlalchemy import select

        from app.db import get_read_engine
        from app.orm import Job, JobStatus

        query = select(Job.id).where(Job.status == JobStatus.queued).order_by(Job.id).limit(1)
        while not self._stop.is_set():
            with get_read_engine().connect() as conn:
                job_id = conn.scalar(query)
            if job_id is None:
                self._stop.wait(0.01)
                continue
            self.run(job_id)
