"""Benchmark of the recipe search (DESIGN §10) through the running service.

    python -m benchmarks.run --only search                  # every part (about 25 minutes)
    python -m benchmarks.search --part digits --trials 30 --max-seconds 1200
    python -m benchmarks.search --part workers --part robustness

Four parts, each a real service and real searches; every number printed is measured in
the run.

- ``digits``: one search on the digits CNN in ``squish serve`` (API and one embedded
  Celery worker): pt2 upload; train, calibration and eval from the digits images, as
  :mod:`benchmarks.engine` builds them; ``accuracy_drop <= 0.01`` verified on the held-out
  split; objectives latency and size. Its chosen model is downloaded and timed in
  alternation, in this process, against the fp32 model in ONNX Runtime and compiled by
  AOTInductor (:func:`benchmarks.engine.paired_latency`); its accuracy is scored on the
  whole test split. Beside it, each single-method trial of the same search (the known-good
  recipes: each method's default) with whether the chosen trial dominates it. A second
  search is cancelled while a trial runs: the seconds until the job and every one of its
  trials are closed.
- ``minilm``: the pretrained MiniLM as an hf zip, ``cosine_similarity >= 0.99``, objective
  latency at batch 32; the chosen model timed in alternation against the fp32 model
  converted to ONNX, and the best single-method trial of the search beside it.
- ``workers``: the same search (same seed) with one ``squish worker`` and with two, on
  PostgreSQL and Redis: trials per hour, and whether the recipes and the Pareto front are
  the same.
- ``robustness``: on the same stack with two workers, a worker SIGKILLed while it runs a
  trial, and a search whose space holds a method that fails on the model every time
  (``lowrank`` on the CNN as ONNX: no MatMul or Gemm wide enough to factorize), each with
  its outcome.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks import engine as eb
from benchmarks import service as sb

OUT = Path(__file__).resolve().parent / "out" / "search.json"
TERMINAL = sb.TERMINAL
PARTS = ("digits", "minilm", "workers", "robustness")
FAILING_METHOD = "lowrank"
"""A method the space offers for the digits CNN as ONNX that fails on it every time: in ONNX,
lowrank factorizes MatMul/Gemm weights, and the CNN's only one (its 32 → 10 head) is
narrower than lowrank's ``min_features``."""


# --------------------------------------------------------------------------- one search


def _wait_terminal(service: sb.Service, job_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    last = ""
    while time.monotonic() < deadline:
        service.procs.check_alive()
        job = service.job(job_id)
        if job["status"] in TERMINAL:
            return job
        if job.get("stage") != last:
            last = str(job.get("stage"))
            eb._log(f"search {job_id}: {job['status']} {last}")
        time.sleep(1.0)
    raise sb.BenchError(f"search {job_id} still {job.get('status')} after {timeout:.0f} s")


def _trials(job: dict[str, Any]) -> list[dict[str, Any]]:
    return ((job.get("metrics") or {}).get("search") or {}).get("trials") or []


def _figures(trial: dict[str, Any]) -> dict[str, Any]:
    compressed = (trial.get("metrics") or {}).get("compressed") or {}
    fidelity = (trial.get("metrics") or {}).get("fidelity") or {}
    return {
        "size_bytes": compressed.get("size_bytes"),
        "p50_b1_ms": eb.p50(compressed, 1),
        "p50_b32_ms": eb.p50(compressed, 32),
        "accuracy": compressed.get("accuracy"),
        "cosine": fidelity.get("cosine_similarity"),
    }


def _holdout_summary(figures: dict[str, Any] | None) -> dict[str, Any] | None:
    """A verified trial's held-out verdict: feasible, accuracy drop or cosine, and the paired
    speedup against the original per batch size with its spread."""
    if not figures:
        return None
    return {
        "feasible": figures.get("feasible"),
        "accuracy_drop": figures.get("accuracy_drop"),
        "cosine": (figures.get("cosine_similarity") or {}).get("value"),
        "speedup": {
            batch: [round(p["speedup"], 2), [round(x, 2) for x in p["speedup_range"]]]
            for batch, p in (figures.get("latency") or {}).items()
        },
    }


def _recipe(trial: dict[str, Any]) -> str:
    """A trial's recipe as one comparable string: its steps and its output format."""
    steps = [(s.get("method"), s.get("params")) for s in trial.get("pipeline") or []]
    return json.dumps([steps, trial.get("output_format")], sort_keys=True, default=str)


def _dominates(a: dict[str, Any], b: dict[str, Any], latency: str) -> bool | None:
    keys = (latency, "size_bytes")
    if any(a[k] is None or b[k] is None for k in keys):
        return None
    return all(a[k] <= b[k] for k in keys) and any(a[k] < b[k] for k in keys)


def _spec(
    model_id: str,
    data: dict[str, str],
    trials: int,
    seconds: int,
    *,
    constraints: dict[str, float] | None = None,
    batch_sizes: list[int] | None = None,
    **search: Any,
) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "datasets": data,
        "search": {
            "objectives": ["latency", "size"],
            "constraints": constraints or {"accuracy_drop": 0.01},
            "budget": {"max_trials": trials, "max_seconds": seconds, "parallel_trials": 2},
            "seed": 0,
            **search,
        },
        "evaluate": {"batch_sizes": batch_sizes or list(eb.BATCH_SIZES)},
        "cache": False,
    }


