"""The Celery side of a search job (DESIGN §10): start, step, trial and finish tasks.

No task waits for another, so a search cannot deadlock the one embedded worker:

1. ``run_job`` claims the job as for a pipeline and, for a spec with ``search``, calls
   :func:`start`: the eval data is split (search / held-out), the per-layer sensitivity is
   analyzed (it counts against ``max_seconds``), the splits go to the object store, the
   ``search`` row says ``trials``, and :func:`step` runs once. ``run_job`` then returns:
   the job stays ``running``, owned by the claim's token, which every later task uses.
2. :func:`step` (task ``squish.search_step``), under the search's step guard (a
   conditional UPDATE: two steps never ask at once), rebuilds the Optuna study from the
   ``search_trial`` rows, asks for trials up to ``parallel_trials`` and the budget (the
   known-good recipes first), writes them ``queued`` and sends one ``squish.run_trial``
   each after the commit; with the budget spent (``max_trials``, ``max_seconds``, or
   the space exhausted) and nothing running, it hands over to the finishing task.
3. :func:`run_trial` (task ``squish.run_trial``) claims one trial, runs its recipe with
   :func:`worker.search.trial.run_trial` on the search split, stores its model, records
   its figures (or its error: the search goes on), and sends a step. A heartbeat thread
   stops it within seconds when the job is cancelled or the deadline passes.
4. :func:`finish` (task ``squish.finish_search``) verifies the Pareto set on the held-out
   split, stores the best trial's model as ``model`` and each Pareto trial's as
   ``trial-N``, and records the job: succeeded, or failed ``constraints_unmet`` with the
   closest model and the trial table kept.

A worker that dies mid-trial is noticed by the reaper (app/search/trials.py): the trial
runs once more, then is marked failed, and the search goes on.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from app.db import new_id, session_scope, utcnow
from app.errors import database_outage
from app.files import delete_if_unused, object_key
from app.jobs import lifecycle
from app.observability import job_context
from app.orm import Artifact, Dataset, Job, JobStatus, MLModel, Search, SearchTrial
from app.queue import FINISH_SEARCH, RUN_TRIAL, SEARCH_STEP, send, send_after_commit
from app.search import trials as state
from app.search.trials import Phase
from app.settings import get_settings
from app.storage import ObjectNotFound, StorageError, get_store
from worker.card import FileRef
from worker.constraints import Constraints, bounds, excess, measured, violations
from worker.contract import (
    CARD_MEDIA_TYPE,
    FORMATS,
    REPORT_MEDIA_TYPE,
    ArtifactName,
    DatasetRole,
    ErrorCode,
    LogLevel,
    ModelFormat,
    Objective,
    TrialStatus,
)
from worker.errors import (
    ConstraintsUnmetError,
    EngineError,
    InternalError,
    JobCancelled,
)
from worker.schemas import LayerSensitivity, PipelineMetrics
from worker.search.space import Recipe, Space, build_space
from worker.search.spec import SearchSpec, Strategy
from worker.spec import DatasetInfo
from worker.tasks import (
    TRANSIENT,
    ClaimedJob,
    Inputs,
    WorkDir,
    _sha256,
    celery_app,
    dataset_ref,
    warning_events,
)

if TYPE_CHECKING:
    import optuna

log = logging.getLogger("squish.search")

ASK_TRIES = 5
"""Proposals in a row that repeat an earlier recipe before a step stops asking."""
SKIP_TRIES = 50
"""Proposals dropped as dead ends (:func:`dead_ends`) in one step before it stops asking."""
HOLDOUT_ROUNDS = 3
"""Fronts verified on the held-out split at most: when each trial of the front fails there,
the front of the remaining feasible trials is verified next."""
DEAD_END_CODES = frozenset(
    {ErrorCode.invalid_params, ErrorCode.unsupported, ErrorCode.method_failed}
)
"""Error codes a step raises again whenever it gets the same model with the same params."""
UNMEASURED = 1.0
"""The constraint amount Optuna is told for a figure that was not measured (> 0: violated)."""


# --- start ------------------------------------------------------------------------------


def start(job: ClaimedJob, inputs: Inputs) -> str:
    """Split the eval data, analyze sensitivity, store the splits, then take the first step.

    Runs inside ``run_job`` (the job's heartbeat is alive); raises like a pipeline does,
    and ``run_job`` records the failure.
    """
    from worker.search.sensitivity import analyze
    from worker.search.splits import split_eval

    spec = SearchSpec.model_validate(job.spec["search"])
    with session_scope() as session:
        existing = session.get(Search, job.id)
        deadline_at = (
            existing.deadline_at
            if existing is not None
            else utcnow() + timedelta(seconds=spec.budget.max_seconds)
        )
        state.create(session, job.id, job.token, deadline_at, {})
    remaining = (deadline_at - utcnow()).total_seconds()

    job.reporter.progress(0.01, "split")
    splits = job.work_dir / "splits"
    splits.mkdir()
    search_path, holdout_path = split_eval(
        inputs.datasets[DatasetRole.eval], spec.holdout_fraction, spec.seed or 0, splits
    )
    datasets = {**inputs.datasets, DatasetRole.eval: search_path}

    job.reporter.progress(0.02, "sensitivity")
    sensitivity = analyze(
        inputs.model_path,
        inputs.model_format,
        datasets,
        job.spec["target"]["device"],
        job.work_dir / "sensitivity",
        job.reporter,
        time.monotonic() + max(0.0, remaining),
    )
    sensitivity_json = _sensitivity_json(sensitivity)

    sizes = {"search": _count(search_path), "holdout": _count(holdout_path)}
    store = get_store()  # (it takes the files it is given)
    stored: dict[str, Any] = {}
    for name, path in (("search", search_path), ("holdout", holdout_path)):
        key = scratch_key(job.tenant_id, job.id, f"{name}{''.join(path.suffixes)}")
        store.put_file(path, key)
        stored[name] = {"key": key, "suffix": "".join(path.suffixes)}
    with session_scope() as session:
        session.execute(
            update(Search)
            .where(Search.job_id == job.id)
            .values(
                phase=Phase.trials,
                inputs=stored,
                sensitivity=sensitivity_json,
                splits=sizes,
            )
        )
        lifecycle.add_event(
            session,
            job.id,
            "log",
            f"search: sensitivity of {len(sensitivity_json)} layers analyzed; asking for trials",
            data={"sensitivity_layers": len(sensitivity_json)},
        )
    step(job.id)
    return "searching"


def scratch_key(tenant_id: str, job_id: str, name: str) -> str:
    """Where a search keeps the files its trials share (splits, reusable prefixes)."""
    return f"tenants/{tenant_id}/search/{job_id}/{name}"


def _count(path: Path) -> int | None:
    """Samples in a split file (``.npz``: the first array's length; ``.jsonl``: lines)."""
    try:
        if path.suffix == ".jsonl":
            with path.open("rb") as fh:
                return sum(1 for line in fh if line.strip())
        import numpy as np

        with np.load(path, allow_pickle=False) as data:
            first = next(iter(data.files), None)
            return int(data[first].shape[0]) if first is not None else None
    except Exception:  # a count for the report only
        return None


def _sensitivity_json(sensitivity: Any) -> dict[str, Any]:
    layers = getattr(sensitivity, "layers", sensitivity)
    return {
        str(name): (s.to_json() if hasattr(s, "to_json") else dict(s))
        for name, s in dict(layers or {}).items()
    }


def _sensitivity(row: Search) -> dict[str, LayerSensitivity]:
    return {name: LayerSensitivity.model_validate(s) for name, s in (row.sensitivity or {}).items()}


# --- step -------------------------------------------------------------------------------


@celery_app.task(name=SEARCH_STEP, acks_late=True, ignore_result=True)
def search_step(job_id: str) -> str:
    """Ask for trials (or hand over to the finishing task); a no-op while another step runs."""
    return step(job_id)


def step(job_id: str) -> str:
    with session_scope() as session:
        if not state.begin_step(session, job_id):
            return "busy"
    try:
        with session_scope() as session:
            return _step(session, job_id)
    finally:
        with session_scope() as session:
            state.end_step(session, job_id)


def _step(session: Any, job_id: str) -> str:
    job = session.get(Job, job_id)
    search = session.get(Search, job_id)
    if job is None or search is None:
        return "gone"
    if job.status != JobStatus.running:
        _close(session, job, search)
        return "stopped"
    spec = SearchSpec.model_validate(job.spec["search"])
    rows = state.trials_of(session, job_id)
    active = sum(1 for r in rows if r.status in state.ACTIVE)
    out_of_time = utcnow() >= search.deadline_at
    left = spec.budget.max_trials - len(rows)
    want = 0 if out_of_time else max(0, min(spec.budget.parallel_trials - active, left))
    proposed: list[Proposal] = []
    if want:
        space = search_space(session, job)
        proposed = propose(spec, job.spec, space, _sensitivity(search), rows, want)
        for offer in proposed:
            trial = state.add_trial(
                session,
                job_id,
                offer.number,
                offer.recipe.to_json(),
                offer.params,
                offer.distributions,
                job.queue,
            )
            send_after_commit(session, RUN_TRIAL, str(trial.id), job.queue)
    exhausted = len(proposed) < want
    if active + len(proposed) == 0 and (out_of_time or left <= 0 or exhausted):
        if state.set_phase(session, job_id, Phase.finishing, was=Phase.trials):
            why = (
                "max_seconds reached"
                if out_of_time
                else "max_trials reached"
                if left <= 0
                else "every recipe of the space tried"
            )
            lifecycle.add_event(session, job_id, "log", f"search: {why}; finishing")
            send_after_commit(session, FINISH_SEARCH, job_id, job.queue)
        return "finishing"
    _publish(session, job, search, spec, state.trials_of(session, job_id))
    return f"asked {len(proposed)}"


def search_space(session: Any, job: Job) -> Space:
    """The search's space, as the API checked it (the model's layers, the datasets given)."""
    spec = SearchSpec.model_validate(job.spec["search"])
    model = session.get(MLModel, job.model_id) if job.model_id else None
    names = (model.info or {}).get("layer_names") if model is not None else None
    infos: dict[str, DatasetInfo] = {}
    for role, dataset_id in job.spec["datasets"].items():
        dataset = session.get(Dataset, dataset_id)
        has_labels = (dataset.info or {}).get("has_labels") if dataset is not None else None
        infos[role] = DatasetInfo(has_labels=has_labels)
    return build_space(
        model.format if model is not None else "",
        infos,
        job.spec["target"]["device"],
        spec.methods,
        [str(r) for r in spec.runtimes] if spec.runtimes is not None else None,
        [str(n) for n in names] if isinstance(names, list) else None,
    )


@dataclass
class Proposal:
    number: int
    recipe: Recipe
    params: dict[str, Any]
    distributions: dict[str, str]


def sampler_for(spec: SearchSpec, space: Space, seed: int | None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of ``spec.strategy``; infeasible trials are ranked as such."""
    import optuna

    def constraints(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
        return list(trial.system_attrs.get("constraints", []))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for these options
        if spec.strategy == Strategy.tpe:
            return optuna.samplers.TPESampler(
                seed=seed,
                constraints_func=constraints,
                multivariate=True,
                group=True,
                constant_liar=True,
                n_startup_trials=max(4, min(10, spec.budget.max_trials // 3)),
            )
        if spec.strategy == Strategy.nsga2:
            return optuna.samplers.NSGAIISampler(
                seed=seed,
                constraints_func=constraints,
                population_size=max(4, min(50, 2 * spec.budget.parallel_trials)),
            )
        if spec.strategy == Strategy.grid:
            return optuna.samplers.GridSampler(space.grid(), seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)


def rebuild_study(
    spec: SearchSpec, space: Space, rows: Sequence[SearchTrial], seed: int | None
) -> optuna.Study:
    """An in-memory study holding every trial so far (finished ones with their values)."""
    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = [
        optuna.study.StudyDirection.MAXIMIZE
        if o.maximized
        else optuna.study.StudyDirection.MINIMIZE
        for o in spec.objectives
    ]
    study = optuna.create_study(directions=directions, sampler=sampler_for(spec, space, seed))
    for row in rows:
        distributions = {k: json_to_distribution(v) for k, v in row.distributions.items()}
        if row.status == TrialStatus.succeeded and row.values is not None:
            trial = create_trial(
                state=TrialState.COMPLETE,
                values=list(row.values),
                params=row.params,
                distributions=distributions,
                system_attrs={"constraints": list(row.constraints or [])},
            )
        elif row.status in state.ACTIVE:
            trial = create_trial(
                state=TrialState.RUNNING, params=row.params, distributions=distributions
            )
        else:
            trial = create_trial(
                state=TrialState.FAIL, params=row.params, distributions=distributions
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study.add_trial(trial)
    return study


def propose(
    spec: SearchSpec,
    job_spec: Mapping[str, Any],
    space: Space,
    sensitivity: Mapping[str, LayerSensitivity],
    rows: Sequence[SearchTrial],
    want: int,
) -> list[Proposal]:
    """Up to ``want`` new trials: the known-good recipes not tried yet, then the sampler's.

    A proposal that repeats a recipe already in the study is dropped (the sampler sees it
    as running, so the next ask goes elsewhere); :data:`ASK_TRIES` of those in a row end
    the asking (the space is exhausted, for a grid).
    """
    from optuna.distributions import distribution_to_json

    space = space.with_sensitivity(sensitivity or None)
    seed = None if spec.seed is None else spec.seed + len(rows)
    study = rebuild_study(spec, space, rows, seed)
    known = space.known_good(sensitivity or None)
    for params in known[len(rows) :]:
        study.enqueue_trial(params, skip_if_exists=True)
    seen = {Recipe.from_json(r.recipe).key() for r in rows}
    dead = dead_ends(rows, space.model_format)
    if spec.strategy == Strategy.grid:
        size = 1
        for choices in space.grid().values():
            size *= max(1, len(choices))
        want = min(want, max(0, size - len(rows)))
    found: list[Proposal] = []
    misses = skipped = 0
    while len(found) < want and misses < ASK_TRIES and skipped < SKIP_TRIES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = study.ask()
            recipe = space.recipe(trial)
        if recipe.key() in seen:
            misses += 1
            continue
        misses = 0
        seen.add(recipe.key())
        if any(key in dead for key, _ in recipe.prefixes(space.model_format)):
            skipped += 1  # it would fail as an earlier trial did; the sampler sees it running
            continue
        found.append(
            Proposal(
                number=len(rows) + len(found),
                recipe=recipe,
                params=dict(trial.params),
                distributions={k: distribution_to_json(v) for k, v in trial.distributions.items()},
            )
        )
    return found


def dead_ends(rows: Sequence[SearchTrial], model_format: str) -> dict[str, int]:
    """Leading steps that cannot work on this model: by prefix key
    (:meth:`Recipe.prefixes`), the trial that showed it.

    A trial that failed at one of its leading steps (those run on the model in its own
    format, so they get the same model whatever follows) with an error of
    :data:`DEAD_END_CODES` fails the same way in every recipe that starts with the same
    steps and params: ``prune.semi_structured`` on a model with no eligible layer, a
    ``lowrank`` ratio that factorizes nothing. The search does not spend trials on those.
    """
    found: dict[str, int] = {}
    for row in rows:
        error = row.error or {}
        if row.status != TrialStatus.failed or error.get("code") not in DEAD_END_CODES:
            continue
        try:
            prefixes = Recipe.from_json(row.recipe).prefixes(model_format)
        except Exception:  # a recipe of a method no longer registered
            continue
        for key, head in prefixes:
            if head[-1][0] == error.get("step"):
                found.setdefault(key, row.number)
                break
    return found


# --- a trial's verdict ------------------------------------------------------------------


def objective_values(
    metrics: PipelineMetrics, objectives: Sequence[Objective], batch_sizes: Sequence[int]
) -> list[float] | None:
    """The figures a trial is ranked on, in the objectives' order; None if one is missing."""
    found: list[float] = []
    for objective in objectives:
        value: float | None
        if objective == Objective.latency:
            latency = (metrics.compressed.latency_ms or {}).get(f"batch_{batch_sizes[0]}")
            value = None if latency is None else latency.p50
        elif objective == Objective.size:
            size = metrics.compressed.size_bytes
            value = None if size is None else float(size)
        elif objective == Objective.accuracy:
            value = metrics.compressed.accuracy
        else:
            value = None if metrics.fidelity is None else metrics.fidelity.cosine_similarity
        if value is None:
            return None
        found.append(float(value))
    return found


def constraint_amounts(constraints: Constraints, metrics: PipelineMetrics) -> list[float]:
    """How far a trial is from each bound, relative to it (<= 0: met), for the sampler."""
    amounts = []
    for constraint, bound in bounds(constraints).items():
        value = measured(constraint, metrics)
        amounts.append(UNMEASURED if value is None else excess(constraint, bound, value))
    return amounts


# --- a trial ----------------------------------------------------------------------------


class TrialReporter:
    """A trial's progress checks for cancellation; its warnings become the job's events."""

    def __init__(self, job_id: str, number: int, cancelled: threading.Event) -> None:
        self.job_id, self.number, self.cancelled_event = job_id, number, cancelled
        self.stage: str | None = None
        self.reason = "the job was cancelled"

    def cancelled(self) -> bool:
        return self.cancelled_event.is_set()

    def progress(self, fraction: float, stage: str | None = None) -> None:
        if self.cancelled_event.is_set():
            raise JobCancelled(self.reason)
        if stage is not None:
            self.stage = stage

    def log(
        self, message: str, level: str = LogLevel.info, data: dict[str, Any] | None = None
    ) -> None:
        if level == LogLevel.info:
            return  # a trial's info lines would drown the table; its report keeps them
        try:
            with session_scope() as session:
                lifecycle.add_event(
                    session,
                    self.job_id,
                    "log",
                    f"trial {self.number}: {message}",
                    level=LogLevel(level),
                    data={"trial": self.number, **(data or {})},
                )
        except Exception as exc:
            if not database_outage(exc):
                raise


class TrialHeartbeat(threading.Thread):
    """Stamps the trial (and its job); on cancellation or the deadline, signals stop."""

    def __init__(
        self, trial_id: int, token: str, deadline_at: datetime, reporter: TrialReporter
    ) -> None:
        super().__init__(name=f"trial-heartbeat-{trial_id}", daemon=True)
        self.trial_id, self.token, self.deadline_at = trial_id, token, deadline_at
        self.reporter = reporter
        self.done = threading.Event()
        self.settings = get_settings()

    def run(self) -> None:
        interval = min(self.settings.heartbeat_interval_s, 1.0)
        cancelled = self.reporter.cancelled_event
        while not self.done.wait(interval):
            if utcnow() >= self.deadline_at:
                self.reporter.reason = "the search's max_seconds ran out"
                cancelled.set()
                break
            try:
                with session_scope() as session:
                    alive = state.trial_heartbeat(session, self.trial_id, self.token)
            except Exception as exc:
                if database_outage(exc):
                    continue
                raise
            if not alive:
                cancelled.set()
                break
        if cancelled.is_set() and not self.done.wait(self.settings.cancel_grace_s):
            log.warning(
                "trial %s did not stop within %.0fs; exiting",
                self.trial_id,
                self.settings.cancel_grace_s,
            )
            os._exit(3)


class ObjectPrefixes:
    """:class:`worker.search.trial.PrefixStore` in the object store: the models a recipe's
    leading steps made, shared by the search's trials on every machine, removed with it."""

    def __init__(self, tenant_id: str, job_id: str, work_dir: Path) -> None:
        self.tenant_id, self.job_id, self.work_dir = tenant_id, job_id, work_dir

    def _key(self, key: str) -> str:
        return scratch_key(self.tenant_id, self.job_id, f"prefix-{key}")

    def get(self, key: str) -> Path | None:
        path = self.work_dir / f"prefix-{key}"
        try:
            get_store().get_to_file(self._key(key), path)
        except ObjectNotFound:
            return None
        except StorageError:
            log.warning("prefix %s could not be fetched; recomputing it", key, exc_info=True)
            return None
        return path

    def put(self, key: str, path: Path) -> None:
        copy = self.work_dir / f"prefix-{key}.put"
        try:
            shutil.copyfile(path, copy)  # the store takes the file it is given
            get_store().put_file(copy, self._key(key))
        except StorageError:  # reuse is an optimization: the trial goes on without it
            log.warning("prefix %s could not be stored", key, exc_info=True)


@celery_app.task(name=RUN_TRIAL, acks_late=True, ignore_result=True)
def run_trial_task(trial_id: str) -> str:
    """Claim → fetch → run the recipe → store its model → record its figures → step."""
    return run_trial(int(trial_id))


@dataclass
class ClaimedTrial:
    id: int
    number: int
    job_id: str
    tenant_id: str
    queue: str
    attempts: int
    recipe: Recipe
    spec: SearchSpec
    job_spec: dict[str, Any]
    deadline_at: datetime
    files: dict[str, tuple[str, str]]
    """By name (``model``, dataset roles): (object key, file suffix)."""


def run_trial(trial_id: int) -> str:
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    claimed = _claim_trial(trial_id, token)
    if isinstance(claimed, str):
        return claimed
    with job_context(claimed.job_id):  # the trial's log lines carry its search's job id
        return _run_trial(trial_id, token, claimed)


def _run_trial(trial_id: int, token: str, claimed: ClaimedTrial) -> str:
    cancelled = threading.Event()
    reporter = TrialReporter(claimed.job_id, claimed.number, cancelled)
    heartbeat = TrialHeartbeat(trial_id, token, claimed.deadline_at, reporter)
    folder = WorkDir.make("job", f"{claimed.job_id}.trial-{claimed.number}", token)
    heartbeat.start()
    t0 = time.monotonic()
    try:
        outcome = _run_claimed(claimed, token, folder.path, reporter)
    except Exception as exc:
        outcome = _record_trial_failure(claimed, token, exc, time.monotonic() - t0)
    finally:
        heartbeat.done.set()
        folder.remove()
    send(SEARCH_STEP, claimed.job_id, claimed.queue)  # the trial's row is committed
    return outcome


def _claim_trial(trial_id: int, token: str) -> ClaimedTrial | str:
    with session_scope() as session:
        trial = session.get(SearchTrial, trial_id)
        if trial is None:
            return "gone"
        job = session.get(Job, trial.job_id)
        search = session.get(Search, trial.job_id)
        if job is None or search is None:
            return "gone"
        if utcnow() >= search.deadline_at and trial.status == TrialStatus.queued:
            late = JobCancelled("the search's max_seconds ran out before this trial started")
            error = late.to_dict()
            if state.finish_trial(session, trial_id, None, TrialStatus.cancelled, error=error):
                state.trial_event(session, job.id, trial.number, "cancelled", late.message)
            send_after_commit(session, SEARCH_STEP, job.id, job.queue)
            return "late"
        if not state.claim_trial(session, trial_id, token):
            send_after_commit(session, SEARCH_STEP, job.id, job.queue)
            return "not-claimed"
        state.trial_event(
            session, job.id, trial.number, "started", "", data={"recipe": trial.recipe}
        )
        model = session.get(MLModel, job.model_id) if job.model_id else None
        if model is None:
            files: dict[str, tuple[str, str]] = {}
        else:
            files = {"model": (model.storage_key, f".{model.format}")}
        for role, dataset_id in job.spec["datasets"].items():
            dataset = session.get(Dataset, dataset_id)
            if dataset is not None and role != DatasetRole.eval:
                files[role] = (dataset.storage_key, f".{dataset.format}")
        split = search.inputs["search"]
        files[DatasetRole.eval] = (split["key"], split["suffix"])
        return ClaimedTrial(
            id=trial_id,
            number=trial.number,
            job_id=job.id,
            tenant_id=job.tenant_id,
            queue=job.queue,
            attempts=trial.attempts,
            recipe=Recipe.from_json(trial.recipe),
            spec=SearchSpec.model_validate(job.spec["search"]),
            job_spec=job.spec,
            deadline_at=search.deadline_at,
            files=files,
        )


def _run_claimed(claimed: ClaimedTrial, token: str, work_dir: Path, reporter: TrialReporter) -> str:
    from worker.search.trial import run_trial as run_recipe

    if "model" not in claimed.files:
        raise EngineError("the job's model was deleted")
    store = get_store()
    paths: dict[str, Path] = {}
    for name, (key, suffix) in claimed.files.items():
        paths[name] = work_dir / f"{name}{suffix}"
        store.get_to_file(key, paths[name])
    model_format = claimed.files["model"][1].lstrip(".")
    evaluate = claimed.job_spec["evaluate"]
    t0 = time.monotonic()
    result = run_recipe(
        paths.pop("model"),
        model_format,
        claimed.recipe,
        paths,
        claimed.job_spec["target"]["device"],
        evaluate["batch_sizes"],
        evaluate["warmup"],
        evaluate["iterations"],
        work_dir / "run",
        reporter,
        ObjectPrefixes(claimed.tenant_id, claimed.job_id, work_dir),
    )
    seconds = time.monotonic() - t0
    if reporter.cancelled():
        raise JobCancelled(reporter.reason)
    artifact: dict[str, Any] = {
        "format": str(result.artifact_format),
        "reused_steps": int(getattr(result, "reused_steps", 0) or 0),
    }
    for name, path in (("model", result.artifact_path), ("report", result.report_path)):
        sha, size = _sha256(path), path.stat().st_size
        key = object_key(claimed.tenant_id, sha)
        store.put_file(path, key, sha256=sha)
        artifact[name] = {"key": key, "sha256": sha, "size_bytes": size}
    metrics = result.measured
    values = objective_values(metrics, claimed.spec.objectives, evaluate["batch_sizes"])
    found = violations(claimed.spec.constraints, metrics)
    with session_scope() as session:
        recorded = state.finish_trial(
            session,
            claimed.id,
            token,
            TrialStatus.succeeded,
            metrics=metrics.to_json(),
            values=values,
            constraints=constraint_amounts(claimed.spec.constraints, metrics),
            violations=[v.model_dump() for v in found],
            artifact=artifact,
            seconds=seconds,
        )
        if recorded:
            figures = {
                "objectives": dict(
                    zip([str(o) for o in claimed.spec.objectives], values or [], strict=False)
                ),
                "size_bytes": metrics.compressed.size_bytes,
                "accuracy": metrics.compressed.accuracy,
                "cosine_similarity": metrics.fidelity.cosine_similarity
                if metrics.fidelity
                else None,
                "latency_ms": {k: v.p50 for k, v in (metrics.compressed.latency_ms or {}).items()},
                "feasible": not found,
                "violations": [v.model_dump() for v in found],
                "seconds": round(seconds, 3),
            }
            state.trial_event(
                session,
                claimed.job_id,
                claimed.number,
                "finished",
                "feasible" if not found else "; ".join(v.describe() for v in found),
                data=figures,
            )
    if not recorded:  # cancelled meanwhile: its objects are nobody's
        _drop_objects(artifact)
        return "cancelled"
    return "succeeded"


def _record_trial_failure(claimed: ClaimedTrial, token: str, exc: Exception, seconds: float) -> str:
    if isinstance(exc, JobCancelled):
        error = exc.to_dict()
        with session_scope() as session:
            if state.finish_trial(
                session, claimed.id, token, TrialStatus.cancelled, error=error, seconds=seconds
            ):
                state.trial_event(session, claimed.job_id, claimed.number, "cancelled", exc.message)
        return "cancelled"
    if (
        isinstance(exc, TRANSIENT) or database_outage(exc)
    ) and claimed.attempts < state.TRIAL_ATTEMPTS:
        reason = f"{type(exc).__name__}: {exc}"
        with session_scope() as session:
            session.execute(
                update(SearchTrial)
                .where(
                    SearchTrial.id == claimed.id,
                    SearchTrial.worker == token,
                    SearchTrial.status == TrialStatus.running,
                )
                .values(status=TrialStatus.queued, worker=None, enqueued_at=utcnow())
            )
            state.trial_event(
                session, claimed.job_id, claimed.number, "retried", reason, level=LogLevel.warning
            )
            send_after_commit(session, RUN_TRIAL, str(claimed.id), claimed.queue, countdown=2)
        return "requeued"
    if isinstance(exc, EngineError):
        failure = exc
    else:
        log.error(
            "trial %s of job %s failed unexpectedly", claimed.number, claimed.job_id, exc_info=exc
        )
        failure = InternalError(f"{type(exc).__name__}: {exc}"[:2000])
    with session_scope() as session:
        if state.finish_trial(
            session, claimed.id, token, TrialStatus.failed, error=failure.to_dict(), seconds=seconds
        ):
            state.trial_event(
                session,
                claimed.job_id,
                claimed.number,
                "failed",
                failure.message,
                data={"error": failure.to_dict()},
                level=LogLevel.warning,
            )
    return "failed"


def _drop_objects(artifact: Mapping[str, Any]) -> None:
    try:
        with session_scope() as session:
            for name in ("model", "report"):
                if name in artifact:
                    delete_if_unused(session, get_store(), artifact[name]["key"])
    except Exception:
        log.warning("could not remove a trial's objects", exc_info=True)


# --- the table, while running and at the end --------------------------------------------


def trial_table(rows: Sequence[SearchTrial], spec: SearchSpec) -> list[dict[str, Any]]:
    """``metrics.search.trials``: every trial, by number (DESIGN §10)."""
    table = []
    for row in rows:
        recipe = Recipe.from_json(row.recipe)
        entry: dict[str, Any] = {
            "number": row.number,
            "pipeline": recipe.pipeline,
            "output_format": str(recipe.output_format),
            "runtime": str(recipe.runtime),
            "status": row.status,
        }
        if row.metrics is not None:
            entry["metrics"] = row.metrics
        if row.values is not None:
            entry["objectives"] = dict(
                zip([str(o) for o in spec.objectives], row.values, strict=False)
            )
        if row.status == TrialStatus.succeeded:
            entry["feasible"] = not row.violations
            entry["violations"] = row.violations or []
        if row.seconds is not None:
            entry["seconds"] = round(row.seconds, 3)
        reused = (row.artifact or {}).get("reused_steps") or 0
        if reused:
            entry["reused"] = [name for name, _ in recipe.steps[:reused]]
        if row.error is not None:
            entry["error"] = {k: v for k, v in row.error.items() if v is not None}
        table.append(entry)
    return table


def _publish(
    session: Any, job: Job, search: Search, spec: SearchSpec, rows: Sequence[SearchTrial]
) -> None:
    """``metrics.search`` and the job's progress, while the search runs."""
    done = sum(1 for r in rows if r.status not in state.ACTIVE)
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.running)
        .values(
            metrics={"search": _table_metrics(search, spec, rows)},
            stage=f"trials {done}/{spec.budget.max_trials}",
            progress=min(0.95, 0.05 + 0.9 * done / spec.budget.max_trials),
        )
    )


def _table_metrics(search: Search, spec: SearchSpec, rows: Sequence[SearchTrial]) -> dict[str, Any]:
    """``metrics.search`` before the verdict: the trial table, its Pareto set, sensitivity."""
    from worker.search.selection import pareto

    table = trial_table(rows, spec)
    return {
        "objectives": [str(o) for o in spec.objectives],
        "trials": table,
        "pareto": pareto(table, spec.objectives),
        "sensitivity": search.sensitivity or {},
        **_split_sizes(search),
    }


def _split_sizes(search: Search) -> dict[str, int]:
    sizes = search.splits or {}
    return {
        name: int(sizes[key])
        for name, key in (("search_split", "search"), ("holdout_split", "holdout"))
        if sizes.get(key) is not None
    }


# --- finish -----------------------------------------------------------------------------


@celery_app.task(name=FINISH_SEARCH, acks_late=True, ignore_result=True)
def finish_search(job_id: str) -> str:
    """Verify the Pareto set on the held-out split, store the artifacts, record the job."""
    return finish(job_id)


def finish(job_id: str) -> str:
    with session_scope() as session:
        if not state.begin_step(session, job_id, phase=Phase.finishing):
            return "busy"
    try:
        return _finish(job_id)
    finally:
        with session_scope() as session:
            state.end_step(session, job_id)


def _finish(job_id: str) -> str:
    with session_scope() as session:
        job = session.get(Job, job_id)
        search = session.get(Search, job_id)
        if job is None or search is None:
            return "gone"
        if job.status != JobStatus.running:
            _close(session, job, search)
            return "stopped"
        spec = SearchSpec.model_validate(job.spec["search"])
        job_spec = dict(job.spec)
        rows = state.trials_of(session, job_id)
        token, tenant_id = search.token, job.tenant_id
        table = trial_table(rows, spec)
        artifacts = {row.number: row.artifact for row in rows if row.artifact}
        holdout_file = search.inputs["holdout"]
        scratch = scratch_keys(session, job, search, rows)
        sensitivity = search.sensitivity or {}
        splits = _split_sizes(search)
        model = session.get(MLModel, job.model_id) if job.model_id else None
        model_file = (model.storage_key, model.format) if model is not None else None
        model_ref = (
            FileRef(model.sha256, model.size_bytes, str(model.format), model.name, model.id)
            if model is not None
            else None
        )
        dataset_refs = {
            role: dataset_ref(dataset)
            for role, dataset_id in job.spec["datasets"].items()
            if (dataset := session.get(Dataset, dataset_id)) is not None
        }
        lifecycle.add_event(
            session, job_id, "log", "search: verifying the Pareto set on the held-out split"
        )
    renewer = _Renewer(job_id)
    renewer.start()
    folder = WorkDir.make("job", f"{job_id}.finish", f"{socket.gethostname()}:{os.getpid()}:finish")
    try:
        verdict = decide(
            table, spec, job_spec, artifacts, holdout_file, model_file, folder.path, renewer
        )
    except JobCancelled:
        folder.remove()
        with session_scope() as session:
            job, search = session.get(Job, job_id), session.get(Search, job_id)
            if job is not None and search is not None:
                _close(session, job, search)
        return "stopped"
    except Exception as exc:
        verdict = Verdict(
            best=None,
            pareto=[],
            met=False,
            unmet=[],
            holdout=None,
            error=exc
            if isinstance(exc, EngineError)
            else InternalError(f"{type(exc).__name__}: {exc}"[:2000], step="search"),
        )
    finally:
        renewer.done.set()
    search_metrics: dict[str, Any] = {
        "objectives": [str(o) for o in spec.objectives],
        "trials": table,
        "pareto": verdict.pareto,
        "met": verdict.met,
        "sensitivity": sensitivity,
        **splits,
    }
    if verdict.best is not None:
        search_metrics["best"] = verdict.best
    if verdict.unmet:
        search_metrics["unmet"] = verdict.unmet
    if verdict.holdout is not None:
        search_metrics["holdout"] = verdict.holdout
    metrics: dict[str, Any] = {"search": search_metrics}
    best_metrics = table[verdict.best].get("metrics") if verdict.best is not None else None
    if best_metrics:
        metrics = {**best_metrics, "search": search_metrics}
    stored = _artifact_rows(job_id, artifacts, verdict.best, verdict.pareto)
    try:
        card = _search_card(job_id, job_spec, metrics, model_ref, dataset_refs, stored, folder.path)
    finally:
        folder.remove()
    if card is not None:
        stored.append(card)
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.running)
            .values(metrics=metrics)
        )
        if verdict.met:
            ok = lifecycle.succeed(session, job_id, token, metrics)
        else:
            ok = lifecycle.fail(session, job_id, token, verdict.failure())
        if ok:
            session.add_all(stored)
        state.set_phase(session, job_id, Phase.done)
    _cleanup(
        tenant_id, job_id, scratch, artifacts, keep={a.storage_key for a in stored} if ok else set()
    )
    return "succeeded" if verdict.met else "failed"


