"""The dashboard at /ui in headless Chromium: sign in, upload, the job form built from the
methods' schemas, a job followed live to the end, downloads, paginated lists, a search's
views and the card viewer (a real search too, from the form's search mode to its card);
and the security headers and rules of its static files."""

from __future__ import annotations

import itertools
import re
import threading
import tomllib
from datetime import timedelta
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser import page

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "app" / "ui" / "static"
WAIT_MS = 60_000  # what a step may take at most on a busy 2-core machine (never a threshold)


def sign_in(pg: Any, url: str, key: str) -> None:
    pg.goto(f"{url}/ui/")
    pg.fill("#api-key", key)
    pg.click("#signin-submit")
    pg.wait_for_selector("#jobs[data-rendered]", timeout=WAIT_MS)


def upload(pg: Any, prefix: str, path: Path) -> str:
    """Upload through the form; the created resource's id."""
    pg.set_input_files(f"#{prefix}-file", str(path))
    pg.click(f"#{prefix}-submit")
    pg.wait_for_selector(f"#{prefix}-result .created, #{prefix}-result .problem", timeout=WAIT_MS)
    created = pg.locator(f"#{prefix}-result .created")
    assert created.count() == 1, pg.inner_text(f"#{prefix}-result")
    return str(created.get_attribute("data-id"))


