"""The squish Python SDK: a thin, synchronous client of the squish HTTP API (v1).

Example::

    from squish import Client

    with Client() as client:  # SQUISH_URL and SQUISH_API_KEY from the environment
        model = client.upload_model("resnet18.pt2")
        job = client.create_job(
            model["id"],
            [("prune.magnitude", {"amount": 0.5}), ("quantize.dynamic", {"dtype": "int8"})],
        )
        job = client.wait(job["id"], on_progress=lambda j: print(j["status"], j["progress"]))
        client.download_artifact(job["id"], "model", "resnet18.small.pt2")

Retries: a request that is safe to repeat (GET, HEAD, PUT, DELETE, and `create_job`, whose
``Idempotency-Key`` makes a repeat return the same job) is sent again after a connection
error or a 502/503/504, with exponential backoff (or the server's ``Retry-After``), for at
most ``retry_for`` seconds in all. An upload is streamed from its file, which can be read
again from the start, so it is repeated too, but only when the server certainly stored
nothing: a 503, or a connection that never opened (never after a 502/504 or a connection
broken mid-request: the server may have stored it, and a repeat would store it twice).
Other requests (`cancel_job`) are repeated only when the connection never opened. Each
wait is announced to ``on_retry`` (default: a warning on the ``squish.client`` logger).

Only httpx is needed: this module must never import the server or the engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx

from squish import __version__
from squish.errors import (
    ChecksumMismatch,
    JobCancelled,
    JobFailed,
    NotFound,
    SquishError,
    TransportError,
    WaitTimeout,
    error_from_response,
    retry_after_seconds,
)

__all__ = ["DEFAULT_URL", "TERMINAL_STATUSES", "Client", "PipelineStep", "RetryNotice"]

log = logging.getLogger("squish.client")

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
#: A pipeline step: ``{"method": ..., "params": {...}}`` or ``(method, params)``.
PipelineStep = Mapping[str, Any] | tuple[str, Mapping[str, Any] | None]

_RETRY_STATUSES = frozenset({502, 503, 504})
_MAX_BACKOFF_S = 30.0
_CHUNK = 1024 * 1024
# Connection errors where the request certainly never reached the server, so any request
# can be sent again.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
DEFAULT_RETRY_FOR_S = 60.0
_RETRY_HINT = re.compile(r"[;,.]?\s*retry (?:in|after) [\d.]+ ?s(?:econds)?\.?$", re.IGNORECASE)


class Replay(Enum):
    """When a request may be sent again."""

    SAFE = "safe"
    """Repeating it changes nothing: GET, HEAD, PUT, DELETE, `POST /v1/jobs` with its key."""
    REREAD = "reread"
    """Its body can be re-read from the start (an upload from a file): only when the
    server certainly did nothing with it (a 503, or a connection that never opened)."""
    ONCE = "once"
    """Only when the request certainly never left (the connection did not open)."""


@dataclass(frozen=True)
class RetryNotice:
    """What the client waits for before sending a request again (see ``on_retry``).

    Attributes:
        method: the request's method.
        url: the request's URL.
        reason: what failed, in words: the 503's detail (``"database unavailable"``),
            ``"502 Bad Gateway"``, or the connection error.
        status: the HTTP status that caused the retry; None for a connection error.
        delay: seconds until the next attempt.
        retry: which retry comes next (1 for the first).
        elapsed: seconds since the request's first attempt.
    """

    method: str
    url: str
    reason: str
    status: int | None
    delay: float
    retry: int
    elapsed: float

    def __str__(self) -> str:
        return f"{self.reason}, retrying in {_seconds(self.delay)}\u2026"


def _seconds(delay: float) -> str:
    return f"{delay:.0f} s" if delay >= 1 or delay == 0 else f"{delay:.1f} s"


class Client:
    """A client of one squish server.

    Args:
        base_url: the server, e.g. ``"https://squish.example.com"``; defaults to
            ``$SQUISH_URL``, else ``http://127.0.0.1:8000``.
        api_key: the bearer key; defaults to ``$SQUISH_API_KEY``.
        timeout: seconds for each network operation (connect, each read, each write).
        retry_for: how long, in seconds from its first attempt, a request that failed
            in a way worth repeating (see the module's docstring) is tried again; a
            stream or a download that keeps breaking without progress gives up after
            as long. 0 turns retries off.
        retries: at most this many retries of one request (None: as many as fit in
            ``retry_for``).
        backoff: the first retry waits this many seconds, doubling each time
            (capped at 30 s); the server's ``Retry-After`` takes its place.
        on_retry: called with a `RetryNotice` before each wait; by default the notice
            is logged as a warning on the ``squish.client`` logger.
        transport: an httpx transport to use instead of the network (tests, proxies).

    The client holds one connection pool; use it as a context manager, or call
    `close`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retry_for: float = DEFAULT_RETRY_FOR_S,
        retries: int | None = None,
        backoff: float = 0.5,
        on_retry: Callable[[RetryNotice], object] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("SQUISH_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("SQUISH_API_KEY")
        self.timeout = timeout
        self.retry_for = max(0.0, retry_for)
        self.retries = None if retries is None else max(0, retries)
        self.backoff = max(0.0, backoff)
        self.on_retry = on_retry
        headers = {"User-Agent": f"squish-python/{__version__}", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r})"

    # -- models ------------------------------------------------------------------

    def upload_model(
        self, path: str | os.PathLike[str], *, name: str | None = None, format: str | None = None
    ) -> dict[str, Any]:
        """Upload a model file (streamed from disk) and return the model resource.

        Args:
            path: a ``.pt2`` (torch.export) or ``.onnx`` file.
            name: a display name; the server defaults to the file name.
            format: ``"pt2"`` or ``"onnx"``; the server detects it when omitted.
        """
        return self._upload("/v1/models", path, {"name": name, "format": format})

    def get_model(self, model_id: str) -> dict[str, Any]:
        """Return the model resource."""
        return self._get_json(f"/v1/models/{_seg(model_id)}")

    def list_models(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Iterate over every model, following ``next_cursor`` page by page.

        Args:
            limit: the page size asked of the server (the iterator still walks every
                page; use `itertools.islice` to stop early).
        """
        return self._paginate("/v1/models", {"limit": limit})

    def delete_model(self, model_id: str) -> None:
        """Delete a model."""
        self._delete(f"/v1/models/{_seg(model_id)}")

    def download_model(self, model_id: str, path: str | os.PathLike[str]) -> Path:
        """Download a model's uploaded file to ``path``, checking its sha256."""
        model = self.get_model(model_id)
        return self._download(
            f"/v1/models/{_seg(model_id)}/content",
            Path(path),
            expected_sha256=model.get("sha256"),
            expected_size=model.get("size_bytes"),
            resume=False,
        )

    # -- datasets ----------------------------------------------------------------

    def upload_dataset(
        self, path: str | os.PathLike[str], *, name: str | None = None
    ) -> dict[str, Any]:
        """Upload a dataset file (``.npz``, ``.safetensors``, ``.jsonl``), streamed from disk."""
        return self._upload("/v1/datasets", path, {"name": name})

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        """Return the dataset resource."""
        return self._get_json(f"/v1/datasets/{_seg(dataset_id)}")

    def list_datasets(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Iterate over every dataset; ``limit`` is the page size (see `list_models`)."""
        return self._paginate("/v1/datasets", {"limit": limit})

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset."""
        self._delete(f"/v1/datasets/{_seg(dataset_id)}")

    # -- jobs --------------------------------------------------------------------

    def create_job(
        self,
        model_id: str,
        pipeline: Iterable[PipelineStep],
        *,
        datasets: Mapping[str, str] | None = None,
        target: Mapping[str, Any] | None = None,
        output_format: str | None = None,
        evaluate: Mapping[str, Any] | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        constraints: Mapping[str, Any] | None = None,
        export: Mapping[str, Any] | None = None,
        cache: bool = True,
    ) -> dict[str, Any]:
        """Submit a compression job and return it (status ``queued``; ``succeeded`` at once,
        with ``cached_from``, when an earlier job of this tenant had the same model bytes,
        datasets and spec).

        Args:
            model_id: the model to compress.
            pipeline: the steps, in order: ``{"method": m, "params": {...}}`` dicts or
                ``(method, params)`` tuples.
            datasets: dataset ids by role: ``calibration``, ``train``, ``eval``.
            target: ``{"device": "cpu"|"gpu", "runtime": "torch"|"onnxruntime"|None}``.
            output_format: ``"pt2"`` or ``"onnx"``; ``None`` keeps the input format.
            evaluate: ``{"batch_sizes": [1, 32], "warmup": int, "iterations": int}``.
            webhook_url: a URL the server POSTs to when the job finishes.
            idempotency_key: sent as ``Idempotency-Key``; one is generated when omitted,
                so a retried request never creates a second job.
            constraints: bounds the result must meet (a CI gate), e.g.
                ``{"accuracy_drop": 0.01, "speedup": {"batch_1": 1.5}}``; a result that
                violates one fails the job with ``constraints_unmet`` (its artifacts stay
                downloadable, ``error["violations"]`` lists each with the measured value).
            export: ``{"mlflow": {"tracking_uri": ..., "experiment": ..., "registered_model":
                ...}}``: log the succeeded result into an MLflow run.
            cache: False runs the job even when the result cache could answer it.

        Raises:
            ValidationFailed: the spec asks for something impossible; ``errors`` says
                which field and why.
        """
        body: dict[str, Any] = {"model_id": model_id, "pipeline": _normalize_pipeline(pipeline)}
        optional = {
            "datasets": dict(datasets) if datasets else None,
            "target": dict(target) if target else None,
            "output_format": output_format,
            "evaluate": dict(evaluate) if evaluate else None,
            "webhook_url": webhook_url,
            "constraints": dict(constraints) if constraints else None,
            "export": dict(export) if export else None,
            "cache": None if cache else False,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        key = idempotency_key or uuid.uuid4().hex
        response = self._request(
            "POST", "/v1/jobs", replay=Replay.SAFE, json=body, headers={"Idempotency-Key": key}
        )
        return _json(response)

    def search(
        self,
        model_id: str,
        *,
        datasets: Mapping[str, str],
        constraints: Mapping[str, Any] | None = None,
        objectives: Sequence[str] = ("latency", "size"),
        budget: Mapping[str, Any] | None = None,
        methods: Sequence[str] | None = None,
        runtimes: Sequence[str] | None = None,
        strategy: str | None = None,
        seed: int | None = None,
        holdout_fraction: float | None = None,
        target: Mapping[str, Any] | None = None,
        evaluate: Mapping[str, Any] | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Submit a search job: squish finds the recipe (DESIGN §10); returns it (``queued``).

        ``wait(job["id"], on_progress=...)`` then reports each change of the trial table
        (``job["metrics"]["search"]["trials"]``); the finished job's artifact ``model`` is
        the best trial's, ``trial-N`` each Pareto trial's. When no trial meets the
        constraints the job fails with ``error.code == "constraints_unmet"``, and its
        metrics and the closest trial's model stay available.

        Args:
            model_id: the model to compress.
            datasets: dataset ids by role; ``eval`` is required (it is split into the
                search split and the held-out split), ``train`` enables recovery steps.
            constraints: bounds, e.g. ``{"accuracy_drop": 0.01, "latency_ms": {"batch_1": 0.5}}``.
            objectives: 1 to 3 of ``latency``, ``size``, ``accuracy``, ``fidelity``.
            budget: ``{"max_trials": 24, "max_seconds": 3600, "parallel_trials": 2}``.
            methods / runtimes: restrict the space.
            strategy: ``tpe`` (default), ``nsga2``, ``random`` or ``grid``.
            seed: makes the proposals reproducible.
            holdout_fraction: share of the eval data held out (default 0.3).

        Raises:
            ValidationFailed: the search cannot run (e.g. ``accuracy_drop`` without labels).
        """
        search: dict[str, Any] = {"objectives": list(objectives)}
        extra = {
            "constraints": dict(constraints) if constraints else None,
            "budget": dict(budget) if budget else None,
            "methods": list(methods) if methods is not None else None,
            "runtimes": list(runtimes) if runtimes is not None else None,
            "strategy": strategy,
            "seed": seed,
            "holdout_fraction": holdout_fraction,
        }
        search.update({k: v for k, v in extra.items() if v is not None})
        body: dict[str, Any] = {"model_id": model_id, "search": search, "datasets": dict(datasets)}
        optional = {
            "target": dict(target) if target else None,
            "evaluate": dict(evaluate) if evaluate else None,
            "webhook_url": webhook_url,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        key = idempotency_key or uuid.uuid4().hex
        response = self._request(
            "POST", "/v1/jobs", replay=Replay.SAFE, json=body, headers={"Idempotency-Key": key}
        )
        return _json(response)

    def get_job(self, job_id: str) -> dict[str, Any]:
        """Return the job resource (status, progress, stage, metrics, artifacts, ...)."""
        return self._get_json(f"/v1/jobs/{_seg(job_id)}")

    def list_jobs(
        self, status: str | None = None, limit: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Iterate over every job, newest first, optionally only those in ``status``."""
        return self._paginate("/v1/jobs", {"status": status, "limit": limit})

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Ask the server to cancel a queued or running job; returns the job.

        Raises:
            Conflict: the job has already finished.
        """
        response = self._request("POST", f"/v1/jobs/{_seg(job_id)}/cancel", replay=Replay.ONCE)
        return _json(response)

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        on_progress: Callable[[dict[str, Any]], object] | None = None,
        raise_on_failure: bool = True,
    ) -> dict[str, Any]:
        """Poll a job until it is finished and return it.

        Args:
            timeout: give up after this many seconds (``None``: wait for ever).
            poll_interval: seconds between polls.
            on_progress: called with the job whenever its status, progress or stage
                changes, or (a search) the status of one of its trials (and once with the
                first reading).
            raise_on_failure: raise `JobFailed` / `JobCancelled` instead of returning
                a failed or cancelled job.

        Raises:
            WaitTimeout: ``timeout`` passed; the job keeps running on the server.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: tuple[Any, ...] | None = None
        while True:
            job = self.get_job(job_id)
            state = (job.get("status"), job.get("progress"), job.get("stage"), _trials(job))
            if state != seen:
                seen = state
                if on_progress is not None:
                    on_progress(job)
            status = job.get("status")
            if status in TERMINAL_STATUSES:
                if raise_on_failure and status == "failed":
                    raise JobFailed(job)
                if raise_on_failure and status == "cancelled":
                    raise JobCancelled(job)
                return job
            delay = poll_interval
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(job, timeout or 0.0)
                delay = min(delay, remaining)
            time.sleep(max(0.0, delay))

    def events(
        self, job_id: str, last_event_id: int | str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Stream a job's events (Server-Sent Events) as dicts until the job finishes.

        Each event is ``{"id", "kind", "level", "message", "data", "created_at"}``;
        ``kind`` is ``status``, ``progress`` or ``log``. A dropped connection is
        re-opened with ``Last-Event-ID``, so no event is lost or repeated. The
        iterator ends after the event that reports a terminal status (or when the
        server closes the stream of a job that has finished).

        Args:
            last_event_id: resume after this event id.
        """
        path = f"/v1/jobs/{_seg(job_id)}/events"
        last = None if last_event_id is None else str(last_event_id)
        breaks = _Retrying(self, "GET", path)
        server_retry: float | None = None  # the stream's `retry:` field, in seconds
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last is not None:
                headers["Last-Event-ID"] = last
            received = False
            try:
                with closing(self._stream("GET", path, headers=headers)) as response:
                    for sse in _parse_sse(response.iter_lines()):
                        if sse.retry is not None:
                            server_retry = sse.retry / 1000.0
                        if sse.data is None:
                            continue
                        event = _event_from_sse(sse)
                        if sse.id is not None:
                            last = sse.id
                        received = True
                        yield event
                        if _is_terminal_event(event):
                            return
            except httpx.ReadTimeout:
                # A quiet stream is not a failure (jobs run for hours): reconnect.
                continue
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                # The connection broke mid-stream: reconnect from `last`. (A refused
                # connection is retried, then raised, by `_stream` itself.) Only breaks
                # without an event in between count against the retry budget.
                if received:
                    breaks = _Retrying(self, "GET", path)
                delay = None if server_retry is None else min(server_retry, _MAX_BACKOFF_S)
                if not breaks.wait(f"the event stream broke ({exc})", retry_after=delay):
                    raise TransportError(
                        f"GET {path}: the event stream keeps breaking: {exc}"
                    ) from exc
                continue
            # The server closed the stream without a terminal event. If nothing came
            # and the job is over, its terminal event was before `last_event_id`.
            if not received and self.get_job(job_id).get("status") in TERMINAL_STATUSES:
                return
            # Otherwise reconnect, politely: by default no more than once a second.
            time.sleep(min(server_retry if server_retry is not None else 1.0, _MAX_BACKOFF_S))

    # -- artifacts ---------------------------------------------------------------

    def download_artifact(
        self,
        job_id: str,
        name: str,
        path: str | os.PathLike[str],
        *,
        resume: bool = True,
    ) -> Path:
        """Download a job's artifact (``model``, ``report``) to ``path``.

        The bytes go to ``path + ".part"`` first; with ``resume`` an existing partial
        file is continued with an HTTP Range request. The result is checked against
        the sha256 in the job's ``artifacts`` and only then renamed to ``path``.

        Raises:
            NotFound: the job has no artifact of that name (yet).
            ChecksumMismatch: the bytes do not match the published sha256 (the
                partial file is removed).
        """
        job = self.get_job(job_id)
        artifacts = job.get("artifacts") or []
        artifact = next((a for a in artifacts if a.get("name") == name), None)
        if artifact is None:
            available = ", ".join(a.get("name", "?") for a in artifacts) or "none"
            raise NotFound(
                404,
                "Artifact not found",
                f"job {job_id} ({job.get('status')}) has no artifact {name!r}; "
                f"available: {available}",
            )
        return self._download(
            f"/v1/jobs/{_seg(job_id)}/artifacts/{_seg(name)}",
            Path(path),
            expected_sha256=artifact.get("sha256"),
            expected_size=artifact.get("size_bytes"),
            resume=resume,
        )

    def download_card(self, job_id: str, path: str | os.PathLike[str] | None = None) -> Path:
        """Download a succeeded job's compression card (artifact ``card``): one HTML file
        that opens offline in any browser. ``path`` defaults to ``<job_id>-card.html`` in
        the current folder. Checked against its sha256 like every artifact.

        Raises:
            NotFound: the job has no card (not succeeded, or its card could not be
                rendered: the job's events say why).
        """
        target = Path(path) if path is not None else Path(f"{job_id}-card.html")
        return self.download_artifact(job_id, "card", target, resume=False)

    # -- webhooks ----------------------------------------------------------------

    def webhook_secret(self) -> dict[str, Any]:
        """The secret that signs this tenant's webhooks: ``{"secret": "whsec_…", ...}``.

        Check a received webhook with `squish.webhooks.verify` and this secret.
        """
        return self._get_json("/v1/webhook-secret")

    def rotate_webhook_secret(self) -> dict[str, Any]:
        """Replace the signing secret; returns the new one (``previous_expires_at``: when
        the old one stops signing; until then deliveries carry both signatures)."""
        return _json(self._request("POST", "/v1/webhook-secret/rotate", replay=Replay.ONCE))

    def list_deliveries(self, job_id: str) -> list[dict[str, Any]]:
        """Every attempt to deliver a job's webhook, oldest first (``webhook_id``, ``event``,
        ``attempt``, ``outcome``, ``status_code``, ``error``, ``duration_ms``, ``created_at``)."""
        return list(self._get_json(f"/v1/jobs/{_seg(job_id)}/deliveries").get("items", []))

    # -- service -----------------------------------------------------------------

    def methods(self) -> list[dict[str, Any]]:
        """Every registered compression method, with the JSON Schema of its params."""
        return list(self._get_json("/v1/methods").get("items", []))

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: is the API process up."""
        return self._get_json("/healthz")

    def ready(self) -> dict[str, Any]:
        """``GET /readyz``: can the API reach its database, storage and broker.

        Raises:
            ServerError: not ready (503), after retries.
        """
        return self._get_json("/readyz")

    # -- plumbing ----------------------------------------------------------------

    def _get_json(self, path: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return _json(self._request("GET", path, replay=Replay.SAFE, params=_clean(params)))

    def _paginate(self, path: str, params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        query = _clean(params)
        while True:
            page = self._get_json(path, query)
            yield from page.get("items", [])
            cursor = page.get("next_cursor")
            if not cursor:
                return
            query = {**query, "cursor": cursor}

    def _delete(self, path: str) -> None:
        retrying = _Retrying(self, "DELETE", path)
        try:
            self._send("DELETE", path, replay=Replay.SAFE, read=True, retrying=retrying)
        except NotFound:
            if not retrying.maybe_delivered:
                raise
            # An earlier attempt reached the server and deleted it; only its answer was lost.

    def _upload(
        self, endpoint: str, path: str | os.PathLike[str], fields: Mapping[str, str | None]
    ) -> dict[str, Any]:
        file_path = Path(path)
        data = {k: v for k, v in fields.items() if v is not None}
        with file_path.open("rb") as fh:
            # httpx reads a file object in chunks while sending: the file is never
            # held in memory whole. A retry sends it again from the start.
            files = {"file": (file_path.name, fh, "application/octet-stream")}
            response = self._request(
                "POST", endpoint, replay=Replay.REREAD, files=files, data=data, rewind=fh
            )
        return _json(response)

    def _request(
        self,
        method: str,
        path: str,
        *,
        replay: Replay,
        rewind: IO[bytes] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send a request (retrying what is safe to retry) and return the read response."""
        return self._send(method, path, replay=replay, rewind=rewind, read=True, **kwargs)

    def _stream(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Like `_request` for a GET, but the body is left unread for streaming (close it)."""
        return self._send(method, path, replay=Replay.SAFE, read=False, **kwargs)

    def _send(
        self,
        method: str,
        path: str,
        *,
        replay: Replay,
        read: bool,
        rewind: IO[bytes] | None = None,
        retrying: _Retrying | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        retrying = retrying or _Retrying(self, method, path)
        while True:
            if rewind is not None:
                rewind.seek(0)
            request = self._http.build_request(method, path, **kwargs)
            try:
                response = self._http.send(request, stream=True)
                if read or response.is_error:
                    try:
                        response.read()
                    finally:
                        response.close()
            except httpx.UnsupportedProtocol as exc:
                raise TransportError(f"{method} {request.url}: {exc}") from exc
            except httpx.TransportError as exc:
                not_sent = isinstance(exc, _NOT_SENT)
                if not not_sent:
                    retrying.maybe_delivered = True
                if (replay is Replay.SAFE or not_sent) and retrying.wait(
                    _transport_reason(request, exc)
                ):
                    continue
                raise TransportError(f"{method} {request.url}: {exc}") from exc
            status = response.status_code
            if status in _RETRY_STATUSES:
                if status != 503:
                    retrying.maybe_delivered = True  # a gateway may have passed it on
                repeat = replay is Replay.SAFE or (replay is Replay.REREAD and status == 503)
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                if repeat and retrying.wait(_status_reason(response), status, retry_after):
                    response.close()
                    continue
            if response.is_error:
                raise error_from_response(response)
            return response

    def _announce(self, notice: RetryNotice) -> None:
        if self.on_retry is not None:
            self.on_retry(notice)
        else:
            log.warning("%s %s: %s", notice.method, notice.url, notice)

    def _download(
        self,
        path: str,
        dest: Path,
        *,
        expected_sha256: str | None,
        expected_size: int | None = None,
        resume: bool,
    ) -> Path:
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            part.unlink(missing_ok=True)
        breaks = _Retrying(self, "GET", path)
        progress_at = -1
        while True:
            offset = part.stat().st_size if part.exists() else 0
            if expected_size is not None and offset > expected_size:
                part.unlink()
                offset = 0
            if expected_size is None or offset < expected_size:
                try:
                    self._fetch_into(path, part, offset)
                except (httpx.ReadError, httpx.ReadTimeout, httpx.RemoteProtocolError) as exc:
                    # The connection broke mid-body: continue from what arrived. Only
                    # breaks without new bytes count against the retry budget.
                    arrived = part.stat().st_size if part.exists() else 0
                    if arrived > max(offset, progress_at):
                        breaks = _Retrying(self, "GET", path)
                    progress_at = arrived
                    if not breaks.wait(f"the download broke ({exc})"):
                        raise TransportError(f"GET {path}: download keeps breaking: {exc}") from exc
                    continue
            break
        if expected_sha256:
            actual = _sha256_file(part)
            if actual != expected_sha256:
                part.unlink(missing_ok=True)
                raise ChecksumMismatch(str(dest), expected_sha256, actual)
        os.replace(part, dest)
        return dest

    def _fetch_into(self, path: str, part: Path, offset: int) -> None:
        # Identity encoding: a Range counts bytes of the file itself, not of a gzip of it.
        headers = {"Accept": "*/*", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            stream = self._stream("GET", path, headers=headers)
        except SquishError as exc:
            # 416: what we hold is not a prefix the server recognises; start over.
            if offset and getattr(exc, "status", None) == 416:
                part.unlink(missing_ok=True)
                self._fetch_into(path, part, 0)
                return
            raise
        with closing(stream) as response:
            append = offset > 0 and response.status_code == 206
            with part.open("ab" if append else "wb") as out:
                # Unbuffered: whatever arrived before a break is kept for the resume.
                for chunk in response.iter_bytes():
                    out.write(chunk)


def _trials(job: Mapping[str, Any]) -> tuple[tuple[Any, Any], ...]:
    """A search job's trials as (number, status): what `wait` reports a change of."""
    search = (job.get("metrics") or {}).get("search") or {}
    return tuple((t.get("number"), t.get("status")) for t in search.get("trials") or ())


class _Retrying:
    """The retries of one request: how many were made, and the time they may take in all."""

    def __init__(self, client: Client, method: str, path: str) -> None:
        self.client = client
        self.method = method
        self.url = f"{client.base_url}{path}" if path.startswith("/") else path
        self.start = time.monotonic()
        self.retries = 0
        self.maybe_delivered = False
        """Whether an attempt may have reached the server (its answer was lost)."""

    def wait(
        self, reason: str, status: int | None = None, retry_after: float | None = None
    ) -> bool:
        """Announce and sleep before the next attempt; False when the budget is spent."""
        client = self.client
        if client.retries is not None and self.retries >= client.retries:
            return False
        if retry_after is not None:
            delay = retry_after
        else:
            delay = min(client.backoff * 2**self.retries, _MAX_BACKOFF_S)
        elapsed = time.monotonic() - self.start
        if elapsed + delay > client.retry_for:
            return False
        self.retries += 1
        client._announce(
            RetryNotice(self.method, self.url, reason, status, delay, self.retries, elapsed)
        )
        if delay > 0:
            time.sleep(delay)
        return True


def _status_reason(response: httpx.Response) -> str:
    """The problem's detail ("database unavailable"), else the status line."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, str) and detail.strip():
        # "database unavailable; retry in 5 s": the notice says when it retries itself.
        return _RETRY_HINT.sub("", detail.strip())[:200] or detail.strip()[:200]
    return f"{response.status_code} {response.reason_phrase}".strip()


def _transport_reason(request: httpx.Request, exc: httpx.TransportError) -> str:
    where = request.url.netloc.decode("ascii", "replace")
    what = str(exc) or type(exc).__name__
    return f"cannot reach {where} ({what})"


class _SSE:
    __slots__ = ("data", "event", "id", "retry")

    def __init__(self) -> None:
        self.id: str | None = None
        self.event: str | None = None
        self.data: str | None = None
        self.retry: int | None = None


def _parse_sse(lines: Iterable[str]) -> Iterator[_SSE]:
    """Parse a text/event-stream (WHATWG HTML §9.2.6) into events."""
    current = _SSE()
    data: list[str] = []
    for line in lines:
        if line == "":
            if data or current.retry is not None:
                current.data = "\n".join(data) if data else None
                yield current
            current, data = _SSE(), []
            continue
        if line.startswith(":"):
            continue  # a comment / keep-alive
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            current.event = value
        elif field == "id" and "\0" not in value:
            current.id = value
        elif field == "retry" and value.isdigit():
            current.retry = int(value)
    # An event without its closing blank line was cut off: it is not dispatched.


def _event_from_sse(sse: _SSE) -> dict[str, Any]:
    try:
        payload = json.loads(sse.data or "null")
    except ValueError:
        payload = {"message": sse.data}
    event: dict[str, Any] = payload if isinstance(payload, dict) else {"data": payload}
    if sse.event is not None:
        event.setdefault("kind", sse.event)
    if sse.id is not None:
        event.setdefault("id", int(sse.id) if sse.id.isdigit() else sse.id)
    return event


def _is_terminal_event(event: Mapping[str, Any]) -> bool:
    if event.get("kind") != "status":
        return False
    data = event.get("data")
    status = data.get("status") if isinstance(data, Mapping) else None
    return (status or event.get("status")) in TERMINAL_STATUSES


def _normalize_pipeline(pipeline: Iterable[PipelineStep]) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    for step in pipeline:
        if isinstance(step, Mapping):
            if "method" not in step:
                raise ValueError(f"pipeline step {step!r} has no 'method'")
            steps.append({"method": step["method"], "params": dict(step.get("params") or {})})
        elif isinstance(step, Sequence) and not isinstance(step, str) and len(step) == 2:
            method, params = step
            steps.append({"method": method, "params": dict(params or {})})
        else:
            raise ValueError(
                f"pipeline step {step!r} must be a dict with 'method' or a (method, params) tuple"
            )
    return steps


def _clean(params: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (params or {}).items() if v is not None}


def _seg(value: str) -> str:
    return quote(str(value), safe="")


def _json(response: httpx.Response) -> Any:
    if response.status_code == 204 or not response.content:
        return {}
    return response.json()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
