"""``lowrank``: truncated-SVD factorization of Linear (and 1x1 conv) layers.

A weight ``W`` (``out x in``) becomes ``B @ A`` with ``A = sqrt(S_r) V_r^T`` (``r x in``)
and ``B = U_r sqrt(S_r)`` (``out x r``), the best rank-``r`` approximation of ``W``
(Eckart-Young). The layer then costs ``r * (in + out)`` parameters and multiply-adds
per position instead of ``in * out``, so a layer is factorized only when
``r * (in + out) < in * out``; every skipped layer is logged with the reason.

- pt2: the model is lifted to real layers (``worker.lifting.lift``); each ``nn.Linear``
  becomes ``Linear(in, r, bias=False) -> Linear(r, out)`` and each 1x1 ``nn.Conv1d`` /
  ``nn.Conv2d`` (groups 1) becomes two 1x1 convolutions, then the module is exported
  again with the upload's input signature and dynamic dims.
- onnx: a ``MatMul(X, W)`` or ``Gemm(X, W, C)`` whose ``W`` is a constant initializer
  becomes ``MatMul(X, A') -> MatMul(., B')`` (or ``-> Gemm(., B', C)``, keeping the bias,
  ``alpha`` and ``beta``). Convolutions stay as they are in onnx models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from pydantic import Field, model_validator

from worker.errors import InvalidParamsError
from worker.methods.base import Method, MethodParams, Range, Searchable, SearchRole

if TYPE_CHECKING:
    import numpy as np
    import torch

    from worker.context import StepContext
    from worker.formats import LoadedModel


class LowRankParams(MethodParams):
    """Low-rank (truncated SVD) factorization of Linear and 1x1 convolution layers.

    Give exactly one of ``rank_ratio`` and ``energy``.

    Args:
        rank_ratio: keep ``round(rank_ratio * min(in, out))`` singular values of each
            layer (at least 1), 0 < rank_ratio <= 1.
        energy: keep the fewest singular values whose squares add up to at least this
            fraction of ``sum(sigma^2)`` (the squared Frobenius norm of the weight), per
            layer; 0 < energy <= 1. 0.9 to 0.99 is usual.
        min_features: layers whose input or output width is below this are left as they
            are (small layers gain little and lose much).

    Example:
        ``{"method": "lowrank", "params": {"energy": 0.95}}``
    """

    rank_ratio: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description=(
            "Keep round(rank_ratio * min(in, out)) singular values per layer (at least 1). "
            "Give this or energy."
        ),
    )
    energy: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description=(
            "Keep the fewest singular values holding this fraction of sum(sigma^2) per "
            "layer (e.g. 0.95). Give this or rank_ratio."
        ),
    )
    min_features: int = Field(
        default=16,
        ge=1,
        description="Skip layers whose input or output width is below this.",
    )

    @model_validator(mode="after")
    def _exactly_one_rule(self) -> Self:
        if (self.rank_ratio is None) == (self.energy is None):
            raise ValueError("give exactly one of rank_ratio (e.g. 0.25) and energy (e.g. 0.95)")
        return self


@dataclass
class Factors:
    """``W ≈ outer @ inner``: ``inner`` is ``r x in``, ``outer`` is ``out x r``."""

    inner: torch.Tensor
    outer: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.inner.shape[0])


def choose_rank(singular_values: torch.Tensor, params: LowRankParams) -> int:
    """The rank kept for a layer with these singular values (descending)."""
    import torch

    full = int(singular_values.numel())
    if params.rank_ratio is not None:
        return max(1, min(full, round(params.rank_ratio * full)))
    assert params.energy is not None
    squares = singular_values.double() ** 2
    cumulative = torch.cumsum(squares, 0) / squares.sum().clamp_min(1e-300)
    reached = torch.nonzero(cumulative >= params.energy - 1e-12)
    return int(reached[0]) + 1 if len(reached) else full


def factorize(weight: torch.Tensor, params: LowRankParams) -> Factors:
    """Truncated SVD of a 2-D ``out x in`` weight, split evenly between the factors."""
    import torch

    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    rank = choose_rank(s, params)
    root = s[:rank].sqrt()
    inner = (root[:, None] * vh[:rank]).to(weight.dtype)
    outer = (u[:, :rank] * root[None, :]).to(weight.dtype)
    return Factors(inner.contiguous(), outer.contiguous())


@dataclass
class _Outcome:
    factorized: list[dict[str, Any]]
    skipped: list[dict[str, Any]]


def _check(
    name: str, out_features: int, in_features: int, params: LowRankParams, outcome: _Outcome
) -> bool:
    if min(out_features, in_features) < params.min_features:
        outcome.skipped.append(
            {
                "layer": name,
                "shape": [out_features, in_features],
                "reason": f"narrower than min_features={params.min_features}",
            }
        )
        return False
    return True


def _worth_it(name: str, out_features: int, in_features: int, rank: int, outcome: _Outcome) -> bool:
    before, after = out_features * in_features, rank * (out_features + in_features)
    record = {"layer": name, "shape": [out_features, in_features], "rank": rank}
    if after >= before:
        outcome.skipped.append(
            {
                **record,
                "reason": f"rank {rank} needs {after} weights, not fewer than {before}",
            }
        )
        return False
    outcome.factorized.append({**record, "weights_before": before, "weights_after": after})
    return True


def lowrank(model: LoadedModel, params: LowRankParams, ctx: StepContext) -> LoadedModel:
    """Factorize the model's Linear/1x1-conv (pt2) or MatMul/Gemm (onnx) weights."""
    outcome = _Outcome([], [])
    if model.format == "onnx":
        result = _lowrank_onnx(model, params, ctx, outcome)
    else:
        result = _lowrank_module(model, params, ctx, outcome)
    for skip in outcome.skipped:
        ctx.log(f"lowrank: skipped {skip['layer']} {skip['shape']}: {skip['reason']}")
    before = sum(f["weights_before"] for f in outcome.factorized)
    after = sum(f["weights_after"] for f in outcome.factorized)
    ctx.log(
        f"factorized {len(outcome.factorized)} layers: {before} -> {after} weights",
        data={"factorized": outcome.factorized, "skipped": outcome.skipped},
    )
    ctx.progress(1.0)
    return result


