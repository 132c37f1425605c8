"""Model formats: load (safely), save, inspect, run and re-export.

Three formats:

- ``pt2``: a ``torch.export`` ExportedProgram saved with ``torch.export.save``. Uploads are
  untrusted, and ``torch.export.load`` can unpickle, resolve ``torch.*`` callables as graph
  targets, and ``sympy.sympify`` (``eval``) symbolic-shape strings. :func:`load_model`
  therefore checks the archive first with :mod:`worker.safety.pt2` (the upload check's
  rules: no pickled payload, no custom or opaque object, no compiled code, no legacy
  layout, plain symbolic expressions only), loads it with ``torch.load`` forced to
  ``weights_only=True`` and unpickling refused, and then checks that every graph node
  calls an operator, never an arbitrary Python callable.
- ``onnx``: a single self-contained ``.onnx`` file, checked by :mod:`worker.safety.onnx`
  (external data is refused: its paths would point at files on the worker).
- ``hf``: a zipped Hugging Face Transformers model folder (``config.json``, ``*.safetensors``
  weights, tokenizer files), at the zip's root or in its single top folder, checked by
  :mod:`worker.safety.hf` (member paths, code, pickles, config), extracted into a
  temporary folder and loaded with ``AutoConfig`` and the Auto class of its architecture
  (sequence classification or the base model, i.e. feature extraction) with
  ``trust_remote_code=False``, ``local_files_only=True`` and ``use_safetensors=True``.
  The architecture must be one transformers itself maps to the config's ``model_type``.
  Its inputs are ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the
  tokenizer produces them), ``[batch, sequence]`` int64 with both dims dynamic; its one
  output is ``logits`` (``[batch, num_labels]``) or ``last_hidden_state``
  (``[batch, sequence, hidden]``).

Torch, onnx and onnxruntime are imported inside functions: the API process imports
nothing from here.
"""

from __future__ import annotations

import contextlib
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.contract import FORMATS as CONTRACT_FORMATS
from worker.contract import ModelFormat, values
from worker.errors import EngineError, InvalidModelError, ModelRunError, UnsupportedError
from worker.safety import EXPORT_HELP as EXPORT_HELP  # re-exported: callers import it here
from worker.safety import HF_SAVE_HELP as HF_SAVE_HELP
from worker.safety import NotThisFormat, Unsafe
from worker.safety import hf as hf_safety
from worker.safety import onnx as onnx_safety
from worker.safety import pt2 as pt2_safety

if TYPE_CHECKING:
    import onnx
    import torch
    from torch.export import ExportedProgram