def test_sign_in_upload_submit_follow_and_download(
    live: Any, quick_engine: Any, browser: Any, ui_files: dict[str, Path], tmp_path: Path
) -> None:
    with page(browser) as pg:
        # A refused key: the API's problem detail, still on the sign-in view, nothing stored.
        pg.goto(f"{live.url}/ui/")
        pg.fill("#api-key", "sq_not_a_real_key")
        pg.click("#signin-submit")
        pg.wait_for_selector("#signin-status .problem", timeout=WAIT_MS)
        refusal = pg.inner_text("#signin-status .problem")
        assert "401" in refusal and "Invalid API key" in refusal
        assert "not valid" in refusal  # the API's detail, not a made-up message
        assert pg.locator("#signin").is_visible()
        assert pg.evaluate("sessionStorage.getItem('squish.apiKey')") is None
        assert pg.evaluate("document.cookie") == ""

        pg.fill("#api-key", live.api_key)
        pg.click("#signin-submit")
        pg.wait_for_selector("#jobs[data-rendered]", timeout=WAIT_MS)
        assert pg.evaluate("sessionStorage.getItem('squish.apiKey')") == live.api_key
        assert "No jobs yet" in pg.inner_text("#jobs-body")

        # Uploads: a refused file shows the API's problem; then the model and two datasets.
        pg.click("#nav-upload")
        pg.wait_for_selector("#model-upload")
        pg.set_input_files("#model-file", str(ui_files["eval"]))  # data, not a model
        pg.click("#model-submit")
        pg.wait_for_selector("#model-result .problem", timeout=WAIT_MS)
        refused = pg.inner_text("#model-result .problem")
        assert re.search(r"\b(415|422)\b", refused), refused
        assert live.model_ids() == []

        model_id = upload(pg, "model", ui_files["pt2"])
        eval_id = upload(pg, "dataset", ui_files["eval"])
        calibration_id = upload(pg, "dataset", ui_files["calibration"])
        assert live.model_ids() == [model_id]
        assert sorted(live.dataset_ids()) == sorted([eval_id, calibration_id])

        # The form: built from GET /v1/methods; the model comes from the upload's link.
        pg.click("#use-model")
        pg.wait_for_selector("#job-form[data-ready]", timeout=WAIT_MS)
        assert pg.input_value("#model_id") == model_id
        pg.fill("#dataset-eval", eval_id)
        pg.fill("#dataset-calibration", calibration_id)
        pg.select_option("#step-0-method", "prune.magnitude")
        step = pg.locator('[data-step="0"]')
        step.locator('[data-loc="pipeline.0.params.amount"]').fill("1.5")  # > 1: refused
        pg.select_option('[data-loc="pipeline.0.params.scope"]', label="global")
        pg.click("#add-step")
        pg.select_option("#step-1-method", "quantize.dynamic")
        pg.fill('[data-loc="evaluate.batch_sizes"]', "1, 32")
        pg.fill('[data-loc="evaluate.iterations"]', "5")

        # A 422: its error next to the field it names, the problem above the button.
        with pg.expect_response(
            lambda r: r.url.endswith("/v1/jobs") and r.request.method == "POST"
        ) as answer:
            pg.click("#submit-job")
        assert answer.value.status == 422
        slot = pg.locator('[data-error-for="pipeline.0.params.amount"] .error')
        slot.wait_for(timeout=WAIT_MS)
        assert "1" in slot.inner_text()
        assert (
            pg.locator('[data-field="pipeline.0.params.amount"]')
            .get_attribute("class")
            .count("has-error")
            == 1
        )
        assert "422" in pg.inner_text("#form-problem")
        assert live.job_ids() == []

        # Reorder works on the values typed: move quantize up and back down.
        pg.locator('[data-step="1"] [data-action="up"]').click()
        assert pg.input_value("#step-0-method") == "quantize.dynamic"
        pg.locator('[data-step="0"] [data-action="down"]').click()
        assert pg.input_value("#step-0-method") == "prune.magnitude"
        assert pg.input_value('[data-loc="pipeline.0.params.amount"]') == "1.5"

        pg.fill('[data-loc="pipeline.0.params.amount"]', "0.5")
        quick_engine.serve()
        pg.click("#submit-job")
        pg.wait_for_url(re.compile(r".*#/jobs/job_[A-Za-z0-9_-]+$"), timeout=WAIT_MS)
        job_id = pg.url.rsplit("/", 1)[1]
        assert live.job_ids() == [job_id]
        spec = live_spec(live, job_id)
        assert [s["method"] for s in spec["pipeline"]] == ["prune.magnitude", "quantize.dynamic"]
        assert spec["pipeline"][0]["params"]["amount"] == 0.5
        assert spec["pipeline"][0]["params"]["scope"] == "global"
        assert spec["evaluate"]["batch_sizes"] == [1, 32]
        assert spec["evaluate"]["iterations"] == 5
        assert spec["datasets"] == {"eval": eval_id, "calibration": calibration_id}

        # Followed live to the end: the event log (SSE through fetch), then the metrics.
        pg.wait_for_selector('#job-head[data-status="succeeded"]', timeout=240_000)
        pg.wait_for_selector('#stream-state[data-state="ended"]', timeout=WAIT_MS)
        kinds = pg.eval_on_selector_all("#event-log li", "els => els.map(e => e.dataset.kind)")
        stored = [e["kind"] for e in live.stored_events(job_id)]
        assert kinds == stored and "status" in kinds and "progress" in kinds
        assert float(pg.get_attribute("#job-progress", "data-progress")) == 1.0
        pg.wait_for_selector("#metrics-table", timeout=WAIT_MS)
        figures = pg.eval_on_selector_all(
            "#metrics-table tbody tr", "els => els.map(e => e.dataset.figure)"
        )
        assert {"File size", "Accuracy", "Latency p50, batch 1", "Latency p50, batch 32"} <= set(
            figures
        )
        waterfall = pg.locator("#waterfall")
        assert int(waterfall.get_attribute("data-stages")) >= 3  # original and two steps
        bars = pg.eval_on_selector_all(
            "#waterfall .panel-size rect.bar", "els => els.map(e => Number(e.dataset.value))"
        )
        job = live_job(live, job_id)
        steps = job["metrics"]["steps"]
        assert bars[: 1 + len(steps)] == [
            job["metrics"]["original"]["size_bytes"],
            *(s["size_bytes"] for s in steps),
        ]

        # Download the artifact with the Bearer header, through a blob URL.
        with pg.expect_download() as got:
            pg.click('[data-download="model"]')
        saved = tmp_path / "downloaded"
        got.value.save_as(saved)
        assert got.value.suggested_filename.endswith(".pt2")
        assert saved.read_bytes() == live.artifact_bytes(job_id, "model", tmp_path)
        pg.wait_for_selector('[data-downloaded="model"]', timeout=WAIT_MS)

        # The list shows it, finished.
        pg.click("#nav-jobs")
        pg.wait_for_selector(f'tr[data-job="{job_id}"][data-status="succeeded"]', timeout=WAIT_MS)
        assert pg.page_errors == []


