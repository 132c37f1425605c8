"""Benchmark of the web dashboard: the jobs list with 1,000 jobs, in headless Chromium.

``squish serve`` (API + worker, embedded) runs one real job (the digits MLP, pruned then
quantized), then 1,000 jobs shaped like it (its spec and metrics, statuses mixed) are
written to its database. Headless Chromium (Debian's, through Playwright) signs in and,
in alternating rounds, measures:

- *first render*: a full navigation to ``/ui/#/jobs`` (HTML, CSS, the JS modules, one
  ``GET /v1/jobs`` page, the table built) to the dashboard's ``squish:jobs-rendered``
  performance mark: a revisit in the signed-in tab (its assets cached) with 50 and with 200
  jobs per page, and a first visit in a fresh browser context (nothing cached) with 50;
- the bare ``GET /v1/jobs`` of the same page from the same browser (fetch + JSON), the floor
  under the render;
- *next page*: a click on "Older" to the next page's table, through all 1,000 jobs.

    python -m benchmarks.ui [--rounds 15] [--screenshots docs/img]

``--screenshots`` also saves PNGs of the list, the job page and the job form.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks import service as sb

JOBS = 1000
FIRST_RENDER_TARGET_MS = 1000.0
OUT = Path(__file__).resolve().parent / "out" / "ui.json"

STEPS = [
    {"method": "prune.magnitude", "params": {"amount": 0.5, "scope": "global"}},
    {"method": "quantize.dynamic", "params": {}},
]

_NEXT_PAGE_MS = """async () => {
  const table = document.getElementById("jobs");
  const before = table.dataset.page;
  const t0 = performance.now();
  await new Promise((resolve) => {
    const observer = new MutationObserver(() => {
      if (table.dataset.page !== before) { observer.disconnect(); resolve(); }
    });
    observer.observe(table, { attributes: true, attributeFilter: ["data-page"] });
    document.getElementById("page-next").click();
  });
  return performance.now() - t0;
}"""

_FETCH_MS = """async ([key, limit]) => {
  const t0 = performance.now();
  const answer = await fetch(`/v1/jobs?limit=${limit}`, { headers: { Authorization: `Bearer ${key}` } });
  await answer.json();
  return performance.now() - t0;
}"""

_RENDER_MARK_MS = (
    "() => { const m = performance.getEntriesByName('squish:jobs-rendered');"
    " return m.length ? m[0].startTime : null; }"
)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(values), 1),
        "p95_ms": round(_pct(values, 0.95), 1),
        "max_ms": round(max(values), 1),
        "n": len(values),
    }


def _real_job(service: sb.Service, root: Path) -> dict[str, Any]:
    """One job through the real worker: the digits MLP pruned and quantized."""
    from tests import factories

    model = service.upload(factories.tiny_mlp_pt2(root / "digits.pt2"), "models", name="digits")
    data = service.upload(factories.digits_npz(root / "digits-test.npz"), "datasets")
    created = service.http.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "pipeline": STEPS,
            "datasets": {"eval": data["id"]},
            "evaluate": {"batch_sizes": [1, 32]},
        },
    )
    if created.status_code != 202:
        raise sb.BenchError(f"POST /v1/jobs: {created.status_code} {created.text[:300]}")
    job_id = created.json()["id"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        job = service.http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            if job["status"] != "succeeded":
                raise sb.BenchError(f"the real job {job_id} ended {job['status']}: {job['error']}")
            return dict(job)
        time.sleep(0.3)
    raise sb.BenchError(f"the real job {job_id} did not finish in 600 s")


def _seed(data_dir: Path, like: dict[str, Any], n: int) -> None:
    """``n`` finished jobs shaped like ``like`` (its spec, metrics and tenant), written to
    the service's database directly (no worker runs them)."""
    os.environ["SQUISH_DATA_DIR"] = str(data_dir)
    from app.db import new_id, session_scope
    from app.orm import Job

    with session_scope() as session:
        tenant = session.get(Job, like["id"]).tenant_id  # type: ignore[union-attr]
    # Older than the real job, 30 s apart, in the order of their ids.
    start = datetime.fromisoformat(like["created_at"]) - timedelta(seconds=30 * (n + 1))
    statuses = ["succeeded"] * 7 + ["failed", "cancelled", "succeeded"]
    ids = sorted(new_id("job") for _ in range(n))  # time-sortable: oldest first
    with session_scope() as session:
        for i, job_id in enumerate(ids):
            status = statuses[i % len(statuses)]
            at = start + timedelta(seconds=30 * i)
            session.add(
                Job(
                    id=job_id,
                    tenant_id=tenant,
                    model_id=like["model_id"],
                    status=status,
                    progress=1.0 if status == "succeeded" else 0.4,
                    stage=None,
                    spec=like["spec"],
                    queue="cpu",
                    attempts=1,
                    metrics=like["metrics"] if status == "succeeded" else None,
                    error={"code": "cancelled", "message": "cancelled by the client"}
                    if status == "cancelled"
                    else (
                        {"code": "invalid_params", "message": "seeded failure", "step": "quantize"}
                        if status == "failed"
                        else None
                    ),
                    created_at=at,
                    started_at=at,
                    finished_at=at + timedelta(seconds=12),
                )
            )


