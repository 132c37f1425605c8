"""Helpers shared by the engine tests: torch on one thread, a method run as a pipeline step
would run it, and saved models read back and run with stock torch / ONNX Runtime only.

Torch, ONNX and the engine are imported inside the functions, so importing this module
costs nothing for tests that do not use them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from worker.context import Reporter, StepContext
    from worker.data import Dataset
    from worker.formats import LoadedModel
    from worker.methods.base import Method


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: on tiny models intra-op parallelism costs more than it
    gains, and on shared CPUs its spinning threads make training many times slower (and
    the thread count changes float sums, so results would depend on the machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def step_context(
    tmp_path: Path,
    method: str = "test",
    *,
    step: int = 0,
    datasets: dict[str, Dataset] | None = None,
    reporter: Reporter | None = None,
    device: str = "cpu",
    original: tuple[Path, str] | None = None,
    models: dict[str, tuple[Path, str]] | None = None,
) -> StepContext:
    """What the pipeline gives a method handler, with a reporter that drops everything
    unless one is given; ``original`` and ``models`` as (path, format) of uploaded files."""
    from worker.context import NullReporter, StepContext

    return StepContext(
        step=step, method=method, reporter=reporter or NullReporter(), datasets=datasets or {},
        device=device, work_dir=tmp_path, original=original, models=models or {},
    )  # fmt: skip


def apply(
    method: str | Method,
    model: LoadedModel,
    params: dict[str, Any],
    tmp_path: Path,
    *,
    datasets: dict[str, Dataset] | None = None,
    reporter: Reporter | None = None,
    device: str = "cpu",
    fmt: str | None = None,
    original: tuple[Path, str] | None = None,
    models: dict[str, tuple[Path, str]] | None = None,
) -> LoadedModel:
    """Run one method on a loaded model as a pipeline step does: ``params`` validated for
    ``fmt`` (default: the model's format), then the handler with a step context."""
    from worker.methods import get_method

    if isinstance(method, str):
        method = get_method(method)
    ctx = step_context(
        tmp_path, method.name, datasets=datasets, reporter=reporter, device=device,
        original=original, models=models,
    )  # fmt: skip
    return method.handler(model, method.validate_params(params, fmt or model.format), ctx)


def saved(model: LoadedModel, path: Path) -> Path:
    """``save_model`` to ``path``; returns ``path``."""
    from worker.formats import save_model

    save_model(model, path)
    return path


def _format(path: Path) -> str:
    fmt = Path(path).suffix.lstrip(".")
    if fmt not in ("pt2", "onnx"):
        raise ValueError(f"{path}: a stock runner reads .pt2 or .onnx files")
    return fmt


def stock_program(path: Path) -> torch.export.ExportedProgram:
    """A ``.pt2`` file loaded with ``torch.export.load`` (no squish code)."""
    import torch

    return torch.export.load(str(path))


def stock_module(path: Path) -> torch.nn.Module:
    """A ``.pt2`` file as a runnable module, with stock torch only."""
    return stock_program(path).module()


def stock_weights(path: Path) -> dict[str, np.ndarray]:
    """The weights of a ``.pt2`` (state dict) or ``.onnx`` (initializers), read with stock tools."""
    if _format(path) == "pt2":
        return {k: v.detach().numpy() for k, v in stock_program(path).state_dict.items()}
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def stock_run(path: Path, *inputs: np.ndarray, check_loader: bool = False) -> np.ndarray:
    """The first output of a ``.pt2`` (stock torch) or ``.onnx`` (ONNX Runtime, CPU) file.

    With ``check_loader``, squish's own loader must accept the file first (pt2: nothing
    pickled, only operators; onnx: the graph checker).
    """
    fmt = _format(path)
    if check_loader:
        from worker.formats import load_model

        load_model(path, fmt)
    if fmt == "pt2":
        import torch

        module = stock_module(path)
        with torch.inference_mode():
            return module(*(torch.from_numpy(x) for x in inputs)).numpy()  # type: ignore[no-any-return]
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, inputs, strict=True)))[0]  # type: ignore[no-any-return]


def stock_accuracy(
    path: Path, x: np.ndarray, y: np.ndarray, *, check_loader: bool = False
) -> float:
    """Top-1 accuracy of a saved classifier on ``(x, y)``, run by :func:`stock_run`."""
    return float((stock_run(path, x, check_loader=check_loader).argmax(1) == y).mean())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened, in float64."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def task_handlers() -> dict[str, Callable[[str], Any]]:
    """Each queued task's name → the function a worker runs for its message's id (for tests
    that run the embedded queue's messages in process)."""
    from worker import search_tasks, tasks

    return {
        "squish.run_job": tasks.run_job,
        "squish.inspect_model": tasks.inspect_model,
        "squish.search_step": search_tasks.step,
        "squish.run_trial": lambda trial_id: search_tasks.run_trial(int(trial_id)),
        "squish.finish_search": search_tasks.finish,
        "squish.deliver_webhook": tasks.deliver_webhook,
    }