def live_job(live: Any, job_id: str) -> dict[str, Any]:
    return httpx.get(
        f"{live.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {live.api_key}"}
    ).json()


def live_spec(live: Any, job_id: str) -> dict[str, Any]:
    return live_job(live, job_id)["spec"]


# --- lists, search views, the card ----------------------------------------------------------


def _insert_jobs(n: int, tenant_key: str, **fields: Any) -> list[str]:
    """``n`` jobs straight into the database (newest last), for list and view tests."""
    from app.db import new_id, session_scope, utcnow
    from app.keys import key_cache
    from app.orm import Job

    tenant = key_cache.tenant_for(tenant_key)
    assert tenant is not None
    ids = []
    start = utcnow() - timedelta(hours=1)
    with session_scope() as session:
        for i in range(n):
            job = Job(
                id=new_id("job"),
                tenant_id=tenant,
                status=fields.get("status", "queued"),
                progress=fields.get("progress", 0.0),
                spec=fields.get(
                    "spec", {"pipeline": [{"method": "quantize.dynamic", "params": {}}]}
                ),
                queue="cpu",
                metrics=fields.get("metrics"),
                created_at=start + timedelta(seconds=i),
                finished_at=fields.get("finished_at"),
                started_at=fields.get("started_at"),
            )
            session.add(job)
            ids.append(job.id)
    return ids


def test_jobs_list_pages_through_the_cursor_and_updates_live(live: Any, browser: Any) -> None:
    ids = _insert_jobs(120, live.api_key)
    newest_first = sorted(ids, reverse=True)
    with page(browser) as pg:
        sign_in(pg, live.url, live.api_key)
        shown = []
        for page_number, expected in ((1, 50), (2, 50), (3, 20)):
            pg.wait_for_selector(f'#jobs[data-page="{page_number}"]', timeout=WAIT_MS)
            rows = pg.eval_on_selector_all(
                "#jobs-body tr[data-job]", "els => els.map(e => e.dataset.job)"
            )
            assert len(rows) == expected
            shown += rows
            if page_number < 3:
                assert pg.is_enabled("#page-next")
                pg.click("#page-next")
        assert shown == newest_first  # every job once, in the API's order
        assert not pg.is_enabled("#page-next")
        pg.click("#page-prev")
        pg.wait_for_selector('#jobs[data-page="2"]', timeout=WAIT_MS)
        assert (
            pg.eval_on_selector("#jobs-body tr[data-job]", "e => e.dataset.job") == newest_first[50]
        )

        # Live: a job the worker picks up shows running with its progress, without a reload.
        from app.db import session_scope
        from app.orm import Job

        pg.click("#page-prev")
        pg.wait_for_selector('#jobs[data-page="1"]', timeout=WAIT_MS)
        with session_scope() as session:
            job = session.get(Job, newest_first[0])
            job.status, job.progress, job.stage = "running", 0.5, "prune.magnitude"
        row = f'tr[data-job="{newest_first[0]}"][data-status="running"]'
        pg.wait_for_selector(row, timeout=WAIT_MS)
        assert "50 %" in pg.inner_text(row) and "prune.magnitude" in pg.inner_text(row)

        # The status filter is the API's.
        pg.select_option("#filter-status", "running")
        expect(pg.locator("#jobs-body tr[data-job]")).to_have_count(1, timeout=WAIT_MS)

        # A key that stops working (revoked) while signed in: back to sign-in, with why.
        pg.evaluate("() => sessionStorage.setItem('squish.apiKey', 'sq_revoked')")
        pg.wait_for_selector("#signin-status .problem", timeout=WAIT_MS)
        assert "Invalid API key" in pg.inner_text("#signin-status .problem")
        assert pg.evaluate("() => sessionStorage.getItem('squish.apiKey')") is None
        assert pg.page_errors == []