FORMATS = values(ModelFormat)
FILE_SUFFIX = {str(fmt): facts.suffix for fmt, facts in CONTRACT_FORMATS.items()}
HF_TASKS = ("sequence-classification", "feature-extraction")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output.

    Attributes:
        name: the input/output name (pt2: the forward argument's name).
        shape: ints for static dims, a symbol name (e.g. ``"s0"``, ``"batch"``) for a
            dynamic dim.
        dtype: numpy dtype name (``"float32"``, ``"int64"``, ...).
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    @property
    def rank(self) -> int:
        return len(self.shape)

    def is_dynamic(self, axis: int) -> bool:
        return not isinstance(self.shape[axis], int)

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.name}: [{dims}] {self.dtype}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class LoadedModel:
    """A model in memory, as it flows between pipeline steps.

    Attributes:
        format: ``"pt2"``, ``"onnx"`` or ``"hf"``.
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

    @property
    def static_batch(self) -> int | None:
        """The batch size every input is fixed to, or None when axis 0 is dynamic."""
        sizes = {s.shape[0] for s in self.inputs if s.rank and isinstance(s.shape[0], int)}
        if len(sizes) == 1 and not any(s.rank and s.is_dynamic(0) for s in self.inputs):
            return int(next(iter(sizes)))
        return None


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UnsupportedError(
            f"unknown model format {fmt!r}; supported: {', '.join(FORMATS)}", step="load"
        )


# --------------------------------------------------------------------------------------
# Loading


def load_model(path: Path, fmt: str) -> LoadedModel:
    """Load a model file safely.

    Raises:
        InvalidModelError: the file is broken, unsafe, or not ``fmt``; the message says why.
        UnsupportedError: ``fmt`` is not a known format.
    """
    _check_format(fmt)
    path = Path(path)
    if not path.is_file():
        raise InvalidModelError(f"model file {path.name!r} does not exist", step="load")
    if fmt == "pt2":
        return pt2_model_from_program(load_pt2_program(path))
    if fmt == "hf":
        return load_hf_model(path)
    return onnx_model_from_proto(load_onnx_proto(path))


# Operators that touch the file system; a model has no business calling them.
_DENIED_OPS = frozenset({"aten::from_file", "aten::_save", "aten::save"})
_ALLOWED_OPERATOR_FNS = frozenset(
    {
        "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos",
        "abs", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert",
        "lshift", "rshift", "matmul", "truth", "index",
    }
)  # fmt: skip
_load_lock = threading.Lock()


def load_pt2_program(path: Path) -> ExportedProgram:
    """Load a ``.pt2`` upload without unpickling anything (see the module docstring)."""
    path = Path(path)
    with _refused():
        ops_used = pt2_safety.check_pt2_file(path)
    import torch

    if "quantized_decomposed" in ops_used:
        import torch.ao.quantization.fx._decomposed
    if "torchao" in ops_used:
        import torchao  # noqa: F401  (registers torchao's ops)
    try:
        with _weights_only_unpickling():
            program = torch.export.load(str(path))
    except EngineError:
        raise
    except Exception as exc:
        raise InvalidModelError(
            f"could not load the pt2 archive: {type(exc).__name__}: {exc}", step="load"
        ) from exc
    _check_graph_targets(program)
    return program


@contextlib.contextmanager
def _refused() -> Iterator[None]:
    """A refusal by one of worker.safety's checks, as the engine's InvalidModelError."""
    try:
        yield
    except Unsafe as exc:
        raise InvalidModelError(exc.detail, step="load") from None


class _NoUnpickling:
    """Stands in for the ``pickle`` module inside torch's archive reader during a load."""

    def __getattr__(self, name: str) -> Any:
        import pickle

        return getattr(pickle, name)

    @staticmethod
    def loads(*args: Any, **kwargs: Any) -> Any:
        raise InvalidModelError("the archive holds a pickled object; refused", step="load")


@contextlib.contextmanager
def _weights_only_unpickling() -> Iterator[None]:
    """Force ``torch.load(weights_only=True)`` and refuse object unpickling during a load.

    ``torch.export.load`` calls ``torch.load(..., weights_only=False)`` for pickled
    payloads and as a fallback for sample inputs; both go through this wrapper.
    """
    import torch
    from torch.export.pt2_archive import _package

    real_load = torch.load
    real_pickle_load_obj = torch._C._pickle_load_obj
    real_pickle = _package.pickle

    def weights_only_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("pickle_module", None)
        kwargs["weights_only"] = True
        return real_load(f, *args, **kwargs)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise InvalidModelError("the archive holds a TorchScript object; refused", step="load")

    with _load_lock:
        torch.load = weights_only_load  # type: ignore[assignment]
        torch._C._pickle_load_obj = refuse
        _package.pickle = _NoUnpickling()  # type: ignore[assignment]
        try:
            yield
        finally:
            torch.load = real_load
            torch._C._pickle_load_obj = real_pickle_load_obj
            _package.pickle = real_pickle


def _check_graph_targets(program: ExportedProgram) -> None:
    """Every node must call an operator: torch's deserializer resolves any ``torch.*`` name."""
    import math
    import operator

    import torch

    allowed_callables = {
        torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not,
        torch.sym_ite, torch.sym_sum, torch.sym_sqrt,
    }  # fmt: skip
    for gm in program.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op in ("call_method", "call_module"):
                raise InvalidModelError(
                    f"node {node.name} is a {node.op}, which an exported program never has",
                    step="load",
                )
            if node.op != "call_function":
                continue
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                if target._schema.name in _DENIED_OPS:
                    raise InvalidModelError(
                        f"node {node.name} calls {target._schema.name}, which reads or writes "
                        "files; refused",
                        step="load",
                    )
                continue
            if isinstance(target, torch._ops.HigherOrderOperator) or target in allowed_callables:
                continue
            module = getattr(target, "__module__", None)
            name = getattr(target, "__name__", "")
            if module in ("_operator", "operator") and name in _ALLOWED_OPERATOR_FNS:
                continue
            if module == "math" and getattr(math, name, None) is target:
                continue
            if getattr(operator, name, None) is target and name in _ALLOWED_OPERATOR_FNS:
                continue
            raise InvalidModelError(
                f"node {node.name} calls {target!r}, which is not an operator; refused",
                step="load",
            )


