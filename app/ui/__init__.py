"""The web dashboard at /ui: static HTML, CSS and JS modules (no build step) under a strict CSP."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from starlette.datastructures import URL
from starlette.exceptions import HTTPException
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).resolve().parent / "static"
MOUNT = "/ui"

# The dashboard: scripts and styles from /ui only (no inline script or style, no eval), data
# from this API only, no plugin, no framing by other sites. Images: the blob: and data: URLs
# the pages make themselves.
DASHBOARD_CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "frame-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
# The card viewer (card.html) shows one downloaded `card` artifact in a sandboxed iframe from
# a blob: URL. Such a document inherits its creator's policy, and a card is a self-contained
# HTML file with inline styles and inline SVG or data: images, so this page alone allows
# inline styles; the sandbox (no allow-scripts, an opaque origin) keeps a card's scripts off.
CARD_VIEWER_CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src data:",
        "connect-src 'self'",
        "frame-src blob:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'self'",
    )
)
CARD_VIEWER = "card.html"
PAGES = ("index.html", CARD_VIEWER)
"""The HTML pages: each names its scripts and styles under ``v/{{version}}/``."""
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
# A page is revalidated each time; the files under v/<version>/ never change (the version is
# their hash), so a browser keeps them and a revisit costs one request.
PAGE_CACHE = "no-cache"
ASSET_CACHE = "public, max-age=31536000, immutable"


@functools.cache
def version() -> str:
    """The hash of the static files: a new release (or any edit) gets new asset URLs."""
    digest = hashlib.sha256()
    for path in sorted(p for p in STATIC.rglob("*") if p.is_file()):
        digest.update(path.relative_to(STATIC).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


@functools.cache
def _page(name: str) -> bytes:
    return (STATIC / name).read_text().replace("{{version}}", version()).encode()


class DashboardFiles(StaticFiles):
    """The dashboard's files: its pages (with their asset version filled in) and the assets,
    under ``v/<version>/`` with a year-long cache, every answer with the security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        name = Path(path).as_posix()
        if name in ("", ".") and not scope["path"].endswith("/"):
            return RedirectResponse(URL(scope=scope).replace(path=scope["path"] + "/"))
        if name in ("", ".", *PAGES):
            if scope["method"] not in ("GET", "HEAD"):
                raise HTTPException(status_code=405, headers={"Allow": "GET, HEAD"})
            page = PAGES[0] if name in ("", ".") else name
            response: Response = Response(_page(page), media_type="text/html")
            cache = PAGE_CACHE
        else:
            parts = name.split("/", 2)
            cache = PAGE_CACHE
            if len(parts) == 3 and parts[0] == "v":
                name = parts[2]
                cache = ASSET_CACHE if parts[1] == version() else PAGE_CACHE
            response = await super().get_response(name, scope)
        csp = CARD_VIEWER_CSP if Path(name).name == CARD_VIEWER else DASHBOARD_CSP
        response.headers["Content-Security-Policy"] = csp
        response.headers["Cache-Control"] = cache
        for header, value in SECURITY_HEADERS.items():
            response.headers[header] = value
        return response


def files() -> DashboardFiles:
    """The ASGI app to mount at `MOUNT` (`/ui` answers with a redirect to `/ui/`)."""
    return DashboardFiles(directory=STATIC)
