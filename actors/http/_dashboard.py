"""The dashboard: three files of the package (static/), served as they are.

No build step, no CDN, no external font: the page works offline. It holds
the token in memory and sends it as a header to the /v1 API, so the files
themselves need none, and a cross-site page can neither read nor drive it
(no cookie; the policy below also keeps it out of frames and lets it load
nothing from elsewhere).
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


# Read once: the files are part of the installed package.
_FILES = {name: _read(name) for name in _TYPES}


async def page(request: Request) -> Response:
    """``/``: the dashboard's page."""
    return _file("index.html")


async def styles(request: Request) -> Response:
    """``/dashboard.css``."""
    return _file("dashboard.css")


async def script(request: Request) -> Response:
    """``/dashboard.js``."""
    return _file("dashboard.js")


def _file(name: str) -> Response:
    return Response(_FILES[name], media_type=_TYPES[name], headers=_HEADERS)
