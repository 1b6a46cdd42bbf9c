"""Who may read the metrics: the agent's /metrics, the controller's and Prometheus's API.

Real agent, controller and (where the `prometheus` package is installed, as
deploy/services.sh does) a real Prometheus run with deploy/prometheus/prometheus.yml and
the web config deploy/prometheus-web.sh writes, as deploy/up.sh sets them up. Any local
process reaches these loopback ports, so each asks for its credential.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.metrics_http import authorized, serve
from tests.agent_fixtures import AgentProcess, Stack, metrics, running_agent, wait_for
from tests.services import free_port

pytest_plugins = ["tests.agent_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROMETHEUS = shutil.which("prometheus")


def test_only_the_exact_bearer_token_is_authorized() -> None:
    assert authorized("Bearer s3cret", "s3cret")
    assert authorized("bearer s3cret", "s3cret")
    for header in (None, "", "Bearer", "Bearer ", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret"):
        assert not authorized(header, "s3cret"), header
    assert not authorized("Bearer ", "")  # an empty token opens nothing


async def test_a_request_the_metrics_server_cannot_parse_is_a_400_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Anyone who reaches the port could send these; each logged an ERROR with a traceback.
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    port = free_port()
    runner = await serve(f"127.0.0.1:{port}", str(token), str(tmp_path))
    try:
        for raw in (
            b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n",
            b"GARBAGE\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == b"400", answer
            assert json.loads(body)["error"] == "bad_request", answer
        status, _ = await get(
            f"http://127.0.0.1:{port}/metrics", {"Authorization": "Bearer s3cret"}
        )
        assert status == 200  # still serving
    finally:
        await runner.cleanup()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    assert caplog.text.count("metrics.bad_request") == 2, caplog.text


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:  # loopback only
        async with session.get(url, headers=headers or {}) as response:
            return response.status, await response.text()


async def test_the_agents_metrics_need_its_scrape_token(stack: Stack, agent: AgentProcess) -> None:
    url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
    status, body = await get(url)
    assert status == 401, body
    assert "orkestr_agent" not in body
    status, body = await get(url, {"Authorization": "Bearer not-the-token"})
    assert status == 401, body
    # Another credential of the platform's is not this one either.
    c = stack.controller
    assert c is not None
    status, body = await get(url, {"Authorization": f"Bearer {c.metrics_token}"})
    assert status == 401, body
    assert "orkestr_agent_reconcile_total" in str(
        await metrics(agent.metrics_port, agent.metrics_token)
    )

    # A rotated token: the file is re-read, the old token refused, no restart.
    old = agent.metrics_token
    agent.metrics_token = "rotated-" + old
    agent.metrics_token_file.write_text(agent.metrics_token + "\n")
    status, _ = await get(url, {"Authorization": f"Bearer {old}"})
    assert status == 401
    status, body = await get(url, {"Authorization": f"Bearer {agent.metrics_token}"})
    assert status == 200 and "orkestr_agent_reconcile_total" in body


async def test_without_a_configured_token_the_agent_makes_its_own(stack: Stack) -> None:
    """The security note: with no `[metrics] token_file` /metrics answered every local
    process (a warning only). Now the agent makes its own token (0600, in its state dir,
    kept across restarts) and asks for it like any other."""
    async with running_agent(stack, own_metrics_token=True) as agent:
        url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
        status, body = await get(url)
        assert status == 401 and "orkestr_agent" not in body, body
        path = agent.metrics_token_file
        assert path.stat().st_mode & 0o777 == 0o600
        token = path.read_text().strip()
        assert len(token) >= 32
        status, body = await get(url, {"Authorization": "Bearer " + token})
        assert status == 200 and "orkestr_agent_reconcile_total" in body
        assert f"metrics.own_token listen=127.0.0.1:{agent.metrics_port}" in agent.log_tail(400)
        # The same token after a restart: a scraper given a copy keeps working.
        await agent.stop()
        await agent.start()

        async def served() -> bool:
            try:
                status, _ = await get(url, {"Authorization": "Bearer " + token})
            except aiohttp.ClientError:
                return False
            return status == 200

        await wait_for(served, 30, "the restarted agent's /metrics with the same token", 0.5)
        assert path.read_text().strip() == token


async def test_the_controllers_metrics_need_a_token(stack: Stack) -> None:
    c = stack.controller
    assert c is not None
    status, _ = await c.api("GET", "/metrics", token="")
    assert status == 401
    status, _ = await c.api("GET", "/metrics", token="not-the-token")
    assert status == 401
    status, text = await c.api("GET", "/metrics", token=c.metrics_token)
    assert status == 200 and "orkestr_controller_" in text


@contextlib.asynccontextmanager
async def prometheus(config: str, web: Path, workdir: Path) -> AsyncIterator[str]:
    """A real Prometheus on a free loopback port with `config` and `web`; its URL."""
    assert PROMETHEUS is not None
    (workdir / "prometheus.yml").write_text(config)
    port = free_port()
    log = open(workdir / "prometheus.log", "wb")
    proc = await asyncio.create_subprocess_exec(
        PROMETHEUS,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--web.config.file={web}",
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (deploy/services.sh)")
async def test_prometheus_scrapes_with_the_tokens_and_its_api_asks_for_a_password(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    work = Path(tempfile.mkdtemp(prefix="orkestr-prometheus-"))
    try:
        # The copies deploy/up.sh makes for the prometheus group, here in a temporary dir.
        tokens = {
            "/etc/prometheus/orkestr_metrics_token": c.metrics_token,
            "/etc/prometheus/orkestr_agent_metrics_token": agent.metrics_token,
        }
        text = CONFIG.read_text()
        for name, (path, token) in zip(("controller", "agent"), tokens.items(), strict=True):
            assert f"credentials_file: {path}" in text, path
            copy = work / f"{name}.token"
            copy.write_text(token + "\n")
            os.chmod(copy, 0o640)
            text = text.replace(path, str(copy))
        # The targets of this test's own controller and agent, scraped every second.
        text = text.replace('"127.0.0.1:8080"', f'"127.0.0.1:{c.port}"')
        text = text.replace('"127.0.0.1:9464"', f'"127.0.0.1:{agent.metrics_port}"')
        text = re.sub(r"scrape_interval: 15s", "scrape_interval: 1s", text)
        shutil.copy(CONFIG.parent / "alerts.yml", work / "alerts.yml")
        password = work / "prometheus_password"
        password.write_text("test-" + os.urandom(8).hex() + "\n")
        web = work / "web.yml"
        made = await asyncio.create_subprocess_exec(
            "bash", str(ROOT / "deploy" / "prometheus-web.sh"), str(password), str(web)
        )
        assert await asyncio.wait_for(made.wait(), 60) == 0
        assert oct(web.stat().st_mode & 0o777) == "0o640"
        basic = base64.b64encode(f"orkestr:{password.read_text().strip()}".encode()).decode()
        wrong = base64.b64encode(b"orkestr:wrong").decode()

        async with prometheus(text, web, work) as url:

            async def targets() -> dict[str, Any] | None:
                try:
                    status, body = await get(
                        f"{url}/api/v1/targets", {"Authorization": f"Basic {basic}"}
                    )
                except aiohttp.ClientConnectionError:
                    return None  # still starting
                assert status == 200, body
                found = {t["labels"]["job"]: t for t in json.loads(body)["data"]["activeTargets"]}
                if all(
                    found.get(j, {}).get("health") == "up"
                    for j in ("orkestr-agent", "orkestr-controller")
                ):
                    return found
                return None

            up = await wait_for(targets, 60, "Prometheus scraping the agent and controller (up)")
            assert set(up) == {"orkestr-agent", "orkestr-controller"}, up
            # Prometheus's own API and UI: nothing without the password.
            for headers in ({}, {"Authorization": f"Basic {wrong}"}):
                for path in ("/api/v1/targets", "/api/v1/query?query=up", "/metrics", "/graph"):
                    status, _ = await get(url + path, headers)
                    assert status == 401, (path, headers, status)
    finally:
        shutil.rmtree(work, ignore_errors=True)
