"""Small real models and data built in code, for tests across the project.

Everything here is deterministic (fixed seeds, fixed split) and takes seconds on a CPU.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tests.helpers import one_thread

if TYPE_CHECKING:
    import torch
    from torch import nn


@cache
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    return x_train, y_train, x_test, y_test


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sklearn digits (8x8 images flattened to 64 floats in 0..1), split 75/25.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 ``[N, 64]`` and int64 ``[N]``.
    """
    return tuple(a.copy() for a in _digits())  # type: ignore[return-value]


def mlp(hidden: tuple[int, ...] = (128, 64), in_features: int = 64, classes: int = 10) -> nn.Module:
    """An untrained ReLU MLP ``in_features -> *hidden -> classes`` with a fixed seed."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


@cache
def _trained_state(epochs: int) -> dict[str, torch.Tensor]:
    import torch

    # callable from inference code; one thread, so the weights do not depend on the machine
    with torch.inference_mode(False), torch.enable_grad(), one_thread():
        return _train(epochs)


def _train(epochs: int) -> dict[str, torch.Tensor]:
    x_train, y_train, _, _ = _digits()
    # Weight decay keeps weights small and spread out: the model survives 50% pruning.
    return fit_classifier(mlp(), x_train, y_train, epochs=epochs, weight_decay=0.05)


def fit_classifier(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, weight_decay: float
) -> dict[str, torch.Tensor]:
    """Train ``model`` on ``(x, y)`` with AdamW and a one-cycle schedule (max lr 1e-2,
    batches of 64 in a seeded order); returns a copy of its trained state (eval mode)."""
    import torch
    from torch import nn

    batch = 64
    steps = epochs * -(-len(x) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
            schedule.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_digits_mlp(epochs: int = 20) -> nn.Module:
    """A 64→128→64→10 MLP trained on the digits train split (≈0.97 test accuracy).

    Training (AdamW, weight decay, one-cycle schedule) takes about a second and is cached
    per ``epochs``; each call returns a fresh module in eval mode.
    """
    model = mlp()
    model.load_state_dict(_trained_state(epochs))
    return model.eval()


def digits_accuracy(model: nn.Module) -> float:
    """Test-split accuracy of a torch module on the digits."""
    import torch

    _, _, x_test, y_test = _digits()
    with torch.inference_mode():
        pred = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    return float((pred == y_test).mean())


def export_pt2(
    module: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool = True
) -> Path:
    """``torch.export`` a module (batch dim dynamic unless told) and save it as ``.pt2``."""
    import torch

    module = module.eval()
    dynamic_shapes = ({0: torch.export.Dim.DYNAMIC},) if dynamic_batch else None
    ep = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes)
    path = Path(path)
    torch.export.save(ep, path)
    return path


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export to one self-contained ``.onnx`` file (dynamo exporter, dynamic batch dim)."""
    import torch

    module = module.eval()
    path = Path(path)
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        verbose=False,
    )
    program.save(str(path), external_data=False)
    return path


def write_npz(path: Path, inputs: np.ndarray | dict[str, np.ndarray], labels=None) -> Path:
    """Write a dataset file: one ``inputs`` array or several named inputs, optional ``labels``."""
    arrays = dict(inputs) if isinstance(inputs, dict) else {"inputs": inputs}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    path = Path(path)
    np.savez(path, **arrays)
    return path


def _example() -> torch.Tensor:
    import torch

    return torch.from_numpy(_digits()[2][:4].copy())


def tiny_mlp_pt2(path: Path, *, trained: bool = True, dynamic_batch: bool = True) -> Path:
    """The digits MLP (trained unless told) exported to ``.pt2`` at ``path``."""
    module = train_digits_mlp() if trained else mlp()
    return export_pt2(module, _example(), path, dynamic_batch=dynamic_batch)


def tiny_mlp_onnx(path: Path, *, trained: bool = True) -> Path:
    """The digits MLP (trained unless told) exported to ``.onnx`` at ``path``."""
    module = train_digits_mlp() if trained else mlp()
    return export_onnx(module, _example(), path)


def digits_npz(path: Path, split: str = "test", labels: bool = True) -> Path:
    """The digits ``split`` ("train" or "test") as an ``.npz`` dataset with ``inputs``/``labels``."""
    x_train, y_train, x_test, y_test = _digits()
    if split == "train":
        x, y = x_train, y_train
    elif split == "test":
        x, y = x_test, y_test
    else:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    return write_npz(path, x, y if labels else None)
