"""How close a model's outputs stay to the original's, and how accurate they are."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.context import NullReporter, Reporter, ScaledReporter
from worker.data import Dataset
from worker.errors import UnsupportedError
from worker.formats import LoadedModel, Runtime
from worker.measurement.runs import GENERATED_SAMPLES, generated_inputs, run_loaded
from worker.schemas import Fidelity

FIDELITY_BATCH = 32


def compare_outputs(reference: list[np.ndarray], candidate: list[np.ndarray]) -> Fidelity:
    """Fidelity of ``candidate`` to ``reference`` (same inputs, same output order).

    Returns:
        ``cosine_similarity`` (mean over samples of the cosine between the flattened
        outputs of a sample), ``mse`` and ``max_abs_error`` over all output elements, and
        ``top1_agreement`` (share of samples whose argmax agrees) when the first output
        is ``[N, C]`` with C > 1.

    Raises:
        ValueError: the outputs do not compare (count or shapes differ).
    """
    ref_flat, cand_flat = _flat(reference, candidate)
    cosine = _cosines(ref_flat, cand_flat)
    diff = ref_flat - cand_flat
    first = reference[0]
    classes = first.ndim == 2 and first.shape[1] > 1
    return Fidelity(
        cosine_similarity=float(cosine.mean()),
        mse=float((diff**2).mean()),
        max_abs_error=float(np.abs(diff).max()),
        top1_agreement=float((first.argmax(1) == candidate[0].argmax(1)).mean())
        if classes
        else None,
    )


def sample_cosines(reference: list[np.ndarray], candidate: list[np.ndarray]) -> np.ndarray:
    """Per sample: the cosine between its flattened outputs (what ``cosine_similarity``
    averages). Raises ValueError as :func:`compare_outputs` does."""
    return _cosines(*_flat(reference, candidate))


def _flat(reference: list[np.ndarray], candidate: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference outputs but {len(candidate)} candidates")
    for ref, cand in zip(reference, candidate, strict=True):
        if ref.shape != cand.shape:
            raise ValueError(f"output shapes differ: {ref.shape} vs {cand.shape}")
    num = reference[0].shape[0] if reference[0].ndim else 1
    ref_flat = np.concatenate([r.reshape(num, -1).astype(np.float64) for r in reference], axis=1)
    cand_flat = np.concatenate([c.reshape(num, -1).astype(np.float64) for c in candidate], axis=1)
    return ref_flat, cand_flat


def _cosines(ref_flat: np.ndarray, cand_flat: np.ndarray) -> np.ndarray:
    dots = (ref_flat * cand_flat).sum(axis=1)
    norms = np.linalg.norm(ref_flat, axis=1) * np.linalg.norm(cand_flat, axis=1)
    both_zero = norms == 0
    return np.where(both_zero, 1.0, dots / np.where(both_zero, 1.0, norms))


def is_token_output(output: np.ndarray, inputs: dict[str, np.ndarray]) -> bool:
    """Whether ``output`` is per token (``[N, T, H]``) of inputs with an ``attention_mask``."""
    mask = inputs.get("attention_mask")
    return (
        mask is not None and mask.ndim == 2 and output.ndim == 3 and output.shape[:2] == mask.shape
    )


def pool_token_outputs(
    outputs: list[np.ndarray], inputs: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """Per-token outputs averaged over the tokens the ``attention_mask`` keeps.

    A feature-extraction model's ``last_hidden_state`` becomes its sentence embedding
    (mean pooling, as sentence-transformers does), so fidelity compares what users of the
    embeddings see, and padding positions, whose values mean nothing, do not count.
    Other outputs are returned as they are.
    """
    pooled = []
    for output in outputs:
        if is_token_output(output, inputs):
            mask = inputs["attention_mask"][..., None].astype(np.float64)
            summed = (output.astype(np.float64) * mask).sum(axis=1)
            pooled.append(summed / np.maximum(mask.sum(axis=1), 1.0))
        else:
            pooled.append(output)
    return pooled


def accuracy(outputs: list[np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy of the first output (``[N, C]`` scores) against labels.

    Labels are class indices ``[N]`` or one-hot/probabilities ``[N, C]``.

    Raises:
        UnsupportedError: the output or the labels are not classification-shaped.
    """
    scores = outputs[0]
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise UnsupportedError(
            f"accuracy needs class scores [N, C>1] as the first output, got {list(scores.shape)}"
        )
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == scores.shape[1]:
        labels = labels.argmax(1)
    if labels.ndim != 1 or labels.shape[0] != scores.shape[0]:
        raise UnsupportedError(
            f"labels {list(labels.shape)} do not match the outputs {list(scores.shape)}"
        )
    if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
        raise UnsupportedError("labels must be class indices (integers)")
    return float((scores.argmax(1) == labels.astype(np.int64)).mean())


