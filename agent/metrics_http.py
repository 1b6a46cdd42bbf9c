"""The agent's /metrics endpoint, behind a bearer token when one is configured.

Any local process can reach the listen address, so the scrape token (a file Prometheus's
group can read, `[metrics] token_file`) is what lets a scraper in. The file is re-read
when it changes: a rotation needs no restart.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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


def authorized(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries exactly `Bearer <token>`."""
    if not header or not token:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def app(token: ScrapeToken | None) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        if token is not None:
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


async def serve(listen: str, token_file: str) -> web.AppRunner:
    token = ScrapeToken(token_file) if token_file else None
    if token is None:
        log.warning("metrics.unauthenticated listen=%s: set [metrics] token_file", listen)
    runner = web.AppRunner(app(token), access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
    return runner