def _run_search(service: sb.Service, spec: dict[str, Any]) -> dict[str, Any]:
    """Submit a search, wait for its end; its trial table and figures."""
    budget = spec["search"]["budget"]
    t0 = time.perf_counter()
    job = service.create_job(spec)
    job = _wait_terminal(service, job["id"], budget["max_seconds"] + 900)
    wall_s = time.perf_counter() - t0
    search = (job.get("metrics") or {}).get("search") or {}
    table = search.get("trials") or []
    # From the job's start to its end: not the wait for a worker to pick it up.
    run_s = (
        sb.ts(job["finished_at"]) - sb.ts(job["started_at"]) if job.get("started_at") else wall_s
    )
    return {
        "job_id": job["id"],
        "status": job["status"],
        "error": job.get("error"),
        "budget": {"max_trials": budget["max_trials"], "max_seconds": budget["max_seconds"]},
        "search_wall_s": round(wall_s, 1),
        "search_run_s": round(run_s, 1),
        "trials_run": len(table),
        "trial_statuses": {
            s: sum(t["status"] == s for t in table) for s in {t["status"] for t in table}
        },
        "trials_per_hour": round(len(table) / run_s * 3600, 1),
        "best": search.get("best"),
        "met": search.get("met"),
        "unmet": search.get("unmet"),
        "pareto": search.get("pareto"),
        "holdout": table[search["best"]].get("holdout") if search.get("best") is not None else None,
        "table": [
            {
                "number": t["number"],
                "pipeline": [s.get("method") for s in t.get("pipeline") or []],
                "params": [s.get("params") for s in t.get("pipeline") or []],
                "output_format": t.get("output_format"),
                "runtime": t.get("runtime"),
                "status": t["status"],
                "feasible": t.get("feasible"),
                "seconds": t.get("seconds"),
                "reused": t.get("reused"),
                "error": (t.get("error") or {}).get("message"),
                "recipe": _recipe(t),
                "holdout": _holdout_summary(t.get("holdout")),
                **_figures(t),
            }
            for t in table
        ],
    }


def _download(service: sb.Service, result: dict[str, Any], root: Path) -> tuple[Path, str]:
    """The chosen model of a finished search, saved under ``root``: (path, format)."""
    from worker.contract import format_facts

    fmt = result["table"][result["best"]]["output_format"]
    path = root / f"chosen-{result['job_id']}{format_facts(fmt).suffix}"
    download = service.http.get(f"/v1/jobs/{result['job_id']}/artifacts/model")
    download.raise_for_status()
    path.write_bytes(download.content)
    result["chosen_file"] = {"format": fmt, "size_bytes": path.stat().st_size}
    return path, fmt