def _no_layer_error(outcome: _Outcome, ctx: StepContext) -> InvalidParamsError:
    reasons = "; ".join(f"{s['layer']} {s['shape']}: {s['reason']}" for s in outcome.skipped[:8])
    return InvalidParamsError(
        "no layer was factorized"
        + (f" ({reasons})" if reasons else ": the model has no Linear, 1x1 conv, MatMul or Gemm")
        + "; lower rank_ratio or energy, or min_features",
        step=ctx.method,
    )


# --------------------------------------------------------------------------------------
# pt2 (and any model with a module form)


def _lowrank_module(
    model: LoadedModel, params: LowRankParams, ctx: StepContext, outcome: _Outcome
) -> LoadedModel:
    import torch

    from worker.lifting import lift, relower

    module = lift(model)
    ctx.progress(0.1)
    candidates = [
        (name, layer)
        for name, layer in module.named_modules()
        if isinstance(layer, torch.nn.Linear) or _is_pointwise_conv(layer)
    ]
    for index, (name, layer) in enumerate(candidates):
        weight = layer.weight.detach()
        out_features, in_features = int(weight.shape[0]), int(weight.shape[1])
        if _check(name, out_features, in_features, params, outcome):
            factors = factorize(weight.reshape(out_features, in_features), params)
            if _worth_it(name, out_features, in_features, factors.rank, outcome):
                _replace(module, name, _factorized_layer(layer, factors))
        ctx.progress(0.1 + 0.7 * (index + 1) / max(1, len(candidates)))
    if not outcome.factorized:
        raise _no_layer_error(outcome, ctx)
    return relower(model, module)


def _is_pointwise_conv(layer: Any) -> bool:
    import torch

    return (
        isinstance(layer, torch.nn.Conv1d | torch.nn.Conv2d)
        and all(k == 1 for k in layer.kernel_size)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
    )


def _factorized_layer(layer: torch.nn.Module, factors: Factors) -> torch.nn.Module:
    """``layer`` as two layers: ``inner`` (no bias) then ``outer`` (the bias)."""
    import torch

    rank = factors.rank
    bias = getattr(layer, "bias", None)
    if isinstance(layer, torch.nn.Linear):
        first: torch.nn.Module = torch.nn.Linear(layer.in_features, rank, bias=False)
        second: torch.nn.Module = torch.nn.Linear(rank, layer.out_features, bias=bias is not None)
        shape_in: tuple[int, ...] = (rank, layer.in_features)
        shape_out: tuple[int, ...] = (layer.out_features, rank)
    else:
        assert isinstance(layer, torch.nn.Conv1d | torch.nn.Conv2d)
        conv: Any = type(layer)
        ones = (1,) * len(layer.kernel_size)
        first = conv(
            layer.in_channels, rank, ones, stride=layer.stride, padding=layer.padding, bias=False
        )
        second = conv(rank, layer.out_channels, ones, bias=bias is not None)
        shape_in = (rank, layer.in_channels, *ones)
        shape_out = (layer.out_channels, rank, *ones)
    dtype, device = layer.weight.dtype, layer.weight.device
    first.weight = torch.nn.Parameter(factors.inner.reshape(shape_in).to(dtype).to(device))
    second.weight = torch.nn.Parameter(factors.outer.reshape(shape_out).to(dtype).to(device))
    if bias is not None:
        second.bias = torch.nn.Parameter(bias.detach().clone())
    return torch.nn.Sequential(first, second)