def _best_format(metrics: Mapping[str, Any]) -> str | None:
    """The output format of the search's chosen trial."""
    search = metrics.get("search") or {}
    for trial in search.get("trials") or ():
        if trial.get("number") == search.get("best"):
            return trial.get("output_format")
    return None


def _search_card(
    job_id: str,
    job_spec: Mapping[str, Any],
    metrics: Mapping[str, Any],
    model_ref: FileRef | None,
    dataset_refs: Mapping[str, FileRef],
    stored: Sequence[Artifact],
    work_dir: Path,
) -> Artifact | None:
    """The search's card (:func:`worker.card.render_card`: Pareto plot, trial table, the
    chosen trial's figures), stored; None, with a warning event, when it cannot be."""
    from worker.card import render_card

    best = next((a for a in stored if a.name == ArtifactName.model), None)
    try:
        html = render_card(
            job_id=job_id,
            spec=job_spec,
            metrics=metrics,
            model=model_ref or FileRef(sha256="unknown"),
            artifact=FileRef(best.sha256, best.size_bytes, _best_format(metrics), best.filename)
            if best is not None
            else None,
            datasets=dataset_refs,
            warnings=warning_events(job_id) or (),
        )
        path = work_dir / "card.html"
        path.write_text(html, encoding="utf-8")
        sha, size = _sha256(path), path.stat().st_size
        tenant_key = best.storage_key.rsplit("/", 1)[0] if best is not None else None
        if tenant_key is None:
            return None  # no model to describe: the trial table is in metrics.search
        key = f"{tenant_key}/{sha}"
        get_store().put_file(path, key, sha256=sha)
    except Exception as exc:
        log.warning("search %s: the card could not be rendered", job_id, exc_info=True)
        with session_scope() as session:
            lifecycle.add_event(
                session,
                job_id,
                "log",
                f"compression card not rendered: {type(exc).__name__}: {exc}"[:2000],
                level=LogLevel.warning,
            )
        return None
    return Artifact(
        id=new_id("art"),
        job_id=job_id,
        name=str(ArtifactName.card),
        filename=f"{job_id}-card.html",
        media_type=CARD_MEDIA_TYPE,
        size_bytes=size,
        sha256=sha,
        storage_key=key,
    )


