"""Run the service benchmarks, print one markdown table, write ``benchmarks/out/service.json``.

    python -m benchmarks.run                 # everything (make bench): up to ~1.5 hours
    python -m benchmarks.run --only pickup   # upload | pickup | get | e2e | cache | engine | methods | ui | search
    python -m benchmarks.run --quick         # smoke run with small sizes

Every figure is measured in this run. A benchmark that cannot run (PostgreSQL or Redis
missing, a process that fails) is reported with ``met = no`` and the reason, and the
command exits 1; targets that are missed do not change the exit status.

``engine`` (:mod:`benchmarks.engine`, ~8 minutes) runs the compression engine in-process
on three models, side by side with the libraries called directly; it prints its own
table and writes ``benchmarks/out/engine.json``; ``methods`` (:mod:`benchmarks.methods`,
~3 minutes) compares ``quantize.log`` with linear int4 and measures what ``clip`` buys,
and writes ``benchmarks/out/methods.json``. ``ui`` (:mod:`benchmarks.ui`, ~3 minutes) times the
dashboard's jobs list over 1,000 jobs in headless Chromium (rows in this table; its figures
also in ``benchmarks/out/ui.json``). ``search`` (:mod:`benchmarks.search`, ~25 minutes)
runs recipe searches: 30 trials on the digits CNN within 20 minutes, MiniLM, one worker
against two, and the robustness runs. The service parts alone (upload, pickup, get, e2e,
cache) take about 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ["TORCHAO_FORCE_SKIP_LOADING_SO_FILES"] = "1"

from benchmarks import service as sb

OUT = Path(__file__).resolve().parent / "out" / "service.json"
BENCHMARKS = ("upload", "pickup", "get", "e2e", "cache", "engine", "methods", "ui", "search")
ENGINE_OUT = OUT.parent / "engine.json"

# Issue targets.
UPLOAD_MB_S = 200.0
UPLOAD_RSS_MIB = 64.0
PICKUP_P95_S = 0.5
GET_REQ_S = 1000.0
GET_P99_MS = 50.0
E2E_RATIO = 1.15
CACHE_HIT_S = 0.5


def _host() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


class Runner:
    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.rows: list[dict[str, str]] = []

    def attempt(self, name: str, fn: Callable[[], Any]) -> Any:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # report it in the table, go on with the others
            traceback.print_exc()
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            print(
                f"[bench] {name} FAILED after {time.perf_counter() - t0:.1f}s",
                file=sys.stderr,
                flush=True,
            )
            return None
        print(
            f"[bench] {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True
        )
        self.results[name] = result
        return result

    def row(self, benchmark: str, measured: str, target: str, met: bool, notes: str) -> None:
        self.rows.append(
            {
                "benchmark": benchmark,
                "measured": measured,
                "target": target,
                "met": "yes" if met else "no",
                "notes": notes,
            }
        )

    def failed_row(self, benchmark: str, target: str, name: str) -> None:
        error = self.errors.get(name, "?")
        last = [line.strip() for line in error.splitlines() if line.strip()]
        brief = error.splitlines()[0][:200] + (f" ... {last[-1][:200]}" if len(last) > 1 else "")
        self.row(benchmark, "not measured", target, False, f"{name} failed: {brief}")


def _upload_rows(r: Runner, size_label: str) -> None:
    svc, raw = r.results.get("upload_service"), r.results.get("upload_raw")
    raw_tp = (
        f"raw parser (benchmarks/upload.py): {raw['mb_per_s']} MB/s"
        if raw
        else "raw parser: failed"
    )
    raw_rss = f"raw parser: {raw['server_rss_growth_mib']} MiB" if raw else "raw parser: failed"
    if svc is None:
        r.failed_row(
            f"upload {size_label} POST /v1/datasets: throughput",
            f">= {UPLOAD_MB_S:.0f} MB/s",
            "upload_service",
        )
        r.failed_row(
            f"upload {size_label} POST /v1/datasets: API RSS growth",
            f"<= {UPLOAD_RSS_MIB:.0f} MiB",
            "upload_service",
        )
        return
    r.row(
        f"upload {size_label} POST /v1/datasets: throughput",
        f"{svc['mb_per_s']} MB/s",
        f">= {UPLOAD_MB_S:.0f} MB/s",
        svc["mb_per_s"] >= UPLOAD_MB_S and svc["sha256_ok"],
        f"{svc['size_bytes']} B in {svc['seconds']} s; sha256 ok: {svc['sha256_ok']}; "
        f"API CPU {svc['server_cpu_s']} s, client CPU {svc['client_cpu_s']} s; {raw_tp}",
    )
    r.row(
        f"upload {size_label} POST /v1/datasets: API RSS growth",
        f"{svc['server_rss_growth_mib']} MiB",
        f"<= {UPLOAD_RSS_MIB:.0f} MiB",
        svc["server_rss_growth_mib"] <= UPLOAD_RSS_MIB,
        f"peak - baseline, {svc['rss_samples']} samples every 20 ms; {raw_rss}; {sb.cpu_note(svc['host_cpu'])}",
    )


def _cache_row(r: Runner) -> None:
    res = r.results.get("cache")
    name = "cache hit: POST /v1/jobs -> succeeded (embedded)"
    target = f"p95 < {CACHE_HIT_S} s"
    if res is None:
        r.failed_row(name, target, "cache")
        return
    r.row(
        name,
        f"p50 {res['cached_p50_s'] * 1000:.1f} ms, p95 {res['cached_p95_s'] * 1000:.1f} ms",
        target,
        res["cached_p95_s"] < CACHE_HIT_S and res["nothing_ran"],
        f"{res['rounds']} rounds alternating with the same spec run afresh (cache: false): "
        f"p50 {res['fresh_p50_s']:.2f} s, {res['ratio_fresh_over_cached_p50']}x; the POST "
        f"alone p50 {res['cached_post_p50_s'] * 1000:.1f} ms; nothing ran (no attempt, one "
        f"'served from cache' event): {res['nothing_ran']}",
    )


def _pickup_row(r: Runner, name: str, label: str) -> None:
    res = r.results.get(name)
    target = f"p95 <= {PICKUP_P95_S} s"
    if res is None:
        r.failed_row(f"job pickup, {label}", target, name)
        return
    r.row(
        f"job pickup, {label}",
        f"p95 {res['p95_s']:.3f} s",
        target,
        res["p95_s"] <= PICKUP_P95_S,
        f"p50 {res['p50_s']:.3f} s, max {res['max_s']:.3f} s over {res['jobs']} jobs "
        f"(started_at - created_at); {sb.cpu_note(res['host_cpu'])}",
    )


def _get_rows(r: Runner, workers: int) -> None:
    name = f"get_workers_{workers}"
    res = r.results.get(name)
    label = f"GET /v1/jobs/{{id}}, PostgreSQL, api --workers {workers}"
    if res is None:
        r.failed_row(f"{label}: throughput", f">= {GET_REQ_S:.0f} req/s", name)
        r.failed_row(f"{label}: p99", f"<= {GET_P99_MS:.0f} ms", name)
        return
    clean = res["non_2xx"] == 0 and res["socket_errors"] == 0
    common = (
        f"{res['generator']}, {res['connections']} keep-alive connections, {res['duration_s']} s, "
        f"{res['requests']} requests, non-2xx {res['non_2xx']}, socket errors {res['socket_errors']}"
    )
    r.row(
        f"{label}: throughput",
        f"{res['req_per_s']:.0f} req/s",
        f">= {GET_REQ_S:.0f} req/s",
        res["req_per_s"] >= GET_REQ_S and clean,
        f"{common}; API CPU {res['api_cpu_s']} s = {res.get('api_cpu_ms_per_request')} ms/request; "
        f"{sb.cpu_note(res['host_cpu'])}",
    )
    r.row(
        f"{label}: p99",
        f"{res['p99_ms']:.1f} ms",
        f"<= {GET_P99_MS:.0f} ms",
        res["p99_ms"] <= GET_P99_MS and clean,
        f"p50 {res['p50_ms']:.1f} ms; {res['response_bytes']} B responses",
    )


def _e2e_rows(r: Runner) -> None:
    res = r.results.get("e2e")
    target = f"<= {E2E_RATIO}"
    if res is None:
        r.failed_row("end-to-end overhead (server timestamps)", target, "e2e")
        r.failed_row("end-to-end overhead (client wall, 0.2 s polling)", target, "e2e")
        return
    runs = res["in_process_runs"]
    short = [run["run"] for run in runs if run["seconds"] < 10.0]
    why = f" ({', '.join(short)} shorter than 10 s)" if short else ""
    local = ", ".join(f"{run['run']} {run['seconds']} s" for run in runs)
    r.row(
        "end-to-end overhead (server timestamps)",
        f"{res['ratio_server']:.3f}",
        target,
        res["ratio_server"] <= E2E_RATIO and not short,
        f"finished_at - created_at {res['service_s']} s (queue {res['service_queue_s']} s, "
        f"pipeline in worker {res['service_pipeline_s']} s) / mean in-process {res['in_process_s']} s "
        f"({local}, before and after the job){why}; quantize.dynamic, batch {res['batch_sizes']}, "
        f"{res['iterations']} iterations; {res['model']}",
    )
    cpu = "; ".join(f"{run['run']}: {sb.cpu_note(run['host_cpu'])}" for run in runs)
    r.row(
        "end-to-end overhead (client wall, 0.2 s polling)",
        f"{res['ratio_client']:.3f}",
        target,
        res["ratio_client"] <= E2E_RATIO and not short,
        f"POST to seeing succeeded {res['client_s']} s / mean in-process {res['in_process_s']} s; "
        f"job: {sb.cpu_note(res['host_cpu_service_run'])}; {cpu}",
    )


def report(rows: list[dict[str, str]], res: dict[str, Any], out: Path) -> None:
    """A part run on its own: print its table, write its figures to ``out`` as JSON."""
    print(print_table(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")


def print_table(rows: list[dict[str, str]]) -> str:
    cols = ("benchmark", "measured", "target", "met", "notes")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append(
            "| " + " | ".join(" ".join(row[c].split()).replace("|", "\\|") for c in cols) + " |"
        )
    return "\n".join(lines)


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="squish service benchmarks")
    parser.add_argument(
        "--only", action="append", choices=BENCHMARKS, help="run only this (repeatable)"
    )
    parser.add_argument("--quick", action="store_true", help="fast smoke run with small sizes")
    parser.add_argument(
        "--upload-mib", type=int, default=None, help="upload size (default 1024, quick 64)"
    )
    parser.add_argument(
        "--pickup-jobs", type=int, default=None, help="jobs per topology (default 20, quick 5)"
    )
    parser.add_argument(
        "--connections", type=int, default=16, help="GET load: keep-alive connections"
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="GET load seconds (default 10, quick 3)"
    )
    parser.add_argument(
        "--api-workers", default="1,2", help="GET: comma-separated --workers values"
    )
    parser.add_argument("--load-generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--e2e-seconds", type=float, default=None, help="in-process target (default 15, quick 2)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    # SIGTERM (and SIGINT, even where it was ignored) unwinds the stack, so that every
    # `finally` stops the processes it started and drops its database.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)

    selected = set(args.only or BENCHMARKS)
    quick = args.quick
    upload_bytes = (args.upload_mib or (64 if quick else 1024)) << 20
    size_label = (
        f"{upload_bytes / (1 << 30):g} GiB"
        if upload_bytes >= 1 << 30
        else f"{upload_bytes >> 20} MiB"
    )
    pickup_jobs = args.pickup_jobs or (5 if quick else 20)
    duration = args.duration or (3.0 if quick else 10.0)
    api_workers = [int(w) for w in args.api_workers.split(",") if w.strip()]
    e2e_seconds = args.e2e_seconds or (2.0 if quick else 15.0)

    r = Runner()
    started = time.perf_counter()

    if "upload" in selected:
        r.attempt("upload_service", lambda: sb.bench_service_upload(upload_bytes))
        r.attempt("upload_raw", lambda: sb.bench_raw_upload(upload_bytes))
        _upload_rows(r, size_label)

    if "pickup" in selected:
        r.attempt("pickup_embedded", lambda: sb.bench_pickup_embedded(pickup_jobs))

    if "pickup" in selected or "get" in selected:
        why = sb.ProductionStack.unavailable()
        names = (["pickup_production"] if "pickup" in selected else []) + (
            [f"get_workers_{w}" for w in api_workers] if "get" in selected else []
        )
        if why:
            for name in names:
                r.errors[name] = why
        else:

            def production() -> bool:
                with sb.workdir("production") as root, sb.ProductionStack(root) as stack:
                    last_job = None
                    if "pickup" in selected:
                        res = r.attempt(
                            "pickup_production",
                            lambda: sb.bench_pickup_production(stack, pickup_jobs),
                        )
                        last_job = res["last_job_id"] if res else None
                    if "get" in selected:
                        job_id = sb.prepare_job(stack, last_job)
                        for w in api_workers:

                            def one(w: int = w) -> dict[str, Any]:
                                return sb.bench_get(
                                    stack,
                                    job_id,
                                    w,
                                    args.connections,
                                    duration,
                                    args.load_generator,
                                )

                            r.attempt(f"get_workers_{w}", one)
                return True

            if r.attempt("production_stack", production) is None:
                for name in names:
                    r.errors.setdefault(name, r.errors["production_stack"])
            r.results.pop("production_stack", None)

    if "pickup" in selected:
        _pickup_row(r, "pickup_embedded", "embedded (squish serve)")
        _pickup_row(r, "pickup_production", "production (PostgreSQL + Redis)")
    if "get" in selected:
        for w in api_workers:
            _get_rows(r, w)

    if "e2e" in selected:
        if quick:
            r.attempt(
                "e2e",
                lambda: sb.bench_e2e(
                    target_s=e2e_seconds,
                    hidden=(256, 256, 256),
                    features=256,
                    classes=256,
                    batch=64,
                ),
            )
        else:
            r.attempt("e2e", lambda: sb.bench_e2e(target_s=e2e_seconds))
        _e2e_rows(r)

    if "cache" in selected:
        r.attempt("cache", lambda: sb.bench_cache(rounds=3 if quick else 10))
        _cache_row(r)

    engine_failed = False
    if "engine" in selected:
        from benchmarks import engine as eb

        res = r.attempt("engine", eb.bench_engine)
        if res is None:
            engine_failed = True
        else:
            r.results.pop("engine", None)  # its own JSON file
            print("## compression engine\n")
            print(print_table(res["rows"]))
            print(f"\n{len(res['rows'])} engine rows; {res['seconds']:.0f} s; JSON: {ENGINE_OUT}\n")
            ENGINE_OUT.parent.mkdir(parents=True, exist_ok=True)
            ENGINE_OUT.write_text(json.dumps(res, indent=2, default=str) + "\n")
            engine_failed = bool(res["errors"])
            for name, error in res["errors"].items():
                r.errors[f"engine {name}"] = error
        if selected == {"engine"}:
            return 1 if engine_failed else 0

    if "methods" in selected:
        from benchmarks import methods as mb

        res = r.attempt("methods", mb.bench_methods)
        if res is not None:
            r.results.pop("methods", None)  # its own JSON file
            print("## quantize.log and clip (digits CNN)\n\n" + print_table(res["rows"]) + "\n")
            mb.OUT.parent.mkdir(parents=True, exist_ok=True)
            mb.OUT.write_text(json.dumps(res, indent=2, default=str) + "\n")
            r.errors.update({f"methods {name}": error for name, error in res["errors"].items()})
        if selected == {"methods"}:
            return 1 if res is None or res["errors"] else 0

    if "ui" in selected:
        from benchmarks import ui as ub

        res = r.attempt("ui", lambda: ub.bench_ui(rounds=5 if quick else 15))
        if res is None:
            r.failed_row("dashboard: first render of the jobs list, 1000 jobs", "< 1000 ms", "ui")
        else:
            r.rows += ub.rows(res)
            ub.OUT.parent.mkdir(parents=True, exist_ok=True)
            ub.OUT.write_text(json.dumps(res, indent=2, default=str) + "\n")

    if "search" in selected:
        from benchmarks import search as srb

        res = r.attempt("search", lambda: srb.bench_search(quick=quick))
        if res is None:
            r.failed_row("search digits CNN: chosen trial", "—", "search")
        else:
            r.rows += srb.rows(res)
            srb.OUT.parent.mkdir(parents=True, exist_ok=True)
            srb.OUT.write_text(json.dumps(res, indent=2, default=str) + "\n")

    total_s = time.perf_counter() - started
    table = print_table(r.rows)
    print(table)
    print(
        f"\n{len(r.rows)} rows, {sum(row['met'] == 'yes' for row in r.rows)} met; "
        f"{'quick smoke run; ' if quick else ''}{total_s:.0f} s in all; JSON: {args.out}"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "generated_at": datetime.now(UTC).isoformat(),
                "quick": quick,
                "selected": sorted(selected),
                "total_s": round(total_s, 1),
                "host": _host(),
                "targets": {
                    "upload_mb_per_s": UPLOAD_MB_S,
                    "upload_rss_growth_mib": UPLOAD_RSS_MIB,
                    "pickup_p95_s": PICKUP_P95_S,
                    "get_req_per_s": GET_REQ_S,
                    "get_p99_ms": GET_P99_MS,
                    "e2e_ratio": E2E_RATIO,
                },
                "table": r.rows,
                "results": r.results,
                "errors": r.errors,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    return 1 if r.errors else 0


if __name__ == "__main__":
    sys.exit(main())
