"""A search's orchestration, driven directly: the step guard, the sampler's proposals, trials
whose worker died, cancellation and the budget (SQLite and PostgreSQL; no worker runs)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from tests.app.test_lifecycle import add_model, job_row, lapsed, sent
from tests.factories import digits_npz, tiny_mlp_onnx


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("search-orchestration")
    return {"model": tiny_mlp_onnx(d / "mlp.onnx", trained=False), "eval": digits_npz(d / "e.npz")}


@pytest.fixture
def tenant(db: str) -> str:
    from app.db import session_scope
    from app.keys import get_or_create_tenant

    with session_scope() as session:
        return get_or_create_tenant(session, "alice").id


def running_search(tenant_id: str, files: dict[str, Path], **search: Any) -> str:
    """A search job as the start task leaves it: running, its search row in `trials`."""
    from app.db import new_id, session_scope, utcnow
    from app.jobs import service
    from app.jobs.schemas import JobCreate
    from app.orm import Dataset, Job
    from app.search import trials as state

    model_id = add_model(tenant_id, files["model"])
    with session_scope() as session:
        dataset = Dataset(
            id=new_id("ds"), tenant_id=tenant_id, name="eval.npz", format="npz",
            size_bytes=1, sha256="0" * 64, storage_key="tenants/x/eval", info={"has_labels": True},
        )  # fmt: skip
        session.add(dataset)
        session.flush()
        body = JobCreate.model_validate(
            {
                "model_id": model_id,
                "search": {"seed": 7, **search},
                "datasets": {"eval": dataset.id},
                "evaluate": {"batch_sizes": [1], "warmup": 0, "iterations": 1},
            }
        )
        job, _ = service.create_job(session, tenant_id, body, None)
        job_id = job.id
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status="running", worker="search-token", heartbeat_at=utcnow())
        )
        seconds = body.search.budget.max_seconds if body.search else 60
        state.create(session, job_id, "search-token", utcnow() + timedelta(seconds=seconds), {})
        state.set_phase(session, job_id, state.Phase.trials)
    sent()  # drop the run message
    return job_id


def trials(job_id: str) -> list[Any]:
    from app.db import session_scope
    from app.search import trials as state

    with session_scope() as session:
        rows = state.trials_of(session, job_id)
        session.expunge_all()
        return rows


def search_row(job_id: str) -> Any:
    from app.db import session_scope
    from app.orm import Search

    with session_scope() as session:
        row = session.get(Search, job_id)
        session.expunge_all()
        return row


def test_a_step_asks_for_known_good_trials_first_and_sends_one_task_each(
    tenant: str, files: dict[str, Path]
) -> None:
    from app.db import session_scope
    from app.orm import Job
    from app.search import trials as state
    from worker import search_tasks

    job_id = running_search(tenant, files, budget={"max_trials": 5, "parallel_trials": 3})
    assert search_tasks.step(job_id) == "asked 3"
    rows = trials(job_id)
    assert [r.number for r in rows] == [0, 1, 2] and {r.status for r in rows} == {"queued"}
    # The known-good recipes come first: each a single precision method's defaults.
    with session_scope() as session:
        space = search_tasks.search_space(session, session.get(Job, job_id))
    known = space.known_good()
    assert [r.params for r in rows] == known[:3]
    assert len({search_tasks.Recipe.from_json(r.recipe).key() for r in rows}) == 3
    messages = sent()
    assert sorted(m[1] for m in messages if m[0] == "squish.run_trial") == sorted(
        str(r.id) for r in rows
    )
    # Nothing more while three are open; a second step while one holds the guard does nothing.
    assert search_tasks.step(job_id) == "asked 0"
    with session_scope() as session:
        assert state.begin_step(session, job_id)
    assert search_tasks.step(job_id) == "busy"
    polled = job_row(job_id)
    assert [t["status"] for t in polled.metrics["search"]["trials"]] == ["queued"] * 3


def test_the_same_seed_proposes_the_same_recipes(tenant: str, files: dict[str, Path]) -> None:
    from app.db import session_scope
    from app.orm import Job
    from worker import search_tasks
    from worker.search.spec import SearchSpec

    job_id = running_search(tenant, files)
    with session_scope() as session:
        job = session.get(Job, job_id)
        space = search_tasks.search_space(session, job)
        spec_json = job.spec
    for strategy in ("tpe", "random", "nsga2", "grid"):
        spec = SearchSpec.model_validate({**spec_json["search"], "strategy": strategy})
        first = search_tasks.propose(spec, spec_json, space, {}, [], 12)
        again = search_tasks.propose(spec, spec_json, space, {}, [], 12)
        assert [p.recipe.to_json() for p in first] == [p.recipe.to_json() for p in again]
        assert len({p.recipe.key() for p in first}) == len(first) > 3, strategy


def test_leading_steps_that_failed_on_the_model_are_not_proposed_again(
    tenant: str, files: dict[str, Path]
) -> None:
    from app.db import session_scope
    from app.orm import Job, SearchTrial
    from worker import search_tasks
    from worker.search.spec import SearchSpec

    job_id = running_search(tenant, files, methods=["lowrank", "quantize.dynamic"])
    with session_scope() as session:
        job = session.get(Job, job_id)
        space = search_tasks.search_space(session, job)
        spec_json = job.spec
    spec = SearchSpec.model_validate(spec_json["search"])
    first = search_tasks.propose(spec, spec_json, space, {}, [], 12)
    lowrank = [p for p in first if p.recipe.steps[0][0] == "lowrank"]
    assert len({str(p.recipe.steps[0][1]) for p in lowrank}) > 1  # several ratios proposed
    failed = lowrank[0]
    dead_step = failed.recipe.steps[0]

    def row(offer: Any, **fields: Any) -> SearchTrial:
        return SearchTrial(
            job_id=job_id, number=offer.number, recipe=offer.recipe.to_json(),
            params=offer.params, distributions=offer.distributions, attempts=1, **fields,
        )  # fmt: skip

    error = {"code": "invalid_params", "message": "no layer was factorized", "step": "lowrank"}
    rows = [row(p, status="cancelled") for p in first[: failed.number]]
    rows.append(row(failed, status="failed", error=error))
    assert search_tasks.dead_ends(rows, "onnx") == {failed.recipe.prefixes("onnx")[0][0]: failed.number}  # fmt: skip
    later = search_tasks.propose(spec, spec_json, space, {}, rows, 8)
    assert later and all(p.recipe.steps[0] != dead_step for p in later)
    # A failure another step caused, or one that may pass next time, is no dead end.
    for other in ({**error, "step": "quantize.dynamic"}, {**error, "code": "internal_error"}):
        rows[-1] = row(failed, status="failed", error=other)
        assert search_tasks.dead_ends(rows, "onnx") == {}


def test_a_trial_whose_worker_dies_runs_once_more_then_fails_and_the_search_goes_on(
    tenant: str, files: dict[str, Path]
) -> None:
    from app.db import session_scope, utcnow
    from app.orm import JobEvent, SearchTrial
    from app.reaper import sweep
    from app.search import trials as state
    from worker import search_tasks

    job_id = running_search(tenant, files, budget={"max_trials": 3, "parallel_trials": 1})
    search_tasks.step(job_id)
    (trial,) = trials(job_id)
    sent()
    old = utcnow() - timedelta(hours=1)
    for attempt in (1, 2):
        with session_scope() as session:
            assert state.claim_trial(session, trial.id, f"worker-{attempt}")
            session.execute(
                update(SearchTrial).where(SearchTrial.id == trial.id).values(heartbeat_at=old)
            )
        result = sweep(lapsed())
        assert result["stale"] == 0  # the job is alive: its trial is what died
        messages = sent()
        if attempt == 1:
            assert trials(job_id)[0].status == "queued"
            assert ("squish.run_trial", str(trial.id)) in [(m[0], m[1]) for m in messages]
            with session_scope() as session:
                said = session.scalars(
                    select(JobEvent.message).where(JobEvent.job_id == job_id)
                ).all()
            assert "trial 0 retried: worker worker-1 stopped responding; running it again" in said
        else:
            failed = trials(job_id)[0]
            assert failed.status == "failed" and failed.error["code"] == "worker_lost"
            assert ("squish.search_step", job_id) in [(m[0], m[1]) for m in messages]
    assert job_row(job_id).status == "running"
    assert search_tasks.step(job_id) == "asked 1"  # the search goes on with the next trial
    assert [t.status for t in trials(job_id)] == ["failed", "queued"]


def test_a_cancelled_search_closes_its_trials(tenant: str, files: dict[str, Path]) -> None:
    from app.db import session_scope
    from app.jobs import lifecycle
    from app.search import trials as state
    from worker import search_tasks

    job_id = running_search(tenant, files, budget={"max_trials": 4, "parallel_trials": 2})
    search_tasks.step(job_id)
    first, second = trials(job_id)
    with session_scope() as session:
        assert state.claim_trial(session, first.id, "worker-1")
        assert lifecycle.cancel(session, job_id)
    with session_scope() as session:
        # The running trial's heartbeat says stop; the queued one cannot be claimed.
        assert not state.trial_heartbeat(session, first.id, "worker-1")
        assert not state.claim_trial(session, second.id, "worker-2")
    assert search_tasks.step(job_id) == "stopped"
    assert {t.status for t in trials(job_id)} == {"cancelled"}
    assert search_row(job_id).phase == "done"


def test_the_budget_ends_the_search_with_the_finishing_task(
    tenant: str, files: dict[str, Path]
) -> None:
    from app.db import session_scope, utcnow
    from app.orm import Search
    from worker import search_tasks

    job_id = running_search(tenant, files, budget={"max_trials": 2, "parallel_trials": 2})
    with session_scope() as session:
        session.execute(
            update(Search)
            .where(Search.job_id == job_id)
            .values(deadline_at=utcnow() - timedelta(seconds=1))
        )
    assert search_tasks.step(job_id) == "finishing"  # out of time: nothing asked
    assert trials(job_id) == []
    assert search_row(job_id).phase == "finishing"
    assert ("squish.finish_search", job_id) in [(m[0], m[1]) for m in sent()]
