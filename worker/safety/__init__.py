"""Upload safety: one torch-free checker per file format, shared by the API and the engine.

The API checks an upload with these functions before storing it (``app.sniff`` decides the
format and turns :class:`Unsafe` into a 4xx); the worker's loaders call the same functions
before their own torch-only checks (graph targets, ``weights_only`` unpickling), so an upload
the API accepts is one the engine loads, and each rule is written once.

Modules: :mod:`~worker.safety.pt2` (torch.export archives), :mod:`~worker.safety.hf`
(zipped Hugging Face folders), :mod:`~worker.safety.onnx`, :mod:`~worker.safety.pickles`
(recognising and statically scanning pickles), :mod:`~worker.safety.datasets` (npz,
safetensors, jsonl). Nothing here imports torch, onnxruntime or transformers, and nothing
here unpickles anything.
"""

from __future__ import annotations

__all__ = ["EXPORT_HELP", "HF_SAVE_HELP", "NotThisFormat", "Unsafe"]

EXPORT_HELP = (
    "Export the model and upload the result: "
    '`ep = torch.export.export(model, example_args); torch.export.save(ep, "model.pt2")`, '
    'or `torch.onnx.export(model, example_args, "model.onnx", dynamo=True, '
    "external_data=False)`."
)
"""How to turn a PyTorch model into an upload squish accepts."""

HF_SAVE_HELP = (
    "Save it with `model.save_pretrained(folder, safe_serialization=True)` and "
    "`tokenizer.save_pretrained(folder)`, then zip the folder."
)
"""How to turn a Transformers model into an hf upload."""


class Unsafe(Exception):
    """A file squish refuses to load; ``detail`` tells the user what to change.

    Attributes:
        detail: the reason, with what to do instead.
        title: a short name of the problem (an RFC 9457 ``title`` for the API).
        status: the HTTP status the API answers with (422, or 415 for an unsupported type).
    """

    def __init__(self, detail: str, *, title: str = "Invalid upload", status: int = 422) -> None:
        super().__init__(f"{title}: {detail}")
        self.detail = detail
        self.title = title
        self.status = status


class NotThisFormat(Unsafe):
    """The bytes are not this format at all (so format detection may try another)."""
