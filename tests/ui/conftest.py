"""The dashboard's browser tests: the real application served in process (tests.squish's
`live` and in-process `worker`), driven by headless Chromium (tests.browser)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import factories
from tests.browser import launch, require_chromium
from tests.squish.conftest import engine_runs, live, worker

__all__ = ["engine_runs", "live", "worker"]


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    with launch(require_chromium()) as chromium:
        yield chromium


@pytest.fixture
def quick_engine(worker: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The in-process worker, without the engine's peak-memory probe: that figure is taken
    in a fresh Python process per model (tens of seconds on a busy 2-core machine) and has
    its own tests; here the figure is absent, as the API documents for one not measured."""
    from worker.measurement import model

    def not_measured(*_args: Any, **_kwargs: Any) -> None:
        return None

    monkeypatch.setattr(model, "peak_memory", not_measured)
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
