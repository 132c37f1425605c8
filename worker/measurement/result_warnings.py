"""What a job's events say when its result is slower than the original or far from it.

The figures themselves are in the metrics; these warnings say it plainly, with what to
change, below the thresholds here.
"""

from __future__ import annotations

from worker.context import Reporter
from worker.contract import ModelFormat, RuntimeName, format_facts
from worker.schemas import PipelineMetrics

SLOWER_THAN = 0.95  # speedup (original p50 / compressed p50)
LOW_COSINE = 0.95
LOW_TOP1_AGREEMENT = 0.9


def warn_about_the_result(metrics: PipelineMetrics, artifact_format: str, log: Reporter) -> None:
    """Say plainly when the compressed model is slower than the original or its outputs
    moved far from the original's."""
    slower = _warn_if_slower(metrics, artifact_format, log)
    far = _warn_if_far(metrics, log)
    if slower and far:
        _name_a_better_method(metrics, artifact_format, log)


def _warn_if_slower(metrics: PipelineMetrics, artifact_format: str, log: Reporter) -> bool:
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
                "(ONNX Runtime's int8 kernels)"
            )
        log.log(
            f"the compressed model is slower than the original at {key.replace('_', ' ')}: "
            f"p50 {compressed[key].p50:.3f} ms vs {original[key].p50:.3f} ms "
            f"({speedup:.2f}x){hint}",
            "warning",
            data={"batch": key, "speedup": speedup},
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