@dataclass(frozen=True)
class Scores:
    """A model file's outputs on the evaluation inputs, scored against the original's."""

    fidelity: Fidelity | None
    accuracy: float | None


@dataclass(frozen=True)
class ArtifactScores:
    """The artifact scored at the end of a job: fidelity, and both models' accuracy."""

    fidelity: Fidelity | None
    original_accuracy: float | None
    compressed_accuracy: float | None


@dataclass
class Evaluation:
    """The inputs fidelity and accuracy are measured on, and the original's outputs on them.

    The original model's outputs are computed once (in its own runtime) and compared with
    each step's model and with the artifact. Token-level outputs (``[N, T, H]``, e.g. an hf
    feature-extraction model's ``last_hidden_state``) are compared as sentence embeddings:
    mean-pooled over the tokens the ``attention_mask`` keeps.
    """

    role: str
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    original: tuple[Path, str]
    device: str
    reference: list[np.ndarray] | None = None

    @classmethod
    def choose(
        cls,
        model: LoadedModel,
        original_path: Path,
        device: str,
        feeds_by_role: dict[str, dict[str, np.ndarray]],
        datasets: dict[str, Dataset],
        log: Reporter,
    ) -> Evaluation:
        """The eval inputs, else the calibration inputs, else inputs generated for ``model``."""
        if "eval" in feeds_by_role:
            role, inputs = "eval", feeds_by_role["eval"]
        elif "calibration" in feeds_by_role:
            role, inputs = "calibration", feeds_by_role["calibration"]
            log.log("fidelity measured on the calibration inputs (no eval dataset)")
        else:
            role = "generated"
            inputs = generated_inputs(model)
            log.log(
                f"fidelity measured on {GENERATED_SAMPLES} inputs generated from the model's "
                "signature (standard normal floats): no eval or calibration dataset was given",
                "warning",
            )
        labels = datasets["eval"].labels if "eval" in datasets else None
        return cls(role, inputs, labels, (original_path, model.format), device)

    def run(self, path: Path, fmt: str, reporter: Reporter) -> list[np.ndarray]:
        runtime = Runtime(path, fmt, self.device)
        return run_loaded(runtime, self.inputs, FIDELITY_BATCH, reporter=reporter)

    def original_outputs(self, reporter: Reporter) -> list[np.ndarray]:
        if self.reference is None:
            self.reference = self.run(*self.original, reporter)
        return self.reference

    def fidelity(self, outputs: list[np.ndarray]) -> Fidelity:
        """compare_outputs vs the original; raises ValueError if they do not compare."""
        original = self.original_outputs(NullReporter())
        reference = pool_token_outputs(original, self.inputs)
        result = compare_outputs(reference, pool_token_outputs(outputs, self.inputs))
        if is_token_output(original[0], self.inputs):
            result.top1_agreement = None  # an embedding's argmax is no class
        return result

    def score(self, path: Path, fmt: str, reporter: Reporter) -> Scores:
        """``fidelity`` and (with labelled eval data) ``accuracy`` of a model file."""
        self.original_outputs(ScaledReporter(reporter, 0.0, 0.5))
        outputs = self.run(path, fmt, ScaledReporter(reporter, 0.5, 1.0))
        fidelity = None
        with contextlib.suppress(ValueError):
            fidelity = self.fidelity(outputs)
        score = None
        if self.labels is not None:
            with contextlib.suppress(UnsupportedError):
                score = accuracy(outputs, self.labels)
        return Scores(fidelity, score)

    def score_artifact(self, path: Path, fmt: str, reporter: Reporter) -> ArtifactScores:
        """Fidelity of the artifact and, with labelled eval data, both models' accuracy.

        What could not be measured is None, and the log says why.
        """
        original = self.original_outputs(ScaledReporter(reporter, 0.0, 0.5, "evaluate"))
        outputs = self.run(path, fmt, ScaledReporter(reporter, 0.5, 1.0, "evaluate"))
        fidelity = None
        try:
            fidelity = self.fidelity(outputs)
        except ValueError as exc:
            reporter.log(f"fidelity not measured: {exc}", "warning")
        else:
            samples = len(next(iter(self.inputs.values())))
            pooled = any(is_token_output(o, self.inputs) for o in original)
            how = " (token outputs compared as mask-averaged sentence embeddings)" if pooled else ""
            reporter.log(
                f"fidelity measured on {samples} {self.role} samples{how}",
                data=fidelity.to_json(),
            )
        if self.labels is None:
            reporter.log("accuracy not measured: no labelled eval dataset was given")
            return ArtifactScores(fidelity, None, None)
        try:
            return ArtifactScores(
                fidelity, accuracy(original, self.labels), accuracy(outputs, self.labels)
            )
        except UnsupportedError as exc:
            reporter.log(f"accuracy not measured: {exc.message}", "warning")
            return ArtifactScores(fidelity, None, None)