SEARCH_METRICS = {
    "objectives": ["latency", "size"],
    "trials": [
        {"number": n, "pipeline": [{"method": m, "params": {}}], "output_format": "pt2",
         "runtime": "torch", "status": "succeeded", "feasible": feasible,
         "violations": [] if feasible else [{"constraint": "accuracy_drop", "bound": 0.01, "measured": 0.05}],
         "seconds": 1.5,
         "metrics": {"original": {"size_bytes": 40000}, "compressed": {
             "size_bytes": size, "accuracy": acc, "latency_ms": {"batch_1": {"p50": lat, "p95": lat, "mean": lat}}},
             "ratios": {"size": 40000 / size}}}
        for n, m, size, lat, acc, feasible in (
            (0, "quantize.dynamic", 12000, 0.05, 0.96, True),
            (1, "prune.magnitude", 30000, 0.03, 0.97, True),
            (2, "quantize.half", 20000, 0.08, 0.90, False),
        )
    ] + [{"number": 3, "pipeline": [{"method": "lowrank", "params": {}}], "output_format": "pt2",
          "runtime": "torch", "status": "running"}],
    "pareto": [0, 1],
    "best": 1,
    "met": True,
}  # fmt: skip


def test_search_trials_pareto_and_the_card(live: Any, browser: Any, tmp_path: Path) -> None:
    from app.db import new_id, session_scope, utcnow
    from app.orm import Artifact
    from app.storage import get_store

    metrics = {
        "original": {"size_bytes": 40000, "accuracy": 0.97},
        "compressed": {"size_bytes": 30000, "accuracy": 0.97},
        "ratios": {"size": 1.33},
        "search": SEARCH_METRICS,
    }
    now = utcnow()
    [job_id] = _insert_jobs(
        1, live.api_key, status="succeeded", progress=1.0, metrics=metrics,
        spec={"search": {"objectives": ["latency", "size"]}}, started_at=now, finished_at=now,
    )  # fmt: skip
    # A card: inline style (must apply) and a script (must not run: the iframe is sandboxed).
    card = (
        "<!doctype html><html><head><style>h1{color:rgb(200, 10, 20)}</style></head><body>"
        "<h1 id='title'>Card</h1><script>document.body.dataset.ran = 'yes'</script></body></html>"
    )
    path = tmp_path / "card.html"
    path.write_text(card)
    size = path.stat().st_size
    get_store().put_file(path, "cards/test-card")
    with session_scope() as session:
        session.add(
            Artifact(
                id=new_id("art"), job_id=job_id, name="card", filename=f"{job_id}.card.html",
                media_type="text/html", size_bytes=size, sha256="0" * 64,
                storage_key="cards/test-card",
            )
        )  # fmt: skip

    with page(browser) as pg:
        sign_in(pg, live.url, live.api_key)
        pg.goto(f"{live.url}/ui/#/jobs/{job_id}")
        pg.wait_for_selector("#trials", timeout=WAIT_MS)
        assert pg.eval_on_selector_all(
            "#trials tbody tr", "els => els.map(e => e.dataset.trial)"
        ) == ["0", "1", "2", "3"]
        assert "best" in pg.inner_text('#trials tr[data-trial="1"]')
        assert "accuracy_drop" in pg.inner_text('#trials tr[data-trial="2"]')
        marks = pg.eval_on_selector_all(
            "#pareto .trial-mark", "els => els.map(e => [e.dataset.trial, e.dataset.feasible])"
        )
        assert marks == [["0", "true"], ["1", "true"], ["2", "false"]]  # trial 3: not measured
        assert pg.locator("#pareto .front-ring").count() == 2 + 1  # two trials + the legend

        pg.click('[data-open-card="card"]')
        viewer = pg.frame_locator("#card-frame")
        card_doc = viewer.frame_locator("#card-document")
        title = card_doc.locator("#title")
        title.wait_for(timeout=WAIT_MS)
        assert title.evaluate("e => getComputedStyle(e).color") == "rgb(200, 10, 20)"
        assert card_doc.locator("body").get_attribute("data-ran") is None
        assert viewer.locator("#card-document").get_attribute("sandbox") == ""
        assert pg.page_errors == []