def _replace(root: torch.nn.Module, name: str, layer: torch.nn.Module) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    setattr(owner, attr, layer)


# --------------------------------------------------------------------------------------
# onnx


def _lowrank_onnx(
    model: LoadedModel, params: LowRankParams, ctx: StepContext, outcome: _Outcome
) -> LoadedModel:
    import numpy as np
    import onnx
    import torch
    from onnx import helper, numpy_helper

    from worker.formats import onnx_model_from_proto

    assert model.proto is not None
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    targets = [n for n in graph.node if _onnx_weight(n, initializers) is not None]
    # weight name -> (inner [in, r], outer [r, out]) as x @ W factors, or None if kept
    factored: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
    for index, node in enumerate(targets):
        name = _onnx_weight(node, initializers)
        assert name is not None
        if name not in factored:
            w = numpy_helper.to_array(initializers[name])
            # as an out x in matrix: MatMul computes x @ W, Gemm x @ W^T when transB
            matrix = w if _trans_b(node) else w.T
            out_features, in_features = matrix.shape
            factored[name] = None
            if _check(name, out_features, in_features, params, outcome):
                factors = factorize(torch.from_numpy(np.array(matrix, copy=True)), params)
                if _worth_it(name, out_features, in_features, factors.rank, outcome):
                    factored[name] = (
                        factors.inner.T.contiguous().numpy(),
                        factors.outer.T.contiguous().numpy(),
                    )
        ctx.progress(0.1 + 0.7 * (index + 1) / max(1, len(targets)))
    if not outcome.factorized:
        raise _no_layer_error(outcome, ctx)

    new_nodes = []
    added: set[str] = set()
    for node in graph.node:
        name = _onnx_weight(node, initializers)
        pair = factored.get(name) if name is not None else None
        if pair is None:
            new_nodes.append(node)
            continue
        assert name is not None
        inner_name, outer_name = f"{name}.lowrank_inner", f"{name}.lowrank_outer"
        if inner_name not in added:
            inner, outer = pair
            graph.initializer.append(numpy_helper.from_array(inner, inner_name))
            graph.initializer.append(numpy_helper.from_array(outer, outer_name))
            added.add(inner_name)
        hidden = f"{node.output[0]}.lowrank_hidden"
        label = node.name or node.output[0]
        new_nodes.append(
            helper.make_node(
                "MatMul", [node.input[0], inner_name], [hidden], name=f"{label}.lowrank_inner"
            )
        )
        if node.op_type == "MatMul":
            second = helper.make_node(
                "MatMul", [hidden, outer_name], list(node.output), name=f"{label}.lowrank_outer"
            )
        else:  # Gemm: keep the bias, alpha and beta; the outer factor is not transposed
            second = helper.make_node(
                "Gemm",
                [hidden, outer_name, *node.input[2:]],
                list(node.output),
                name=f"{label}.lowrank_outer",
            )
            for attribute in node.attribute:
                if attribute.name in ("alpha", "beta"):
                    second.attribute.append(attribute)
        new_nodes.append(second)
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return onnx_model_from_proto(proto)


def _trans_b(node: Any) -> bool:
    return node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)


def _onnx_weight(node: Any, initializers: dict[str, Any]) -> str | None:
    """The 2-D constant weight of a ``MatMul(X, W)`` / ``Gemm(X, W, C)`` node, if any."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
        return None
    if node.input[0] in initializers:
        return None  # a constant times a constant is folded, not a layer
    weight = initializers.get(node.input[1])
    if weight is None or len(weight.dims) != 2 or weight.data_type not in _ONNX_FLOATS:
        return None
    return str(node.input[1])


_ONNX_FLOATS = frozenset({1, 11})  # FLOAT, DOUBLE


METHOD = Method(
    name="lowrank",
    summary="Low-rank SVD factorization of Linear / 1x1 conv (pt2) and MatMul / Gemm (onnx) layers.",
    params=LowRankParams,
    formats=frozenset({"pt2", "onnx"}),
    handler=lowrank,
    devices=frozenset({"cpu"}),
    search=Searchable(
        SearchRole.structure,
        {"rank_ratio": Range(0.2, 0.8, step=0.1)},
        defaults={"rank_ratio": 0.5},
    ),
)
