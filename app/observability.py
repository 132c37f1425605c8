"""Prometheus metrics: request counts and latency per route, jobs by status, dependency
outages (the 503s of app.errors)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db import session_scope
from app.errors import OUTAGES
from app.orm import Job

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


class JobCollector(Collector):
    """Jobs by status, read from the database at scrape time (the database is the truth)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("squish_jobs", "Jobs by status", labels=["status"])
        try:
            with session_scope() as session:
                rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        except Exception:
            rows = []
        for status, count in rows:
            gauge.add_metric([status], count)
        yield gauge


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
    """Pure ASGI (no BaseHTTPMiddleware): counts each request under its route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

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


def _route_of(scope: Scope) -> str:
    route = scope.get("route")  # set by the router once it matched
    return getattr(route, "path", "unmatched")
