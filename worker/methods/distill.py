"""``distill``: knowledge distillation from a teacher into the pipeline's (or an uploaded) student.

Loss (Hinton et al., 2015), per batch::

    alpha · τ² · KL(softmax(t/τ) ‖ softmax(s/τ)) + (1 - alpha) · CE(s, labels)
    + Σ_i w_i · MSE(P_i(student feature_i), teacher feature_i)

``t``/``s`` are teacher/student logits; the τ² factor keeps the soft-target gradients
on the scale of the hard-label ones when τ changes. Without labels the loss is the soft
term alone (alpha = 1). The optional feature terms (FitNets-style feature / attention
transfer) compare named intermediate outputs; when the student's tensor is narrower
along one axis (e.g. after ``prune.structured``), ``P_i`` is a learned linear projection
along that axis (trained with the student, then discarded), otherwise the identity.

The teacher runs in inference mode on every batch (pt2, lifted to real layers so that
its layers can be named, or an hf module); the student is lifted with
``worker.lifting.lift`` (an hf student is its transformers module), trained with the
shared loop (``worker.training.train``) and exported again (pt2) or saved with
``save_pretrained`` (hf). Teacher and student may differ in format if they read the same
inputs.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from worker.errors import InvalidParamsError, UnsupportedError
from worker.methods.base import Method, MethodParams, Range, Searchable, SearchRole

if TYPE_CHECKING:
    import torch

    from worker.context import StepContext
    from worker.formats import LoadedModel

TRAINABLE_FORMATS = ("hf", "pt2")


class FeaturePair(BaseModel):
    """One feature-transfer term: MSE between a student and a teacher intermediate output.

    Args:
        student: name of the student's layer or graph node whose output is matched.
        teacher: name of the teacher's layer or graph node it is matched to.
        weight: coefficient of this MSE term in the loss.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    student: str = Field(
        min_length=1,
        max_length=500,
        description=(
            "Student layer (module path as in the original model, e.g. 'layer1.0.conv1' or "
            "'2') or node name of its exported graph (print(torch.export.load(path).graph), "
            "e.g. 'relu_1')."
        ),
    )
    teacher: str = Field(
        min_length=1,
        max_length=500,
        description="Teacher layer or graph node name, found the same way.",
    )
    weight: float = Field(default=1.0, gt=0.0, description="Coefficient of this MSE term.")