def _first_render(pg: Any, url: str, tag: str, limit: int) -> float:
    """A new document (the query string differs) showing the list: ms from navigation start
    to the dashboard's mark."""
    pg.goto(f"{url}/ui/?round={tag}#/jobs?limit={limit}")
    pg.wait_for_selector(f'#jobs[data-rendered="{limit}"]')
    mark = pg.evaluate(_RENDER_MARK_MS)
    if mark is None:
        raise sb.BenchError("the dashboard set no squish:jobs-rendered mark")
    return float(mark)


def _measure(url: str, key: str, rounds: int) -> dict[str, Any]:
    from tests.browser import launch, page

    variants = ("warm 50", "warm 200", "cold 50")
    first: dict[str, list[float]] = {v: [] for v in variants}
    fetched: dict[int, list[float]] = {50: [], 200: []}
    next_page: list[float] = []
    # The key as the sign-in form leaves it, for the fresh contexts of the cold rounds.
    signed_in = f"sessionStorage.setItem('squish.apiKey', {json.dumps(key)});"
    with launch() as browser, page(browser) as pg:
        pg.goto(f"{url}/ui/")
        pg.fill("#api-key", key)
        pg.click("#signin-submit")
        pg.wait_for_selector("#jobs[data-rendered]")
        for r in range(rounds):
            for variant in variants[r % 3 :] + variants[: r % 3]:
                kind, limit = variant.split()
                if kind == "warm":  # this tab: the assets are in its cache
                    first[variant].append(_first_render(pg, url, f"{r}-{limit}", int(limit)))
                    fetched[int(limit)].append(float(pg.evaluate(_FETCH_MS, [key, int(limit)])))
                else:  # a new browser context: nothing cached
                    with page(browser) as cold:
                        cold.add_init_script(signed_in)
                        first[variant].append(_first_render(cold, url, f"{r}-cold", int(limit)))
        # Through every page, 50 at a time.
        pg.goto(f"{url}/ui/?pages#/jobs")
        pg.wait_for_selector('#jobs[data-rendered="50"]')
        pages = 1
        while pg.is_enabled("#page-next"):
            next_page.append(float(pg.evaluate(_NEXT_PAGE_MS)))
            pages += 1
        seen = pg.evaluate("() => document.getElementById('jobs').dataset.page")
        if int(seen) != pages:
            raise sb.BenchError(f"paged to {seen}, counted {pages}")
        version = browser.version
    return {
        "first_render": {k: _summary(v) for k, v in first.items()},
        "bare_get": {str(k): _summary(v) for k, v in fetched.items()},
        "next_page": _summary(next_page),
        "pages": pages,
        "rounds": rounds,
        "chromium": version,
    }