def test_search_form_shows_each_422_error(
    live: Any, browser: Any, ui_files: dict[str, Path]
) -> None:
    with (
        httpx.Client(
            base_url=live.url, headers={"Authorization": f"Bearer {live.api_key}"}
        ) as client,
        ui_files["pt2"].open("rb") as fh,
    ):
        model = client.post("/v1/models", files={"file": ("digits.pt2", fh)}).json()
    with page(browser) as pg:
        sign_in(pg, live.url, live.api_key)
        pg.goto(f"{live.url}/ui/#/new?model={model['id']}")
        pg.wait_for_selector("#job-form[data-ready]", timeout=WAIT_MS)
        pg.check("#kind-search")
        assert pg.is_visible("#search") and not pg.is_visible("#pipeline")
        with pg.expect_response(
            lambda r: r.url.endswith("/v1/jobs") and r.request.method == "POST"
        ) as answer:
            pg.click("#submit-job")  # no eval dataset: a search cannot run
        assert answer.value.status == 422
        errors = answer.value.json()["errors"]
        pg.wait_for_selector("#form-problem .problem", timeout=WAIT_MS)
        placed = pg.eval_on_selector_all(
            ".field-error .error", "els => els.map(e => e.dataset.loc)"
        )
        unplaced = pg.locator("#form-unplaced li").count()
        assert len(placed) + unplaced == len(errors)
        for loc in placed:
            assert loc in {".".join(map(str, e["loc"])) for e in errors}
        assert live.job_ids() == []


SEARCH_MS = 240_000  # a whole search on a busy 2-core machine, at most (never a threshold)
FINAL = {"succeeded", "failed", "cancelled"}
# Each render of the search section: the trial rows' (number, status) as the page showed them.
RECORD_TRIAL_TABLES = """() => {
  window.trialTables = [];
  const box = document.getElementById("job-search");
  const take = () => {
    const rows = [...box.querySelectorAll("#trials tbody tr")];
    const seen = rows.map((r) => [r.dataset.trial, r.dataset.status]);
    const last = window.trialTables[window.trialTables.length - 1];
    if (rows.length && JSON.stringify(seen) !== JSON.stringify(last)) window.trialTables.push(seen);
  };
  new MutationObserver(take).observe(box, { childList: true, subtree: true });
  take();
}"""


def _stage(status: str) -> int:
    return 2 if status in FINAL else ["queued", "running"].index(status)


def hold_first_recipe(monkeypatch: pytest.MonkeyPatch, timeout_s: float) -> threading.Event:
    """The first trial, once started, waits for the returned event before it runs its recipe."""
    from worker.search import trial

    release = threading.Event()
    real = trial.run_trial
    held = [release]

    def run_trial(*args: Any, **kwargs: Any) -> Any:
        if held:
            held.pop().wait(timeout_s)
        return real(*args, **kwargs)

    monkeypatch.setattr(trial, "run_trial", run_trial)
    return release


