"""A model file loaded in the runtime it runs in, called with numpy feeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from worker.errors import EngineError, ModelRunError
from worker.formats.base import Runner
from worker.formats.models import load_model
from worker.formats.registry import backend_for


class Runtime:
    """A model loaded in the runtime of its file: call with feeds, get outputs.

    pt2 runs ``torch.export.load(...).module()`` eagerly under ``torch.inference_mode``;
    hf runs the transformers module (loaded with ``from_pretrained``) the same way and
    returns its ``logits`` or ``last_hidden_state``; onnx runs an
    ``onnxruntime.InferenceSession`` (CPU provider, or CUDA for ``gpu``); aoti loads the
    package with ``torch._inductor.aoti_load_package`` and calls it with the inputs in order.
    """

    def __init__(self, path: Path, fmt: str, device: str = "cpu") -> None:
        backend = backend_for(fmt)
        self.model = load_model(path, fmt)
        self.format = fmt
        self.device = device
        self._call: Runner = backend.runner(self.model, Path(path), device)

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run once. Feeds are keyed by input name, or given in input order."""
        names = [s.name for s in self.model.inputs]
        if set(feeds) != set(names) and len(feeds) == len(names):
            feeds = dict(zip(names, feeds.values(), strict=True))
        try:
            return self._call(feeds)
        except EngineError:
            raise
        except Exception as exc:  # whatever the model's own code raises
            shapes = {k: list(v.shape) for k, v in feeds.items()}
            raise ModelRunError(
                f"the {self.format} model failed to run on inputs {shapes}: "
                f"{type(exc).__name__}: {exc}",
                step="run",
            ) from exc
