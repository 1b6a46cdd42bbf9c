"""aiohttp's server with JSON errors for requests it cannot parse, and bounded connections.

A request aiohttp cannot parse (a bad Content-Length, a control byte in a header, a bad
method) is a 400 with the API's `{"error", "message"}` body and one WARNING line,
`http_bad_request` (httpcommon/bad_request.py, shared with the agent's /metrics).

aiohttp also keeps every connection a client opens, idle for up to an hour: one tenant
holding thousands would use up the controller's file descriptors for everyone. Here a
client address has at most `per_client` connections open (past that, a new one gets a
503 and is closed at once), and an idle connection is closed after the runner's
`keepalive_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from controller.logs import log
from httpcommon.bad_request import JsonBadRequestHandler

logger = logging.getLogger(__name__)


_BODY = msgspec.json.encode(
    {
        "error": "too_many_connections",
        "message": "this address holds too many connections open; close idle ones",
    }
)
_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nRetry-After: 1\r\n"
    + f"Content-Length: {len(_BODY)}\r\n\r\n".encode()
    + _BODY
)


class _Handler(JsonBadRequestHandler):
    _peer: str | None = None  # the address counted against its cap, once counted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self._manager
        if not isinstance(server, _Server) or server.per_client <= 0:
            return
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "unix"
        if server.open[host] >= server.per_client:
            server.refused(host)
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(_TOO_MANY)  # before its request: most clients read it still
            self.force_close()  # closes the transport once the answer is flushed
            return
        server.open[host] += 1
        self._peer = host

    def connection_lost(self, exc: BaseException | None) -> None:
        server = self._manager
        if self._peer is not None and isinstance(server, _Server):
            server.open[self._peer] -= 1
            if server.open[self._peer] <= 0:
                del server.open[self._peer]
            self._peer = None
        super().connection_lost(exc)

    def log_bad_request(self, request: BaseRequest, reason: str) -> None:
        log(logger, "http_bad_request", logging.WARNING, remote=request.remote, reason=reason)


class _Server(web.Server):
    per_client: int  # connections one address may hold open; 0: no cap
    open: Counter[str]  # address -> connections open
    _warned: float  # when `refused` last logged

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)

    def refused(self, host: str) -> None:
        now = time.monotonic()
        if now - self._warned >= 10:  # a client in a loop would flood the log
            self._warned = now
            log(logger, "http_connection_refused", logging.WARNING, remote=host,
                open=self.open[host], cap=self.per_client)  # fmt: skip


class JsonErrorsRunner(web.AppRunner):
    """`per_client`: connections one client address may hold open (0: no cap); the
    other keyword arguments are aiohttp's (`keepalive_timeout` closes idle ones)."""

    def __init__(self, app: web.Application, *, per_client: int = 0, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._per_client = per_client

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # same state, our request handler
        assert isinstance(server, _Server)
        server.per_client, server.open, server._warned = self._per_client, Counter(), -1e9
        return server
