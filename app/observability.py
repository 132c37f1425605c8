"""Operations: Prometheus metrics and logs (text, or JSON lines with the job's id).

Metrics. Request counts and latency per route, the reaper's re-sends and dependency
outages are this API process's own. Everything about jobs is read from the database at
scrape time (:class:`JobCollector`): jobs and webhook deliveries are recorded by Celery
workers, separate processes on any number of machines with no port to scrape, and the
database is the one place that sees them all. So every API process reports the same
figures, a restart loses none, and nothing needs a shared folder (prometheus-client's
multiprocess mode would only cover one host). The queries run at most once per
:data:`SNAPSHOT_TTL_S` per process (concurrent scrapes share one), under a statement
timeout on PostgreSQL; when the database does not answer, the last figures are served and
`squish_metrics_snapshot_age_seconds` says how old they are.

Logs. :func:`configure_logging` sets the format of every line this process writes
(`SQUISH_LOG_FORMAT`: ``text`` or ``json``); while a job runs (`job_context`, set by the
worker's tasks and by the API for requests under ``/v1/jobs/{id}``), each line carries its
``job_id``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db import session_scope
from app.errors import OUTAGES
from app.orm import Job, JobStatus, WebhookDelivery
from app.queue import QUEUES
from app.settings import get_settings

log = logging.getLogger("squish.metrics")

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "squish_http_requests", "HTTP requests", ["method", "route", "status"], registry=REGISTRY
)
REAPER_RESENDS = Counter(
    "squish_reaper_resends",
    "Messages the reaper sent again because they looked lost (with a healthy broker, each "
    "is a redundant delivery)",
    ["task"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "squish_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


# --- jobs, queues, trials and webhooks: from the database, at scrape time ---------------

SNAPSHOT_TTL_S = 10.0
"""Scrapes within this of the last one are answered from its figures (no query)."""
STATEMENT_TIMEOUT_MS = 5000
DURATION_BUCKETS_S = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
SEARCH_METHOD = "search"
"""The `method` label of a search job's duration (its trials are counted separately)."""
TERMINAL = tuple(status.value for status in JobStatus if status.terminal)

TrialSource = Callable[[Session], Mapping[str, int]]
_trial_sources: list[TrialSource] = []


def count_trials_with(source: TrialSource) -> TrialSource:
    """Register how search trials are counted: ``source(session)`` returns the number of
    trials by status (e.g. ``{"succeeded": 40, "failed": 2}``) from the database, and is
    called at scrape time; `squish_search_trials_total{status}` sums every source.

    Trials run in workers, which no one scrapes: count them from the rows that record them,
    as the job figures are. Usable as a decorator; returns ``source``.
    """
    _trial_sources.append(source)
    return source


@dataclass
class _Snapshot:
    database_url: str = ""
    taken_at: float = 0.0
    by_status: list[tuple[str, int]] = field(default_factory=list)
    created: int = 0
    finished: list[tuple[str, str, int]] = field(default_factory=list)
    durations: list[tuple[str, str, list[int], int, float]] = field(default_factory=list)
    """(method, queue, cumulative bucket counts, count, sum of seconds)."""
    queued: list[tuple[str, int]] = field(default_factory=list)
    trials: dict[str, int] = field(default_factory=dict)
    deliveries: list[tuple[str, int]] = field(default_factory=list)


def _duration_sql(dialect: str) -> str:
    """Each finished job's run time, once per distinct method its pipeline uses, and once
    as `search` for a search; summed into histogram buckets per (method, queue)."""
    terminal = ", ".join(f"'{status}'" for status in TERMINAL)
    ran = f"j.status IN ({terminal}) AND j.started_at IS NOT NULL AND j.finished_at IS NOT NULL"
    if dialect == "postgresql":
        seconds = "EXTRACT(EPOCH FROM (j.finished_at - j.started_at))"
        steps = (
            "SELECT DISTINCT j.id, j.queue, s.value->>'method' AS method, "
            f"{seconds} AS d FROM job AS j CROSS JOIN LATERAL json_array_elements("
            "CASE WHEN json_typeof(j.spec->'pipeline') = 'array' THEN j.spec->'pipeline' "
            f"ELSE '[]'::json END) AS s(value) WHERE {ran}"
        )
        search = "json_typeof(j.spec->'search') = 'object'"
    else:
        seconds = "(julianday(j.finished_at) - julianday(j.started_at)) * 86400.0"
        steps = (
            "SELECT DISTINCT j.id, j.queue, json_extract(s.value, '$.method') AS method, "
            f"{seconds} AS d FROM job AS j, json_each(j.spec, '$.pipeline') AS s WHERE {ran}"
        )
        search = "json_type(j.spec, '$.search') = 'object'"
    searches = (
        f"SELECT j.id, j.queue, '{SEARCH_METHOD}' AS method, {seconds} AS d "
        f"FROM job AS j WHERE {ran} AND {search}"
    )
    buckets = ", ".join(
        f"SUM(CASE WHEN d <= {bound} THEN 1 ELSE 0 END) AS le{i}"
        for i, bound in enumerate(DURATION_BUCKETS_S)
    )
    return (
        f"SELECT method, queue, COUNT(*) AS n, COALESCE(SUM(d), 0) AS total, {buckets} "
        f"FROM ({steps} UNION ALL {searches}) AS runs "
        "WHERE method IS NOT NULL GROUP BY method, queue"
    )


