"""hf: a zipped Hugging Face Transformers model folder, run with transformers.

``config.json``, ``*.safetensors`` weights and tokenizer files, at the zip's root or in its
single top folder, checked by :mod:`worker.safety.hf` (member paths, code, pickles,
config), extracted into a temporary folder and loaded with ``AutoConfig`` and the Auto
class of its architecture (sequence classification or the base model, i.e. feature
extraction) with ``trust_remote_code=False``, ``local_files_only=True`` and
``use_safetensors=True``. The architecture must be one transformers itself maps to the
config's ``model_type``. Its inputs are ``input_ids``, ``attention_mask`` (and
``token_type_ids`` when the tokenizer produces them), ``[batch, sequence]`` int64 with both
dims dynamic; its one output is ``logits`` (``[batch, num_labels]``) or
``last_hidden_state`` (``[batch, sequence, hidden]``).
"""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.contract import ModelFormat
from worker.errors import EngineError, InvalidModelError, UnsupportedError
from worker.formats._torch import (
    decode_packed_weights,
    int8_weights,
    tensor_to_numpy,
    torch_device,
    torch_dtype_name,
)
from worker.formats.base import Runner, refused
from worker.formats.types import HF_TASKS, LoadedModel, TensorSpec
from worker.layers import layer_of
from worker.safety import hf as hf_safety

if TYPE_CHECKING:
    import torch

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

    with refused():
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
    dtype = torch_dtype_name(next(module.parameters()).dtype)
    if task == "sequence-classification":
        outputs = [TensorSpec("logits", ("batch", int(config.num_labels)), dtype)]
    else:
        outputs = [
            TensorSpec("last_hidden_state", ("batch", "sequence", int(config.hidden_size)), dtype)
        ]
    hint = min(HF_SEQUENCE_HINT, int(getattr(config, "max_position_embeddings", 512) or 512))
    return LoadedModel(
        ModelFormat.hf,
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
        refused_suffixes = hf_safety.PICKLE_SUFFIXES + hf_safety.CODE_SUFFIXES
        unsafe = [n for n in written if n.lower().endswith(refused_suffixes)]
        if unsafe or not any(n.endswith(".safetensors") for n in written):
            raise UnsupportedError(
                f"save_pretrained did not write plain safetensors weights (wrote {written}); "
                "this model cannot be saved in hf format",
                step="save",
            )
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for rel in written:
                zf.write(folder / rel, rel)


def _weight_tensors(model: LoadedModel) -> dict[str, torch.Tensor]:
    assert model.module is not None
    weights: dict[str, torch.Tensor] = {
        name: p.detach() for name, p in model.module.named_parameters(remove_duplicate=True)
    }
    buffers = dict(model.module.named_buffers(remove_duplicate=True))
    weights.update(int8_weights(buffers))
    return decode_packed_weights(weights, buffers)


class HfBackend:
    """The hf format (see the module docstring)."""

    format = ModelFormat.hf

    def load(self, path: Path) -> LoadedModel:
        return load_hf_model(path)

    def save(self, model: LoadedModel, path: Path) -> None:
        save_hf_model(model, path)

    def layer_counts(self, model: LoadedModel) -> Counter[str]:
        """Leaf module types (``Linear``, ``Embedding`` ...)."""
        assert model.module is not None
        counts: Counter[str] = Counter()
        for module in model.module.modules():
            if not any(True for _ in module.children()):
                counts[type(module).__name__] += 1
        return counts

    def layer_names(self, model: LoadedModel) -> list[str]:
        """Module paths of the modules that hold weights (a tied weight under its first)."""
        return list(dict.fromkeys(layer_of(name) for name in _weight_tensors(model)))

    def describe(self, model: LoadedModel) -> dict[str, Any]:
        assert model.module is not None
        return {"task": model.task, "architecture": type(model.module).__name__}

    def weight_arrays(self, model: LoadedModel) -> dict[str, np.ndarray]:
        return {name: tensor_to_numpy(t) for name, t in _weight_tensors(model).items()}

    def weight_shapes(self, model: LoadedModel) -> dict[str, tuple[int, ...]]:
        """The module's parameters (a tied weight once) plus its 8-bit integer buffers."""
        return {name: tuple(t.shape) for name, t in _weight_tensors(model).items()}

    def vocab_size(self, model: LoadedModel) -> int | None:
        if model.module is None:
            return None
        return int(getattr(model.module.config, "vocab_size", 2) or 2)

    def runner(self, model: LoadedModel, path: Path, device: str) -> Runner:
        """The transformers module under ``torch.inference_mode``; its logits or hidden state."""
        import torch

        module = model.module
        assert module is not None
        target = torch_device(device)
        if target.type == "cuda":
            module.to(target)
        names = [s.name for s in model.inputs]
        on_gpu = target.type == "cuda"

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            kwargs = {name: torch.from_numpy(feeds[name]).to(target) for name in names}
            with torch.inference_mode():
                result = hf_output(model, module(**kwargs))
                if on_gpu:
                    torch.cuda.synchronize()
            return [tensor_to_numpy(result)]

        return run
