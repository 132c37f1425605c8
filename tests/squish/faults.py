"""Faults the real application cannot produce on demand, injected in front of it.

`Faults` wraps the squish ASGI app: every request is recorded and passed through, unless
a test asked for a fault: an injected status, a response cut off mid-body, a lost
response (the app handled the request, the client never hears), an event stream dropped
after N events, a wrong published sha256. It also lets a worker thread move in lockstep
with a polling client (`PollGate`).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JOB_PATH = re.compile(r"/v1/jobs/[^/]+")


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes = b""  # JSON request bodies only (not uploads)


class PollGate:
    """Holds a worker after each change it commits until a poll that began later has ended,
    so that a client polling the job sees every state the worker went through."""

    def __init__(self, timeout_s: float = 10.0) -> None:
        self._cond = threading.Condition()
        self._begun = 0
        self._seen = 0
        self._open = False
        self.timeout_s = timeout_s

    def poll_begins(self) -> int:
        with self._cond:
            self._begun += 1
            return self._begun

    def poll_ended(self, number: int) -> None:
        with self._cond:
            self._seen = max(self._seen, number)
            self._cond.notify_all()

    def wait_for_a_poll(self) -> None:
        with self._cond:
            after = self._begun
            self._cond.wait_for(lambda: self._open or self._seen > after, timeout=self.timeout_s)

    def open(self) -> None:
        """Hold nobody any more (the test is over)."""
        with self._cond:
            self._open = True
            self._cond.notify_all()


@dataclass
class _Fault:
    method: str
    path: re.Pattern[str]
    kind: str  # "status", "cut", "lose"
    value: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.method == method and self.path.fullmatch(path) is not None


@dataclass
class Faults:
    """The real app behind a fault injector; tests set faults and read `requests`."""

    app: ASGIApp
    requests: list[Recorded] = field(default_factory=list)
    gate: PollGate = field(default_factory=PollGate)
    corrupt_sha: bool = False  # publish a wrong sha256 for every job's "model" artifact
    _faults: list[_Fault] = field(default_factory=list)
    _drop_events: tuple[int, bool] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def inject(self, method: str, path_regex: str, *statuses: int) -> None:
        """Answer the next requests matching ``method`` and ``path_regex`` with ``statuses``."""
        with self._lock:
            self._faults += [_Fault(method, re.compile(path_regex), "status", s) for s in statuses]

    def cut(self, method: str, path_regex: str, after_bytes: int) -> None:
        """Break the connection of the next matching response after ``after_bytes`` of body."""
        with self._lock:
            self._faults.append(_Fault(method, re.compile(path_regex), "cut", after_bytes))

    def lose_response(self, method: str, path_regex: str) -> None:
        """Let the app handle the next matching request, then answer 502 instead."""
        with self._lock:
            self._faults.append(_Fault(method, re.compile(path_regex), "lose"))

    def drop_events(self, after: int, *, cleanly: bool = False) -> None:
        """End the next event stream after ``after`` events: broken, or properly ended."""
        self._drop_events = (after, cleanly)

    def requests_to(self, method: str, path_regex: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and re.fullmatch(path_regex, r.path)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        recorded = Recorded(method, path, scope["query_string"].decode(), headers)
        if headers.get("content-type", "").startswith("application/json"):
            receive = _teed(receive, recorded)
        with self._lock:
            self.requests.append(recorded)
            fault = next((f for f in self._faults if f.matches(method, path)), None)
            if fault is not None:
                self._faults.remove(fault)
        if fault is not None and fault.kind == "status":
            await _problem(send, fault.value, f"injected {fault.value}")
            return
        if fault is not None:
            status, response_headers, body = await _buffered(self.app, scope, receive)
            if fault.kind == "lose":
                await _problem(send, 502, "the response was lost on the way")
            else:  # "cut": promise the whole body, deliver the first bytes, hang up
                await _start(send, status, response_headers, len(body))
                await send(
                    {"type": "http.response.body", "body": body[: fault.value], "more_body": True}
                )
            return
        if method == "GET" and path.endswith("/events") and self._drop_events is not None:
            drop, self._drop_events = self._drop_events, None
            await self.app(scope, receive, _dropping(send, *drop))
            return
        if method == "GET" and JOB_PATH.fullmatch(path):
            number = self.gate.poll_begins()
            try:
                if self.corrupt_sha:
                    status, response_headers, body = await _buffered(self.app, scope, receive)
                    body = _with_wrong_sha(body)
                    await _start(send, status, response_headers, len(body))
                    await send({"type": "http.response.body", "body": body})
                else:
                    await self.app(scope, receive, send)
            finally:
                self.gate.poll_ended(number)
            return
        await self.app(scope, receive, send)


async def _problem(send: Send, status: int, detail: str) -> None:
    body = json.dumps(
        {"type": "about:blank", "title": "Injected", "status": status, "detail": detail}
    ).encode()
    headers = [(b"content-type", b"application/problem+json")]
    await _start(send, status, headers, len(body))
    await send({"type": "http.response.body", "body": body})


async def _start(send: Send, status: int, headers: list[Any], length: int) -> None:
    kept = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    kept.append((b"content-length", str(length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": kept})


async def _buffered(app: ASGIApp, scope: Scope, receive: Receive) -> tuple[int, list[Any], bytes]:
    start: Message = {}
    chunks: list[bytes] = []

    async def collect(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, collect)
    return start["status"], list(start.get("headers", [])), b"".join(chunks)


def _teed(receive: Receive, recorded: Recorded) -> Receive:
    async def wrapped() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            recorded.body += message.get("body", b"")
        return message

    return wrapped


def _dropping(send: Send, after: int, cleanly: bool) -> Send:
    """Pass the first ``after`` events through, swallow the rest; then end the stream
    properly (``cleanly``) or leave it unterminated, which breaks the connection."""
    sent = 0
    ended = False

    async def wrapped(message: Message) -> None:
        nonlocal sent, ended
        if message["type"] != "http.response.body":
            await send(message)
            return
        if ended:
            return
        body = message.get("body", b"")
        if b"\ndata: " in body or body.startswith(b"data: "):
            if sent == after:
                ended = True
                if cleanly:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            sent += 1
        await send(message)

    return wrapped


def _with_wrong_sha(body: bytes) -> bytes:
    job = json.loads(body)
    for artifact in job.get("artifacts", []):
        if artifact["name"] == "model":
            artifact["sha256"] = "0" * 64
    return json.dumps(job).encode()
