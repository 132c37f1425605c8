"""Model and data files shared by the engine tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import factories


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