def load_onnx_proto(path: Path) -> onnx.ModelProto:
    """Load a single-file ONNX model and check it (worker.safety's ONNX rules)."""
    with _refused():
        try:
            return onnx_safety.check_onnx_file(path)
        except NotThisFormat as exc:
            raise onnx_safety.not_onnx(exc) from None


# --------------------------------------------------------------------------------------
# Hugging Face (hf): a zipped Transformers model folder

HF_MAX_EXTRA_FILE_BYTES = 1 << 20
HF_SEQUENCE_HINT = 16
# What save_pretrained (model and tokenizer) writes itself; not kept as extra files.
_HF_WRITTEN_BY_SAVE = frozenset(
    {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json",
        "merges.txt", "chat_template.jinja", "chat_template.json",
    }
)  # fmt: skip
_HF_EXTRA_SUFFIXES = (".json", ".txt", ".md")


def load_hf_model(path: Path) -> LoadedModel:
    """Load a zipped Hugging Face model folder safely (see the module docstring)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="squish-hf-") as tmp:
        folder, config = extract_hf_archive(Path(path), Path(tmp))
        return load_hf_folder(folder, config)


def extract_hf_archive(path: Path, dest: Path) -> tuple[Path, dict[str, Any]]:
    """Check the zip (worker.safety's hf rules) and extract its folder under ``dest``.

    Returns:
        The extracted model folder and its config.json.

    Raises:
        InvalidModelError: what the check refused, or a member that cannot be extracted.
    """
    import shutil

    with _refused():
        archive = hf_safety.check_hf_file(path)
    try:
        with zipfile.ZipFile(path) as zf:
            dest.mkdir(parents=True, exist_ok=True)
            for name in archive.members:
                target = dest.joinpath(*name[len(archive.root) :].split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)  # zipfile checks the CRC at EOF
    except zipfile.BadZipFile as exc:
        raise InvalidModelError(f"the hf zip is corrupt: {exc}", step="load") from exc
    except (OSError, EOFError, NotImplementedError) as exc:
        raise InvalidModelError(f"the hf zip cannot be extracted: {exc}", step="load") from exc
    return dest, archive.config


def _hf_auto_class(model_type: str, architecture: str) -> tuple[str, Any]:
    """The task and Auto class of a transformers architecture; refuses anything else."""
    import transformers
    from transformers.models.auto import modeling_auto

    candidates = (
        (
            "sequence-classification",
            modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
            transformers.AutoModelForSequenceClassification,
        ),
        ("feature-extraction", modeling_auto.MODEL_MAPPING_NAMES, transformers.AutoModel),
    )
    for task, names, auto_class in candidates:
        expected = names.get(model_type)
        allowed = expected if isinstance(expected, tuple | list) else (expected,)
        if architecture in allowed:
            return task, auto_class
    raise UnsupportedError(
        f"architecture {architecture!r} (model_type {model_type!r}) is not a transformers "
        f"sequence classifier or base model; supported hf tasks: {', '.join(HF_TASKS)} "
        "(e.g. BertForSequenceClassification, BertModel)",
        step="load",
    )


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_hf_folder(folder: Path, config_json: dict[str, Any]) -> LoadedModel:
    """Load a checked, extracted model folder with transformers (no remote code, no hub)."""
    import transformers

    _quiet_transformers()
    architecture = config_json["architectures"][0]
    task, auto_class = _hf_auto_class(config_json["model_type"], architecture)
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(folder), trust_remote_code=False, local_files_only=True
        )
        # Chosen here, never taken from config.json (where it could name a hub kernel).
        model_class = getattr(transformers, architecture, None)
        attention = "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"
        module = auto_class.from_pretrained(
            str(folder),
            config=config,
            trust_remote_code=False,
            local_files_only=True,
            use_safetensors=True,
            attn_implementation=attention,
        )
    except EngineError:
        raise
    except Exception as exc:  # transformers raises many types for a bad folder
        raise InvalidModelError(
            f"transformers could not load the model: {type(exc).__name__}: {exc}", step="load"
        ) from exc
    if type(module).__name__ != architecture or not type(module).__module__.startswith(
        "transformers."
    ):
        raise InvalidModelError(
            f"config.json names {architecture!r} but transformers built {type(module).__name__!r}",
            step="load",
        )
    module.eval()
    if getattr(module, "main_input_name", "input_ids") != "input_ids":
        raise UnsupportedError(
            f"{architecture} takes {module.main_input_name}, not input_ids: only text models "
            "are supported in hf format",
            step="load",
        )
    try:  # the safety check made sure the folder has tokenizer files
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(folder), trust_remote_code=False, local_files_only=True
        )
    except Exception as exc:  # tokenizers and transformers raise many types
        raise InvalidModelError(
            f"the tokenizer files could not be loaded: {type(exc).__name__}: {exc}",
            step="load",
        ) from exc
    extra = {}
    for file in sorted(folder.rglob("*")):
        rel = file.relative_to(folder).as_posix()
        if (
            file.is_file()
            and rel not in _HF_WRITTEN_BY_SAVE
            and file.suffix.lower() in _HF_EXTRA_SUFFIXES
            and not rel.endswith(".safetensors.index.json")
            and file.stat().st_size <= HF_MAX_EXTRA_FILE_BYTES
        ):
            extra[rel] = file.read_bytes()
    model = hf_model_from_module(module, tokenizer, task)
    model.extra_files = extra
    return model


def hf_model_from_module(module: torch.nn.Module, tokenizer: Any, task: str) -> LoadedModel:
    """Wrap a transformers module: its text inputs and its one output, as TensorSpecs."""
    import inspect

    config: Any = module.config
    accepted = set(inspect.signature(module.forward).parameters)
    produced = set(getattr(tokenizer, "model_input_names", ("input_ids", "attention_mask")))
    names = [
        name
        for name in ("input_ids", "attention_mask", "token_type_ids")
        if name in accepted and (name == "input_ids" or name in produced)
    ]
    inputs = [TensorSpec(name, ("batch", "sequence"), "int64") for name in names]
    dtype = _torch_dtype_name(next(module.parameters()).dtype)
    if task == "sequence-classification":
        outputs = [TensorSpec("logits", ("batch", int(config.num_labels)), dtype)]
    else:
        outputs = [
            TensorSpec("last_hidden_state", ("batch", "sequence", int(config.hidden_size)), dtype)
        ]
    hint = min(HF_SEQUENCE_HINT, int(getattr(config, "max_position_embeddings", 512) or 512))
    return LoadedModel(
        "hf",
        inputs,
        outputs,
        dim_hints={"sequence": hint},
        module=module,
        tokenizer=tokenizer,
        task=task,
    )


def hf_output(model: LoadedModel, result: Any) -> torch.Tensor:
    """The one output squish uses of a transformers forward: logits or last_hidden_state."""
    if model.task == "sequence-classification":
        return result.logits
    return result.last_hidden_state


def save_hf_model(model: LoadedModel, path: Path) -> None:
    """``save_pretrained`` (safetensors) + the tokenizer + the extra files, zipped (stored)."""
    import tempfile

    module: Any = model.module
    assert module is not None
    _quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="squish-hf-save-") as tmp:
        folder = Path(tmp)
        module.save_pretrained(str(folder))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(folder))
        for rel, data in model.extra_files.items():
            target = folder.joinpath(*rel.split("/"))
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        refused = hf_safety.PICKLE_SUFFIXES + hf_safety.CODE_SUFFIXES
        unsafe = [n for n in written if n.lower().endswith(refused)]
        if unsafe or not any(n.endswith(".safetensors") for n in written):
            raise UnsupportedError(
                f"save_pretrained did not write plain safetensors weights (wrote {written}); "
                "this model cannot be saved in hf format",
                step="save",
            )
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for rel in written:
                zf.write(folder / rel, rel)


# --------------------------------------------------------------------------------------
# Signatures


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pt2_model_from_program(program: ExportedProgram) -> LoadedModel:
    """Wrap an ExportedProgram, reading its user inputs and outputs from the graph."""
    import torch
    from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs: list[TensorSpec] = []
    hints: dict[str, int] = {}
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        if not isinstance(spec.arg, TensorArgument):
            raise UnsupportedError(
                f"model input {spec.arg} is not a tensor; only tensor inputs are supported",
                step="load",
            )
        val = placeholders[spec.arg.name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise InvalidModelError(f"input {spec.arg.name} has no tensor metadata", step="load")
        inputs.append(
            TensorSpec(spec.arg.name, _shape_of(val, hints), _torch_dtype_name(val.dtype))
        )
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    flat_outputs = list(output_node.args[0])
    outputs: list[TensorSpec] = []
    for spec, arg in zip(program.graph_signature.output_specs, flat_outputs, strict=False):
        if spec.kind != OutputKind.USER_OUTPUT:
            continue
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        if isinstance(val, torch.Tensor):
            name = spec.arg.name if isinstance(spec.arg, TensorArgument) else str(arg)
            outputs.append(TensorSpec(name, _shape_of(val, hints), _torch_dtype_name(val.dtype)))
    return LoadedModel("pt2", inputs, outputs, program=program, dim_hints=hints)


def _shape_of(val: torch.Tensor, hints: dict[str, int]) -> tuple[int | str, ...]:
    import torch

    shape: list[int | str] = []
    for dim in val.shape:
        if isinstance(dim, torch.SymInt):
            name = str(dim)
            hint = dim.node.hint
            if hint is not None:
                hints.setdefault(name, int(hint))
            shape.append(name)
        else:
            shape.append(int(dim))
    return tuple(shape)


def _onnx_value_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    import onnx

    ttype = value.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)).name
    except (KeyError, TypeError, ValueError):
        dtype = onnx.TensorProto.DataType.Name(ttype.elem_type).lower()
    shape: list[int | str] = []
    for i, dim in enumerate(ttype.shape.dim):
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        else:
            shape.append(dim.dim_param or f"{value.name}_dim{i}")
    return TensorSpec(value.name, tuple(shape), dtype)


def onnx_model_from_proto(proto: onnx.ModelProto) -> LoadedModel:
    """Wrap a ModelProto; graph inputs that are initializers are not model inputs."""
    initializer_names = {t.name for t in proto.graph.initializer}
    inputs = [_onnx_value_spec(v) for v in proto.graph.input if v.name not in initializer_names]
    outputs = [_onnx_value_spec(v) for v in proto.graph.output]
    return LoadedModel("onnx", inputs, outputs, proto=proto)


# --------------------------------------------------------------------------------------
# Saving and inspecting


def _save_pt2_without_data(program: torch.export.ExportedProgram, path: Path) -> None:
    """``torch.export.save`` with the program's example inputs replaced by zeros of the
    same shapes and dtypes: a re-export traces with a few real samples (train or
    calibration data), and the user's data has no business inside the artifact."""
    import torch
    from torch.utils import _pytree

    examples = program.example_inputs
    if examples is not None:
        program.example_inputs = _pytree.tree_map(
            lambda v: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v, examples
        )
    try:
        torch.export.save(program, str(path))
    finally:
        if examples is not None:
            program.example_inputs = examples


def save_model(model: LoadedModel, path: Path) -> None:
    """Write the model: pt2 with ``torch.export.save`` (example inputs zeroed), onnx as one
    file with ``onnx.save``, hf as a zip of the ``save_pretrained`` folder (safetensors
    weights, tokenizer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.format == "pt2":
        assert model.program is not None
        _save_pt2_without_data(model.program, path)
    elif model.format == "onnx":
        import onnx

        assert model.proto is not None
        if model.proto.ByteSize() >= 2**31:
            raise UnsupportedError(
                "the ONNX model is over 2 GiB, which needs external data files; not supported",
                step="save",
            )
        onnx.save(model.proto, str(path))
    elif model.format == "hf":
        save_hf_model(model, path)
    else:
        _check_format(model.format)


def inspect_model(path: Path, fmt: str) -> dict[str, Any]:
    """Describe a model file.

    Returns:
        ``{"parameters": int, "layers": {op: count}, "inputs": [...], "outputs": [...]}``;
        layers count operators (pt2: ``aten.linear`` ...; onnx: ``Gemm`` ...; hf: module
        types, ``Linear`` ...), inputs and outputs are ``{"name", "shape", "dtype"}`` with a
        symbol name for a dynamic dim. hf adds ``task`` and ``architecture``.
    """
    model = load_model(path, fmt)
    info: dict[str, Any] = {
        "parameters": sum(int(np.prod(shape)) for shape in weight_shapes(model).values()),
        "layers": dict(sorted(layer_counts(model).items())),
        "inputs": [s.to_dict() for s in model.inputs],
        "outputs": [s.to_dict() for s in model.outputs],
    }
    if model.format == "hf":
        assert model.module is not None
        info["task"] = model.task
        info["architecture"] = type(model.module).__name__
    return info


def layer_counts(model: LoadedModel) -> Counter[str]:
    """Operator counts: pt2 ``aten.linear``-style names, onnx op types, hf leaf module types."""
    counts: Counter[str] = Counter()
    if model.format == "hf":
        assert model.module is not None
        for module in model.module.modules():
            if not any(True for _ in module.children()):
                counts[type(module).__name__] += 1
    elif model.format == "pt2":
        import torch

        assert model.program is not None
        for node in model.program.graph.nodes:
            if node.op != "call_function":
                continue
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                counts[f"{target.namespace}.{target._opname}"] += 1
            else:
                counts[getattr(target, "__name__", str(target))] += 1
    else:
        assert model.proto is not None
        for node in model.proto.graph.node:
            counts[node.op_type if not node.domain else f"{node.domain}.{node.op_type}"] += 1
    return counts


_WEIGHT_DTYPES = frozenset(
    {"float16", "bfloat16", "float32", "float64", "int8", "uint8", "int4", "uint4"}
)


def weight_arrays(model: LoadedModel) -> dict[str, np.ndarray]:
    """The model's weight tensors as numpy arrays (see :func:`weight_shapes` for which)."""
    if model.format == "pt2":
        return {name: _tensor_to_numpy(t) for name, t in _pt2_weight_tensors(model).items()}
    if model.format == "hf":
        return {name: _tensor_to_numpy(t) for name, t in _hf_weight_tensors(model).items()}
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in _onnx_weight_initializers(model)}


