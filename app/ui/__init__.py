"""The web dashboard at /ui: static HTML, CSS and JS modules (no build step) under a strict CSP."""

from __future__ import annotations

from pathlib import Path

from starlette.responses import Response
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
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate each time (ETag / Last-Modified): an upgraded server serves its own files.
    "Cache-Control": "no-cache",
}


class DashboardFiles(StaticFiles):
    """`StaticFiles` whose every answer carries the dashboard's security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        csp = CARD_VIEWER_CSP if Path(path).name == CARD_VIEWER else DASHBOARD_CSP
        response.headers["Content-Security-Policy"] = csp
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
        return response


def files() -> DashboardFiles:
    """The ASGI app to mount at `MOUNT` (`/ui` answers with a redirect to `/ui/`)."""
    return DashboardFiles(directory=STATIC, html=True)