def _single_methods(result: dict[str, Any], latency: str) -> None:
    """Mark each single-method trial with whether the chosen trial dominates it."""
    if result["best"] is None:
        return
    chosen = result["table"][result["best"]]
    result["chosen"] = chosen
    for row in result["table"]:
        if len(row["pipeline"]) == 1 and row["number"] != chosen["number"]:
            row["chosen_dominates"] = _dominates(chosen, row, latency)


def _events(service: sb.Service, job_id: str) -> list[dict[str, Any]]:
    """Every event of a finished job (its event stream, read to its end)."""
    response = service.http.get(
        f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}, timeout=60
    )
    response.raise_for_status()
    return [
        json.loads(line[5:])
        for line in response.text.splitlines()
        if line.startswith("data:") and line[5:].strip().startswith("{")
    ]


# --------------------------------------------------------------------------- digits CNN


def _cnn_subject(root: Path) -> eb.Subject:
    import torch

    from tests import factories_cnn

    torch.manual_seed(0)
    (root / "data").mkdir()
    (root / "cnn").mkdir()
    images = {
        split: factories_cnn.images_npz(root / "data" / f"images_{split}.npz", split)
        for split in ("train", "test")
    }
    with eb._quiet():
        files = {
            "pt2": factories_cnn.cnn_pt2(root / "cnn" / "cnn.pt2"),
            "onnx": factories_cnn.cnn_onnx(root / "cnn" / "cnn.onnx"),
        }
    roles = {"train": images["train"], "calibration": images["train"], "eval": images["test"]}
    return eb.Subject(
        "digits CNN",
        files,
        roles,
        "digits",
        module_factory=factories_cnn.train_digits_cnn,
        example=factories_cnn.example_images(),
        head="head",
    )


def _upload(
    service: sb.Service, subject: eb.Subject, fmt: str, *, datasets: bool = True
) -> tuple[str, dict[str, str]]:
    """The subject's model (in ``fmt``) and datasets uploaded: (model id, datasets by role)."""
    model = service.upload(subject.files[fmt], "models", name=subject.name)
    service.wait_model_inspected(model["id"])
    data = {
        role: service.upload(path, "datasets", name=f"{subject.name} {role}")["id"]
        for role, path in subject.datasets.items()
        if datasets
    }
    return model["id"], data


def _cancel_mid_search(
    service: sb.Service, model_id: str, data: dict[str, str], timeout: float
) -> dict[str, Any]:
    """A second search, cancelled as soon as one of its trials runs."""
    job = service.create_job(_spec(model_id, data, 6, 3600))
    running = _wait_running(service, job["id"], 1, timeout)
    t0 = time.perf_counter()
    response = service.http.post(f"/v1/jobs/{job['id']}/cancel")
    if response.status_code not in (200, 202):
        raise sb.BenchError(f"cancel answered {response.status_code}: {response.text[:300]}")
    job_closed_s = None
    while time.perf_counter() - t0 < 120:
        current = service.job(job["id"])
        if current["status"] in TERMINAL and job_closed_s is None:
            job_closed_s = time.perf_counter() - t0
        trials = _trials(current)
        open_ = [t for t in trials if t["status"] in ("queued", "running")]
        if current["status"] in TERMINAL and not open_:
            return {
                "status": current["status"],
                "trials_running_at_cancel": running,
                "trials": {t["number"]: t["status"] for t in trials},
                "job_closed_s": round(job_closed_s or 0.0, 2),
                "all_trials_closed_s": round(time.perf_counter() - t0, 2),
            }
        time.sleep(0.1)
    raise sb.BenchError(f"search {job['id']} still open 120 s after its cancel")


