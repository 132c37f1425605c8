"""Model and data files shared by the engine tests (built once per session), and torch on
one thread for all of them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import factories
from tests.helpers import one_thread


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models train many times faster on one thread than on cores shared with others,
    and the same thread count gives the same float sums, so the same trained weights."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The trained digits MLP as pt2 (dynamic and static batch) and onnx, and the test split."""
    root = tmp_path_factory.mktemp("engine-files")
    return {
        "pt2": factories.tiny_mlp_pt2(root / "mlp.pt2"),
        "pt2_static": factories.tiny_mlp_pt2(root / "mlp_static.pt2", dynamic_batch=False),
        "onnx": factories.tiny_mlp_onnx(root / "mlp.onnx"),
        "eval": factories.digits_npz(root / "digits_test.npz"),
        "calibration": factories.digits_npz(root / "digits_train.npz", split="train"),
    }
