"""Model formats: load (safely), save, inspect, weigh, run and re-export.

One backend module per format (:mod:`~worker.formats.pt2`, :mod:`~worker.formats.onnx`,
:mod:`~worker.formats.hf`), each implementing :class:`~worker.formats.base.FormatBackend`
and registered by :class:`~worker.contract.ModelFormat` in
:data:`~worker.formats.registry.BACKENDS`; the functions here look the backend up (a miss
fails loudly, naming the known formats). What an upload may hold is
:mod:`worker.safety`'s rule, which every backend applies before its own checks. Format
facts (suffix, media type, runtime) are :mod:`worker.contract`'s.

- :mod:`~worker.formats.types`: :class:`TensorSpec`, :class:`LoadedModel`.
- :mod:`~worker.formats.models`: :func:`load_model`, :func:`save_model`,
  :func:`inspect_model`, :func:`layer_counts`, :func:`weight_arrays`, :func:`weight_shapes`.
- :mod:`~worker.formats.inputs`: :func:`generate_inputs`, :func:`cast_feeds`.
- :mod:`~worker.formats.runtime`: :class:`Runtime`.
- :mod:`~worker.formats.reexport`: :func:`reexport_pt2` and its helpers.

Torch, onnx, onnxruntime and transformers are imported inside functions: importing this
package imports none of them.
"""

from __future__ import annotations

from worker.contract import FORMATS as _FACTS
from worker.contract import ModelFormat, values
from worker.formats._torch import tensor_to_numpy as _tensor_to_numpy
from worker.formats.base import FormatBackend, Runner, WeightsUnreadable
from worker.formats.hf import (
    HF_MAX_EXTRA_FILE_BYTES,
    HF_SEQUENCE_HINT,
    extract_hf_archive,
    hf_model_from_module,
    hf_output,
    load_hf_folder,
    load_hf_model,
    save_hf_model,
)
from worker.formats.inputs import cast_feeds, generate_inputs
from worker.formats.models import (
    inspect_model,
    layer_counts,
    layer_names,
    load_model,
    save_model,
    weight_arrays,
    weight_shapes,
)
from worker.formats.onnx import load_onnx_proto, onnx_model_from_proto
from worker.formats.pt2 import load_pt2_program, pt2_model_from_program
from worker.formats.reexport import pt2_dynamic_shapes, pt2_example_args, reexport_pt2
from worker.formats.registry import BACKENDS, backend_for
from worker.formats.runtime import Runtime
from worker.formats.types import HF_TASKS, LoadedModel, TensorSpec
from worker.safety import EXPORT_HELP, HF_SAVE_HELP

FORMATS = values(ModelFormat)
FILE_SUFFIX = {str(fmt): facts.suffix for fmt, facts in _FACTS.items()}

__all__ = [
    "BACKENDS",
    "EXPORT_HELP",
    "FILE_SUFFIX",
    "FORMATS",
    "HF_MAX_EXTRA_FILE_BYTES",
    "HF_SAVE_HELP",
    "HF_SEQUENCE_HINT",
    "HF_TASKS",
    "FormatBackend",
    "LoadedModel",
    "Runner",
    "Runtime",
    "TensorSpec",
    "WeightsUnreadable",
    "_tensor_to_numpy",
    "backend_for",
    "cast_feeds",
    "extract_hf_archive",
    "generate_inputs",
    "hf_model_from_module",
    "hf_output",
    "inspect_model",
    "layer_counts",
    "layer_names",
    "load_hf_folder",
    "load_hf_model",
    "load_model",
    "load_onnx_proto",
    "load_pt2_program",
    "onnx_model_from_proto",
    "pt2_dynamic_shapes",
    "pt2_example_args",
    "pt2_model_from_program",
    "reexport_pt2",
    "save_hf_model",
    "save_model",
    "weight_arrays",
    "weight_shapes",
]
