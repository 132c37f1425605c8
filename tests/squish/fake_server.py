"""An in-memory squish API (the §4 contract) for testing the SDK and the CLI.

It is not the real server: no database, no worker. A job moves one step each time it
is read (``queued`` -> one ``running`` step per pipeline method -> ``succeeded``), a
step whose method is ``test.fail`` fails the job, and `FakeState` has knobs that
inject faults (a status for the next N requests, a lost create-job response, a
dropped event stream, a wrong published sha256). Every request is recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

API_KEY = "test-key"
TERMINAL = {"succeeded", "failed", "cancelled"}
METHODS: dict[str, dict[str, dict[str, Any]]] = {
    "prune.magnitude": {
        "amount": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "description": "fraction to prune",
        },
        "scope": {"type": "string", "enum": ["layer", "global"], "default": "layer"},
    },
    "quantize.dynamic": {"dtype": {"type": "string", "enum": ["int8"]}},
    "distill": {"temperature": {"type": "number", "exclusiveMinimum": 0}},
    "test.fail": {},
}


def now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]


@dataclass
class FakeState:
    """Everything the fake server holds; tests read and tweak it directly."""

    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_bytes: dict[str, bytes] = field(default_factory=dict)
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    artifacts: dict[tuple[str, str], bytes] = field(default_factory=dict)
    idempotency: dict[str, str] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    # Fault knobs.
    faults: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path regex, status)
    cuts: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path regex, bytes)
    lose_next_create_response: bool = False
    drop_events_after: int | None = None  # cut the next event stream after N events
    drop_events_cleanly: bool = False  # ... by ending it properly instead of breaking it
    corrupt_sha: bool = False
    max_upload_bytes: int = 8 * 1024 * 1024
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self.ids):04d}"

    def inject(self, method: str, path_regex: str, *statuses: int) -> None:
        """Answer the next requests matching ``method`` and ``path_regex`` with ``statuses``."""
        self.faults.extend((method, path_regex, s) for s in statuses)

    def cut(self, method: str, path_regex: str, after_bytes: int) -> None:
        """Break the connection of the next matching response after ``after_bytes`` of body."""
        self.cuts.append((method, path_regex, after_bytes))

    def requests_to(self, method: str, path_regex: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and re.fullmatch(path_regex, r.path)]

    # -- jobs move one step per read -------------------------------------------------

    def add_event(
        self, job: dict[str, Any], kind: str, message: str, data: dict[str, Any], level="info"
    ) -> None:
        events = self.events.setdefault(job["id"], [])
        events.append(
            {
                "id": len(events) + 1,
                "kind": kind,
                "level": level,
                "message": message,
                "data": data,
                "created_at": now(),
            }
        )

    def advance(self, job: dict[str, Any]) -> None:
        if job["status"] in TERMINAL:
            return
        pipeline = job["spec"]["pipeline"]
        if job["status"] == "queued":
            job.update(status="running", started_at=now(), attempts=1, _step=0)
            self.add_event(job, "status", "running", {"status": "running"})
        else:
            job["_step"] += 1
        step = job["_step"]
        if step < len(pipeline):
            method = pipeline[step]["method"]
            if method == "test.fail":
                error = {"code": "method_failed", "message": "test.fail always fails", "step": step}
                job.update(status="failed", error=error, finished_at=now())
                self.add_event(
                    job,
                    "status",
                    "failed: test.fail always fails",
                    {"status": "failed", "error": error},
                    level="error",
                )
                return
            job.update(progress=round(step / len(pipeline), 4), stage=method)
            self.add_event(
                job, "progress", f"stage: {method}", {"progress": job["progress"], "stage": method}
            )
            self.add_event(job, "log", f"running {method}", {})
            return
        self._succeed(job)

    def _succeed(self, job: dict[str, Any]) -> None:
        model_bytes = self.model_bytes[job["model_id"]]
        artifact = model_bytes[::2] + b"squished"
        batch_sizes = job["spec"]["evaluate"]["batch_sizes"]
        original_latency = {f"batch_{b}": {"p50": 2.0 * b, "p95": 2.5 * b} for b in batch_sizes}
        compressed_latency = {f"batch_{b}": {"p50": 1.0 * b, "p95": 1.2 * b} for b in batch_sizes}
        metrics = {
            "original": {
                "size_bytes": len(model_bytes),
                "parameters": 1000,
                "latency_ms": original_latency,
                "accuracy": 0.9125,
            },
            "compressed": {
                "size_bytes": len(artifact),
                "parameters": 1000,
                "sparsity": 0.5,
                "latency_ms": compressed_latency,
                "accuracy": 0.9050,
            },
            "fidelity": {"top1_agreement": 0.99, "cosine_similarity": 0.998},
            "ratios": {
                "size": len(model_bytes) / len(artifact),
                "speedup": {f"batch_{b}": 2.0 for b in batch_sizes},
            },
        }
        report = json.dumps(metrics).encode()
        artifacts = []
        for name, content in (("model", artifact), ("report", report)):
            self.artifacts[(job["id"], name)] = content
            sha = hashlib.sha256(content).hexdigest()
            if self.corrupt_sha and name == "model":
                sha = "0" * 64
            artifacts.append(
                {
                    "name": name,
                    "size_bytes": len(content),
                    "sha256": sha,
                    "url": f"/v1/jobs/{job['id']}/artifacts/{name}",
                }
            )
        job.update(
            status="succeeded",
            progress=1.0,
            stage=None,
            metrics=metrics,
            artifacts=artifacts,
            finished_at=now(),
        )
        self.add_event(job, "status", "succeeded", {"status": "succeeded"})


def public(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if not k.startswith("_")}


def problem(
    status: int, title: str, detail: str, errors: list[dict[str, Any]] | None = None
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def not_found(kind: str, ident: str) -> JSONResponse:
    return problem(404, "Not found", f"no {kind} {ident!r}")


def page(items: list[dict[str, Any]], limit: int | None, cursor: str | None) -> Any:
    limit = limit or 50
    if not 1 <= limit <= 100:
        return problem(
            422,
            "Invalid request",
            "limit must be 1..100",
            [{"loc": ["query", "limit"], "msg": "must be between 1 and 100"}],
        )
    try:
        start = int(cursor) if cursor else 0
    except ValueError:
        return problem(400, "Bad request", f"invalid cursor {cursor!r}")
    chunk = items[start : start + limit]
    more = start + limit < len(items)
    return {"items": chunk, "next_cursor": str(start + limit) if more else None}


def create_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [p for p in e["loc"] if p != "body"], "msg": e["msg"]} for e in exc.errors()
        ]
        return problem(422, "Invalid request", "the request is invalid", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, "Error", str(exc.detail))

    @app.middleware("http")
    async def _record_auth_faults(request: Request, call_next: Any) -> Any:
        path = request.url.path
        with state.lock:
            state.requests.append(
                Recorded(request.method, path, request.url.query, dict(request.headers))
            )
            for i, (method, regex, status) in enumerate(state.faults):
                if method == request.method and re.fullmatch(regex, path):
                    del state.faults[i]
                    return problem(status, "Injected", f"injected {status}")
        if path.startswith("/v1/") and request.headers.get("authorization") != f"Bearer {API_KEY}":
            return problem(401, "Unauthorized", "missing or unknown API key")
        with state.lock:
            cut = next(
                (c for c in state.cuts if c[0] == request.method and re.fullmatch(c[1], path)), None
            )
            if cut is not None:
                state.cuts.remove(cut)
        response = await call_next(request)
        if cut is None:
            return response
        body = b"".join([chunk async for chunk in response.body_iterator])
        headers = dict(response.headers)
        headers["content-length"] = str(len(body))  # promised, never delivered

        async def partial() -> Any:
            yield body[: cut[2]]

        return StreamingResponse(partial(), status_code=response.status_code, headers=headers)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict[str, Any]:
        return {"status": "ok", "checks": {"database": "ok"}}

    def store_upload(file: UploadFile) -> tuple[bytes, str] | JSONResponse:
        data = file.file.read()
        if len(data) > state.max_upload_bytes:
            return problem(
                413, "Payload too large", f"the upload is over {state.max_upload_bytes} bytes"
            )
        return data, hashlib.sha256(data).hexdigest()

    @app.post("/v1/models", status_code=201)
    def upload_model(
        file: UploadFile = File(...), name: str | None = Form(None), format: str | None = Form(None)
    ) -> Any:
        stored = store_upload(file)
        if isinstance(stored, JSONResponse):
            return stored
        data, sha = stored
        filename = file.filename or "model"
        fmt = format or {"pt2": "pt2", "onnx": "onnx"}.get(filename.rpartition(".")[2])
        if fmt not in ("pt2", "onnx"):
            return problem(
                422,
                "Invalid request",
                "unknown model format",
                [{"loc": ["format"], "msg": "name the file .pt2 or .onnx, or send format"}],
            )
        with state.lock:
            model_id = state.new_id("mdl")
            model = {
                "id": model_id,
                "name": name or filename,
                "format": fmt,
                "size_bytes": len(data),
                "sha256": sha,
                "created_at": now(),
                "inspection_status": "done",
                "info": {"parameters": 1000},
            }
            state.models[model_id] = model
            state.model_bytes[model_id] = data
        return model

    @app.get("/v1/models")
    def list_models(limit: int | None = None, cursor: str | None = None) -> Any:
        return page(list(state.models.values()), limit, cursor)

    @app.get("/v1/models/{model_id}")
    def get_model(model_id: str) -> Any:
        return state.models.get(model_id) or not_found("model", model_id)

    @app.get("/v1/models/{model_id}/content")
    def model_content(model_id: str) -> Any:
        if model_id not in state.models:
            return not_found("model", model_id)
        return Response(state.model_bytes[model_id], media_type="application/octet-stream")

    @app.delete("/v1/models/{model_id}", status_code=204, response_model=None)
    def delete_model(model_id: str) -> Any:
        if state.models.pop(model_id, None) is None:
            return not_found("model", model_id)
        return Response(status_code=204)

    @app.post("/v1/datasets", status_code=201)
    def upload_dataset(file: UploadFile = File(...), name: str | None = Form(None)) -> Any:
        stored = store_upload(file)
        if isinstance(stored, JSONResponse):
            return stored
        data, sha = stored
        filename = file.filename or "data"
        with state.lock:
            dataset_id = state.new_id("ds")
            dataset = {
                "id": dataset_id,
                "name": name or filename,
                "format": filename.rpartition(".")[2],
                "size_bytes": len(data),
                "sha256": sha,
                "created_at": now(),
                "info": {"inputs": [4, 3]},
            }
            state.datasets[dataset_id] = dataset
        return dataset

    @app.get("/v1/datasets")
    def list_datasets(limit: int | None = None, cursor: str | None = None) -> Any:
        return page(list(state.datasets.values()), limit, cursor)

    @app.get("/v1/datasets/{dataset_id}")
    def get_dataset(dataset_id: str) -> Any:
        return state.datasets.get(dataset_id) or not_found("dataset", dataset_id)

    @app.delete("/v1/datasets/{dataset_id}", status_code=204, response_model=None)
    def delete_dataset(dataset_id: str) -> Any:
        if state.datasets.pop(dataset_id, None) is None:
            return not_found("dataset", dataset_id)
        return Response(status_code=204)

    def validate_spec(body: dict[str, Any]) -> list[dict[str, Any]]:
        errors: list[dict[str, Any]] = []
        if body.get("model_id") not in state.models:
            errors.append({"loc": ["model_id"], "msg": f"no model {body.get('model_id')!r}"})
        pipeline = body.get("pipeline")
        if not isinstance(pipeline, list) or not pipeline:
            errors.append({"loc": ["pipeline"], "msg": "give at least one step"})
            pipeline = []
        for i, step in enumerate(pipeline):
            method = step.get("method")
            if method not in METHODS:
                errors.append(
                    {"loc": ["pipeline", i, "method"], "msg": f"unknown method {method!r}"}
                )
                continue
            for key, value in (step.get("params") or {}).items():
                schema = METHODS[method].get(key)
                if schema is None:
                    errors.append(
                        {"loc": ["pipeline", i, "params", key], "msg": "unknown parameter"}
                    )
                elif "maximum" in schema and not (schema["minimum"] <= value <= schema["maximum"]):
                    errors.append(
                        {
                            "loc": ["pipeline", i, "params", key],
                            "msg": f"must be between {schema['minimum']} and {schema['maximum']}",
                        }
                    )
        for role, ds_id in (body.get("datasets") or {}).items():
            if role not in ("calibration", "train", "eval"):
                errors.append({"loc": ["datasets", role], "msg": "unknown role"})
            elif ds_id not in state.datasets:
                errors.append({"loc": ["datasets", role], "msg": f"no dataset {ds_id!r}"})
        return errors

    @app.post("/v1/jobs")
    async def create_job(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return problem(400, "Bad request", "the body is not JSON")
        errors = validate_spec(body)
        if errors:
            detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
            return problem(422, "Invalid job spec", detail, errors)
        key = request.headers.get("idempotency-key")
        with state.lock:
            if key and key in state.idempotency:
                job = state.jobs[state.idempotency[key]]
                return JSONResponse(public(job), status_code=200)
            job_id = state.new_id("job")
            evaluate = {"batch_sizes": [1], "warmup": 2, "iterations": 10}
            evaluate.update(body.get("evaluate") or {})
            spec = {
                "model_id": body["model_id"],
                "pipeline": [
                    {"method": s["method"], "params": s.get("params") or {}}
                    for s in body["pipeline"]
                ],
                "datasets": body.get("datasets") or {},
                "target": {"device": "cpu", "runtime": None, **(body.get("target") or {})},
                "output_format": body.get("output_format"),
                "evaluate": evaluate,
                "webhook_url": body.get("webhook_url"),
            }
            job = {
                "id": job_id,
                "model_id": body["model_id"],
                "status": "queued",
                "progress": 0.0,
                "stage": None,
                "spec": spec,
                "error": None,
                "metrics": None,
                "artifacts": [],
                "attempts": 0,
                "created_at": now(),
                "started_at": None,
                "finished_at": None,
            }
            state.jobs[job_id] = job
            state.add_event(job, "status", "queued", {"status": "queued"})
            if key:
                state.idempotency[key] = job_id
            if state.lose_next_create_response:
                # The job exists, but the client never hears about it.
                state.lose_next_create_response = False
                return problem(502, "Bad gateway", "the response was lost on the way")
        return JSONResponse(
            public(job), status_code=202, headers={"Location": f"/v1/jobs/{job_id}"}
        )

    @app.get("/v1/jobs")
    def list_jobs(
        status: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> Any:
        items = [public(j) for j in reversed(state.jobs.values()) if status in (None, j["status"])]
        return page(items, limit, cursor)

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str) -> Any:
        with state.lock:
            job = state.jobs.get(job_id)
            if job is None:
                return not_found("job", job_id)
            snapshot = public(job)
            state.advance(job)
        return snapshot

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202)
    def cancel_job(job_id: str) -> Any:
        with state.lock:
            job = state.jobs.get(job_id)
            if job is None:
                return not_found("job", job_id)
            if job["status"] in TERMINAL:
                return problem(409, "Conflict", f"job {job_id} is already {job['status']}")
            job.update(status="cancelled", finished_at=now())
            state.add_event(job, "status", "cancelled", {"status": "cancelled"})
            return JSONResponse(public(job), status_code=202)

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request) -> Any:
        if job_id not in state.jobs:
            return not_found("job", job_id)
        last = int(request.headers.get("last-event-id") or 0)
        drop_after, state.drop_events_after = state.drop_events_after, None
        headers = {}
        if drop_after is not None and not state.drop_events_cleanly:
            # A Content-Length the body never reaches: the connection is cut mid-message,
            # which the client sees as a broken stream.
            headers["Content-Length"] = str(1 << 20)

        async def stream() -> Any:
            nonlocal last
            sent = 0
            yield b": hello\n\nretry: 10\n\n"
            while True:
                with state.lock:
                    job = state.jobs[job_id]
                    pending = [e for e in state.events[job_id] if e["id"] > last]
                    finished = job["status"] in TERMINAL
                for event in pending:
                    if drop_after is not None and sent >= drop_after:
                        return
                    body = json.dumps(event)
                    yield f"id: {event['id']}\nevent: {event['kind']}\ndata: {body}\n\n".encode()
                    last, sent = event["id"], sent + 1
                if finished and not pending:
                    return
                with state.lock:
                    state.advance(job)
                await asyncio.sleep(0.001)

        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    @app.get("/v1/jobs/{job_id}/artifacts/{name}")
    def get_artifact(job_id: str, name: str, request: Request) -> Any:
        content = state.artifacts.get((job_id, name))
        if content is None:
            return not_found("artifact", f"{job_id}/{name}")
        header = request.headers.get("range")
        if header is None:
            return Response(
                content, media_type="application/octet-stream", headers={"Accept-Ranges": "bytes"}
            )
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", header)
        if match is None:
            return problem(416, "Range not satisfiable", f"cannot parse {header!r}")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) else len(content) - 1
        if start >= len(content) or end < start:
            return problem(
                416, "Range not satisfiable", f"{header} is outside 0-{len(content) - 1}"
            )
        end = min(end, len(content) - 1)
        return Response(
            content[start : end + 1],
            status_code=206,
            media_type="application/octet-stream",
            headers={
                "Content-Range": f"bytes {start}-{end}/{len(content)}",
                "Accept-Ranges": "bytes",
            },
        )

    @app.get("/v1/methods")
    def methods() -> dict[str, Any]:
        return {
            "items": [
                {
                    "name": name,
                    "summary": f"the {name} method",
                    "formats": ["onnx", "pt2"],
                    "datasets_required": ["train"] if name == "distill" else [],
                    "datasets_optional": [],
                    "devices": ["cpu", "gpu"],
                    "params_schema": {"type": "object", "properties": props},
                }
                for name, props in METHODS.items()
            ]
        }

    return app


@dataclass
class FakeServer:
    url: str
    state: FakeState

    def reset(self) -> None:
        """Forget everything (the same `FakeState` object stays in use by the app)."""
        fresh = FakeState()
        for name in FakeState.__dataclass_fields__:
            if name != "lock":
                setattr(self.state, name, getattr(fresh, name))


@contextmanager
def running_server() -> Iterator[FakeServer]:
    """Serve a fresh fake API with uvicorn on a free 127.0.0.1 port in a thread."""
    state = FakeState()
    config = uvicorn.Config(
        create_app(state),
        host="127.0.0.1",
        port=0,  # a free port, read back once the server is listening
        log_config=None,
        log_level="critical",
        access_log=False,
        lifespan="off",
        ws="none",
        http="h11",
        loop="asyncio",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the fake squish server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield FakeServer(f"http://127.0.0.1:{port}", state)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
