"""One search trial: a recipe run as a pipeline, reusing the longest stored prefix of it.

The search split is its eval data; the same distilled model quantized four ways is
distilled once.

A prefix is stored as one zip file (``model<suffix>`` + ``steps.json``, the steps' measured
entries) in a :class:`PrefixStore` the caller provides, keyed by
:meth:`worker.search.space.Recipe.prefixes`; a broken or missing prefix is recomputed.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from worker.context import Reporter
from worker.contract import format_facts
from worker.formats import LoadedModel, save_model
from worker.pipeline import PipelineResult, PipelineSpec, Resume, run_pipeline
from worker.schemas import StepMetrics
from worker.search.space import Recipe

_STEPS_FILE = "steps.json"


class PrefixStore(Protocol):
    """Where trials of one search share the models their leading steps made."""

    def get(self, key: str) -> Path | None:
        """A local copy of the file stored under ``key``, or None."""
        ...

    def put(self, key: str, path: Path) -> None:
        """Store the file at ``path`` under ``key`` (a failure must not raise)."""
        ...


def run_trial(
    model_path: Path,
    model_format: str,
    recipe: Recipe,
    datasets: dict[str, Path],
    device: str,
    batch_sizes: Sequence[int],
    warmup: int,
    iterations: int,
    work_dir: Path,
    reporter: Reporter,
    prefixes: PrefixStore | None = None,
    *,
    peak_memory: bool = True,
) -> PipelineResult:
    """Run ``recipe`` on the model (``datasets["eval"]`` is the search split) and measure it.

    ``result.reused_steps`` says how many leading steps came from ``prefixes``;
    ``peak_memory=False`` skips the two fresh processes that measure ``peak_memory_bytes``.

    Raises:
        EngineError: as :func:`worker.pipeline.run_pipeline`.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    spec = PipelineSpec(
        steps=[(name, dict(params)) for name, params in recipe.steps],
        output_format=recipe.output_format,
        device=device,
        batch_sizes=list(batch_sizes),
        warmup=warmup,
        iterations=iterations,
        peak_memory=peak_memory,
    )
    heads = recipe.prefixes(model_format)
    resume: Resume | None = None
    if prefixes is not None:
        for key, head in reversed(heads):
            stored = prefixes.get(key)
            resume = _unpack(stored, len(head), work_dir / "prefix", model_format, reporter)
            if resume is not None:
                break
    done = len(resume.steps) if resume is not None else 0
    whole = len(spec.steps) if recipe.output_format == model_format else None
    # the whole recipe in the model's own format is this trial's artifact, not a prefix
    worth = {len(head): key for key, head in heads if done < len(head) != whole}

    def after_step(index: int, model: LoadedModel, steps: list[StepMetrics]) -> None:
        key = worth.get(index + 1)
        if prefixes is None or key is None:
            return
        path = _pack(model, steps[: index + 1], work_dir / f"prefix-{index + 1}")
        prefixes.put(key, path)
        path.unlink(missing_ok=True)

    result = run_pipeline(
        Path(model_path), model_format, spec, datasets, work_dir / "run", reporter,
        resume=resume, after_step=after_step,
    )  # fmt: skip
    result.reused_steps = done
    return result


def _pack(model: LoadedModel, steps: list[StepMetrics], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model_file = folder / f"model{format_facts(model.format).suffix}"
    save_model(model, model_file)
    path = folder.with_suffix(".zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.write(model_file, model_file.name)
        zf.writestr(_STEPS_FILE, json.dumps([s.to_json() for s in steps]))
    model_file.unlink()
    return path


def _unpack(
    stored: Path | None, count: int, folder: Path, model_format: str, reporter: Reporter
) -> Resume | None:
    """The prefix in ``stored``, or None (with a log line) when it is absent or unreadable."""
    if stored is None:
        return None
    name = f"model{format_facts(model_format).suffix}"
    try:
        with zipfile.ZipFile(stored) as zf:
            steps = [StepMetrics.model_validate(s) for s in json.loads(zf.read(_STEPS_FILE))]
            if len(steps) != count:
                raise ValueError(f"{len(steps)} steps stored, {count} expected")
            folder.mkdir(parents=True, exist_ok=True)
            zf.extract(name, folder)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        reporter.log(f"a stored prefix could not be read ({exc}); its steps run again", "warning")
        return None
    finally:
        stored.unlink(missing_ok=True)
    return Resume(model_path=folder / name, steps=steps)
