"""The method registry: an explicit list, one module per method.

Torch-free: the API imports this to validate job specs and publish parameter schemas.
Adding a method means adding its module and one line below.
"""

from __future__ import annotations

from worker.methods import (
    clip,
    distill,
    finetune,
    lowrank,
    prune_activation,
    prune_magnitude,
    prune_semi_structured,
    prune_structured,
    quantize_binary,
    quantize_dynamic,
    quantize_half,
    quantize_log,
    quantize_qat,
    quantize_static,
    quantize_weight_only,
)
from worker.methods.base import Method, MethodParams, UnknownMethodError

REGISTRY: dict[str, Method] = {
    method.name: method
    for method in (
        prune_magnitude.METHOD,
        prune_structured.METHOD,
        prune_activation.METHOD,
        prune_semi_structured.METHOD,
        quantize_dynamic.METHOD,
        quantize_static.METHOD,
        quantize_half.METHOD,
        quantize_weight_only.METHOD,
        quantize_binary.METHOD,
        quantize_log.METHOD,
        quantize_qat.METHOD,
        finetune.METHOD,
        distill.METHOD,
        lowrank.METHOD,
        clip.METHOD,
    )
}


def get_method(name: str) -> Method:
    """The method registered as ``name``; raises UnknownMethodError listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(name, sorted(REGISTRY)) from None


def all_methods() -> list[Method]:
    """Every registered method, by name."""
    return [REGISTRY[name] for name in sorted(REGISTRY)]


__all__ = ["REGISTRY", "Method", "MethodParams", "UnknownMethodError", "all_methods", "get_method"]
