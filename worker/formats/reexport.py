"""Re-exporting a pt2 program after its graph changed, keeping the upload's dynamic dims."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from worker.errors import UnsupportedError
from worker.formats.inputs import cast_feeds, generate_inputs
from worker.formats.pt2 import pt2_model_from_program
from worker.formats.types import LoadedModel

if TYPE_CHECKING:
    import torch


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
