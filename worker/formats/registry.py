"""The format backends, keyed by :class:`~worker.contract.ModelFormat`; a miss fails loudly.

A new format is one backend module (implementing :class:`~worker.formats.base.FormatBackend`),
its facts in :data:`worker.contract.FORMATS`, and one line here.
"""

from __future__ import annotations

from worker.contract import ModelFormat
from worker.errors import UnsupportedError
from worker.formats.aoti import AotiBackend
from worker.formats.base import FormatBackend
from worker.formats.hf import HfBackend
from worker.formats.onnx import OnnxBackend
from worker.formats.pt2 import Pt2Backend

BACKENDS: dict[ModelFormat, FormatBackend] = {
    ModelFormat.pt2: Pt2Backend(),
    ModelFormat.onnx: OnnxBackend(),
    ModelFormat.hf: HfBackend(),
    ModelFormat.aoti: AotiBackend(),
}


def backend_for(fmt: str, *, step: str | None = "load") -> FormatBackend:
    """The backend of ``fmt``.

    Raises:
        UnsupportedError: ``fmt`` is no registered format; the message names the known ones.
    """
    try:
        return BACKENDS[ModelFormat(fmt)]
    except (ValueError, KeyError):
        known = ", ".join(BACKENDS)
        raise UnsupportedError(
            f"unknown model format {fmt!r}; supported: {known}", step=step
        ) from None