class DistillParams(MethodParams):
    """Knowledge distillation: train the student to match the teacher's soft outputs.

    Loss = alpha·τ²·KL(softmax(t/τ) ‖ softmax(s/τ)) + (1-alpha)·CE(s, labels) (+ feature terms).
    The teacher is the model as uploaded (default) or another uploaded model; the student
    is the pipeline's current model (e.g. after ``prune.structured``) or an uploaded one.
    Both must be classifiers with the same number of outputs and the same inputs.

    Args:
        temperature: τ > 0; softens both distributions (2..8 is usual; 1 = plain logits).
        alpha: weight of the soft-target term, 0..1; 1 - alpha weighs cross-entropy with
            the train labels. Without labels, alpha is 1 (pure soft-target distillation).
        epochs: passes over the train data (at most; see ``patience``).
        lr: Adam's learning rate.
        batch_size: samples per optimizer step (a model exported with a static batch size
            trains with that size instead).
        patience: stop after this many epochs without a lower eval loss (needs an
            ``eval`` dataset; labels optional); null trains every epoch.
        teacher_model_id: id of another uploaded model (pt2 or hf) to learn from;
            default: the pipeline's input model as uploaded.
        student_model_id: id of an uploaded model (pt2 or hf) to train instead of the
            pipeline's current model; it becomes the pipeline's model from this step on.
        features: feature-transfer terms (student layer, teacher layer, weight). Layer
            names are module paths of the original model (``layer1.0.conv1``; also
            accepted with ``_`` for ``.``; for hf, ``model.named_modules()`` names such as
            ``bert.encoder.layer.1``) or node names of the exported pt2 graph
            (``print(torch.export.load("model.pt2").graph)``); unknown names are refused
            with the list of available layers.

    Example:
        ``{"method": "distill", "params": {"temperature": 4, "alpha": 0.7, "epochs": 10}}``
    """

    temperature: float = Field(
        default=4.0, gt=0.0, le=100.0, description="Softmax temperature τ (> 0)."
    )
    alpha: float = Field(
        default=0.7,
        ge=0.0,
        le=1.0,
        description=(
            "Weight of the soft-target (KL) term; 1 - alpha weighs cross-entropy with the "
            "labels. Forced to 1 when the train data has no labels."
        ),
    )
    epochs: int = Field(default=10, ge=1, le=1000, description="Passes over the train data.")
    lr: float = Field(default=1e-3, gt=0.0, le=1.0, description="Adam learning rate.")
    batch_size: int = Field(default=64, ge=1, le=65536, description="Samples per optimizer step.")
    patience: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Early stopping: stop after this many epochs without a lower eval loss "
            "(needs an eval dataset). null: train every epoch."
        ),
    )
    teacher_model_id: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Uploaded model (pt2 or hf) to learn from; default: the input model as uploaded."
        ),
    )
    student_model_id: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Uploaded model (pt2 or hf) to train instead of the pipeline's current model; it "
            "becomes the pipeline's model."
        ),
    )
    features: tuple[FeaturePair, ...] = Field(
        default=(),
        max_length=64,
        description=(
            "Feature-transfer terms: MSE between named student and teacher intermediate "
            "outputs, [{'student': name, 'teacher': name, 'weight': 1.0}]. Names: module "
            "paths of the original model (e.g. 'layer1.0.conv1') or exported-graph node "
            "names (print(torch.export.load(path).graph))."
        ),
    )


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha·τ²·KL(softmax(t/τ) ‖ softmax(s/τ)) + (1-alpha)·CE(s, labels); the soft term
    τ²·KL alone when ``labels`` is None. The KL is summed over classes and averaged over rows (the
    last axis holds the classes; other axes are rows)."""
    from torch.nn import functional as F

    from worker.training import supervised_loss

    classes = student_logits.shape[-1]
    s = student_logits.reshape(-1, classes) / temperature
    t = teacher_logits.reshape(-1, classes) / temperature
    soft = F.kl_div(
        F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True
    )
    soft = temperature**2 * soft
    if labels is None or alpha == 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * supervised_loss(student_logits, labels)


def distill(model: LoadedModel, params: DistillParams, ctx: StepContext) -> LoadedModel:
    """Train the student against the teacher; returns the re-exported student."""
    import torch

    from worker.lifting import lift, relower
    from worker.training import (
        batch_plan,
        model_forward,
        primary_output,
        trace_inputs,
        train,
        training_data,
    )

    student = model
    if params.student_model_id is not None:
        student = ctx.load_model(params.student_model_id)
        ctx.log(
            f"student: uploaded model {params.student_model_id} (replaces the pipeline's model)"
        )
    _check_trainable(student, "student", ctx)
    if params.teacher_model_id is not None:
        teacher = ctx.load_model(params.teacher_model_id)
        ctx.log(f"teacher: uploaded model {params.teacher_model_id}")
    else:
        teacher = ctx.load_original()
        ctx.log("teacher: the input model as uploaded")
    _check_trainable(teacher, "teacher", ctx)
    _check_same_inputs(student, teacher, ctx)

    data = training_data(student, ctx, labels_required=False)
    alpha = params.alpha
    if data.labels is None and alpha < 1.0:
        ctx.log(
            f"the train dataset has no labels: pure soft-target distillation (alpha 1 "
            f"instead of {alpha})"
        )
        alpha = 1.0
    ctx.progress(0.03)

    teacher_module = lift(teacher).eval()
    for p in teacher_module.parameters():
        p.requires_grad_(False)
    student_module = lift(student)
    student_taps = _Taps(student_module, [f.student for f in params.features], "student", ctx)
    teacher_taps = _Taps(teacher_module, [f.teacher for f in params.features], "teacher", ctx)
    student_forward = model_forward(student)
    teacher_forward = model_forward(teacher)
    batch_size, drop_last = batch_plan(student, params.batch_size, ctx)

    def forward(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        with torch.no_grad():
            teacher_out = primary_output(teacher_forward(teacher_module, batch))
            teacher_feats = teacher_taps.take()
        # the student's logits first: the training loop's eval accuracy reads them
        student_out = primary_output(student_forward(module, batch))
        return student_out, teacher_out, student_taps.take(), teacher_feats

    probe = _probe(data.inputs, batch_size if drop_last else 8)
    projections = _feature_projections(params, forward, student_module, probe)
    _check_logits(forward, student_module, probe, ctx)
    temperature = params.temperature
    weights = [f.weight for f in params.features]

    def loss_fn(outputs: Any, labels: torch.Tensor | None) -> torch.Tensor:
        student_out, teacher_out, student_feats, teacher_feats = outputs
        loss = distillation_loss(
            student_out,
            teacher_out,
            labels,
            temperature=temperature,
            alpha=alpha,
        )
        for weight, project, fs, ft in zip(
            weights, projections, student_feats, teacher_feats, strict=True
        ):
            loss = loss + weight * torch.nn.functional.mse_loss(project(fs), ft)
        return loss

    trainable = [p for p in student_module.parameters() if p.requires_grad]
    trainable += [p for proj in projections for p in proj.parameters()]
    try:
        history = train(
            student_module,
            inputs=data.inputs,
            labels=data.labels,
            loss_fn=loss_fn,
            epochs=params.epochs,
            lr=params.lr,
            batch_size=batch_size,
            ctx=ctx,
            eval_inputs=data.eval_inputs,
            eval_labels=data.eval_labels,
            patience=params.patience,
            forward=forward,
            parameters=trainable,
            progress_range=(0.05, 0.92),
            drop_last=drop_last,
        )
    finally:
        student_taps.remove()
        teacher_taps.remove()
    if params.patience is not None and data.eval_inputs is None:
        ctx.log("patience ignored: early stopping needs an eval dataset", "warning")
    result = relower(student, student_module, example_inputs=trace_inputs(student, data.inputs))
    summary = {k: v for k, v in history.items() if k != "train_loss"}
    summary.update(final_train_loss=history["train_loss"][-1], alpha=alpha, temperature=temperature)
    ctx.log(
        f"distilled for {history['epochs_run']} epochs (loss {history['train_loss'][0]:.4f} "
        f"-> {history['train_loss'][-1]:.4f})",
        data=summary,
    )
    ctx.progress(1.0)
    return result


def _check_trainable(model: LoadedModel, role: str, ctx: StepContext) -> None:
    if model.format not in TRAINABLE_FORMATS:
        raise UnsupportedError(
            f"the {role} is a {model.format} model; distill runs {role}s in PyTorch and "
            f"takes {' or '.join(TRAINABLE_FORMATS)} models: export it with torch.export and "
            "upload the .pt2 file",
            step=ctx.method,
        )


def _check_same_inputs(student: LoadedModel, teacher: LoadedModel, ctx: StepContext) -> None:
    ranks_s = [(s.rank, s.dtype) for s in student.inputs]
    ranks_t = [(s.rank, s.dtype) for s in teacher.inputs]
    if ranks_s != ranks_t:
        raise InvalidParamsError(
            "the student and the teacher take different inputs (student: "
            f"{', '.join(s.describe() for s in student.inputs)}; teacher: "
            f"{', '.join(s.describe() for s in teacher.inputs)}); both must read the same data",
            step=ctx.method,
        )


def _probe(inputs: dict[str, Any], size: int) -> dict[str, torch.Tensor]:
    import numpy as np
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v[:size])) for k, v in inputs.items()}


def _check_logits(
    forward: Any,
    student_module: torch.nn.Module,
    probe: dict[str, torch.Tensor],
    ctx: StepContext,
) -> None:
    import torch

    with torch.no_grad():
        student_out, teacher_out, _, _ = forward(student_module, probe)
    student_logits = student_out
    if student_logits.shape != teacher_out.shape or student_logits.shape[-1] < 2:
        raise InvalidParamsError(
            f"distillation needs student and teacher logits of one shape [..., classes >= 2]; "
            f"got student {list(student_logits.shape)}, teacher {list(teacher_out.shape)}",
            step=ctx.method,
        )


class _Taps:
    """The named intermediate outputs of one module, in the order asked for: a forward
    hook on a named layer, or, for a graph node, an inserted ``call_module`` to a recorder
    (removed again by :meth:`remove`)."""

    def __init__(
        self, module: torch.nn.Module, names: list[str], role: str, ctx: StepContext
    ) -> None:
        import torch

        self.module = module
        self.values: dict[int, torch.Tensor] = {}
        self.handles: list[Any] = []
        self.recorders: list[str] = []
        self.names = names
        modules = dict(module.named_modules())
        nodes = (
            {n.name: n for n in module.graph.nodes}
            if isinstance(module, torch.fx.GraphModule)
            else {}
        )
        for index, name in enumerate(names):
            target = modules.get(name) or modules.get(name.replace(".", "_"))
            if name and target is not None:
                self.handles.append(target.register_forward_hook(self._hook(index)))
            elif name in nodes and nodes[name].op not in ("placeholder", "output", "get_attr"):
                assert isinstance(module, torch.fx.GraphModule)
                self._insert_recorder(module, nodes[name], index)
            else:
                layers = [n for n, m in module.named_modules() if n and not list(m.children())]
                raise InvalidParamsError(
                    f"features: the {role} has no layer or graph node named {name!r}; its "
                    f"layers are {', '.join(layers[:40])}{' ...' if len(layers) > 40 else ''} "
                    "(graph node names: print(torch.export.load(path).graph))",
                    step=ctx.method,
                )
        if self.recorders:
            assert isinstance(module, torch.fx.GraphModule)
            module.recompile()

    def _hook(self, index: int) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            from worker.training import primary_output

            self.values[index] = primary_output(output)

        return hook

    def _insert_recorder(
        self, module: torch.fx.GraphModule, node: torch.fx.Node, index: int
    ) -> None:
        name = f"_squish_feature_tap_{index}"
        recorder, _ = _torch_modules()
        module.add_module(name, recorder(self._hook(index)))
        with module.graph.inserting_after(node):
            module.graph.call_module(name, (node,))
        self.recorders.append(name)

    def take(self) -> list[torch.Tensor]:
        """The recorded outputs of the last forward, then forgotten."""
        missing = [name for i, name in enumerate(self.names) if i not in self.values]
        if missing:
            raise InvalidParamsError(
                f"features: {', '.join(missing)} did not run in the forward pass; pick layers "
                "on the path from the inputs to the outputs",
                step="distill",
            )
        values = [self.values[i] for i in range(len(self.names))]
        self.values.clear()
        return values

    def remove(self) -> None:
        """Remove every hook and recorder: the module computes exactly what it did."""
        import torch

        for handle in self.handles:
            handle.remove()
        if self.recorders:
            assert isinstance(self.module, torch.fx.GraphModule)
            graph = self.module.graph
            for node in list(graph.nodes):
                if node.op == "call_module" and node.target in self.recorders:
                    graph.erase_node(node)
            for name in self.recorders:
                delattr(self.module, name)
            self.module.recompile()
        self.handles, self.recorders = [], []


@functools.cache
def _torch_modules() -> tuple[type, type]:
    """``(Recorder, AxisProjection)``, defined on first use: importing this module (as
    the API does) must not import torch."""
    import torch

    class Recorder(torch.nn.Module):
        """An identity-like layer whose call hands its input to a callback."""

        def __init__(self, callback: Any) -> None:
            super().__init__()
            self.callback = callback

        def forward(self, x: Any) -> None:
            self.callback(self, (x,), x)

    class AxisProjection(torch.nn.Module):
        """A learned linear map along one axis (FitNets' regressor for a narrower student)."""

        def __init__(self, axis: int, width_in: int, width_out: int) -> None:
            super().__init__()
            self.axis = axis
            self.linear = torch.nn.Linear(width_in, width_out, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x.movedim(self.axis, -1)).movedim(-1, self.axis)  # type: ignore[no-any-return]

    return Recorder, AxisProjection


def _feature_projections(
    params: DistillParams,
    forward: Any,
    student_module: torch.nn.Module,
    probe: dict[str, torch.Tensor],
) -> list[Any]:
    """Per feature pair: identity if the shapes match, else a learned Linear along the one
    axis where the student is narrower or wider."""
    import torch

    if not params.features:
        return []
    with torch.no_grad():
        _, _, student_feats, teacher_feats = forward(student_module, probe)
    projections: list[Any] = []
    for pair, fs, ft in zip(params.features, student_feats, teacher_feats, strict=True):
        if fs.shape == ft.shape:
            projections.append(torch.nn.Identity())
            continue
        differ = [a for a in range(fs.ndim) if fs.ndim == ft.ndim and fs.shape[a] != ft.shape[a]]
        if fs.ndim != ft.ndim or len(differ) != 1 or differ[0] == 0:
            raise InvalidParamsError(
                f"features: student {pair.student!r} {list(fs.shape)} and teacher "
                f"{pair.teacher!r} {list(ft.shape)} differ in more than one (non-batch) "
                "axis; pick layers whose outputs differ at most in width",
                step="distill",
            )
        _, projection = _torch_modules()
        projections.append(projection(differ[0], fs.shape[differ[0]], ft.shape[differ[0]]))
    return projections


METHOD = Method(
    name="distill",
    summary=(
        "Knowledge distillation: soft targets with temperature (τ² factor) mixed with "
        "hard labels, optional feature transfer; teacher = the original or an uploaded model."
    ),
    params=DistillParams,
    formats=frozenset(TRAINABLE_FORMATS),
    handler=distill,
    datasets_required=frozenset({"train"}),
    datasets_optional=frozenset({"eval"}),
    devices=frozenset({"cpu"}),
    model_refs=("teacher_model_id", "student_model_id"),
    search=Searchable(SearchRole.recovery, {"epochs": Range(2, 10, step=2, integer=True)}),
)
