"""Every password and token, searched for in the clear wherever a local process could look.

Haystacks: the controller's, agent's and broker's logs, every process's arguments, `docker
inspect` of the host's containers, what the broker retains (read by a peer allowed to read
every topic), and a pg_dump of the controller's database. Needles: the add-ons' tenant and
platform passwords, and the operator, metrics, project, agent and MQTT credentials.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import urllib.parse
from pathlib import Path

from tests.agent_fixtures import (
    AgentProcess,
    Stack,
    create_addon,
    create_project,
    docker,
    run_job,
    wait_for,
    wait_phase,
)

pytest_plugins = ["tests.agent_fixtures"]


def _argv_of_every_process() -> str:
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            out.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue  # gone meanwhile
    return "\n".join(out)


async def _retained(stack: Stack) -> str:
    peer = await stack.mosquitto.identity("sweep.peer", "peer")
    seen: list[str] = []
    async with stack.mosquitto.client(peer) as client:
        await client.subscribe("#")
        try:
            async with asyncio.timeout(3):
                async for message in client.messages:
                    seen.append(f"{message.topic} {message.payload!r}")
        except TimeoutError:
            pass
    return "\n".join(seen)


def _variants(secret: str) -> set[str]:
    return {secret, urllib.parse.quote(secret, safe=""), json.dumps(secret)[1:-1]}


async def test_no_credential_appears_in_the_clear(stack: Stack, agent: AgentProcess) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    pg = await create_addon(c, project["id"], "sweep-db", "postgres")
    rd = await create_addon(c, project["id"], "sweep-cache", "redis")
    await wait_phase(c, project["id"], pg["id"], "ready")
    await wait_phase(c, project["id"], rd["id"], "ready")
    project_token = await c.new_project_token(project["id"])
    job = await run_job(c, project["id"], 'psql "$DATABASE_URL" -tAc "select 1"')
    assert job["state"] == "succeeded", job

    status, env = await c.api("GET", f"/v1/projects/{project['id']}/env")
    assert status == 200
    secrets_dir = agent.state_dir / "secrets"
    agent_token = re.search(r'agent_token = "([^"]+)"', agent.config_path.read_text())
    least = {
        "postgres backup password": secrets_dir / pg["id"] / "orkestr_backup" / "password",
        "postgres restore password": secrets_dir / pg["id"] / "orkestr_restore" / "password",
        "redis backup password": secrets_dir / rd["id"] / "orkestr_backup" / "password",
    }

    async def made() -> bool:  # by the first upkeep round (agent/platform_roles.py)
        return all(path.is_file() for path in least.values())

    await wait_for(made, 30, "the least roles' passwords")
    needles = {
        "postgres password": urllib.parse.urlparse(env["env"]["DATABASE_URL"]).password,
        "redis password": urllib.parse.urlparse(env["env"]["REDIS_URL"]).password,
        "postgres platform password": (secrets_dir / pg["id"] / "admin_password").read_text(),
        "redis platform password": (secrets_dir / rd["id"] / "admin_password").read_text(),
        **{what: path.read_text() for what, path in least.items()},
        "operator token": c.operator_token,
        "metrics token": c.metrics_token,
        "project token": project_token,
        "agent token": agent_token[1] if agent_token else None,
        "agent mqtt password": agent.mqtt_password_file.read_text().strip(),
    }
    assert all(needles.values()), needles

    dump = subprocess.run(  # noqa: ASYNC221
        ["pg_dump", "--no-owner", stack.dsn], capture_output=True, text=True, timeout=120
    )
    assert dump.returncode == 0, dump.stderr
    containers = docker("ps", "-aq", "--filter", f"label=orkestr.host={agent.host}").split()
    haystacks = {
        "controller log": c.log_text(),
        "agent log": agent.log_path.read_text(errors="replace"),
        "broker log": stack.mosquitto.log_text(),
        "process arguments": _argv_of_every_process(),
        "docker inspect": docker("inspect", *containers) if containers else "",
        "retained messages": await _retained(stack),
        "controller database dump": dump.stdout,
    }
    assert haystacks["docker inspect"] and haystacks["retained messages"], "nothing to search"
    # The search can find what is there: the job's output is in the dump only as "1".
    assert project["id"] in haystacks["controller database dump"].replace("-", "")
    found = [
        (what, where)
        for what, secret in needles.items()
        for where, text in haystacks.items()
        if any(v in text for v in _variants(str(secret)))
    ]
    assert not found, found