def weight_shapes(model: LoadedModel) -> dict[str, tuple[int, ...]]:
    """Shapes of the weight tensors.

    Weights are a pt2 program's parameters plus its 8-bit integer buffers/constants
    (quantized weights); an hf module's parameters (a tied weight once) plus its 8-bit
    integer buffers; an onnx model's float and 8-bit initializers except those that
    are quantization metadata (scales and zero points of quantize/dequantize and integer
    matmul/conv ops, and the weight scales ONNX Runtime multiplies after an integer matmul).
    """
    if model.format == "pt2":
        return {name: tuple(t.shape) for name, t in _pt2_weight_tensors(model).items()}
    if model.format == "hf":
        return {name: tuple(t.shape) for name, t in _hf_weight_tensors(model).items()}
    return {t.name: tuple(t.dims) for t in _onnx_weight_initializers(model)}


def _tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _pt2_weight_tensors(model: LoadedModel) -> dict[str, torch.Tensor]:
    import torch

    program = model.program
    assert program is not None
    sig = program.graph_signature
    weights: dict[str, torch.Tensor] = {}
    for name in sig.parameters:
        weights[name] = program.state_dict[name]
    others: dict[str, Any] = {}
    for name in sig.buffers:
        others[name] = program.state_dict.get(name, program.constants.get(name))
    for name in sig.lifted_tensor_constants:
        others[name] = program.constants.get(name)
    for name, t in others.items():
        if isinstance(t, torch.Tensor) and t.dtype in (torch.int8, torch.uint8):
            weights[name] = t
    return _decode_packed_weights(weights, others)


