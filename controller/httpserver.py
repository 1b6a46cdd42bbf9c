"""aiohttp's server with JSON errors for requests it cannot parse.

aiohttp answers a malformed request line or header (a bad Content-Length, a control byte
in a header, a bad method) itself, before any middleware runs: text/plain, and an ERROR
with a traceback in the log for what is only a bad client. Here that is a 400 with the
API's `{"error", "message"}` body and one WARNING line.
"""

from __future__ import annotations

import logging

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from controller.errors import BadRequest
from controller.logs import log

logger = logging.getLogger(__name__)


class _Handler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status != 400:
            return super().handle_error(request, status, exc, message)
        # aiohttp's message quotes the offending bytes over several lines: the first says why.
        reason = (message or str(exc) or "malformed request").strip().splitlines()[0].rstrip(":")
        log(logger, "http_bad_request", logging.WARNING, remote=request.remote, reason=reason)
        error = BadRequest(f"malformed HTTP request: {reason}")
        response = web.Response(
            body=msgspec.json.encode({"error": error.code, "message": error.message}),
            status=error.status,
            content_type="application/json",
        )
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class JsonErrorsRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # same state, our request handler
        return server