def _wait_running(service: sb.Service, job_id: str, count: int, timeout: float) -> list[int]:
    """Wait until ``count`` trials of the search run at once; their numbers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        service.procs.check_alive()
        current = service.job(job_id)
        if current["status"] in TERMINAL:
            raise sb.BenchError(f"search ended ({current['status']}) before {count} trials ran")
        running = [t["number"] for t in _trials(current) if t["status"] == "running"]
        if len(running) >= count:
            return running
        time.sleep(0.2)
    raise sb.BenchError(f"{count} trials of search {job_id} did not run within {timeout:.0f} s")


def bench_digits(trials: int = 30, max_seconds: int = 1200, cancel: bool = True) -> dict[str, Any]:
    t_start = time.perf_counter()
    with sb.workdir("search") as root:
        cnn = _cnn_subject(root)
        with sb.embedded_serve(root) as service:
            model_id, data = _upload(service, cnn, "pt2")
            result = _run_search(service, _spec(model_id, data, trials, max_seconds))
            _single_methods(result, "p50_b1_ms")
            if result["best"] is not None:
                chosen = _download(service, result, root)
                result["paired"] = _paired_cnn(cnn, root, chosen)
            if cancel:
                result["cancel"] = _cancel_mid_search(service, model_id, data, 900)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def _paired(
    scorer: eb.Scorer, chosen: tuple[Path, str], baselines: dict[str, tuple[Path, str]]
) -> dict[str, Any]:
    """The chosen model against each baseline, timed in alternation in this process."""
    quality = "accuracy" if scorer.labels is not None else "cosine"
    out: dict[str, Any] = {"quality": quality, "chosen": scorer.score(*chosen)[quality]}
    for name, other in baselines.items():
        eb._log(f"search: chosen vs {name} ...")
        pair = eb.paired_latency(other, chosen, scorer.feeds)
        out[name] = {
            "size_bytes": other[0].stat().st_size,
            quality: scorer.score(*other)[quality],
            "paired": {str(b): {k: round(v, 4) for k, v in p.items()} for b, p in pair.items()},
        }
    return out


def _paired_cnn(cnn: eb.Subject, root: Path, chosen: tuple[Path, str]) -> dict[str, Any]:
    """The chosen CNN against fp32 ONNX Runtime and fp32 aoti."""
    scorer = eb.Scorer.for_subject(cnn)
    with eb._quiet():
        fp32_aoti = eb.direct_aoti(cnn.files["pt2"], root / "fp32.aoti.pt2", cnn.files["pt2"])
    baselines = {"fp32 onnx (ORT)": (cnn.files["onnx"], "onnx"), "fp32 aoti": (fp32_aoti, "aoti")}
    return _paired(scorer, chosen, baselines)


# --------------------------------------------------------------------------- MiniLM


def bench_minilm(trials: int = 12, max_seconds: int = 1500) -> dict[str, Any]:
    t_start = time.perf_counter()
    with sb.workdir("search-minilm") as root:
        lm = eb.minilm_subject(root)
        with sb.embedded_serve(root) as service:
            model_id, data = _upload(service, lm, "hf")
            spec = _spec(
                model_id,
                data,
                trials,
                max_seconds,
                constraints={"cosine_similarity": 0.99},
                batch_sizes=[32, 1],  # the first batch size is the latency objective's
            )
            result = _run_search(service, spec)
            _single_methods(result, "p50_b32_ms")
            singles = [
                row
                for row in result["table"]
                if len(row["pipeline"]) == 1 and row["feasible"] and row["p50_b32_ms"] is not None
            ]
            result["best_single"] = min(singles, key=lambda r: r["p50_b32_ms"], default=None)
            if result["best"] is not None:
                chosen = _download(service, result, root)
                scorer = eb.Scorer.for_subject(lm)
                fp32 = eb.minilm_converted(lm, "onnx", root, scorer)["artifact"]
                baseline = {"fp32 onnx (ORT)": (Path(fp32), "onnx")}
                result["paired"] = _paired(scorer, chosen, baseline)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


# --------------------------------------------------------------------------- workers


def _stack_workers(stack: sb.ProductionStack, count: int) -> list[str]:
    names = [f"worker-{i + 1}" for i in range(count)]
    for name in names:
        stack.start_worker(name)
    return names


@contextlib.contextmanager
def _cnn_stack(prefix: str) -> Iterator[tuple[sb.ProductionStack, sb.Service, eb.Subject]]:
    """PostgreSQL, Redis and ``squish api`` (no worker yet), and the digits CNN to upload."""
    why = sb.ProductionStack.unavailable()
    if why is not None:
        raise sb.BenchError(f"not run: {why}")
    with sb.workdir(prefix) as root, sb.ProductionStack(root) as stack:
        yield stack, stack.start_api(1), _cnn_subject(root)


def bench_workers(trials: int = 10, max_seconds: int = 900) -> dict[str, Any]:
    """The same search (same seed) with one worker, then with two."""
    t_start = time.perf_counter()
    result: dict[str, Any] = {}
    with _cnn_stack("search-workers") as (stack, service, cnn):
        for count in (1, 2):
            names = _stack_workers(stack, count)
            try:
                if count == 1:
                    model_id, data = _upload(service, cnn, "pt2")
                run = _run_search(service, _spec(model_id, data, trials, max_seconds))
            finally:
                for name in names:
                    stack.stop_worker(name)
            result[f"{count} worker{'s' * (count > 1)}"] = run
    one, two = result["1 worker"], result["2 workers"]
    recipes = [[row["recipe"] for row in r["table"]] for r in (one, two)]
    fronts = [sorted(r["table"][n]["recipe"] for n in r["pareto"] or []) for r in (one, two)]
    result["same_recipes"] = recipes[0] == recipes[1]
    result["same_pareto"] = fronts[0] == fronts[1]
    result["first_different_trial"] = next(
        (i for i, (a, b) in enumerate(zip(*recipes, strict=False)) if a != b), None
    )
    result["throughput_ratio"] = round(two["trials_per_hour"] / one["trials_per_hour"], 2)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


# --------------------------------------------------------------------------- robustness


def bench_robustness(trials: int = 6, max_seconds: int = 900) -> dict[str, Any]:
    """A worker SIGKILLed mid-trial; a search with a method that always fails."""
    t_start = time.perf_counter()
    result: dict[str, Any] = {}
    with _cnn_stack("search-robust") as (stack, service, cnn):
        names = _stack_workers(stack, 2)
        model_id, data = _upload(service, cnn, "pt2")
        spec = _spec(model_id, data, trials, max_seconds)
        result["sigkill"] = _sigkill_mid_trial(stack, service, spec)
        stack.start_worker(names[0])  # back to two workers
        onnx_id, _ = _upload(service, cnn, "onnx", datasets=False)
        failing = _spec(
            onnx_id,
            data,
            trials,
            max_seconds,
            methods=[FAILING_METHOD, "quantize.dynamic", "quantize.half"],
        )
        run = _run_search(service, failing)
        run["failed_trials"] = [
            {"number": row["number"], "pipeline": row["pipeline"], "error": row["error"]}
            for row in run["table"]
            if row["status"] == "failed"
        ]
        result["failing_method"] = run
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def _sigkill_mid_trial(
    stack: sb.ProductionStack, service: sb.Service, spec: dict[str, Any]
) -> dict[str, Any]:
    """Two workers each run a trial; one is SIGKILLed; the search must go on with the other."""
    job = service.create_job(spec)
    running = _wait_running(service, job["id"], 2, 600)
    stack.procs.kill("worker-1")
    t_kill = time.perf_counter()
    eb._log(f"search {job['id']}: SIGKILLed worker-1 while trials {running} ran")
    job = _wait_terminal(service, job["id"], spec["search"]["budget"]["max_seconds"] + 900)
    lost = [
        e for e in _events(service, job["id"]) if "stopped responding" in str(e.get("message", ""))
    ]
    trials = _trials(job)
    return {
        "status": job["status"],
        "error": job.get("error"),
        "running_at_kill": running,
        "seconds_after_kill": round(time.perf_counter() - t_kill, 1),
        "trials": {t["number"]: t["status"] for t in trials},
        "errors": {
            t["number"]: (t.get("error") or {}).get("code") for t in trials if t.get("error")
        },
        "worker_lost_events": [e.get("message") for e in lost],
        "best": (job.get("metrics") or {}).get("search", {}).get("best"),
    }


# --------------------------------------------------------------------------- all parts


def bench_search(
    parts: tuple[str, ...] = PARTS,
    quick: bool = False,
    *,
    trials: int | None = None,
    max_seconds: int | None = None,
    cancel: bool = True,
) -> dict[str, Any]:
    """Every part asked for; a part that fails is reported with its error, the rest still run.
    ``trials`` and ``max_seconds`` set the digits search's budget."""
    digits = (trials or (8 if quick else 30), max_seconds or (600 if quick else 1200))
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "digits": lambda: bench_digits(*digits, cancel=cancel),
        "minilm": lambda: bench_minilm(4 if quick else 12, 900 if quick else 1500),
        "workers": lambda: bench_workers(4 if quick else 10),
        "robustness": lambda: bench_robustness(4 if quick else 6),
    }
    out: dict[str, Any] = {}
    for part in parts:
        eb._log(f"search benchmark: {part} ...")
        try:
            out[part] = runs[part]()
        except Exception as exc:  # reported as the part's failure
            out[part] = {"failed": f"{type(exc).__name__}: {exc}"[:1000]}
    return out


