"""What a job's events say when its result is slower than the original or far from it.

The figures themselves are in the metrics; these warnings say it plainly, with what to
change, below the thresholds here. A slower result is never left at that: its warning
names the other runtimes the model could be delivered in (:class:`Alternative`), with the
speedup measured when that was cheap (:mod:`worker.measurement.alternatives`), and says
what to ask for otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from worker.context import Reporter
from worker.contract import ModelFormat, RuntimeName, format_facts
from worker.schemas import PipelineMetrics

SLOWER_THAN = 0.95  # speedup (original p50 / compressed p50)
LOW_COSINE = 0.95
LOW_TOP1_AGREEMENT = 0.9


@dataclass(frozen=True)
class Alternative:
    """Another output format for the job's model, and what running in it measured.

    Attributes:
        format: the output format (its runtime is the contract's).
        speedup: by batch key, original p50 / p50 of the model in this format; empty when
            it was not measured.
        why_not_measured: what measuring it would have taken, when it was not.
    """

    format: ModelFormat
    speedup: dict[str, float] = field(default_factory=dict)
    why_not_measured: str | None = None

    def describe(self, key: str) -> str:
        runtime = format_facts(self.format).runtime
        if key in self.speedup:
            return (
                f"as {self.format} ({runtime}) this model runs {self.speedup[key]:.2f}x as fast "
                f"as the original (measured): ask for output_format '{self.format}'"
            )
        why = f" ({self.why_not_measured})" if self.why_not_measured else ""
        return f"output_format '{self.format}' ({runtime}) may be faster, not measured{why}"


def warn_about_the_result(
    metrics: PipelineMetrics,
    artifact_format: str,
    log: Reporter,
    alternatives: Sequence[Alternative] = (),
) -> None:
    """Say plainly when the compressed model is slower than the original (naming the
    ``alternatives``) or its outputs moved far from the original's."""
    slower = _warn_if_slower(metrics, artifact_format, log, alternatives)
    far = _warn_if_far(metrics, log)
    if slower and far:
        _name_a_better_method(metrics, artifact_format, log)


def _warn_if_slower(
    metrics: PipelineMetrics,
    artifact_format: str,
    log: Reporter,
    alternatives: Sequence[Alternative] = (),
) -> bool:
    original = metrics.original.latency_ms or {}
    compressed = metrics.compressed.latency_ms or {}
    slower = False
    for key, speedup in (metrics.ratios.speedup or {}).items():
        if speedup >= SLOWER_THAN:
            continue
        slower = True
        hint = ""
        if format_facts(artifact_format).runtime == RuntimeName.torch:
            hint = (
                "; eager PyTorch runs quantized (int8, fp16 on CPU) weights through "
                f"reference kernels: for CPU speed ask for output_format '{ModelFormat.onnx}' "
                f"(ONNX Runtime's int8 kernels) or '{ModelFormat.aoti}' (Inductor's)"
            )
        if alternatives:
            hint += "; " + "; ".join(a.describe(key) for a in alternatives)
        data: dict = {"batch": key, "speedup": speedup}
        measured = {str(a.format): a.speedup[key] for a in alternatives if key in a.speedup}
        if measured:
            data["alternatives"] = measured
        log.log(
            f"the compressed model is slower than the original at {key.replace('_', ' ')}: "
            f"p50 {compressed[key].p50:.3f} ms vs {original[key].p50:.3f} ms "
            f"({speedup:.2f}x){hint}",
            "warning",
            data=data,
        )
    return slower


def _warn_if_far(metrics: PipelineMetrics, log: Reporter) -> bool:
    fidelity = metrics.fidelity
    if fidelity is None:
        return False
    cosine, top1 = fidelity.cosine_similarity, fidelity.top1_agreement
    if not (cosine < LOW_COSINE or (top1 is not None and top1 < LOW_TOP1_AGREEMENT)):
        return False
    shown = ", ".join(
        f"{k} {v:.4f}" for k, v in (("cosine", cosine), ("top-1 agreement", top1)) if v is not None
    )
    log.log(
        f"the compressed model's outputs differ strongly from the original's ({shown}): "
        "metrics.steps shows which step cost it; a gentler setting (quantize.dynamic "
        "instead of quantize.static, per_channel, a smaller amount) or a training step "
        "(distill, finetune) after it may recover it",
        "warning",
        data=fidelity.to_json(),
    )
    return True


def _name_a_better_method(metrics: PipelineMetrics, artifact_format: str, log: Reporter) -> None:
    """Both slower and less faithful after dynamic int8 in ONNX Runtime: its integer ops
    quantize activations on every call, where static int8 calibrates them once and runs
    fused int8 kernels."""
    steps = [s.method for s in metrics.steps or []]
    if "quantize.dynamic" not in steps or artifact_format != ModelFormat.onnx:
        return
    log.log(
        "the result is both slower and less faithful than the original: use quantize.static "
        "with a calibration dataset (a few hundred representative inputs, no labels) instead "
        "of quantize.dynamic; static int8 calibrates the activation ranges once and ONNX "
        "Runtime runs it with fused int8 kernels",
        "warning",
        data={"instead_of": "quantize.dynamic", "use": "quantize.static", "needs": "calibration"},
    )


def slower_batches(metrics: PipelineMetrics) -> list[str]:
    """The batch keys at which the compressed model is slower than the original."""
    return [key for key, x in (metrics.ratios.speedup or {}).items() if x < SLOWER_THAN]