def _take_snapshot(session: Session, database_url: str) -> _Snapshot:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
    snap = _Snapshot(database_url=database_url, taken_at=time.monotonic())
    snap.by_status = [
        (str(status), int(count))
        for status, count in session.execute(
            select(Job.status, func.count()).group_by(Job.status)
        ).all()
    ]
    snap.created = sum(count for _status, count in snap.by_status)
    code = Job.error["code"].as_string()
    snap.finished = [
        (str(status), code_value or "", int(count))
        for status, code_value, count in session.execute(
            select(Job.status, code, func.count())
            .where(Job.status.in_(TERMINAL))
            .group_by(Job.status, code)
        ).all()
    ]
    for row in session.execute(text(_duration_sql(dialect))).mappings():
        cumulative = [int(row[f"le{i}"] or 0) for i in range(len(DURATION_BUCKETS_S))]
        snap.durations.append(
            (str(row["method"]), str(row["queue"]), cumulative, int(row["n"]), float(row["total"]))
        )
    snap.queued = [
        (str(queue), int(count))
        for queue, count in session.execute(
            select(Job.queue, func.count())
            .where(Job.status == JobStatus.queued)
            .group_by(Job.queue)
        ).all()
    ]
    trials: dict[str, int] = defaultdict(int)
    for source in _trial_sources:
        for status, count in source(session).items():
            trials[str(status)] += int(count)
    snap.trials = dict(trials)
    snap.deliveries = [
        (str(outcome), int(count))
        for outcome, count in session.execute(
            select(WebhookDelivery.outcome, func.count()).group_by(WebhookDelivery.outcome)
        ).all()
    ]
    return snap


class JobCollector(Collector):
    """Jobs, queues, search trials and webhook deliveries, read from the database at scrape
    time (at most once per :data:`SNAPSHOT_TTL_S`; the last figures while it is down)."""

    def __init__(self) -> None:
        self._snapshot: _Snapshot | None = None
        self._lock = threading.Lock()

    def snapshot(self) -> _Snapshot | None:
        url = get_settings().database_url
        with self._lock:  # concurrent scrapes wait for one query instead of each running it
            current = self._snapshot
            if current is not None and current.database_url != url:
                current = self._snapshot = None
            if current is not None and time.monotonic() - current.taken_at < SNAPSHOT_TTL_S:
                return current
            try:
                with session_scope() as session:
                    self._snapshot = _take_snapshot(session, url)
            except Exception as exc:
                log.warning("metrics: could not read the job figures: %s", exc)
            return self._snapshot

    def collect(self) -> Iterator[Any]:
        snap = self.snapshot()
        gauge = GaugeMetricFamily("squish_jobs", "Jobs by status", labels=["status"])
        created = CounterMetricFamily("squish_jobs_created", "Jobs created")
        finished = CounterMetricFamily(
            "squish_jobs_finished",
            "Jobs that reached a terminal status, by status and error code ('' unless failed)",
            labels=["status", "error_code"],
        )
        durations = HistogramMetricFamily(
            "squish_job_duration_seconds",
            "Run time of finished jobs (started to finished), counted under each method its "
            "pipeline uses (a search under 'search'), per queue",
            labels=["method", "queue"],
        )
        depth = GaugeMetricFamily(
            "squish_queue_depth", "Jobs waiting in each queue (queued)", labels=["queue"]
        )
        trials = CounterMetricFamily(
            "squish_search_trials", "Search trials by status", labels=["status"]
        )
        deliveries = CounterMetricFamily(
            "squish_webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered, failed, refused)",
            labels=["outcome"],
        )
        age = GaugeMetricFamily(
            "squish_metrics_snapshot_age_seconds",
            "How old the database figures above are (large: the database is not answering)",
        )
        if snap is not None:
            for status, count in snap.by_status:
                gauge.add_metric([status], count)
            created.add_metric([], snap.created)
            for status, error_code, count in snap.finished:
                finished.add_metric([status, error_code], count)
            bounds = [str(float(b)) for b in DURATION_BUCKETS_S]
            for method, queue, cumulative, count, total in snap.durations:
                buckets = [*zip(bounds, cumulative, strict=True), ("+Inf", count)]
                durations.add_metric([method, queue], buckets, total)
            waiting = dict.fromkeys(QUEUES, 0) | dict(snap.queued)
            for queue, count in sorted(waiting.items()):
                depth.add_metric([queue], count)
            for status, count in sorted(snap.trials.items()):
                trials.add_metric([status], count)
            for outcome, count in snap.deliveries:
                deliveries.add_metric([outcome], count)
            age.add_metric([], time.monotonic() - snap.taken_at)
        yield from (gauge, created, finished, durations, depth, trials, deliveries, age)


