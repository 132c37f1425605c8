"""What a pipeline run measures: each step's model as it is made, then both ends of the run.

:class:`Bench` holds what every measurement of one run shares (the inputs, the timing
settings, the evaluation with the original's outputs), so that the pipeline only says
when to measure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.context import Reporter, ScaledReporter
from worker.contract import DatasetRole, format_facts
from worker.data import Dataset
from worker.errors import EngineError, JobCancelled
from worker.formats import LoadedModel, save_model
from worker.layers import merge_layers
from worker.measurement.alternatives import find_alternatives
from worker.measurement.fidelity import Evaluation
from worker.measurement.model import measure_model
from worker.measurement.ratios import ratios
from worker.measurement.result_warnings import slower_batches, warn_about_the_result
from worker.measurement.runs import generated_inputs
from worker.schemas import FileFigures, ModelMetrics, PipelineMetrics, StepMetrics

STEP_WARMUP = 1
STEP_ITERATIONS = 5
"""Timed runs per batch size when measuring an intermediate step's model."""

# Shares of measure_result's progress.
_ORIGINAL_END = 0.4
_COMPRESSED_END = 0.8
# Of measure_step's progress: measuring the file; the rest scores its outputs.
_STEP_FILE_SHARE = 0.7


@dataclass
class Bench:
    """The measurements of one pipeline run.

    Attributes:
        inputs: latency, MACs and memory inputs (the eval, else calibration, else train
            inputs, else generated ones); also the example inputs of a conversion.
        evaluation: the inputs and reference outputs fidelity and accuracy are scored on.
        batch_sizes / warmup / iterations: latency settings of the full measurement;
            an intermediate step's model gets at most :data:`STEP_WARMUP` untimed and
            :data:`STEP_ITERATIONS` timed runs per batch size, and no peak memory.
        device: ``"cpu"`` or ``"gpu"``.
    """

    inputs: dict[str, np.ndarray]
    evaluation: Evaluation
    batch_sizes: list[int]
    warmup: int
    iterations: int
    device: str

    @classmethod
    def prepare(
        cls,
        model: LoadedModel,
        original_path: Path,
        feeds_by_role: dict[str, dict[str, np.ndarray]],
        datasets: dict[str, Dataset],
        *,
        batch_sizes: list[int],
        warmup: int,
        iterations: int,
        device: str,
        log: Reporter,
    ) -> Bench:
        """Choose the inputs for ``model`` (the upload, at ``original_path``)."""
        return cls(
            inputs=_latency_inputs(model, feeds_by_role, log),
            evaluation=Evaluation.choose(
                model, original_path, device, feeds_by_role, datasets, log
            ),
            batch_sizes=batch_sizes,
            warmup=warmup,
            iterations=iterations,
            device=device,
        )

    def measure_step(
        self,
        model: LoadedModel,
        step: StepMetrics,
        index: int,
        work_dir: Path,
        reporter: Reporter,
    ) -> None:
        """Save the model step ``index`` left and measure it into ``step``.

        A model that cannot be measured keeps what was measured before the failure, and
        the log says why; only a cancellation propagates.
        """
        path = work_dir / f"step{index + 1}{format_facts(model.format).suffix}"
        iterations = min(self.iterations, STEP_ITERATIONS)
        try:
            save_model(model, path)
            measured = measure_model(
                path,
                model.format,
                inputs=self.inputs,
                batch_sizes=self.batch_sizes,
                warmup=min(self.warmup, STEP_WARMUP),
                iterations=iterations,
                device=self.device,
                reporter=ScaledReporter(reporter, 0.0, _STEP_FILE_SHARE, "measure_step"),
                with_peak_memory=False,
            )
            _take_file_figures(step, measured, iterations)
            scoring = ScaledReporter(reporter, _STEP_FILE_SHARE, 1.0, "measure_step")
            scores = self.evaluation.score(path, model.format, scoring)
            step.fidelity, step.accuracy = scores.fidelity, scores.accuracy
        except JobCancelled:
            raise
        except EngineError as exc:
            reporter.log(f"step {index + 1} ({step.method}) not measured: {exc.message}", "warning")
        finally:
            path.unlink(missing_ok=True)
        reporter.progress(1.0, "measure_step")

    def measure_result(
        self,
        original: tuple[Path, str],
        artifact: tuple[Path, str],
        steps: list[StepMetrics],
        *,
        last_step_is_artifact: bool,
        reporter: Reporter,
        with_peak_memory: bool = True,
    ) -> PipelineMetrics:
        """Measure the upload and the artifact (each in its own runtime), score the artifact,
        and warn when it is slower or far off.

        When the artifact is the last step's model, that step's entry gets the artifact's
        figures (its full measurement) instead of a second, shorter one.
        """
        measured: dict[str, ModelMetrics] = {}
        for name, (path, fmt), (start, end) in (
            ("original", original, (0.0, _ORIGINAL_END)),
            ("compressed", artifact, (_ORIGINAL_END, _COMPRESSED_END)),
        ):
            measured[name] = measure_model(
                path,
                fmt,
                inputs=self.inputs,
                batch_sizes=self.batch_sizes,
                warmup=self.warmup,
                iterations=self.iterations,
                device=self.device,
                reporter=ScaledReporter(reporter, start, end, f"measure_{name}"),
                with_peak_memory=with_peak_memory,
            )
        reporter.progress(_COMPRESSED_END, "evaluate")
        scores = self.evaluation.score_artifact(
            *artifact, ScaledReporter(reporter, _COMPRESSED_END, 1.0)
        )
        original_metrics, compressed = measured["original"], measured["compressed"]
        original_metrics.accuracy = scores.original_accuracy
        compressed.accuracy = scores.compressed_accuracy
        if last_step_is_artifact and steps:
            last = steps[-1]
            _take_file_figures(last, compressed, self.iterations)
            last.accuracy = compressed.accuracy
            last.fidelity = scores.fidelity
        metrics = PipelineMetrics(
            original=original_metrics,
            compressed=compressed,
            fidelity=scores.fidelity,
            ratios=ratios(original_metrics, compressed),
            steps=steps,
            layers=merge_layers(steps),
        )
        slower = slower_batches(metrics)
        alternatives = []
        if slower:  # name the other runtimes; measure those that are cheap to try
            alternatives = find_alternatives(
                original[1], artifact, original_metrics, slower, inputs=self.inputs,
                warmup=self.warmup, iterations=self.iterations, device=self.device,
                reporter=reporter,
            )  # fmt: skip
        warn_about_the_result(metrics, artifact[1], reporter, alternatives)
        return metrics


def _take_file_figures(step: StepMetrics, measured: ModelMetrics, iterations: int) -> None:
    """The file's figures into a step's entry; ``iterations`` timed runs if it was timed."""
    for name in FileFigures.model_fields:
        setattr(step, name, getattr(measured, name))
    if measured.latency_ms is not None:
        step.latency_iterations = iterations


def _latency_inputs(
    model: LoadedModel, feeds_by_role: dict[str, dict[str, np.ndarray]], log: Reporter
) -> dict[str, np.ndarray]:
    for role in (DatasetRole.eval, DatasetRole.calibration, DatasetRole.train):
        if role in feeds_by_role:
            return feeds_by_role[role]
    log.log("latency and memory measured on inputs generated from the model's signature")
    return generated_inputs(model)
