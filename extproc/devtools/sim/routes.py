"""Routing like vLLM's ASGI stack: the path is percent-decoded (uvicorn), then matched exactly
and case sensitively (Starlette); a trailing slash is redirected (307) to the path without it
when that path exists; a known path with another method is 405."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import unquote

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Routes:
    def __init__(self) -> None:
        self._table: dict[str, dict[str, Handler]] = {}

    def add(self, method: str, path: str, handler: Handler) -> None:
        self._table.setdefault(path, {})[method] = handler

    @property
    def paths(self) -> list[str]:
        return sorted(self._table)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        raw, _, query = request.raw_path.partition("?")
        path = unquote(raw, errors="replace")
        methods = self._table.get(path)
        if methods is None:
            alt = path[:-1] if path.endswith("/") else path + "/"
            if alt in self._table:
                # Starlette's redirect_slashes
                raise web.HTTPTemporaryRedirect(alt + ("?" + query if query else ""))
            raise web.HTTPNotFound()
        handler = methods.get(request.method) or (methods.get("GET") if request.method == "HEAD" else None)
        if handler is None:
            raise web.HTTPMethodNotAllowed(request.method, sorted(methods))
        return await handler(request)