def _screenshots(url: str, key: str, job_id: str, model_id: str, folder: Path) -> list[str]:
    from tests.browser import launch, page, screenshot

    out = []
    with launch() as browser, page(browser, viewport={"width": 1280, "height": 860}) as pg:
        pg.goto(f"{url}/ui/")
        pg.fill("#api-key", key)
        pg.click("#signin-submit")
        pg.wait_for_selector('#jobs[data-rendered="50"]')
        out.append(str(screenshot(pg, folder / "ui-jobs.png", full_page=False)))
        pg.goto(f"{url}/ui/#/jobs/{job_id}")
        pg.wait_for_selector("#waterfall")
        pg.wait_for_selector('#stream-state[data-state="ended"]')
        out.append(str(screenshot(pg, folder / "ui-job.png")))
        pg.goto(f"{url}/ui/#/new?model={model_id}&steps=prune.magnitude,quantize.dynamic")
        pg.wait_for_selector("#job-form[data-ready]")
        pg.fill('[data-loc="pipeline.0.params.amount"]', "1.5")
        pg.click("#submit-job")
        pg.wait_for_selector('[data-error-for="pipeline.0.params.amount"] .error')
        pg.evaluate("() => window.scrollTo(0, 0)")
        out.append(str(screenshot(pg, folder / "ui-new-job.png", full_page=False)))
    return out


def bench_ui(rounds: int = 15, screenshots: Path | None = None) -> dict[str, Any]:
    """The figures (and, with ``screenshots``, the PNGs) described in the module docstring."""
    from tests.browser import chromium_path

    if chromium_path() is None:
        raise sb.BenchError("chromium is not installed: run scripts/ensure-chromium")
    with sb.workdir("ui") as root, sb.embedded_serve(root) as service:
        real = _real_job(service, root)
        _seed(root / "data", real, JOBS - 1)
        watch = sb.CpuWatch()
        result = _measure(service.url, service.api_key, rounds)
        result["host_cpu"] = watch.result()
        result["jobs"] = JOBS
        result["job_json_bytes"] = len(json.dumps(real))
        if screenshots is not None:
            result["screenshots"] = _screenshots(
                service.url, service.api_key, real["id"], real["model_id"], screenshots
            )
    return result


def rows(res: dict[str, Any]) -> list[dict[str, str]]:
    """The table rows of benchmarks/run.py."""
    out = []
    labels = {
        "warm 50": ("50 per page, a revisit (assets cached)", "50"),
        "warm 200": ("200 per page, a revisit (assets cached)", "200"),
        "cold 50": ("50 per page, a first visit (nothing cached)", "50"),
    }
    for variant, (label, limit) in labels.items():
        first = res["first_render"][variant]
        bare = res["bare_get"][limit]
        out.append(
            {
                "benchmark": f"dashboard: first render of the jobs list, {res['jobs']} jobs, "
                f"{label} (headless Chromium)",
                "measured": f"p50 {first['p50_ms']} ms, p95 {first['p95_ms']} ms",
                "target": f"< {FIRST_RENDER_TARGET_MS:.0f} ms",
                "met": "yes" if first["p95_ms"] < FIRST_RENDER_TARGET_MS else "no",
                "notes": f"navigation start to the rendered table, {first['n']} rounds "
                f"alternating with the other cases; the bare GET /v1/jobs?limit={limit} from "
                f"the page: p50 {bare['p50_ms']} ms, p95 {bare['p95_ms']} ms; jobs of "
                f"{res['job_json_bytes']} B of JSON each; Chromium {res['chromium']}; "
                f"{sb.cpu_note(res['host_cpu'])}",
            }
        )
    nxt = res["next_page"]
    out.append(
        {
            "benchmark": f"dashboard: next page of the jobs list, 50 per page, through all "
            f"{res['jobs']} jobs",
            "measured": f"p50 {nxt['p50_ms']} ms, p95 {nxt['p95_ms']} ms",
            "target": f"< {FIRST_RENDER_TARGET_MS:.0f} ms",
            "met": "yes" if nxt["p95_ms"] < FIRST_RENDER_TARGET_MS else "no",
            "notes": f"click on 'Older' to the next page's table (GET with the cursor, DOM "
            f"replaced), {nxt['n']} pages after the first; {res['pages']} pages in all",
        }
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--screenshots", type=Path, default=None, help="save PNGs here")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    res = bench_ui(args.rounds, args.screenshots)
    from benchmarks.run import report

    report(rows(res), res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