@dataclass
class Verdict:
    """What the finishing task decided: the chosen trial, the Pareto set, met or not."""

    best: int | None
    pareto: list[int]
    met: bool
    unmet: list[dict[str, Any]]
    holdout: dict[str, Any] | None
    error: EngineError | None = None
    message: str = ""

    def failure(self) -> EngineError:
        if self.error is not None:
            return self.error
        return ConstraintsUnmetError(self.message, step="search")


def decide(
    table: list[dict[str, Any]],
    spec: SearchSpec,
    job_spec: Mapping[str, Any],
    artifacts: Mapping[int, Mapping[str, Any]],
    holdout_file: Mapping[str, str],
    model_file: tuple[str, str] | None,
    work_dir: Path,
    reporter: Any,
) -> Verdict:
    """Verify the Pareto trials on the held-out split; choose; say why when nothing meets.

    ``table`` (the trials' entries) gets each verified trial's ``holdout`` figures.
    """
    from worker.search.selection import (
        choose,
        closest,
        held_out_latency,
        pareto,
        verify_holdout,
    )

    succeeded = [t for t in table if t["status"] == TrialStatus.succeeded]
    if not succeeded:
        failed = [t for t in table if t.get("error")]
        if not failed:
            return Verdict(None, [], False, [], None, message="the search ran no trial")
        first = failed[0]["error"]
        code = ErrorCode(first.get("code", ErrorCode.internal_error))
        from worker.errors import error_for

        reasons = "; ".join(f"trial {t['number']}: {t['error']['message']}" for t in failed[:3])
        return Verdict(
            None,
            [],
            False,
            [],
            None,
            error=error_for(code, f"every trial failed ({len(failed)}): {reasons}", step="search"),
        )
    if model_file is None:
        raise EngineError("the job's model was deleted")
    store = get_store()
    original = work_dir / f"original.{model_file[1]}"
    store.get_to_file(model_file[0], original)
    holdout = work_dir / f"holdout{holdout_file['suffix']}"
    store.get_to_file(holdout_file["key"], holdout)
    evaluate = job_spec["evaluate"]
    refuted: set[int] = set()  # feasible on the search split, not on the held-out one
    front: list[int] = []
    for _ in range(HOLDOUT_ROUNDS):
        front = pareto([t for t in table if t["number"] not in refuted], spec.objectives)
        todo = [n for n in front if table[n].get("feasible") and "holdout" not in table[n]]
        for number in todo:
            reporter.progress(0.0)
            stored = artifacts[number]
            suffix = FORMATS[ModelFormat(stored["format"])].suffix
            candidate = work_dir / f"trial-{number}{suffix}"
            store.get_to_file(stored["model"]["key"], candidate)
            figures = verify_holdout(
                (original, model_file[1]),
                (candidate, stored["format"]),
                holdout,
                {},
                spec.constraints,
                evaluate["batch_sizes"],
                job_spec["target"]["device"],
                work_dir / f"verify-{number}",
                reporter,
            )
            table[number]["holdout"] = figures.to_json()
            candidate.unlink(missing_ok=True)
            if not figures.feasible:
                refuted.add(number)
        if not todo or any(n not in refuted for n in todo):
            break  # a front confirmed on the held-out split, or nothing left to verify
    front = pareto([t for t in table if t["number"] not in refuted], spec.objectives)
    verified = [
        {
            **t,
            "feasible": bool(t.get("feasible")) and bool((t.get("holdout") or {}).get("feasible")),
        }
        for t in table
    ]
    first = None
    if spec.objectives[0] == Objective.latency:  # judged on the held-out paired rounds
        batch = evaluate["batch_sizes"][0]
        first = {
            t["number"]: figure
            for t in verified
            if t["feasible"] and (figure := held_out_latency(t, batch)) is not None
        }
    best = choose(verified, spec.objectives, first or None)
    if best is not None:
        return Verdict(best, front, True, [], table[best].get("holdout"))
    nearest, unmet = closest(table, spec.constraints)
    unmet_json = [u.to_json() if hasattr(u, "to_json") else dict(u) for u in unmet]
    if unmet_json:
        message = "no trial meets the constraints: " + "; ".join(
            _describe_unmet(u) for u in unmet_json
        )
    else:  # feasible on the search split, not on the held-out one
        held = [t for t in table if t.get("holdout")]
        parts = [
            f"trial {t['number']}: "
            + "; ".join(
                f"{v['constraint']} (bound {v['bound']:.4g}, held out {_figure(v.get('measured'))})"
                for v in t["holdout"].get("violations") or []
            )
            for t in held
        ]
        message = (
            "the trials that meet the constraints on the search split do not on the "
            "held-out split: " + "; ".join(parts)
        )
        if nearest is None and held:
            nearest = held[0]["number"]
    return Verdict(
        nearest,
        front,
        False,
        unmet_json,
        table[nearest].get("holdout") if nearest is not None else None,
        message=message,
    )


