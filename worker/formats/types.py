"""The shapes a model takes in memory: its signature (TensorSpec) and the model itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx
    import torch
    from torch.export import ExportedProgram

HF_TASKS = ("sequence-classification", "feature-extraction")


def is_fixed_size(size: int | None) -> bool:
    """Whether a dim size stored in a model file fixes that dim.

    Exporters write an unknown (dynamic) dim as a symbol name, as no size at all, or as
    ``-1`` or ``0`` (paddle2onnx, tf2onnx and older converters): only a positive size is a
    fixed one.
    """
    return size is not None and size > 0


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output.

    Attributes:
        name: the input/output name (pt2: the forward argument's name).
        shape: ints for static dims, a symbol name (e.g. ``"s0"``, ``"batch"``) for a
            dynamic dim (a file's ``-1`` or ``0`` reads as a symbol: :func:`is_fixed_size`).
        dtype: numpy dtype name (``"float32"``, ``"int64"``, ...).
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    @property
    def rank(self) -> int:
        return len(self.shape)

    def is_dynamic(self, axis: int) -> bool:
        dim = self.shape[axis]
        return not (isinstance(dim, int) and is_fixed_size(dim))

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.name}: [{dims}] {self.dtype}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class LoadedModel:
    """A model in memory, as it flows between pipeline steps.

    Attributes:
        format: ``"pt2"``, ``"onnx"``, ``"hf"`` or ``"aoti"`` (a compiled artifact).
        inputs / outputs: the signature; for pt2 the user inputs in flattened order.
        program: (pt2) the ExportedProgram.
        proto: (onnx) the ModelProto.
        dim_hints: (pt2, hf) a representative size for each dynamic dim symbol, from the
            export's example inputs (hf: a typical sequence length); used to build
            tracing inputs.
        module: (hf) the transformers ``nn.Module`` (a ``PreTrainedModel``), in eval mode.
        tokenizer: (hf) the tokenizer loaded from the upload, or None when it has none.
        task: (hf) ``"sequence-classification"`` or ``"feature-extraction"`` (one of
            :data:`HF_TASKS`), from the config's ``architectures``.
        extra_files: (hf) small files of the uploaded folder that ``save_pretrained``
            does not write (a README, sentence-transformers' ``modules.json`` and pooling
            config, ...), by relative path; written back when the model is saved. The
            extracted folder itself is deleted once the model is loaded.
        package: (aoti) the AOTInductor package file (``torch._inductor.aoti_load_package``).
        build: (aoti) how the package was compiled: torch version, instruction set,
            compile options (:mod:`worker.formats.aoti`).
    """

    format: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    program: ExportedProgram | None = None
    proto: onnx.ModelProto | None = None
    dim_hints: dict[str, int] = field(default_factory=dict)
    module: torch.nn.Module | None = None
    tokenizer: Any = None
    task: str | None = None
    extra_files: dict[str, bytes] = field(default_factory=dict)
    package: Path | None = None
    build: dict[str, Any] = field(default_factory=dict)

    @property
    def static_batch(self) -> int | None:
        """The batch size every input is fixed to, or None when axis 0 is dynamic."""
        sizes = {s.shape[0] for s in self.inputs if s.rank and not s.is_dynamic(0)}
        if len(sizes) == 1 and not any(s.rank and s.is_dynamic(0) for s in self.inputs):
            return int(next(iter(sizes)))
        return None