def _hf_weight_tensors(model: LoadedModel) -> dict[str, torch.Tensor]:
    import torch

    assert model.module is not None
    weights: dict[str, torch.Tensor] = {
        name: p.detach() for name, p in model.module.named_parameters(remove_duplicate=True)
    }
    buffers = dict(model.module.named_buffers(remove_duplicate=True))
    for name, buf in buffers.items():
        if buf.dtype in (torch.int8, torch.uint8):
            weights[name] = buf
    return _decode_packed_weights(weights, buffers)


def _decode_packed_weights(
    weights: dict[str, torch.Tensor], buffers: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Each packed 1/2/4-bit weight (a ``packed`` buffer of :class:`worker.packing.PackedLayer`
    with its ``packed_layout`` beside it) replaced by the logical weight it decodes to, so
    parameters and sparsity count weights, not bytes; the file size stays the packed size."""
    import torch

    from worker.packing import PACKED_SUFFIX, decode_packed, layout_name

    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        layout = buffers.get(layout_name(name) or "")
        if tensor.dtype != torch.uint8 or not isinstance(layout, torch.Tensor):
            out[name] = tensor
            continue
        prefix = name[: -len(PACKED_SUFFIX)]
        scale, offset = buffers.get(prefix + "scale"), buffers.get(prefix + "offset")
        if not isinstance(scale, torch.Tensor) or not isinstance(offset, torch.Tensor):
            out[name] = tensor
            continue
        out[prefix + "weight"] = decode_packed(tensor, scale, offset, layout)
    return out


_ONNX_QUANT_METADATA_INPUTS: dict[str, tuple[int, ...]] = {
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
    "MatMulInteger": (2, 3),
    "ConvInteger": (2, 3),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "QLinearConv": (1, 2, 4, 5, 6, 7),
    "DynamicQuantizeMatMul": (2, 3),
    "MatMulIntegerToFloat": (2, 3, 4, 5),
}


def _onnx_weight_initializers(model: LoadedModel) -> list[onnx.TensorProto]:
    import onnx

    assert model.proto is not None
    graph = model.proto.graph
    metadata: set[str] = set()
    dql_scales = {n.output[1] for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
    for node in graph.node:
        for index in _ONNX_QUANT_METADATA_INPUTS.get(node.op_type, ()):
            if index < len(node.input):
                metadata.add(node.input[index])
        if node.op_type == "Mul" and any(i in dql_scales for i in node.input):
            metadata.update(node.input)
    weights = []
    for tensor in graph.initializer:
        if tensor.name in metadata:
            continue
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).name
        except (KeyError, TypeError, ValueError):
            dtype = onnx.TensorProto.DataType.Name(tensor.data_type).lower()
        if dtype in _WEIGHT_DTYPES:
            weights.append(tensor)
    return weights


# --------------------------------------------------------------------------------------
# Inputs and running


def generate_inputs(model: LoadedModel, batch: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs built from the signature: standard normal floats, zeros for integers.

    Text inputs are the exception: an ``attention_mask`` is all ones, and an hf model's
    ``input_ids`` are uniform random token ids of its vocabulary. A dynamic axis 0 gets
    ``batch``; another dynamic dim gets the export's example size when known, else 8.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif axis == 0:
                shape.append(batch)
            else:
                shape.append(max(2, model.dim_hints.get(dim, 8)))
        dtype = np.dtype(spec.dtype if spec.dtype != "bfloat16" else "float32")
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        elif spec.name == "input_ids" and model.module is not None:
            vocab = int(getattr(model.module.config, "vocab_size", 2) or 2)
            feeds[spec.name] = rng.integers(0, vocab, size=shape).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return feeds


def cast_feeds(model: LoadedModel, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays cast to the dtypes of the model's inputs, in input order."""
    out = {}
    for spec in model.inputs:
        arr = feeds[spec.name]
        target = np.dtype("float32" if spec.dtype == "bfloat16" else spec.dtype)
        out[spec.name] = np.ascontiguousarray(arr, dtype=target)
    return out


class Runtime:
    """A model loaded in the runtime of its file: call with feeds, get outputs.

    pt2 runs ``torch.export.load(...).module()`` eagerly under ``torch.inference_mode``;
    hf runs the transformers module (loaded with ``from_pretrained``) the same way and
    returns its ``logits`` or ``last_hidden_state``; onnx runs an
    ``onnxruntime.InferenceSession`` (CPU provider, or CUDA for ``gpu``).
    """

    def __init__(self, path: Path, fmt: str, device: str = "cpu") -> None:
        _check_format(fmt)
        self.model = load_model(path, fmt)
        self.format = fmt
        self.device = device
        self._call: Callable[[dict[str, np.ndarray]], list[np.ndarray]]
        if fmt == "pt2":
            self._call = self._pt2_runner()
        elif fmt == "hf":
            self._call = self._hf_runner()
        else:
            self._call = self._onnx_runner(path)

    def _pt2_runner(self) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
        import torch
        from torch.utils import _pytree as pytree

        program = self.model.program
        assert program is not None
        torch_device = torch.device("cpu")
        if self.device == "gpu":
            if not torch.cuda.is_available():
                raise UnsupportedError("device 'gpu' requested but this worker has no CUDA GPU")
            from torch.export.passes import move_to_device_pass

            torch_device = torch.device("cuda")
            program = move_to_device_pass(program, torch_device)
        module = program.module()
        in_spec = program.call_spec.in_spec
        names = [s.name for s in self.model.inputs]
        on_gpu = torch_device.type == "cuda"

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            flat = [torch.from_numpy(feeds[name]).to(torch_device) for name in names]
            args, kwargs = pytree.tree_unflatten(flat, in_spec)
            with torch.inference_mode():
                result = module(*args, **kwargs)
                if on_gpu:
                    torch.cuda.synchronize()
            leaves = pytree.tree_leaves(result)
            return [_tensor_to_numpy(t) for t in leaves if isinstance(t, torch.Tensor)]

        return run

    def _hf_runner(self) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
        import torch

        module = self.model.module
        assert module is not None
        torch_device = torch.device("cpu")
        if self.device == "gpu":
            if not torch.cuda.is_available():
                raise UnsupportedError("device 'gpu' requested but this worker has no CUDA GPU")
            torch_device = torch.device("cuda")
            module.to(torch_device)
        names = [s.name for s in self.model.inputs]
        on_gpu = torch_device.type == "cuda"
        model = self.model

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            kwargs = {name: torch.from_numpy(feeds[name]).to(torch_device) for name in names}
            with torch.inference_mode():
                result = hf_output(model, module(**kwargs))
                if on_gpu:
                    torch.cuda.synchronize()
            return [_tensor_to_numpy(result)]

        return run

    def _onnx_runner(self, path: Path) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if self.device == "gpu":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UnsupportedError(
                    "device 'gpu' requested but onnxruntime on this worker has no CUDA provider"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise InvalidModelError(
                f"ONNX Runtime cannot load the model: {exc}", step="load"
            ) from exc

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            return [np.asarray(o) for o in session.run(None, feeds)]

        return run

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


# --------------------------------------------------------------------------------------
# Re-export after a pt2 graph changed


def pt2_example_args(model: LoadedModel, feeds: dict[str, np.ndarray] | None = None) -> tuple:
    """``(args, kwargs)`` for the program's forward, from feeds or generated inputs.

    Generated inputs use batch 2 so that a dynamic batch dim is not specialized to 1.
    """
    import torch
    from torch.utils import _pytree as pytree

    assert model.program is not None
    feeds = cast_feeds(model, feeds if feeds is not None else generate_inputs(model, batch=2))
    flat = [torch.from_numpy(feeds[s.name].copy()) for s in model.inputs]
    return pytree.tree_unflatten(flat, model.program.call_spec.in_spec)


def pt2_dynamic_shapes(model: LoadedModel) -> tuple | None:
    """The uploaded program's dynamic dims as ``dynamic_shapes`` for ``torch.export.export``."""
    import torch
    from torch.utils import _pytree as pytree

    assert model.program is not None
    per_input = [
        {axis: torch.export.Dim.DYNAMIC for axis in range(s.rank) if s.is_dynamic(axis)} or None
        for s in model.inputs
    ]
    if not any(per_input):
        return None
    args, kwargs = pytree.tree_unflatten(per_input, model.program.call_spec.in_spec)
    return (*args, *kwargs.values())


def reexport_pt2(
    module: torch.nn.Module, reference: LoadedModel, feeds: dict[str, np.ndarray] | None = None
) -> LoadedModel:
    """``torch.export`` a changed module again, keeping the reference program's dynamic dims.

    A dim that was dynamic in the upload is exported as ``Dim.DYNAMIC``; a static one
    (e.g. a fixed batch size) stays static. Parameters and buffers the graph no longer
    reads (e.g. fp32 weights replaced by int8 constants) are dropped first.
    """
    import torch

    _drop_unused_state(module)
    args, kwargs = pt2_example_args(reference, feeds)
    try:
        program = torch.export.export(
            module, tuple(args), kwargs or None, dynamic_shapes=pt2_dynamic_shapes(reference)
        )
    except Exception as exc:  # export raises many unrelated types
        raise UnsupportedError(
            f"re-exporting the changed program failed: {type(exc).__name__}: {exc}"
        ) from exc
    loaded = pt2_model_from_program(program)
    for before, after in zip(reference.inputs, loaded.inputs, strict=True):
        for axis in range(before.rank):
            if before.is_dynamic(axis) and not after.is_dynamic(axis):
                raise UnsupportedError(
                    f"the changed program lost dynamic dim {axis} of input {before.name!r}"
                )
    return loaded


def _drop_unused_state(module: torch.nn.Module) -> None:
    import torch

    from worker.packing import layout_name

    if not isinstance(module, torch.fx.GraphModule):
        return
    used = {str(n.target) for n in module.graph.nodes if n.op == "get_attr"}
    for node in module.graph.nodes:  # a called layer's own weights are used too
        if node.op == "call_module":
            layer = module.get_submodule(str(node.target))
            owned = [n for n, _ in layer.named_parameters()] + [n for n, _ in layer.named_buffers()]
            used.update(f"{node.target}.{name}" for name in owned)
    state = [name for name, _ in module.named_parameters()] + [
        name for name, _ in module.named_buffers()
    ]
    # a packed layer's layout is read by squish's metrics, not by the graph: kept with it
    used.update(layout for name in list(used) if (layout := layout_name(name)) is not None)
    for name in state:
        if name in used:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