def _figure(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4g}"


def _describe_unmet(unmet: Mapping[str, Any]) -> str:
    lower = unmet["constraint"].split(".", 1)[0] in ("cosine_similarity", "speedup")
    closest_value = unmet.get("closest")
    where = f" (trial {unmet['trial']})" if unmet.get("trial") is not None else ""
    return (
        f"{unmet['constraint']} {'≥' if lower else '≤'} {unmet['bound']:.4g}: closest "
        f"{_figure(closest_value)}{where}"
    )


class _Renewer(threading.Thread):
    """Keeps the finishing task's lease (and the job's heartbeat) fresh while it verifies."""

    def __init__(self, job_id: str) -> None:
        super().__init__(name=f"search-finish-{job_id}", daemon=True)
        self.job_id = job_id
        self.done = threading.Event()
        self.cancelled_event = threading.Event()

    def cancelled(self) -> bool:
        return self.cancelled_event.is_set()

    def progress(self, fraction: float, stage: str | None = None) -> None:
        if self.cancelled_event.is_set():
            raise JobCancelled("the job was cancelled")

    def log(
        self, message: str, level: str = LogLevel.info, data: dict[str, Any] | None = None
    ) -> None:
        with session_scope() as session:
            lifecycle.add_event(
                session, self.job_id, "log", message, level=LogLevel(level), data=data
            )

    def run(self) -> None:
        while not self.done.wait(1.0):
            try:
                with session_scope() as session:
                    state.renew_step(session, self.job_id)
                    status = session.scalar(select(Job.status).where(Job.id == self.job_id))
                    session.execute(
                        update(Job)
                        .where(Job.id == self.job_id, Job.status == JobStatus.running)
                        .values(heartbeat_at=utcnow())
                    )
            except Exception as exc:
                if database_outage(exc):
                    continue
                raise
            if status != JobStatus.running:
                self.cancelled_event.set()


