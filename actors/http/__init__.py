"""The HTTP API of a running system (the ``http`` extra).

Install with ``pip install 'actors[http]'``; then, inside the ``async with
run_system(...)`` block, serve :func:`app` with hypercorn's trio worker::

    api = actors.http.app(system, token=token)
    await hypercorn.trio.serve(api, config)

or run ``actors serve DB --handler package.module:function``. See
docs/howto-http.md for the endpoints, the tokens and their roles.

Importing this module raises ``ImportError`` if Starlette is not installed.
"""

from __future__ import annotations

try:
    import starlette  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "actors.http needs Starlette (and hypercorn to serve it): "
        "install the extra with pip install 'actors[http]'"
    ) from exc

from ._app import HttpApp, HttpStatistics, app
from ._auth import Role, parse_token_lines
from ._serve import serve

__all__ = ["HttpApp", "HttpStatistics", "Role", "app", "parse_token_lines", "serve"]