def rows(res: dict[str, Any]) -> list[dict[str, str]]:
    """The benchmark table's rows."""
    out: list[dict[str, str]] = []
    builders = {"digits": _digits_rows, "minilm": _minilm_rows, "workers": _workers_rows,
                "robustness": _robustness_rows}  # fmt: skip
    for part, part_res in res.items():
        if "failed" in part_res:
            out.append(_row(f"search {part}", "failed", "—", part_res["failed"]))
        else:
            out += builders[part](part_res)
    return out


def _run_note(run: dict[str, Any]) -> str:
    budget = f"{run['budget']['max_trials']} trials / {run['budget']['max_seconds']} s"
    return (
        f"{run['trials_run']} trials ({run['trial_statuses']}) in {run['search_run_s']} s "
        f"from the job's start ({run['trials_per_hour']}/h; {run['search_wall_s']} s from its "
        f"submission), budget {budget}; job {run['status']}"
    )


def _chosen_row(name: str, run: dict[str, Any]) -> dict[str, str]:
    chosen = run.get("chosen")
    if chosen is None:
        return _row(f"search {name}: chosen trial", "none", _run_note(run), run.get("error"))
    return _row(
        f"search {name}: chosen trial",
        f"#{chosen['number']} {' → '.join(chosen['pipeline'])} ({chosen['runtime']})",
        _run_note(run),
        f"held-out: {json.dumps(run.get('holdout'), default=str)[:400]}",
    )