def _artifact_rows(
    job_id: str, artifacts: Mapping[int, Mapping[str, Any]], best: int | None, pareto: Sequence[int]
) -> list[Artifact]:
    """`model` (and `report`) of the chosen trial, `trial-N` for each Pareto trial."""
    rows: list[Artifact] = []

    def add(name: str, number: int, part: str = "model") -> None:
        stored = artifacts.get(number)
        if not stored or part not in stored:
            return
        fmt = ModelFormat(stored["format"])
        media_type, suffix = (
            (FORMATS[fmt].media_type, FORMATS[fmt].suffix)
            if part == "model"
            else (REPORT_MEDIA_TYPE, ".json")
        )
        rows.append(
            Artifact(
                id=new_id("art"),
                job_id=job_id,
                name=name,
                filename=f"{job_id}-{name}{suffix}",
                media_type=media_type,
                size_bytes=stored[part]["size_bytes"],
                sha256=stored[part]["sha256"],
                storage_key=stored[part]["key"],
            )
        )

    if best is not None:
        add("model", best)
        add("report", best, "report")
    for number in pareto:
        add(f"trial-{number}", number)
    return rows


def _close(session: Any, job: Job, search: Search) -> None:
    """A search whose job stopped (cancelled, failed): close its trials, drop its scratch."""
    from sqlalchemy import event

    closed = state.cancel_open_trials(session, job.id)
    if search.phase == Phase.done:
        return
    state.set_phase(session, job.id, Phase.done)
    if closed:
        lifecycle.add_event(
            session, job.id, "log", f"search stopped: {closed} open trials cancelled"
        )
    rows = state.trials_of(session, job.id)
    if job.metrics is not None and "search" in job.metrics:  # the table, as its trials ended
        spec = SearchSpec.model_validate(job.spec["search"])
        job.metrics = {**job.metrics, "search": _table_metrics(search, spec, rows)}
    artifacts = {row.number: row.artifact for row in rows if row.artifact}
    scratch = scratch_keys(session, job, search, rows)
    tenant_id, job_id = job.tenant_id, job.id

    def later(_session: Any) -> None:
        _cleanup(tenant_id, job_id, scratch, artifacts, keep=set())

    event.listen(session, "after_commit", later, once=True)


