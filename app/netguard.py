"""The webhook URL guard: http(s) only, and no host that resolves to a non-public address.

A webhook must not become a way to probe the operator's network: unless
`SQUISH_WEBHOOK_ALLOW_PRIVATE` is on, a URL whose host is (or resolves to) a private,
loopback, link-local, multicast, reserved or otherwise non-global address is refused at
`POST /v1/jobs` (422) and checked again before every delivery (DNS can change after the
job was created; a refused delivery sends nothing and is recorded as an error).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from app.errors import RETRY_AFTER_S, ServiceUnavailable, Unprocessable
from app.settings import get_settings

SCHEMES = ("http", "https")
Resolver = Callable[..., list[tuple[Any, ...]]]


class UrlRefused(Exception):
    """The URL may not be called; ``str()`` says why, for the client."""


class UrlUnresolvable(UrlRefused):
    """The URL's host does not resolve; ``temporary`` when DNS may answer later."""

    def __init__(self, message: str, *, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


def _forbidden(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why squish will not call `address`, or None for a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind in ("loopback", "link_local", "multicast", "private", "reserved", "unspecified"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    if not address.is_global:  # shared (100.64/10), documentation, benchmarking ranges
        return "non-global"
    return None


def _addresses(host: str, port: int, resolve: Resolver) -> list[str]:
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        temporary = exc.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None))
        raise UrlUnresolvable(
            f"the host {host!r} does not resolve ({exc.strerror or exc})", temporary=temporary
        ) from None
    except (UnicodeError, OSError) as exc:
        raise UrlUnresolvable(
            f"the host {host!r} does not resolve ({exc})", temporary=False
        ) from None
    # In the resolver's order of preference, each once.
    return list(dict.fromkeys(str(info[4][0]).partition("%")[0] for info in infos))


def check_url(url: str, *, allow_private: bool, resolve: Resolver | None = None) -> list[str]:
    """Raise `UrlRefused` (or `UrlUnresolvable`) unless squish may POST to `url`.

    Every address the host resolves to must be public: a client may connect to any of them.
    Returns those addresses (none when private ones are allowed: nothing was resolved), for
    the caller to connect to (:func:`pin`), so that DNS is not asked again in between.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        raise UrlRefused(f"the scheme must be http or https, not {parts.scheme or 'none'!r}")
    host = parts.hostname
    if not host:
        raise UrlRefused("the URL has no host")
    if allow_private:
        return []
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise UrlRefused("the URL's port is not a number between 0 and 65535") from None
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        addresses = _addresses(host, port, resolve or socket.getaddrinfo)
    else:
        addresses = [str(literal)]
    for text in addresses:
        why = _forbidden(ipaddress.ip_address(text))
        if why is not None:
            resolved = "is" if text == host else f"resolves to {text}, which is"
            raise UrlRefused(
                f"the host {host!r} {resolved} a {why} address; squish only calls public "
                "addresses (an operator can allow private ones with SQUISH_WEBHOOK_ALLOW_PRIVATE)"
            )
    return addresses


@dataclass(frozen=True)
class Pinned:
    """A request to `url`'s host sent to one checked address of it."""

    url: str
    """`url` with the address in place of the host name."""
    host: str | None
    """The `Host` header to send (the original host and port); None: unchanged."""
    sni_hostname: str | None
    """The TLS server name (and the name the certificate must match) for https."""


def pin(url: str, address: str) -> Pinned:
    """Send to `address`, as checked, instead of resolving `url`'s host again (a DNS
    answer that changed since the check must not decide where the request goes)."""
    parts = urlsplit(url)
    host = parts.hostname
    if host is None or address == host or address == host.strip("[]"):
        return Pinned(url, None, None)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    literal = f"[{address}]" if ":" in address else address
    netloc = f"{userinfo}{at}{literal}" + (f":{parts.port}" if parts.port else "")
    sni = host if parts.scheme.lower() == "https" else None
    return Pinned(urlunsplit(parts._replace(netloc=netloc)), hostport, sni)


def submitted_webhook_url(url: object | None) -> str | None:
    """A job's `webhook_url` as stored, checked for `POST /v1/jobs`: 422 when refused, 503
    with Retry-After while DNS cannot answer."""
    if url is None:
        return None
    text = str(url)
    try:
        check_url(text, allow_private=bool(get_settings().webhook_allow_private))
    except UrlUnresolvable as exc:
        if exc.temporary:
            raise ServiceUnavailable(
                f"DNS could not resolve the webhook URL's host now ({exc}); try again.",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        raise _refused(exc) from None
    except UrlRefused as exc:
        raise _refused(exc) from None
    return text


def _refused(exc: UrlRefused) -> Exception:
    errors = [{"loc": ["body", "webhook_url"], "msg": str(exc), "type": "value_error"}]
    return Unprocessable(f"body.webhook_url: {exc}", title="Webhook URL refused", errors=errors)
