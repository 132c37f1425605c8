"""The original model against the compressed one: size ratio and speedup per batch size."""

from __future__ import annotations

from worker.schemas import ModelMetrics, Ratios


def ratios(original: ModelMetrics, compressed: ModelMetrics) -> Ratios:
    """``size`` (original / compressed bytes) and ``speedup`` (original / compressed p50)
    for each batch size both were timed at; what one of them lacks is absent."""
    size = None
    if original.size_bytes and compressed.size_bytes:
        size = original.size_bytes / compressed.size_bytes
    speedup = {}
    for key, timing in (original.latency_ms or {}).items():
        other = (compressed.latency_ms or {}).get(key)
        if other is not None and other.p50 > 0:
            speedup[key] = timing.p50 / other.p50
    return Ratios(size=size, speedup=speedup or None)
