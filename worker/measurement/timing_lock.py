"""One timed measurement at a time per machine and device: a host-wide ``flock``.

Two latency measurements on one machine at the same time corrupt each other (they share
cores, caches and memory bandwidth), so every timed run (:func:`worker.measurement.latency.
time_runs`) holds this lock: jobs and search trials compress in parallel, and take turns
only while timing. The lock is a file (``latency-<device>.lock``) under :data:`lock_dir`,
by default the work folders' root; the worker points it at its configured ``work_dir``
(:func:`set_lock_dir`). Waiting keeps reporting progress, so a cancellation is honoured
while queued behind another measurement.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from worker.context import Reporter

_POLL_S = 0.02
_REPORT_EVERY_S = 0.5

lock_dir: Path = Path(tempfile.gettempdir()) / "squish-work"
_threads: dict[str, threading.Lock] = {}
_guard = threading.Lock()


def set_lock_dir(path: Path) -> None:
    """Where the lock files live: one folder shared by every worker process of the host."""
    global lock_dir
    lock_dir = Path(path)


LOCK_FILES = "latency-*.lock"
"""The lock files' name pattern: they stay in :data:`lock_dir` (a work folders' root)
between measurements, and the work-folder sweep leaves them alone."""


def lock_path(device: str) -> Path:
    return lock_dir / LOCK_FILES.replace("*", device)


def _thread_lock(device: str) -> threading.Lock:
    with _guard:
        return _threads.setdefault(device, threading.Lock())


@contextlib.contextmanager
def timing(device: str, reporter: Reporter | None = None, at: float = 0.0) -> Iterator[float]:
    """Hold the host's timing lock for ``device``; yields the seconds spent waiting.

    ``reporter.progress(at)`` is called while waiting (it raises to cancel).
    """
    started = time.monotonic()
    last = started
    thread_lock = _thread_lock(device)
    while not thread_lock.acquire(timeout=_POLL_S):  # threads of this process first
        last = _report(reporter, at, last)
    try:
        path = lock_path(device)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    last = _report(reporter, at, last)
                    time.sleep(_POLL_S)
            try:
                yield time.monotonic() - started
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        thread_lock.release()


def _report(reporter: Reporter | None, at: float, last: float) -> float:
    now = time.monotonic()
    if reporter is not None and now - last > _REPORT_EVERY_S:
        reporter.progress(at, "wait_for_timing")
        return now
    return last
