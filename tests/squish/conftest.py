"""The SDK and CLI tests run against the real application (`app.main`), served in process
on the `embedded` configuration; `tests.squish.faults` injects what it cannot do on demand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import factories
from tests.squish.faults import Faults
from tests.squish.service import EngineRuns, InProcessWorker, Live, serving


@pytest.fixture
def live(embedded: dict[str, str]) -> Iterator[Live]:
    """The application on a free port, with alice's API key; a fresh database per test."""
    from app.main import create_app

    faults = Faults(create_app(run_reaper=False))
    with serving(faults) as url:
        yield Live(url, embedded["alice"], faults)


@pytest.fixture(scope="session")
def engine_runs(tmp_path_factory: pytest.TempPathFactory) -> EngineRuns:
    return EngineRuns(tmp_path_factory.mktemp("engine-runs"))


@pytest.fixture
def worker(
    live: Live, engine_runs: EngineRuns, monkeypatch: pytest.MonkeyPatch
) -> Iterator[InProcessWorker]:
    """Runs the live server's jobs through the real worker task, in this process."""
    from worker import pipeline

    monkeypatch.setattr(pipeline, "run_pipeline", engine_runs.wrap(pipeline.run_pipeline))
    runner = InProcessWorker(live.faults)
    yield runner
    runner.stop()


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The trained digits MLP as pt2 and onnx, a 1.6 MB untrained MLP, the digits data."""
    import torch

    root = tmp_path_factory.mktemp("sdk-files")
    big = factories.mlp(hidden=(1024, 320))
    return {
        "pt2": factories.tiny_mlp_pt2(root / "net.pt2"),
        "onnx": factories.tiny_mlp_onnx(root / "net.onnx"),
        "big_pt2": factories.export_pt2(big, torch.zeros(4, 64), root / "big.pt2"),
        "eval": factories.digits_npz(root / "eval.npz"),
        "calibration": factories.digits_npz(root / "calib.npz", split="train", labels=False),
    }
