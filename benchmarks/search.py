"""Benchmark of the recipe search (DESIGN §10) through ``squish serve``, on the digits CNN.

    python -m benchmarks.run --only search                       # 30 trials, 1 hour at most
    python -m benchmarks.search --trials 8 --max-seconds 600     # a shorter budget

One search (pt2 upload; train, calibration and eval from the digits images, as
:mod:`benchmarks.engine` builds them; ``accuracy_drop <= 0.01`` verified on the held-out
split; objectives latency and size) runs in a real ``squish serve`` (API and one embedded
Celery worker). Its chosen model is downloaded and timed in alternation, in this process,
against the fp32 model in ONNX Runtime and compiled by AOTInductor
(:func:`benchmarks.engine.paired_latency`); its accuracy is scored on the whole test split.
Beside it, each single-method trial of the same search (the known-good recipes: each
method's default) with whether the chosen trial dominates it on the search split.
A second search is cancelled while a trial runs: the seconds until the job and every one
of its trials are closed are measured. Every number printed is measured in the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import engine as eb
from benchmarks import service as sb

OUT = Path(__file__).resolve().parent / "out" / "search.json"
TERMINAL = sb.TERMINAL


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


def _figures(trial: dict[str, Any]) -> dict[str, Any]:
    compressed = (trial.get("metrics") or {}).get("compressed") or {}
    return {
        "size_bytes": compressed.get("size_bytes"),
        "p50_b1_ms": eb.p50(compressed, 1),
        "p50_b32_ms": eb.p50(compressed, 32),
        "accuracy": compressed.get("accuracy"),
    }


def _dominates(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    keys = ("p50_b1_ms", "size_bytes")
    if any(a[k] is None or b[k] is None for k in keys):
        return None
    return all(a[k] <= b[k] for k in keys) and any(a[k] < b[k] for k in keys)


def _spec(model_id: str, data: dict[str, str], trials: int, seconds: int) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "datasets": data,
        "search": {
            "objectives": ["latency", "size"],
            "constraints": {"accuracy_drop": 0.01},
            "budget": {"max_trials": trials, "max_seconds": seconds, "parallel_trials": 2},
            "seed": 0,
        },
        "evaluate": {"batch_sizes": list(eb.BATCH_SIZES)},
    }


def _cancel_mid_search(
    service: sb.Service, model_id: str, data: dict[str, str], timeout: float
) -> dict[str, Any]:
    """A second search, cancelled as soon as one of its trials runs."""
    job = service.create_job(_spec(model_id, data, 6, 3600) | {"cache": False})
    deadline = time.monotonic() + timeout
    running: list[int] = []
    while time.monotonic() < deadline and not running:
        current = service.job(job["id"])
        if current["status"] in TERMINAL:
            raise sb.BenchError(f"search ended ({current['status']}) before a trial ran")
        trials = ((current.get("metrics") or {}).get("search") or {}).get("trials") or []
        running = [t["number"] for t in trials if t["status"] == "running"]
        time.sleep(0.2)
    if not running:
        raise sb.BenchError(f"no trial of search {job['id']} ran within {timeout:.0f} s")
    t0 = time.perf_counter()
    response = service.http.post(f"/v1/jobs/{job['id']}/cancel")
    if response.status_code not in (200, 202):
        raise sb.BenchError(f"cancel answered {response.status_code}: {response.text[:300]}")
    job_closed_s = None
    while time.perf_counter() - t0 < 120:
        current = service.job(job["id"])
        if current["status"] in TERMINAL and job_closed_s is None:
            job_closed_s = time.perf_counter() - t0
        trials = ((current.get("metrics") or {}).get("search") or {}).get("trials") or []
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


def bench_search(trials: int = 30, max_seconds: int = 3600, cancel: bool = True) -> dict[str, Any]:
    t_start = time.perf_counter()
    with sb.workdir("search") as root:
        cnn = _cnn_subject(root)
        with sb.embedded_serve(root) as service:
            model = service.upload(cnn.files["pt2"], "models", name="digits-cnn")
            service.wait_model_inspected(model["id"])
            data = {
                role: service.upload(path, "datasets", name=f"digits-{role}")["id"]
                for role, path in cnn.datasets.items()
            }
            t0 = time.perf_counter()
            job = service.create_job(_spec(model["id"], data, trials, max_seconds))
            job = _wait_terminal(service, job["id"], max_seconds + 900)
            search_wall_s = time.perf_counter() - t0
            search = (job.get("metrics") or {}).get("search") or {}
            table = search.get("trials") or []
            best = search.get("best")
            result: dict[str, Any] = {
                "job_id": job["id"],
                "status": job["status"],
                "error": job.get("error"),
                "budget": {"max_trials": trials, "max_seconds": max_seconds},
                "search_wall_s": round(search_wall_s, 1),
                "trials_run": len(table),
                "trial_statuses": {
                    s: sum(t["status"] == s for t in table) for s in {t["status"] for t in table}
                },
                "trials_per_hour": round(len(table) / search_wall_s * 3600, 1),
                "best": best,
                "pareto": search.get("pareto"),
                "holdout": search.get("holdout"),
                "table": [
                    {
                        "number": t["number"],
                        "pipeline": [s.get("method") for s in t.get("pipeline") or []],
                        "params": [s.get("params") for s in t.get("pipeline") or []],
                        "runtime": t.get("runtime"),
                        "status": t["status"],
                        "feasible": t.get("feasible"),
                        "seconds": t.get("seconds"),
                        **_figures(t),
                    }
                    for t in table
                ],
            }
            if best is not None:
                chosen = result["table"][best]
                result["chosen"] = chosen
                for row in result["table"]:
                    if len(row["pipeline"]) == 1 and row["number"] != best:
                        row["chosen_dominates"] = _dominates(chosen, row)
                fmt = table[best]["output_format"]
                artifact = root / f"chosen{'.pt2' if fmt == 'aoti' else eb._suffix(fmt)}"
                download = service.http.get(f"/v1/jobs/{job['id']}/artifacts/model")
                download.raise_for_status()
                artifact.write_bytes(download.content)
                result["chosen_file"] = {"format": fmt, "size_bytes": artifact.stat().st_size}
                result["paired"] = _paired(cnn, root, (artifact, fmt))
            if cancel:
                result["cancel"] = _cancel_mid_search(service, model["id"], data, 900)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


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


def _paired(cnn: eb.Subject, root: Path, chosen: tuple[Path, str]) -> dict[str, Any]:
    """The chosen model against fp32 ONNX Runtime and fp32 aoti, timed in alternation."""
    scorer = eb.Scorer.for_subject(cnn)
    with eb._quiet():
        fp32_aoti = eb.direct_aoti(cnn.files["pt2"], root / "fp32.aoti.pt2", cnn.files["pt2"])
    baselines = {"fp32 onnx (ORT)": (cnn.files["onnx"], "onnx"), "fp32 aoti": (fp32_aoti, "aoti")}
    out: dict[str, Any] = {"chosen_accuracy": scorer.score(*chosen)["accuracy"]}
    for name, other in baselines.items():
        eb._log(f"search: chosen vs {name} ...")
        pair = eb.paired_latency(other, chosen, scorer.feeds)
        out[name] = {
            "size_bytes": other[0].stat().st_size,
            "accuracy": scorer.score(*other)["accuracy"],
            "paired": {str(b): {k: round(v, 4) for k, v in p.items()} for b, p in pair.items()},
        }
    return out


def rows(res: dict[str, Any]) -> list[dict[str, str]]:
    """The benchmark table's rows."""
    out: list[dict[str, str]] = []
    budget = f"{res['budget']['max_trials']} trials / {res['budget']['max_seconds']} s"
    note = (
        f"{res['trials_run']} trials ({res['trial_statuses']}) in {res['search_wall_s']} s "
        f"({res['trials_per_hour']}/h), budget {budget}; job {res['status']}"
    )
    chosen = res.get("chosen")
    if chosen is None:
        out.append(_row("search digits CNN: chosen trial", "none", note, res.get("error")))
        return out
    out.append(
        _row(
            "search digits CNN: chosen trial",
            f"#{chosen['number']} {' → '.join(chosen['pipeline'])} ({chosen['runtime']})",
            note,
            f"held-out: {json.dumps(res.get('holdout'), default=str)[:400]}",
        )
    )
    paired = res["paired"]
    size = res["chosen_file"]["size_bytes"]
    for name in ("fp32 onnx (ORT)", "fp32 aoti"):
        base = paired[name]
        p = base["paired"]
        out.append(
            _row(
                f"search digits CNN: chosen vs {name}",
                f"size {base['size_bytes'] / size:.2f}x smaller; speedup "
                f"b1 {1 / p['1']['ratio']:.2f}x, b32 {1 / p['32']['ratio']:.2f}x",
                f"p50 b1 {p['1']['p50_a']:.3f} → {p['1']['p50_b']:.3f} ms, b32 "
                f"{p['32']['p50_a']:.3f} → {p['32']['p50_b']:.3f} ms",
                f"accuracy {base['accuracy']:.4f} → {paired['chosen_accuracy']:.4f} "
                f"(whole test split); {eb.PAIRED_ROUNDS} alternating rounds",
            )
        )
    for row in res["table"]:
        if "chosen_dominates" not in row:
            continue
        out.append(
            _row(
                f"search digits CNN: single method #{row['number']} {row['pipeline'][0]}",
                f"{row['status']}; size {row['size_bytes']} B, b1 {_ms(row['p50_b1_ms'])}, "
                f"b32 {_ms(row['p50_b32_ms'])}",
                f"feasible {row['feasible']}; accuracy {row['accuracy']}",
                f"chosen dominates it: {row['chosen_dominates']}",
            )
        )
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


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f} ms"


def _row(benchmark: str, measured: str, target: str, notes: Any) -> dict[str, str]:
    return {"benchmark": benchmark, "measured": measured, "target": target, "met": "—",
            "notes": str(notes)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="squish search benchmark")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--max-seconds", type=int, default=3600)
    parser.add_argument("--no-cancel", action="store_true", help="skip the cancel check")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    res = bench_search(args.trials, args.max_seconds, cancel=not args.no_cancel)
    from benchmarks.run import report

    report(rows(res), res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