def _paired_rows(name: str, run: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    paired = run.get("paired") or {}
    size = run["chosen_file"]["size_bytes"] if "chosen_file" in run else None
    quality = paired.get("quality")
    for base_name, base in paired.items():
        if not isinstance(base, dict):
            continue
        p = base["paired"]
        out.append(
            _row(
                f"search {name}: chosen vs {base_name}",
                f"size {base['size_bytes'] / size:.2f}x smaller; speedup "
                f"b1 {1 / p['1']['ratio']:.2f}x, b32 {1 / p['32']['ratio']:.2f}x",
                f"p50 b1 {p['1']['p50_a']:.3f} → {p['1']['p50_b']:.3f} ms, b32 "
                f"{p['32']['p50_a']:.3f} → {p['32']['p50_b']:.3f} ms",
                f"{quality} {base[quality]:.4f} → {paired['chosen']:.4f} (whole eval set); "
                f"{eb.PAIRED_ROUNDS} alternating rounds",
            )
        )
    return out


def _single_rows(name: str, run: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for row in run["table"]:
        if "chosen_dominates" not in row:
            continue
        quality = row["accuracy"] if row["accuracy"] is not None else row["cosine"]
        out.append(
            _row(
                f"search {name}: single method #{row['number']} {row['pipeline'][0]} "
                f"({row['runtime']})",
                f"{row['status']}; size {row['size_bytes']} B, b1 {_ms(row['p50_b1_ms'])}, "
                f"b32 {_ms(row['p50_b32_ms'])}",
                f"feasible {row['feasible']}; quality {quality}",
                f"chosen dominates it: {row['chosen_dominates']}",
            )
        )
    return out


def _pareto_rows(name: str, run: dict[str, Any]) -> list[dict[str, str]]:
    """Each Pareto trial with its held-out verdict."""
    out = []
    for number in run.get("pareto") or []:
        row = run["table"][number]
        held = row.get("holdout")
        out.append(
            _row(
                f"search {name}: Pareto trial #{number} {' → '.join(row['pipeline'])} "
                f"({row['runtime']})",
                f"size {row['size_bytes']} B, b1 {_ms(row['p50_b1_ms'])}, "
                f"b32 {_ms(row['p50_b32_ms'])}",
                "held out: not verified" if held is None else f"held out: {json.dumps(held)}",
                f"params {row['params']}",
            )
        )
    return out


def _digits_rows(res: dict[str, Any]) -> list[dict[str, str]]:
    out = [_chosen_row("digits CNN", res), *_paired_rows("digits CNN", res)]
    out += _single_rows("digits CNN", res)
    out += _pareto_rows("digits CNN", res)
    if "cancel" in res:
        c = res["cancel"]
        out.append(
            _row(
                "search cancelled while a trial runs",
                f"job {c['status']} in {c['job_closed_s']} s, every trial closed in "
                f"{c['all_trials_closed_s']} s",
                f"running at cancel: {c['trials_running_at_cancel']}",
                f"trials: {c['trials']}",
            )
        )
    return out


def _minilm_rows(res: dict[str, Any]) -> list[dict[str, str]]:
    out = [_chosen_row("MiniLM", res), *_paired_rows("MiniLM", res)]
    best = res.get("best_single")
    if best is not None:
        out.append(
            _row(
                f"search MiniLM: best single recipe #{best['number']} {best['pipeline'][0]}",
                f"b32 {_ms(best['p50_b32_ms'])}, size {best['size_bytes']} B, "
                f"cosine {best['cosine']}",
                "chosen: b32 " + _ms((res.get("chosen") or {}).get("p50_b32_ms")),
                "the search's own timings (search split, one worker)",
            )
        )
    return out + _single_rows("MiniLM", res)


def _workers_rows(res: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for name in ("1 worker", "2 workers"):
        run = res[name]
        out.append(
            _row(
                f"search digits CNN, {name} (PostgreSQL + Redis)",
                f"{run['trials_per_hour']} trials/h",
                _run_note(run),
                f"pareto {run['pareto']}, best {run['best']}",
            )
        )
    out.append(
        _row(
            "search: two workers against one, same seed",
            f"{res['throughput_ratio']}x trials/h",
            f"same recipes: {res['same_recipes']}, same Pareto front: {res['same_pareto']}",
            f"first trial whose recipe differs: {res['first_different_trial']}",
        )
    )
    return out


def _robustness_rows(res: dict[str, Any]) -> list[dict[str, str]]:
    k = res["sigkill"]
    f = res["failing_method"]
    return [
        _row(
            "search: a worker SIGKILLed mid-trial",
            f"job {k['status']} {k['seconds_after_kill']} s after the kill; best {k['best']}",
            f"running at kill: {k['running_at_kill']}; trials {k['trials']}",
            f"errors {k['errors']}; {k['worker_lost_events']}",
        ),
        _row(
            f"search: {FAILING_METHOD} always fails on this model",
            f"job {f['status']}; {len(f['failed_trials'])} trials failed, best {f['best']}",
            _run_note(f),
            "; ".join(
                f"#{t['number']} {'→'.join(t['pipeline'])}: {t['error']}"
                for t in f["failed_trials"]
            )[:600],
        ),
    ]


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f} ms"


def _row(benchmark: str, measured: str, target: str, notes: Any) -> dict[str, str]:
    return {"benchmark": benchmark, "measured": measured, "target": target, "met": "—",
            "notes": str(notes)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="squish search benchmark")
    parser.add_argument("--part", action="append", choices=PARTS, help="repeatable; default all")
    parser.add_argument("--trials", type=int, default=None, help="digits: trials (default 30)")
    parser.add_argument("--max-seconds", type=int, default=None, help="digits: budget (1200)")
    parser.add_argument("--no-cancel", action="store_true", help="digits: skip the cancel check")
    parser.add_argument("--quick", action="store_true", help="smaller budgets")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    res = bench_search(
        tuple(args.part or PARTS),
        args.quick,
        trials=args.trials,
        max_seconds=args.max_seconds,
        cancel=not args.no_cancel,
    )
    from benchmarks.run import report

    report(rows(res), res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
