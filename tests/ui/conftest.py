"""The dashboard's browser tests: the real application served in process (tests.squish's
`live` and in-process `worker`; for a search, `queue_worker`, which consumes the broker's
queue), driven by headless Chromium (tests.browser)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import factories
from tests.browser import launch, require_chromium
from tests.helpers import task_handlers
from tests.squish.conftest import engine_runs, live, worker

__all__ = ["engine_runs", "live", "worker"]


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    with launch(require_chromium()) as chromium:
        yield chromium


def without_peak_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """No engine peak-memory probe: that figure is taken in a fresh Python process per model
    (tens of seconds on a busy 2-core machine) and has its own tests; here the figure is
    absent, as the API documents for one not measured."""
    from worker.measurement import model

    def not_measured(*_args: Any, **_kwargs: Any) -> None:
        return None

    monkeypatch.setattr(model, "peak_memory", not_measured)


@pytest.fixture
def quick_engine(worker: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The in-process worker, without the engine's peak-memory probe."""
    without_peak_memory(monkeypatch)
    return worker


@pytest.fixture(scope="session")
def ui_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The trained digits MLP (pt2), its eval (labelled) and calibration data."""
    root = tmp_path_factory.mktemp("ui-files")
    return {
        "pt2": factories.tiny_mlp_pt2(root / "digits.pt2"),
        "eval": factories.digits_npz(root / "eval.npz"),
        "calibration": factories.digits_npz(root / "calib.npz", split="train", labels=False),
    }


class QueueWorker:
    """The embedded broker's queue consumed in a thread by the real task functions, one
    message at a time, as the one embedded worker would. A search needs it: its start
    (``run_job``), steps, trials and finish are messages, where the in-process worker of
    tests.squish runs only the jobs it finds queued in the database.

    ``hold(task)`` keeps the first message of ``task`` until the returned event is set (or
    ``timeout_s`` passes), so a test can see a state that the worker would otherwise leave
    within milliseconds; ``wait_for(task)`` waits until a message of ``task`` has run."""

    def __init__(self, queue_name: str = "cpu", timeout_s: float = 60.0) -> None:
        self.queue_name = queue_name
        self.timeout_s = timeout_s
        self.ran: list[str] = []
        self.errors: list[tuple[str, str, BaseException]] = []
        self._holds: dict[str, threading.Event] = {}
        self._done = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="squish-queue-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        for event in self._holds.values():
            event.set()
        self._thread.join(timeout=self.timeout_s)

    def hold(self, task: str) -> threading.Event:
        event = threading.Event()
        self._holds[task] = event
        return event

    def wait_for(self, task: str) -> bool:
        with self._done:
            return self._done.wait_for(lambda: task in self.ran, timeout=self.timeout_s)

    def _loop(self) -> None:
        from app.queue import get_celery

        handlers = task_handlers()
        with get_celery().connection_for_read() as conn:
            inbox = conn.SimpleQueue(self.queue_name, no_ack=True)
            try:
                while not self._stop.is_set():
                    try:
                        message = inbox.get_nowait()
                    except queue.Empty:
                        self._stop.wait(0.02)  # the folder broker is polled, like a worker's
                        continue
                    task, obj_id = message.headers["task"], str(message.payload[0][0])
                    held = self._holds.pop(task, None)
                    if held is not None:
                        held.wait(self.timeout_s)
                    try:
                        handlers[task](obj_id)
                    except Exception as exc:  # a task that raised: the fixture fails the test
                        self.errors.append((task, obj_id, exc))
                    with self._done:
                        self.ran.append(task)
                        self._done.notify_all()
            finally:
                inbox.close()


@pytest.fixture
def queue_worker(live: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[QueueWorker]:
    """The real tasks consuming the live server's queue, on the real engine without its
    peak-memory probe; a task that raised fails the test.

    Not beside the `worker` fixture: its memo of ``run_pipeline`` replays whole pipelines
    and takes no ``resume`` (a trial's reuse of an earlier trial's steps)."""
    from worker import pipeline
    from worker.search import trial

    assert pipeline.run_pipeline.__module__ == "worker.pipeline", "the engine is wrapped"
    without_peak_memory(monkeypatch)
    # worker.search.trial binds run_pipeline once, when first imported: the real one here.
    monkeypatch.setattr(trial, "run_pipeline", pipeline.run_pipeline)
    runner = QueueWorker()
    runner.start()
    yield runner
    runner.stop()
    assert not runner.errors, runner.errors
