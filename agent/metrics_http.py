"""The agent's /metrics endpoint, always behind a bearer token.

Any local process (and, on another listen address, any host) can reach the listen
address, so the scrape token is what lets a scraper in: the file `[metrics] token_file`
names (one Prometheus's group can read), or, when none is configured, one the agent
makes for itself in its state dir (`metrics_token`, 0600 root), so no configuration
leaves the endpoint open (the security note: it used to be open, with a warning). The
file is re-read when it changes: a rotation needs no restart.

A request aiohttp cannot parse (a header line over 8 KiB, a bad request line) is a 400
and one WARNING line, `metrics.bad_request` (httpcommon/bad_request.py, as the controller's
API does): aiohttp's own handling logged an ERROR with a
traceback for it, which anyone who can reach the port could repeat at will.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from httpcommon.bad_request import JsonBadRequestHandler

log = logging.getLogger("orkestr.agent.metrics")


class ScrapeToken:
    """The token in `path`, read again whenever the file's mtime or size changes."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int] | None = None
        self._token = ""
        self.current()  # an unreadable or empty file stops the agent at start

    def current(self) -> str:
        st = os.stat(self.path)
        key = (st.st_mtime_ns, st.st_size)
        if key != self._seen:
            token = self.path.read_text().strip()
            if not token:
                raise ValueError(f"{self.path} holds no token")
            self._token, self._seen = token, key
        return self._token


OWN_TOKEN = "metrics_token"


def own_token_file(state_dir: str) -> Path:
    """`<state_dir>/metrics_token`, made once (0600, a random token) and kept across
    restarts, so a scraper given a copy keeps working."""
    path = Path(state_dir) / OWN_TOKEN
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{OWN_TOKEN}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (secrets.token_urlsafe(32) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def token_path(token_file: str, state_dir: str) -> Path:
    """The scrape token's file: the configured one, else the agent's own."""
    return Path(token_file) if token_file else own_token_file(state_dir)


def authorized(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries exactly `Bearer <token>`."""
    if not header or not token:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def app(token: ScrapeToken) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        try:
            expected = token.current()
        except (OSError, ValueError) as exc:
            # Never open on a broken file: refuse until it is fixed.
            log.error("metrics.token_unreadable error=%s", exc)
            expected = ""
        if not authorized(request.headers.get("Authorization"), expected):
            return web.json_response(
                {"error": "unauthorized", "message": "GET /metrics needs the scrape token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="orkestr-agent-metrics"'},
            )
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    application = web.Application()
    application.router.add_get("/metrics", metrics)
    return application


class _Handler(JsonBadRequestHandler):
    def log_bad_request(self, request: BaseRequest, reason: str) -> None:
        log.warning("metrics.bad_request remote=%s reason=%s", request.remote, reason[:200])


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # same state, the handler above
        return server


async def serve(listen: str, token_file: str, state_dir: str) -> web.AppRunner:
    path = token_path(token_file, state_dir)
    if not token_file:
        log.warning(
            "metrics.own_token listen=%s token_file=%s: no [metrics] token_file; scrapers "
            "need this token (Authorization: Bearer)",
            listen,
            path,
        )
    token = ScrapeToken(str(path))
    runner: web.AppRunner = _Runner(app(token), access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
    return runner
