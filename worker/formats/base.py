"""What a format backend does: the protocol each of pt2, onnx and hf implements."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from worker.errors import InvalidModelError, UnsupportedError
from worker.safety import Unsafe

if TYPE_CHECKING:
    from worker.contract import ModelFormat
    from worker.formats.types import LoadedModel

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
"""One run of a model: feeds by input name in, outputs (numpy) out."""


class FormatBackend(Protocol):
    """One model format: how squish loads, saves, inspects, weighs and runs it.

    A backend is registered in :data:`worker.formats.registry.BACKENDS` under its
    :class:`~worker.contract.ModelFormat`; its file facts (suffix, media type, runtime)
    are :data:`worker.contract.FORMATS`'.
    """

    format: ModelFormat

    def load(self, path: Path) -> LoadedModel:
        """Load a checked file (the safety rules first, then the format's own checks)."""
        ...

    def save(self, model: LoadedModel, path: Path) -> None:
        """Write a file that loads with the format's stock tools."""
        ...

    def layer_counts(self, model: LoadedModel) -> Counter[str]:
        """Operator (or layer type) counts, as ``info.layers`` lists them."""
        ...

    def layer_names(self, model: LoadedModel) -> list[str]:
        """The layers ``exclude`` names (``info.layer_names``): module paths of the modules
        that hold weights (pt2, hf), names of the nodes that read weights (onnx)."""
        ...

    def describe(self, model: LoadedModel) -> dict[str, Any]:
        """What the model resource's ``info`` adds for this format beyond the common keys."""
        ...

    def weight_arrays(self, model: LoadedModel) -> dict[str, np.ndarray]:
        """The weight tensors as numpy arrays (the ones :meth:`weight_shapes` lists);
        raises :class:`WeightsUnreadable` where the format hides them."""
        ...

    def weight_shapes(self, model: LoadedModel) -> dict[str, tuple[int, ...]]:
        """The shapes of the weight tensors (what ``parameters`` counts)."""
        ...

    def vocab_size(self, model: LoadedModel) -> int | None:
        """The token vocabulary an ``input_ids`` input draws from, if the model has one."""
        ...

    def runner(self, model: LoadedModel, path: Path, device: str) -> Runner:
        """The model ready to run in its runtime on ``device`` (``cpu`` or ``gpu``)."""
        ...


@contextlib.contextmanager
def refused() -> Iterator[None]:
    """A refusal by one of worker.safety's checks, as the engine's InvalidModelError."""
    try:
        yield
    except Unsafe as exc:
        raise InvalidModelError(exc.detail, step="load") from None


class WeightsUnreadable(UnsupportedError):
    """The format keeps its weights where squish cannot read them (an aoti package)."""
