"""A 400 in the API's JSON shape for a request aiohttp cannot parse.

aiohttp answers a malformed request line or header itself, before any middleware runs:
text/plain, and an ERROR with a traceback in the log for what is only a bad client (which
anyone who can reach the port could repeat at will). Both the controller's API
(controller/httpserver.py) and the agent's /metrics (agent/metrics_http.py) answer it
with `{"error": "bad_request", "message"}`, one WARNING line and a closed connection.
"""

from __future__ import annotations

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest


class JsonBadRequestHandler(RequestHandler):
    """aiohttp's request handler; a subclass says how to log a bad request."""

    def log_bad_request(self, request: BaseRequest, reason: str) -> None:
        raise NotImplementedError

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
        self.log_bad_request(request, reason)
        body = {"error": "bad_request", "message": f"malformed HTTP request: {reason}"}
        response = web.Response(
            body=msgspec.json.encode(body), status=400, content_type="application/json"
        )
        response.force_close()
        return response
