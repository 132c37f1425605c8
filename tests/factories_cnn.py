"""A small CNN for the digits seen as 1x8x8 images, with the couplings pruning must handle.

``DigitsCNN``: a conv-BN-ReLU stem, two residual blocks (conv-BN-ReLU-conv-BN plus the
skip, so the stem and both blocks share one channel group), two branches concatenated
along the channels, global average pooling and a Linear head. Deterministic (fixed
seeds, the split of :mod:`tests.factories`) and trained in a few seconds on a CPU.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tests import factories
from tests.helpers import one_thread

if TYPE_CHECKING:
    import torch
    from torch import nn

IMAGE_SHAPE = (1, 8, 8)


def digits_images() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits split of :func:`tests.factories.digits_arrays` as ``[N, 1, 8, 8]`` images.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 images in 0..1 and int64 labels.
    """
    x_train, y_train, x_test, y_test = factories.digits_arrays()
    return (
        x_train.reshape(-1, *IMAGE_SHAPE),
        y_train,
        x_test.reshape(-1, *IMAGE_SHAPE),
        y_test,
    )


def cnn(width: int = 32, classes: int = 10) -> nn.Module:
    """An untrained :class:`DigitsCNN` (fixed seed); ``width`` channels in the trunk."""
    import torch
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + x)

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
            )
            self.block1 = Residual(width)
            self.block2 = Residual(width)
            self.branch_a = nn.Conv2d(width, width // 2, 1)
            self.branch_b = nn.Conv2d(width, width // 2, 3, padding=1)
            self.head = nn.Linear(width, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.block2(self.block1(self.stem(x)))
            x = torch.cat([torch.relu(self.branch_a(x)), torch.relu(self.branch_b(x))], dim=1)
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
            return self.head(x)

    torch.manual_seed(0)
    return DigitsCNN()


@cache
def _trained_state(epochs: int) -> dict[str, torch.Tensor]:
    import torch

    with torch.inference_mode(False), torch.enable_grad(), one_thread():
        return _train(epochs)


def _train(epochs: int) -> dict[str, torch.Tensor]:
    x_train, y_train, _, _ = digits_images()
    return factories.fit_classifier(cnn(), x_train, y_train, epochs=epochs, weight_decay=1e-3)


def train_digits_cnn(epochs: int = 4) -> nn.Module:
    """:func:`cnn` trained on the digits train split (≥ 0.95 test accuracy), in eval mode.

    Training (AdamW, one-cycle schedule) takes a few seconds and is cached per
    ``epochs``; each call returns a fresh module.
    """
    model = cnn()
    model.load_state_dict(_trained_state(epochs))
    return model.eval()


def images_accuracy(module: nn.Module | None = None, predict=None) -> float:
    """Test-split accuracy of a module (or a ``predict(x) -> logits`` function)."""
    import torch

    _, _, x_test, y_test = digits_images()
    with torch.inference_mode():
        if predict is None:
            assert module is not None
            predict = module
        logits = predict(torch.from_numpy(x_test))
    return float((np.asarray(logits).argmax(axis=1) == y_test).mean())


def example_images(batch: int = 4) -> torch.Tensor:
    """The first ``batch`` test images, the example inputs of the exports."""
    import torch

    return torch.from_numpy(digits_images()[2][:batch].copy())


def cnn_pt2(path: Path, *, trained: bool = True, dynamic_batch: bool = True) -> Path:
    """The digits CNN (trained unless told) exported to ``.pt2`` at ``path``."""
    module = train_digits_cnn() if trained else cnn()
    return factories.export_pt2(module, example_images(), path, dynamic_batch=dynamic_batch)


def cnn_onnx(path: Path, *, trained: bool = True) -> Path:
    """The digits CNN (trained unless told) exported to ``.onnx`` at ``path``."""
    module = train_digits_cnn() if trained else cnn()
    return factories.export_onnx(module, example_images(), path)


def images_npz(path: Path, split: str = "train", labels: bool = True) -> Path:
    """The digits ``split`` ("train" or "test") as an ``.npz`` of ``[N, 1, 8, 8]`` images."""
    x_train, y_train, x_test, y_test = digits_images()
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    return factories.write_npz(path, x, y if labels else None)