class OutageCollector(Collector):
    """Whether each dependency is answering, its outages and the requests they failed."""

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["dependency"]
        up = GaugeMetricFamily(
            "squish_dependency_up", "0 while requests fail for want of it", labels=labels
        )
        outages = CounterMetricFamily(
            "squish_dependency_outages", "Outages seen by this process", labels=labels
        )
        failed = CounterMetricFamily(
            "squish_dependency_unavailable_responses", "Requests answered 503", labels=labels
        )
        for outage in OUTAGES:
            up.add_metric([outage.part], 0 if outage.down else 1)
            outages.add_metric([outage.part], outage.outages)
            failed.add_metric([outage.part], outage.total_failures)
        yield from (up, outages, failed)


REGISTRY.register(JobCollector())
REGISTRY.register(OutageCollector())


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): counts each request under its route template, and
    sets the job context for requests under ``/v1/jobs/{id}``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}
        job = _JOB_PATH.match(scope.get("path", ""))
        token = JOB_ID.set(job[1]) if job is not None else None

        async def _send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = _route_of(scope)
            REQUESTS.labels(scope["method"], route, str(status["code"])).inc()
            LATENCY.labels(scope["method"], route).observe(time.perf_counter() - start)
            if token is not None:
                JOB_ID.reset(token)


def _route_of(scope: Scope) -> str:
    route = scope.get("route")  # set by the router once it matched
    return getattr(route, "path", "unmatched")


# --- logs -------------------------------------------------------------------------------

JOB_ID: ContextVar[str | None] = ContextVar("squish_job_id", default=None)
"""The job this code runs for: every log line written meanwhile carries it."""
_JOB_PATH = re.compile(r"^/v1/jobs/(job_[A-Za-z0-9_-]{1,36})(?:/|$)")
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s%(job)s: %(message)s"
LogFormat = str  # "text" or "json" (Settings.log_format)
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "job_id",
    "job",
    "color_message",  # uvicorn's
    "taskName",
}


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Log lines written inside (in this thread or task) carry ``job_id``."""
    token = JOB_ID.set(job_id)
    try:
        yield
    finally:
        JOB_ID.reset(token)


class JobIdFilter(logging.Filter):
    """Stamps each record with the current job's id (`record.job_id`, None outside a job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        job_id = getattr(record, "job_id", None) or JOB_ID.get()
        record.job_id = job_id
        record.job = f" [{job_id}]" if job_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, job_id,
    process, the exception's traceback if any, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None) or JOB_ID.get(),
            "process": record.processName,
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Text lines with the job's id after the logger's name while a job runs."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "job"):
            JobIdFilter().filter(record)
        return super().format(record)


def formatter(log_format: LogFormat) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"unknown log format {log_format!r}: use text or json")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is when a line is written (not when it was made)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def format_handlers(handlers: Iterable[logging.Handler], log_format: LogFormat) -> None:
    """Give `handlers` squish's format and the job id (once each)."""
    fmt = formatter(log_format)
    for handler in handlers:
        handler.setFormatter(fmt)
        if not any(isinstance(f, JobIdFilter) for f in handler.filters):
            handler.addFilter(JobIdFilter())


def capture_warnings(log_format: LogFormat) -> None:
    """Python warnings become log lines in `log_format` (their own handler: they are
    written in that format even before the rest of logging is set up)."""
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    ours = [h for h in warnings_log.handlers if isinstance(h, _StderrHandler)]
    if not ours:
        ours = [_StderrHandler()]
        warnings_log.addHandler(ours[0])
    warnings_log.propagate = False
    format_handlers(ours, log_format)


def configure_logging(log_format: LogFormat, *, servers: Iterable[str] = ("uvicorn",)) -> None:
    """This process's log lines in `log_format` (text or json), with the job id in a job.

    Adds one stderr handler to the root logger (once), and re-formats the handlers
    of `servers`' loggers (uvicorn's own, which do not propagate), so that every line the
    process writes has one format.
    """
    formatter(log_format)  # fails loudly on an unknown format
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _StderrHandler)]
    if not ours:
        ours = [_StderrHandler()]
        root.addHandler(ours[0])
    capture_warnings(log_format)
    handlers: list[logging.Handler] = list(ours)
    for name in servers:
        for logger_name in (name, f"{name}.error", f"{name}.access"):
            handlers += logging.getLogger(logger_name).handlers
    format_handlers(handlers, log_format)
