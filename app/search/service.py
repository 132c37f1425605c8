"""A search job's spec at ``POST /v1/jobs``: checked with the engine's own check, normalized."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.errors import Unprocessable
from app.jobs.schemas import JobCreate
from app.orm import MLModel
from worker.search.spec import check_search
from worker.spec import DatasetInfo, PipelineRequest, Problem, check_pipeline, describe


def normalize_search(
    model: MLModel,
    body: JobCreate,
    datasets: dict[str, str],
    infos: dict[str, DatasetInfo],
    layer_names: Sequence[str] | None,
) -> dict[str, Any]:
    """The stored spec of a search job; 422 with every problem when it cannot run."""
    assert body.search is not None
    # The checks a search shares with a pipeline (device, evaluate, datasets), without steps.
    shared = PipelineRequest(
        model_format=model.format,
        steps=[],
        device=body.target.device,
        datasets=infos,
        batch_sizes=body.evaluate.batch_sizes,
        warmup=body.evaluate.warmup,
        iterations=body.evaluate.iterations,
        layer_names=layer_names,
    )
    problems: list[Problem] = [p for p in check_pipeline(shared) if p.loc != ("pipeline",)]
    problems += check_search(
        body.search,
        model_format=model.format,
        datasets=infos,
        device=body.target.device,
        batch_sizes=body.evaluate.batch_sizes,
        layer_names=layer_names,
    )
    if problems:
        errors = [problem.to_dict() for problem in problems]
        raise Unprocessable(describe(problems), title="Invalid job spec", errors=errors)
    return {
        "model_id": model.id,
        "search": body.search.model_dump(mode="json"),
        "datasets": datasets,
        "models": {},
        "target": {"device": str(body.target.device), "runtime": None},
        "output_format": None,
        "evaluate": body.evaluate.model_dump(),
    }