def scratch_keys(session: Any, job: Job, search: Search, rows: Sequence[SearchTrial]) -> list[str]:
    """The search's scratch objects: its splits and every recipe prefix a trial may have put."""
    keys = [f["key"] for f in (search.inputs or {}).values() if isinstance(f, dict) and "key" in f]
    model = session.get(MLModel, job.model_id) if job.model_id else None
    if model is not None:
        for row in rows:
            try:
                prefixes = Recipe.from_json(row.recipe).prefixes(model.format)
            except Exception:  # a recipe of a method no longer registered: nothing to find
                continue
            keys += [scratch_key(job.tenant_id, job.id, f"prefix-{key}") for key, _ in prefixes]
    return list(dict.fromkeys(keys))


def _cleanup(
    tenant_id: str,
    job_id: str,
    scratch: Sequence[str],
    artifacts: Mapping[int, Mapping[str, Any]],
    keep: set[str],
) -> None:
    """Remove the search's scratch objects and the models of trials that were not kept."""
    store = get_store()
    try:
        with session_scope() as session:
            for stored in artifacts.values():
                for part in ("model", "report"):
                    key = (stored.get(part) or {}).get("key")
                    if key and key not in keep:
                        delete_if_unused(session, store, key)
        for key in scratch:
            store.delete(key)
    except Exception:  # the outcome is recorded; a leftover object is only space
        log.warning(
            "search %s of tenant %s: could not remove every scratch object",
            job_id,
            tenant_id,
            exc_info=True,
        )