def test_a_real_search_followed_live_from_the_form_to_its_card(
    live: Any,
    queue_worker: Any,
    browser: Any,
    ui_files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth = {"Authorization": f"Bearer {live.api_key}"}
    with httpx.Client(base_url=live.url, headers=auth, timeout=WAIT_MS / 1000) as client:
        ids = {}
        for name, kind in (("pt2", "models"), ("eval", "datasets"), ("calibration", "datasets")):
            with ui_files[name].open("rb") as fh:
                ids[name] = client.post(f"/v1/{kind}", files={"file": (fh.name, fh)}).json()["id"]
    assert queue_worker.wait_for("squish.inspect_model")  # the model's layer names

    with page(browser) as pg:
        sign_in(pg, live.url, live.api_key)
        pg.goto(f"{live.url}/ui/#/new?model={ids['pt2']}&kind=search")
        pg.wait_for_selector("#job-form[data-ready]", timeout=WAIT_MS)
        assert pg.is_checked("#kind-search") and pg.is_visible("#search")
        pg.fill("#dataset-eval", ids["eval"])
        pg.fill("#dataset-calibration", ids["calibration"])
        for method in ("quantize.dynamic", "quantize.half", "quantize.static"):
            pg.check(f'[data-loc="search.methods"] input[value="{method}"]')
        pg.check('[data-loc="search.runtimes"] input[value="torch"]')
        pg.fill('[data-loc="search.constraints.accuracy_drop"]', "0.05")
        # 3/4 of the model: the int8 programs come near it (some may be infeasible), fp16 not.
        size_bound = ui_files["pt2"].stat().st_size * 3 // 4
        pg.fill('[data-loc="search.constraints.size_bytes"]', str(size_bound))
        pg.fill('[data-loc="search.budget.max_trials"]', "3")
        pg.fill('[data-loc="search.budget.parallel_trials"]', "1")
        pg.fill('[data-loc="search.seed"]', "0")
        pg.fill('[data-loc="evaluate.batch_sizes"]', "1")
        pg.fill('[data-loc="evaluate.warmup"]', "0")
        pg.fill('[data-loc="evaluate.iterations"]', "3")

        # The first trial waits until the page has shown it queued, then running: the table
        # is seen live.
        first_trial = queue_worker.hold("squish.run_trial")
        first_recipe = hold_first_recipe(monkeypatch, WAIT_MS / 1000)
        pg.click("#submit-job")
        pg.wait_for_url(re.compile(r".*#/jobs/job_[A-Za-z0-9_-]+$"), timeout=WAIT_MS)
        job_id = pg.url.rsplit("/", 1)[1]
        spec = live_spec(live, job_id)
        assert spec["search"]["methods"] == ["quantize.dynamic", "quantize.half", "quantize.static"]
        assert spec["search"]["runtimes"] == ["torch"]
        assert spec["search"]["budget"]["max_trials"] == 3
        bounds = {k: v for k, v in spec["search"]["constraints"].items() if v is not None}
        assert bounds == {"accuracy_drop": 0.05, "size_bytes": size_bound}
        assert spec["datasets"] == {"eval": ids["eval"], "calibration": ids["calibration"]}
        pg.wait_for_selector("#job-search", state="attached", timeout=WAIT_MS)
        pg.evaluate(RECORD_TRIAL_TABLES)
        first_row = '#trials tr[data-trial="0"]'
        try:
            pg.wait_for_selector(f'{first_row}[data-status="queued"]', timeout=WAIT_MS)
        finally:
            first_trial.set()
        try:  # started: its event says so before the next step publishes the table
            pg.wait_for_selector(f'{first_row}[data-status="running"]', timeout=WAIT_MS)
        finally:
            first_recipe.set()

        pg.wait_for_selector('#job-head[data-status="succeeded"]', timeout=SEARCH_MS)
        job = live_job(live, job_id)
        assert job["status"] == "succeeded" and job["error"] is None
        search = job["metrics"]["search"]
        assert search["met"] is True
        trials = search["trials"]
        assert [t["number"] for t in trials] == [0, 1, 2]
        assert {t["status"] for t in trials} <= FINAL
        final = [[str(t["number"]), t["status"]] for t in trials]
        assert pg.locator("#trials tbody tr").count() == 3  # rendered with the final status
        tables = pg.evaluate("window.trialTables")
        assert tables[0] == [["0", "queued"]] and [["0", "running"]] in tables
        assert tables[-1] == final
        for before, after in itertools.pairwise(tables):
            # Rows are only added, in order; a row's status only moves on.
            assert [n for n, _ in after][: len(before)] == [n for n, _ in before]
            for (_, was), (_, now) in zip(before, after, strict=False):
                assert was == now or _stage(was) < _stage(now), tables
        for t in trials:
            row = pg.inner_text(f'#trials tr[data-trial="{t["number"]}"]')
            assert all(v["constraint"] in row for v in t["violations"]), row

        # The Pareto plot: one mark per measured trial, its feasibility; the best one marked.
        measured = [t for t in trials if t.get("metrics")]
        marks = pg.eval_on_selector_all(
            "#pareto .trial-mark", "els => els.map(e => [e.dataset.trial, e.dataset.feasible])"
        )
        assert marks == [[str(t["number"]), str(t["feasible"]).lower()] for t in measured]
        best = search["best"]
        assert best in search["pareto"] and trials[best]["feasible"]
        assert pg.text_content(f'#pareto .trial-mark[data-trial="{best}"] .value-label') == "best"
        rings = pg.eval_on_selector_all(
            "#pareto .trial-mark:has(.front-ring)", "els => els.map(e => Number(e.dataset.trial))"
        )
        assert sorted(rings) == sorted(search["pareto"])
        assert "best" in pg.inner_text(f'#trials tr[data-trial="{best}"]')

        # The card of this search, in the viewer: its trial table and Pareto scatter.
        pg.click('[data-open-card="card"]')
        card = pg.frame_locator("#card-frame").frame_locator("#card-document")
        card.locator("#search").wait_for(timeout=WAIT_MS)
        rows = card.locator("#search h3:text-is('Trials') + table tr:has(td)")
        numbers = [r.split()[0] for r in rows.all_inner_texts()]
        assert numbers == [str(t["number"]) for t in trials]
        assert "best" in rows.nth(best).inner_text()
        feasible = [rows.nth(i).locator("td").nth(9).inner_text().split()[0] for i in range(3)]
        assert feasible == ["yes" if t["feasible"] else "no" for t in trials]
        scatter = card.locator('#search svg[aria-label^="Pareto plot"]')
        assert f"best (trial {best})" in (scatter.text_content() or "")
        assert pg.page_errors == []


# --- static files: headers and rules ------------------------------------------------------------


def test_ui_headers_and_redirect(live: Any) -> None:
    with httpx.Client(base_url=live.url) as client:
        assert client.get("/ui").status_code in (307, 308)
        index = client.get("/ui/")
        assert index.status_code == 200 and "text/html" in index.headers["content-type"]
        csp = index.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["script-src"] == "'self'"
        assert directives["style-src"] == "'self'"
        assert directives["default-src"] == "'none'"
        assert directives["frame-ancestors"] == "'none'"
        assert "unsafe" not in csp
        assert index.headers["x-content-type-options"] == "nosniff"
        viewer = client.get("/ui/card.html").headers["content-security-policy"]
        assert "script-src 'self'" in viewer and "unsafe-eval" not in viewer
        assert "script-src 'self';" in viewer.replace("'self' 'unsafe-inline'", "")
        # Assets under the version of the files: kept a year; the page itself is revalidated.
        assert index.headers["cache-control"] == "no-cache"
        [main] = re.findall(r'<script type="module" src="(v/[0-9a-f]{12}/js/main\.js)"', index.text)
        script = client.get(f"/ui/{main}")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert "immutable" in script.headers["cache-control"]
        assert script.content == (STATIC / "js" / "main.js").read_bytes()
        stale = client.get("/ui/v/000000000000/js/main.js")
        assert stale.status_code == 200 and stale.headers["cache-control"] == "no-cache"
        assert client.post("/ui/").status_code == 405
        missing = client.get("/ui/js/nope.js")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")


def test_static_files_follow_the_rules() -> None:
    """No inline script, no HTML built from strings, nothing from another origin, and every
    file is in the package data (an installed wheel serves the same dashboard)."""
    files = [p for p in STATIC.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".html", ".js", ".css"}
    for html in STATIC.glob("*.html"):
        text = html.read_text()
        for script in re.findall(r"<script\b[^>]*>(.*?)</script>", text, flags=re.S):
            assert script.strip() == "", f"inline script in {html.name}"
        assert not re.search(r"\son[a-z]+=", text), f"inline handler in {html.name}"
        assert "style=" not in text
    for js in STATIC.rglob("*.js"):
        text = js.read_text()
        for banned in (
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
        ):
            assert banned not in text, f"{banned} in {js.name}"
    for path in files:
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", path.read_text()), path.name
        assert "@import url(http" not in path.read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["app"]
    for path in files:
        relative = path.relative_to(ROOT / "app").as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative
