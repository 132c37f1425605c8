"""The host-wide timing lock: two processes never time at once; waiting can be cancelled."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from worker.errors import JobCancelled
from worker.measurement import timing_lock


def _hold(lock_dir: str, ready: object, release: object) -> None:
    timing_lock.set_lock_dir(Path(lock_dir))
    with timing_lock.timing("cpu"):
        ready.set()  # type: ignore[attr-defined]
        release.wait(30)  # type: ignore[attr-defined]


class _Cancelling:
    def __init__(self) -> None:
        self.calls = 0

    def progress(self, fraction: float, stage: str | None = None) -> None:
        self.calls += 1
        raise JobCancelled("cancelled while waiting")

    def log(self, message: str, level: str = "info", data: dict | None = None) -> None:
        return None


def test_a_second_process_waits_and_a_cancel_stops_the_wait(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(str(tmp_path), ready, release))
    holder.start()
    before = timing_lock.lock_dir
    try:
        assert ready.wait(60)
        timing_lock.set_lock_dir(tmp_path)
        reporter = _Cancelling()
        with pytest.raises(JobCancelled), timing_lock.timing("cpu", reporter):
            pytest.fail("the lock was taken while another process held it")
        assert reporter.calls == 1
        with timing_lock.timing("gpu"):  # another device: its own lock
            pass
        release.set()
        holder.join(30)
        t0 = time.monotonic()
        with timing_lock.timing("cpu") as waited:
            assert waited < 5
        assert time.monotonic() - t0 < 5
    finally:
        release.set()
        holder.join(30)
        timing_lock.set_lock_dir(before)
