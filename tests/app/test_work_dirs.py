"""Work folders: one recognisable folder per job under SQUISH_WORK_DIR, none left behind by
a killed process once a sweep has run (worker/tasks.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.app.test_lifecycle import add_model, create_job
from tests.factories import tiny_mlp_onnx
from worker.measurement.timing_lock import LOCK_FILES

REPO = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, time
from worker.tasks import WorkDir
folder = WorkDir.make("job", sys.argv[1], "{host}:" + str(__import__("os").getpid()) + ":t")
(folder.path / "input.onnx").write_bytes(b"x" * 1000)
print(folder.path, flush=True)
time.sleep(600)
"""


@pytest.fixture
def work_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from app.settings import get_settings

    root = tmp_path / "work"
    monkeypatch.setenv("SQUISH_WORK_DIR", str(root))
    get_settings.cache_clear()
    yield root
    get_settings.cache_clear()


def hold(job_id: str, root: Path, host: str | None = None) -> tuple[subprocess.Popen[str], Path]:
    """A process that makes a job's work folder and works in it until killed."""
    env = dict(os.environ, SQUISH_WORK_DIR=str(root), TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    code = HOLDER.replace("{host}", host or socket.gethostname())
    proc = subprocess.Popen(
        [sys.executable, "-c", code, job_id], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, f"the holder of {job_id} did not start"
    return proc, Path(line)


def sweep() -> list[Path]:
    from app.settings import get_settings
    from worker.tasks import sweep_work_dirs

    return sweep_work_dirs(get_settings())


def test_ten_sigkilled_processes_leave_no_work_folder_after_a_sweep(work_root: Path) -> None:
    holders = [hold(f"job_{i:02d}", work_root) for i in range(10)]
    folders = [folder for _, folder in holders]
    for (proc, _), i in zip(holders, range(10), strict=True):
        assert folders[i].name == f"squish-job-job_{i:02d}-{proc.pid}"
        assert folders[i].parent == work_root
    assert sweep() == []  # every one is in use
    for proc, _ in holders:
        proc.send_signal(signal.SIGKILL)  # no clean-up code runs
        proc.wait(timeout=10)
    assert all(folder.is_dir() for folder in folders)  # what SIGKILL leaves
    assert sorted(sweep()) == sorted(folders)
    assert list(work_root.iterdir()) == []


def test_a_live_process_keeps_its_folder_even_when_its_job_is_over(work_root: Path) -> None:
    proc, folder = hold("job_cancelled", work_root)
    try:
        # Cancelled or not, the process is still in there (winding down): not removed.
        assert sweep() == [] and folder.is_dir()
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert sweep() == [folder]


def test_another_machines_folder_and_unrelated_entries_are_left_alone(work_root: Path) -> None:
    proc, folder = hold("job_elsewhere", work_root, host="another-host")
    proc.kill()
    proc.wait(timeout=10)
    (work_root / "notes.txt").write_text("mine")
    (work_root / "squish-job-x").mkdir()  # not the pattern: no pid
    (work_root / "cache").mkdir()
    assert sweep() == []  # another host (a shared root) judges its own folders
    assert folder.is_dir() and (work_root / "notes.txt").exists()


def test_a_folder_never_locked_is_removed_once_its_process_is_gone_or_it_is_old(
    work_root: Path,
) -> None:
    work_root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = work_root / f"squish-job-job_a-{dead.pid}"
    young = work_root / f"squish-job-job_b-{os.getpid()}"  # being made right now
    old = work_root / f"squish-inspect-mdl_c-{os.getpid()}"
    for folder in (gone, young, old):
        folder.mkdir()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert sorted(sweep()) == sorted([gone, old])
    assert young.is_dir()


def test_the_worker_sweeps_at_start(work_root: Path) -> None:
    from app.settings import get_settings
    from worker.tasks import WorkDirSweeper

    proc, folder = hold("job_before_restart", work_root)
    proc.kill()
    proc.wait(timeout=10)
    sweeper = WorkDirSweeper(get_settings().model_copy(update={"work_sweep_interval_s": 0.2}))
    sweeper.start()
    try:
        deadline = time.monotonic() + 5
        while folder.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not folder.exists()
        proc, folder = hold("job_later", work_root)  # killed while the worker runs
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while folder.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not folder.exists()  # the periodic sweep
    finally:
        sweeper.stopped.set()
        sweeper.join(timeout=5)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mlp_onnx(tmp_path_factory.mktemp("work-dirs") / "mlp.onnx", trained=False)


def test_a_job_works_in_its_named_folder_and_removes_it(
    db: str, work_root: Path, onnx_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.db import session_scope
    from app.keys import get_or_create_tenant
    from worker import pipeline, tasks

    with session_scope() as session:
        tenant = get_or_create_tenant(session, "alice").id
    job_id = create_job(tenant, add_model(tenant, onnx_model))
    seen: dict[str, Any] = {}
    real = pipeline.run_pipeline

    def looking(model_path: Path, *args: Any, **kwargs: Any) -> Any:
        folder = model_path.parent
        seen["folder"] = folder
        seen["owner"] = (folder / tasks.OWNER_FILE).read_text()
        seen["swept"] = sweep()  # a sweep meanwhile leaves it alone
        return real(model_path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "run_pipeline", looking)
    assert tasks.run_job(job_id) == "succeeded"
    assert seen["folder"] == work_root / f"squish-job-{job_id}-{os.getpid()}"
    assert seen["owner"].startswith(f"{socket.gethostname()}:{os.getpid()}:")
    assert seen["swept"] == []
    assert not seen["folder"].exists()
    assert [p.name for p in work_root.iterdir() if not p.match(LOCK_FILES)] == []
