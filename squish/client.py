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

Only httpx is needed: this module must never import the server or the engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
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
)

__all__ = ["DEFAULT_URL", "TERMINAL_STATUSES", "Client", "PipelineStep"]

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
#: A pipeline step: ``{"method": ..., "params": {...}}`` or ``(method, params)``.
PipelineStep = Mapping[str, Any] | tuple[str, Mapping[str, Any] | None]

_RETRY_STATUSES = frozenset({502, 503, 504})
_MAX_BACKOFF_S = 30.0
_CHUNK = 1024 * 1024
# Connection errors where the request certainly never reached the server, so even a
# non-idempotent request (an upload) can be sent again.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class Client:
    """A client of one squish server.

    Args:
        base_url: the server, e.g. ``"https://squish.example.com"``; defaults to
            ``$SQUISH_URL``, else ``http://127.0.0.1:8000``.
        api_key: the bearer key; defaults to ``$SQUISH_API_KEY``.
        timeout: seconds for each network operation (connect, each read, each write).
        retries: how many times an idempotent request (every GET, and `create_job`,
            which always sends an ``Idempotency-Key``) is sent again after a
            connection error or a 502/503/504. Other requests are re-sent only when
            the connection could not even be opened.
        backoff: the first retry waits this many seconds, doubling each time
            (capped at 30 s); a ``Retry-After`` header in seconds takes its place.
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
        retries: int = 3,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("SQUISH_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("SQUISH_API_KEY")
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = max(0.0, backoff)
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
        self._request("DELETE", f"/v1/models/{_seg(model_id)}", idempotent=False)

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
        self._request("DELETE", f"/v1/datasets/{_seg(dataset_id)}", idempotent=False)

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
    ) -> dict[str, Any]:
        """Submit a compression job and return it (status ``queued``).

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
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        key = idempotency_key or uuid.uuid4().hex
        response = self._request(
            "POST", "/v1/jobs", idempotent=True, json=body, headers={"Idempotency-Key": key}
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
        response = self._request("POST", f"/v1/jobs/{_seg(job_id)}/cancel", idempotent=False)
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
                changes (and once with the first reading).
            raise_on_failure: raise `JobFailed` / `JobCancelled` instead of returning
                a failed or cancelled job.

        Raises:
            WaitTimeout: ``timeout`` passed; the job keeps running on the server.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: tuple[Any, Any, Any] | None = None
        while True:
            job = self.get_job(job_id)
            state = (job.get("status"), job.get("progress"), job.get("stage"))
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
        failures = 0
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
                        failures = 0
                        yield event
                        if _is_terminal_event(event):
                            return
            except httpx.ReadTimeout:
                # A quiet stream is not a failure (jobs run for hours): reconnect.
                continue
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                # The connection broke mid-stream: reconnect from `last`. (A refused
                # connection is retried, then raised, by `_stream` itself.)
                if not received:
                    failures += 1
                    if failures > self.retries:
                        raise TransportError(
                            f"GET {path}: the event stream keeps breaking: {exc}"
                        ) from exc
                if server_retry is not None:
                    time.sleep(min(server_retry, _MAX_BACKOFF_S))
                else:
                    self._sleep_before_retry(max(failures - 1, 0), None)
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
        return _json(self._request("GET", path, idempotent=True, params=_clean(params)))

    def _paginate(self, path: str, params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        query = _clean(params)
        while True:
            page = self._get_json(path, query)
            yield from page.get("items", [])
            cursor = page.get("next_cursor")
            if not cursor:
                return
            query = {**query, "cursor": cursor}

    def _upload(
        self, endpoint: str, path: str | os.PathLike[str], fields: Mapping[str, str | None]
    ) -> dict[str, Any]:
        file_path = Path(path)
        data = {k: v for k, v in fields.items() if v is not None}
        with file_path.open("rb") as fh:
            # httpx reads a file object in chunks while sending: the file is never
            # held in memory whole.
            files = {"file": (file_path.name, fh, "application/octet-stream")}
            response = self._request(
                "POST", endpoint, idempotent=False, files=files, data=data, rewind=fh
            )
        return _json(response)

    def _request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        rewind: IO[bytes] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send a request (retrying what is safe to retry) and return the read response."""
        return self._send(method, path, idempotent=idempotent, rewind=rewind, read=True, **kwargs)

    def _stream(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Like `_request` for a GET, but the body is left unread for streaming (close it)."""
        return self._send(method, path, idempotent=True, read=False, **kwargs)

    def _send(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        read: bool,
        rewind: IO[bytes] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        attempt = 0
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
                if attempt < self.retries and (idempotent or isinstance(exc, _NOT_SENT)):
                    self._sleep_before_retry(attempt, None)
                    attempt += 1
                    continue
                raise TransportError(f"{method} {request.url}: {exc}") from exc
            if response.status_code in _RETRY_STATUSES and idempotent and attempt < self.retries:
                response.close()
                self._sleep_before_retry(attempt, response.headers.get("Retry-After"))
                attempt += 1
                continue
            if response.is_error:
                raise error_from_response(response)
            return response

    def _sleep_before_retry(self, attempt: int, retry_after: str | None) -> None:
        delay = min(self.backoff * (2**attempt), _MAX_BACKOFF_S)
        if retry_after is not None and retry_after.strip().isdigit():
            delay = min(float(retry_after), _MAX_BACKOFF_S)  # (an HTTP-date is ignored)
        if delay > 0:
            time.sleep(delay)

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
        broken = 0
        while True:
            offset = part.stat().st_size if part.exists() else 0
            if expected_size is not None and offset > expected_size:
                part.unlink()
                offset = 0
            if expected_size is None or offset < expected_size:
                try:
                    self._fetch_into(path, part, offset)
                except (httpx.ReadError, httpx.ReadTimeout, httpx.RemoteProtocolError) as exc:
                    # The connection broke mid-body: continue from what arrived.
                    broken += 1
                    if broken > self.retries:
                        raise TransportError(f"GET {path}: download keeps breaking: {exc}") from exc
                    self._sleep_before_retry(broken - 1, None)
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
