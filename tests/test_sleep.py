"""Idle add-ons sleep (light: paused, deep: stopped) and wake when a client connects.

Real containers, a real agent and controller. Clients run in a container on the project
network, as an app or a job would; the host's own connections are exempt from the wake
path by design, so they would not exercise it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from agent import netns, synwatch
from agent.secrets import SecretStore
from agent.specs import ADMIN_USER
from schemas.storage import quota_bytes
from tests.agent_fixtures import (
    TOOLBOX,
    AgentProcess,
    SharedAgent,
    Stack,
    addon,
    container_state,
    create_addon,
    create_project,
    docker,
    more_passes,
    run_job,
    running_agent,
    wait_for,
    wait_passes,
    wait_phase,
    wait_status_after,
)

pytest_plugins = ["tests.agent_fixtures"]
# One agent for the module; a fresh one for a test marked `own_agent` (tests/agent_fixtures.py).
pytestmark = pytest.mark.shared_agent

LIGHT_S, DEEP_S = 2.0, 5.0
# The 20-cycle test's plan: most of its time is spent waiting for the timeouts, and the
# light stage (QUICK_DEEP_S - QUICK_LIGHT_S) still lasts long enough to be seen.
QUICK_LIGHT_S, QUICK_DEEP_S = 1.0, 3.0


@pytest.fixture(scope="module")
def plans_text() -> str:
    return f"""
[starter]
max_addons = 1
cpus = 0.5
memory_mb = 256
sleep = {{ enabled = true, light_after_s = {LIGHT_S}, deep_after_s = {DEEP_S} }}

[pro]
max_addons = 2
cpus = 0.5
memory_mb = 320
sleep = {{ enabled = true, light_after_s = {LIGHT_S}, deep_after_s = {DEEP_S} }}

[team]
max_addons = 5
cpus = 0.5
memory_mb = 256
sleep = {{ enabled = false }}

[quick]
max_addons = 1
cpus = 0.5
memory_mb = 256
sleep = {{ enabled = true, light_after_s = {QUICK_LIGHT_S}, deep_after_s = {QUICK_DEEP_S} }}
"""


class Client:
    """A long-running toolbox container on a project network, with the project's env."""

    def __init__(self, host: str, project_id: str, env: dict[str, str]) -> None:
        self.name = f"orkestr-test-client-{uuid.uuid4().hex[:10]}"
        self.env = env
        docker(
            "run", "-d", "--name", self.name, "--network", f"orkestr-{project_id}",
            "--label", f"orkestr.host={host}", TOOLBOX, "sleep", "infinity",
        )  # fmt: skip
        self.ip = json.loads(docker("inspect", self.name))[0]["NetworkSettings"]["Networks"][
            f"orkestr-{project_id}"
        ]["IPAddress"]

    async def sh(self, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env_args = [arg for k, v in self.env.items() for arg in ("-e", f"{k}={v}")]
        proc = await asyncio.create_subprocess_exec(
            "docker", "exec", *env_args, self.name, "sh", "-c", script,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        return subprocess.CompletedProcess(script, proc.returncode or 0, out.decode(), err.decode())

    def remove(self) -> None:
        docker("rm", "-f", "-v", self.name, check=False)


async def setup_addon(
    stack: Stack, kind: str, plan: str = "starter"
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    c = stack.controller
    assert c is not None
    project = await create_project(c, plan)
    a = await create_addon(c, project["id"], f"{kind[:2]}-{uuid.uuid4().hex[:4]}", kind)
    await wait_phase(c, project["id"], a["id"], "ready")
    status, env = await c.api("GET", f"/v1/projects/{project['id']}/env")
    assert status == 200
    return project, a, env["env"]


def db_state(addon_id: str) -> str:
    return str(container_state(f"orkestr-{addon_id}-db").get("Status", "missing"))


async def wait_db(addon_id: str, status: str, timeout: float = 30) -> None:
    await wait_for(lambda: db_state(addon_id) == status, timeout, f"db {status}", interval=0.1)


@pytest.fixture
async def pg(
    stack: Stack, agent: AgentProcess
) -> AsyncIterator[tuple[dict[str, Any], dict[str, Any], Client]]:
    project, a, env = await setup_addon(stack, "postgres")
    client = Client(agent.host, project["id"], env)
    try:
        yield project, a, client
    finally:
        client.remove()


async def test_sleeps_when_idle_but_not_while_a_client_is_connected(stack: Stack, pg: Any) -> None:
    c = stack.controller
    assert c is not None
    project, a, client = pg
    # A client holds a connection open well past both timeouts: the add-on stays awake.
    held = asyncio.create_task(client.sh('psql "$DATABASE_URL" -c "select pg_sleep(8)"'))
    await asyncio.sleep(DEEP_S + 1.5)
    assert db_state(a["id"]) == "running"
    view = await addon(c, project["id"], a["id"])
    assert view["sleep_state"] == "awake"
    assert any(x["source"].startswith(client.ip + ":") for x in view["clients"]), view["clients"]
    assert (await held).returncode == 0

    # Idle now. Readiness probes keep running every resync, and must not keep it awake.
    await wait_db(a["id"], "paused", timeout=LIGHT_S + 6)
    await wait_db(a["id"], "exited", timeout=DEEP_S + 6)
    await wait_phase(c, project["id"], a["id"], "sleeping")

    async def deep_after_two_sleeps() -> dict[str, Any] | None:
        view = await addon(c, project["id"], a["id"])
        return view if view["sleep_state"] == "deep" and view["sleeps"] >= 2 else None

    view = await wait_for(deep_after_two_sleeps, 10, "status: deep sleep, two sleeps counted")
    assert any(x["type"] == "Sleeping" and x["status"] == "True" for x in view["conditions"])


async def test_an_idle_addon_falls_asleep_at_its_setting(agent: AgentProcess, pg: Any) -> None:
    """A pass is scheduled at the sleep deadline (plan.next_sleep_deadline): the sleep does
    not wait for a sleep tick and then a pass something else caused."""
    _project, a, _client = pg
    await wait_db(a["id"], "paused", timeout=LIGHT_S + 6)
    line = next(
        x for x in agent.log_tail(2000).splitlines()
        if f"addon.sleep addon={a['id']} stage=light" in x
    )  # fmt: skip
    idle_s = float(line.rsplit("idle_s=", 1)[1].split()[0])
    # Measured from the last activity the meter saw: the setting plus one pass.
    assert LIGHT_S <= idle_s <= LIGHT_S + 1.0, line


async def test_psql_wakes_it_from_light_and_deep_sleep_and_data_survives_20_cycles(
    stack: Stack, agent: AgentProcess
) -> None:
    project, a, env = await setup_addon(stack, "postgres", plan="quick")
    client = Client(agent.host, project["id"], env)
    try:
        r = await client.sh('psql "$DATABASE_URL" -qc "create table cycles(n int)"')
        assert r.returncode == 0, r.stderr
        for n in range(20):
            stage = "paused" if n % 2 == 0 else "exited"
            await wait_db(a["id"], stage, timeout=QUICK_DEEP_S + 8)
            # The client's own first command succeeds: no retry, no error.
            r = await client.sh(
                f'psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -qtAc "insert into cycles values ({n}); select count(*) from cycles"'
            )
            assert r.returncode == 0, (n, stage, r.stderr)
            assert r.stdout.strip() == str(n + 1), (n, stage, r.stdout)
            assert db_state(a["id"]) == "running"
    finally:
        client.remove()


async def test_a_job_wakes_the_addon_and_its_first_command_succeeds(stack: Stack, pg: Any) -> None:
    c = stack.controller
    assert c is not None
    project, a, _client = pg
    await wait_db(a["id"], "exited", timeout=DEEP_S + 8)
    job = await run_job(
        c, project["id"], 'psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -tAc "select 40 + 2"'
    )
    assert job["exit_code"] == 0 and job["output"].strip() == "42", job
    view = await addon(c, project["id"], a["id"])
    assert view["wakes"] >= 1 and view["last_wake_ms"], view


async def test_a_rotation_while_it_sleeps_reaches_the_database_before_a_client_needs_it(
    stack: Stack, pg: Any
) -> None:
    # The database learns a new password from the agent, awake. Asleep it learned it only
    # once a client woke it, and that client, holding the new password, was refused.
    c = stack.controller
    assert c is not None
    project, a, _client = pg
    await wait_db(a["id"], "exited", timeout=DEEP_S + 8)
    base = f"/v1/projects/{project['id']}/addons/{a['id']}"
    status, body = await c.api("POST", f"{base}/rotate-credentials")
    assert status == 202 and body["secret_version"] == 2, body
    # Woken for it, and asleep again afterwards on its own idle timer.
    await wait_db(a["id"], "running", timeout=30)
    await wait_db(a["id"], "exited", timeout=DEEP_S + 30)
    job = await run_job(
        c, project["id"], 'psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -tAc "select session_user"'
    )
    assert job["exit_code"] == 0 and job["output"].strip() == "app_rot", job


async def test_twenty_clients_connecting_during_one_wake_all_succeed(pg: Any) -> None:
    _project, a, client = pg
    await wait_db(a["id"], "exited", timeout=DEEP_S + 8)
    script = (
        'for i in $(seq 20); do (psql "$DATABASE_URL" -tAc "select 40 + 2" > /tmp/out.$i 2>&1; '
        "echo $? >> /tmp/codes) & done; wait; sort /tmp/codes | uniq -c; cat /tmp/out.*"
    )
    r = await client.sh(script)
    assert "20 0" in r.stdout, r.stdout
    assert r.stdout.count("42") == 20, r.stdout


async def test_redis_cli_wakes_redis_from_both_stages(stack: Stack, agent: AgentProcess) -> None:
    project, a, env = await setup_addon(stack, "redis")
    client = Client(agent.host, project["id"], env)
    try:
        r = await client.sh('redis-cli --no-auth-warning -u "$REDIS_URL" set k v1')
        assert r.stdout.strip() == "OK", r
        await wait_db(a["id"], "paused", timeout=LIGHT_S + 6)
        r = await client.sh('redis-cli --no-auth-warning -u "$REDIS_URL" get k')
        assert r.stdout.strip() == "v1", r
        await wait_db(a["id"], "exited", timeout=DEEP_S + 8)
        r = await client.sh('redis-cli --no-auth-warning -u "$REDIS_URL" get k')
        assert r.stdout.strip() == "v1", r
    finally:
        client.remove()


async def test_team_addon_never_sleeps(stack: Stack, agent: AgentProcess) -> None:
    c = stack.controller
    assert c is not None
    project, a, _env = await setup_addon(stack, "postgres", plan="team")
    await asyncio.sleep(DEEP_S + 3)
    assert db_state(a["id"]) == "running"
    view = await addon(c, project["id"], a["id"])
    assert view["sleep_state"] == "awake" and view["sleeps"] == 0
    assert any(x["type"] == "Sleeping" and x["reason"] == "Disabled" for x in view["conditions"])


async def test_a_plan_that_stops_allowing_sleep_wakes_it_through_its_worker(
    stack: Stack, agent: AgentProcess, pg: Any
) -> None:
    c = stack.controller
    assert c is not None
    project, a, client = pg
    await wait_db(a["id"], "exited", timeout=DEEP_S + 8)
    status, body = await c.api("PATCH", f"/v1/projects/{project['id']}", {"plan": "team"})
    assert status == 200 and body["plan"] == "team", body
    # Woken by the planner, on the add-on's worker (the wake's log names why), not beside it.
    await wait_for(
        lambda: (
            f"addon.wake addon={a['id']} stage=deep reason=sleep disabled by the plan"
            in agent.log_tail(400)
        ),
        60,
        "the wake for the plan change",
    )
    # Logged once the action returns, a moment after the wake's own line (a loaded
    # machine lost that race).
    await wait_for(
        lambda: f"action.done action=WakeAddon key={a['id']}" in agent.log_tail(400),
        30,
        "the planned WakeAddon done",
    )
    await wait_db(a["id"], "running")
    await wait_phase(c, project["id"], a["id"], "ready")
    # It stays awake past both timeouts, and a client reaches the database itself: the
    # deep-sleep redirect went with the wake (a redirect left to a closed listener would
    # refuse every client).
    await more_passes(agent, 2)
    await asyncio.sleep(DEEP_S + 1)
    assert db_state(a["id"]) == "running"
    r = await client.sh('psql "$DATABASE_URL" -tAc "select 6 * 7"')
    assert r.returncode == 0 and r.stdout.strip() == "42", r
    view = await addon(c, project["id"], a["id"])
    assert view["sleep_state"] == "awake", view
    assert any(x["type"] == "Sleeping" and x["reason"] == "Disabled" for x in view["conditions"])


async def test_wake_listener_answers_only_what_the_redirect_sends_it(pg: Any) -> None:
    """Dialled directly (awake or asleep) the listener's port is dropped: no relay, no wake."""
    _project, a, client = pg
    direct = (
        f'if timeout 2 bash -c "echo > /dev/tcp/{a["name"]}/15432" 2>/dev/null; '
        "then echo REACHED; else echo BLOCKED; fi"
    )
    assert (await client.sh('psql "$DATABASE_URL" -tAc "select 1"')).returncode == 0
    r = await client.sh(direct)
    assert r.stdout.strip() == "BLOCKED", ("awake", r.stdout)
    await wait_db(a["id"], "paused", timeout=LIGHT_S + 6)
    r = await client.sh(direct)
    assert r.stdout.strip() == "BLOCKED", ("paused", r.stdout)
    assert db_state(a["id"]) == "paused"  # and the attempt did not wake it
    r = await client.sh('psql "$DATABASE_URL" -tAc "select 40 + 2"')
    assert r.stdout.strip() == "42", r


async def test_other_project_cannot_reach_addon_or_wake_listener_in_any_state(
    stack: Stack, agent: AgentProcess, pg: Any
) -> None:
    c = stack.controller
    assert c is not None
    project, a, client = pg
    other_project, _b, other_env = await setup_addon(stack, "redis")
    outsider = Client(agent.host, other_project["id"], other_env)
    ip = json.loads(docker("inspect", f"orkestr-{a['id']}-net"))[0]["NetworkSettings"]["Networks"][
        f"orkestr-{project['id']}"
    ]["IPAddress"]
    name = a["name"]
    # The three targets are tried at once, so a probe takes ~1 s and fits in each stage.
    probe = (
        f"for target in {name}:5432 {ip}:5432 {ip}:15432; do "
        '(if timeout 1 bash -c "echo > /dev/tcp/${target%:*}/${target#*:}" 2>/dev/null; '
        "then echo REACHED-$target; else echo BLOCKED-$target; fi) & done; wait"
    )
    try:
        for state in ("running", "paused", "exited"):
            if state == "running":
                # Its own project's client wakes it (it may have dozed off during set-up).
                assert (await client.sh('psql "$DATABASE_URL" -tAc "select 1"')).returncode == 0
            else:
                await wait_db(a["id"], state, timeout=DEEP_S + 8)
            wakes = (await addon(c, project["id"], a["id"]))["wakes"]
            r = await outsider.sh(probe)
            assert "REACHED" not in r.stdout, (state, r.stdout)
            assert r.stdout.count("BLOCKED") == 3, (state, r.stdout)
            if state != "running":
                # The outsider's attempts must not have woken it (it may sleep deeper).
                assert db_state(a["id"]) != "running"
                # A status sent after the probe, so a wake would be counted.
                await wait_status_after(c, agent.host, datetime.now(UTC))
                assert (await addon(c, project["id"], a["id"]))["wakes"] == wakes
        # From its own project the wake listener answers (and wakes it).
        r = await client.sh('psql "$DATABASE_URL" -tAc "select 1"')
        assert r.returncode == 0, r
        assert db_state(a["id"]) == "running"
    finally:
        outsider.remove()


@pytest.mark.own_agent
async def test_waking_works_with_broker_and_controller_down(stack: Stack, pg: Any) -> None:
    c = stack.controller
    assert c is not None
    _project, a, client = pg
    await stack.mosquitto.stop()
    await c.stop()
    try:
        await wait_db(a["id"], "exited", timeout=DEEP_S + 8)
        r = await client.sh('psql "$DATABASE_URL" -tAc "select 7 * 6"')
        assert r.returncode == 0 and r.stdout.strip() == "42", r
    finally:
        await stack.mosquitto.start()
        await c.start()


@pytest.mark.own_agent
@pytest.mark.parametrize("how", ["sigterm", "kill9", "keeper_restarted_first", "light_kill9"])
async def test_clients_connecting_while_the_agent_is_down_are_served_when_it_returns(
    agent: AgentProcess, pg: Any, how: str
) -> None:
    _project, a, client = pg
    # Light: the client queues at the paused database itself (no listener involved).
    await wait_db(a["id"], "paused" if how == "light_kill9" else "exited", timeout=DEEP_S + 8)
    if how == "keeper_restarted_first":
        await agent.restart_keeper()  # empty now: the running agent must refill it
        await more_passes(agent, 2)  # each pass puts the listeners back
    await (agent.stop() if how == "sigterm" else agent.kill9())
    # The keeper still holds the wake listener: the client's connection is queued, not refused.
    waiting = asyncio.create_task(client.sh('psql "$DATABASE_URL" -tAc "select 6 * 7"'))
    await asyncio.sleep(3)
    assert not waiting.done(), await waiting
    await agent.start()
    r = await asyncio.wait_for(waiting, 60)
    assert r.returncode == 0 and r.stdout.strip() == "42", r


@pytest.mark.own_agent
async def test_restarted_agent_keeps_sleeping_addon_asleep_and_wakes_it(
    agent: AgentProcess, pg: Any
) -> None:
    _project, a, client = pg
    await wait_db(a["id"], "exited", timeout=DEEP_S + 8)
    await agent.kill9()
    await agent.start()
    await wait_passes(agent, 2)  # the new agent's first passes must not start the sleeping db
    assert db_state(a["id"]) == "exited"
    r = await client.sh('psql "$DATABASE_URL" -tAc "select 6 * 7"')
    assert r.returncode == 0 and r.stdout.strip() == "42", r
    assert db_state(a["id"]) == "running"


@pytest.mark.own_agent
async def test_a_wake_cut_short_by_a_crash_is_resolved_by_the_restarted_agent(
    stack: Stack, agent: AgentProcess, pg: Any
) -> None:
    project, a, client = pg
    assert stack.controller is not None
    await wait_db(a["id"], "exited", timeout=DEEP_S + 8)
    await agent.kill9()
    # What a wake killed after starting the database leaves: recorded asleep, yet running.
    docker("start", f"orkestr-{a['id']}-db")
    await agent.start()
    # Not reported asleep while it runs: ready, then asleep again on its own idle timer.
    await wait_phase(stack.controller, project["id"], a["id"], "ready", timeout=30)
    await wait_db(a["id"], "exited", timeout=DEEP_S + 20)
    r = await client.sh('psql "$DATABASE_URL" -tAc "select 6 * 7"')
    assert r.returncode == 0 and r.stdout.strip() == "42", r


def _agent_metric(agent: AgentProcess, name: str) -> float:
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{agent.metrics_port}/metrics",
        headers={"Authorization": f"Bearer {agent.metrics_token}"},
    )
    with urllib.request.urlopen(request, timeout=5) as f:  # loopback only
        text = f.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


@pytest.mark.own_agent  # one with other settings: runs with the module's own-agent tests
async def test_a_flood_at_one_wake_listener_leaves_the_agent_serving_other_wakes(
    stack: Stack, shared_agent: SharedAgent
) -> None:
    # A small per-add-on cap, so the connections that reach the listener while the add-on
    # starts (its deep wake takes ~100 ms) always exceed it, however loaded the machine is.
    cap = 8
    extra = f'wake_relays_per_addon = {cap}\ndeep_wake = "relay"'  # the relay's own caps
    await shared_agent.close()  # the only agent online: the projects are placed on this one
    async with running_agent(stack, agent_extra=extra) as agent:
        await _flood(stack, agent, cap)


async def _flood(stack: Stack, agent: AgentProcess, cap: int) -> None:
    p_flood, a_flood, env_flood = await setup_addon(stack, "redis")
    p_calm, a_calm, env_calm = await setup_addon(stack, "redis")
    attacker = Client(agent.host, p_flood["id"], env_flood)
    neighbour = Client(agent.host, p_calm["id"], env_calm)
    assert agent.proc is not None
    try:
        await wait_db(a_flood["id"], "exited", timeout=DEEP_S + 8)
        # 2,000 connections at once at the sleeping add-on, held open: four loops of 500.
        flood = (
            "for n in 1 2 3 4; do bash -c 'for i in $(seq 500); do "
            f"exec {{fd}}<>/dev/tcp/{a_flood['name']}/6379 || true; done; sleep 40' & done; "
            "sleep 1; echo started"
        )
        docker("exec", "-d", attacker.name, "sh", "-c", flood)
        await wait_for(
            lambda: _agent_metric(agent, "orkestr_agent_wake_relays_refused_total") > 0,
            30, "relays over the cap refused",
        )  # fmt: skip
        fds = len(list((__import__("pathlib").Path(f"/proc/{agent.proc.pid}/fd")).iterdir()))
        assert _agent_metric(agent, "orkestr_agent_wake_relays ") <= cap, "per add-on cap"
        assert fds < 2 * cap + 200, f"the agent holds {fds} descriptors"
        # The neighbour wakes and answers while the flood holds its connections.
        await wait_for(
            lambda: db_state(a_calm["id"]) in ("paused", "exited"), DEEP_S + 8, "neighbour asleep"
        )
        r = await neighbour.sh('redis-cli --no-auth-warning -u "$REDIS_URL" ping', timeout=20)
        assert r.stdout.strip() == "PONG", r
        print(
            "flood: refused", _agent_metric(agent, "orkestr_agent_wake_relays_refused_total"),
            "relayed", _agent_metric(agent, "orkestr_agent_wake_relays "), "agent fds", fds,
        )  # fmt: skip
    finally:
        attacker.remove()
        neighbour.remove()


async def test_a_client_connecting_in_light_sleep_talks_to_the_database_itself(
    stack: Stack, agent: AgentProcess, pg: Any
) -> None:
    """No redirect, no relay: the paused database's own socket took the connection."""
    c = stack.controller
    assert c is not None
    project, a, client = pg
    await wait_db(a["id"], "paused", timeout=LIGHT_S + 6)
    syns = _agent_metric(agent, "orkestr_agent_wake_syns_total")
    light_wakes = _agent_metric(agent, 'orkestr_agent_addon_wakes_total{stage="light"}')
    held = asyncio.create_task(
        client.sh(
            'psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -tA '
            '-c "select host(inet_client_addr())" -c "select pg_sleep(6)"'
        )
    )

    async def listed_direct() -> dict[str, Any] | None:
        view = await addon(c, project["id"], a["id"])
        mine = [x for x in view["clients"] if x["source"].startswith(client.ip + ":")]
        return view if mine and all(x["via"] == "direct" for x in mine) else None

    # While it is open the meter counts it (so the add-on stays awake) as a direct client.
    view = await wait_for(listed_direct, 5, "the client listed, via direct")
    assert view["sleep_state"] == "awake"
    assert _agent_metric(agent, "orkestr_agent_wake_relays ") == 0
    r = await held
    assert r.returncode == 0, r.stderr
    # The database saw the client's own address (a relayed one comes from the gateway).
    assert r.stdout.split()[0] == client.ip, r.stdout
    assert _agent_metric(agent, "orkestr_agent_wake_syns_total") > syns
    assert _agent_metric(agent, 'orkestr_agent_addon_wakes_total{stage="light"}') > light_wakes


async def test_a_syn_flood_in_light_sleep_is_rate_limited_and_a_neighbour_still_wakes(
    stack: Stack, agent: AgentProcess
) -> None:
    p_flood, a_flood, env_flood = await setup_addon(stack, "redis")
    p_calm, a_calm, env_calm = await setup_addon(stack, "redis")
    attacker = Client(agent.host, p_flood["id"], env_flood)
    neighbour = Client(agent.host, p_calm["id"], env_calm)
    assert agent.proc is not None
    flood: list[socket.socket] = []
    try:
        # Both awake now, so both are in light sleep together (deep follows DEEP_S later).
        ping = 'redis-cli --no-auth-warning -u "$REDIS_URL" ping'
        await asyncio.gather(attacker.sh(ping), neighbour.sh(ping))
        await wait_db(a_flood["id"], "paused", timeout=LIGHT_S + 6)
        await wait_db(a_calm["id"], "paused", timeout=LIGHT_S + 6)
        syns = _agent_metric(agent, "orkestr_agent_wake_syns_total")
        started = asyncio.get_running_loop().time()
        # 2,000 connection attempts, as fast as the machine allows, at the paused add-on.
        ip = json.loads(docker("inspect", f"orkestr-{a_flood['id']}-net"))[0]["NetworkSettings"][
            "Networks"
        ][f"orkestr-{p_flood['id']}"]["IPAddress"]
        # Non-blocking connects from inside the attacker's own namespace: the SYNs leave at
        # once (a shell loop in the container manages only a few a second on a busy host).
        attacker_pid = json.loads(docker("inspect", attacker.name))[0]["State"]["Pid"]

        def open_flood() -> list[socket.socket]:
            socks = []
            for _ in range(2000):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect_ex((ip, 6379))
                socks.append(s)
            return socks

        flood += await netns.in_namespace(attacker_pid, open_flood)
        await wait_db(a_flood["id"], "running", timeout=15)
        # The neighbour wakes and answers meanwhile.
        pong = await neighbour.sh(ping, timeout=30)
        assert pong.stdout.strip() == "PONG", pong
        await asyncio.sleep(2)
        elapsed = asyncio.get_running_loop().time() - started
        seen = _agent_metric(agent, "orkestr_agent_wake_syns_total") - syns
        # Two add-ons' rules, each at most its burst plus its rate over the window.
        bound = 2 * (synwatch.BURST + synwatch.RATE_PER_S * elapsed)
        assert 1 <= seen <= bound, (seen, bound, elapsed)
        assert _agent_metric(agent, "orkestr_agent_wake_relays ") == 0
        fds = len(list((__import__("pathlib").Path(f"/proc/{agent.proc.pid}/fd")).iterdir()))
        assert fds < 200, f"the agent holds {fds} descriptors"
        established = sum(1 for x in netns.tcp_table(attacker_pid) if x.state == netns.ESTABLISHED)
        print("syn flood: 2000 SYNs,", established, "connected;", seen, "seen in", elapsed, "s")
    finally:
        for sock in flood:
            sock.close()
        attacker.remove()
        neighbour.remove()


async def test_a_paused_addon_is_deleted_with_a_clean_shutdown(stack: Stack, pg: Any) -> None:
    """Docker refuses to stop a paused container: the agent unpauses it, then stops it."""
    c = stack.controller
    assert c is not None
    project, a, client = pg
    await wait_db(a["id"], "paused", timeout=LIGHT_S + 6)
    since = str(int(datetime.now(UTC).timestamp()) - 1)
    status, body = await c.api("DELETE", f"/v1/projects/{project['id']}/addons/{a['id']}")
    assert status == 202, body
    await wait_db(a["id"], "missing", timeout=60)
    until = str(int(datetime.now(UTC).timestamp()) + 1)
    events = docker(
        "events", "--since", since, "--until", until,
        "--filter", f"container=orkestr-{a['id']}-db",
        "--format", "{{.Status}} {{index .Actor.Attributes \"exitCode\"}}",
    ).split("\n")  # fmt: skip
    statuses = [e.split()[0] for e in events if e.strip()]
    assert "unpause" in statuses and "destroy" in statuses, events
    assert statuses.index("unpause") < statuses.index("die"), events
    assert "die 0" in events, events  # shut down by its own stop signal, not killed
    client.remove()


async def test_a_sleeping_addon_goes_to_its_home_cores_while_it_sleeps(
    agent: AgentProcess, pg: Any
) -> None:
    """Placement is over all add-ons, so one created later can give a sleeping add-on other
    cores. The move is made while it sleeps (Docker updates a paused container), not by the
    first upkeep round after its wake, in the first seconds of the clients that woke it."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nothing is placed")
    _project, a, _client = pg
    db = f"orkestr-{a['id']}-db"

    def cores() -> str:
        return str(json.loads(docker("inspect", db))[0]["HostConfig"]["CpusetCpus"] or "")

    home = await wait_for(cores, 30, "home cores set")
    await wait_db(a["id"], "paused", timeout=LIGHT_S + 6)
    # Another core, as if the placement had moved while it slept.
    other = str(min(set(os.sched_getaffinity(0)) - {int(c) for c in home.split("-")[0:1]}))
    line = f"upkeep.limits_updated addon={a['id']} cores={home} asleep=yes"
    moves = agent.log_path.read_text(errors="replace").count(line)
    docker("update", "--cpuset-cpus", other, db)  # (the agent may move it back at once)
    await wait_for(lambda: cores() == home, 10, f"back on its home cores {home}")
    assert db_state(a["id"]) == "paused"  # moved asleep, not woken for it
    await wait_for(
        lambda: agent.log_path.read_text(errors="replace").count(line) > moves, 5, "the move logged"
    )


async def test_a_plan_change_reaches_a_deep_sleeping_redis_before_its_wake(
    stack: Stack, agent: AgentProcess
) -> None:
    """A deep wake starts Redis on its redis.conf: a quota changed while it was stopped must
    be in that file already, not only after the first upkeep round of the wake."""
    c = stack.controller
    assert c is not None
    project, a, env = await setup_addon(stack, "redis")
    secrets = SecretStore(agent.state_dir / "secrets")
    assert secrets.redis_maxmemory(a["id"]) == quota_bytes("redis", None, 256)
    await wait_db(a["id"], "exited", timeout=DEEP_S + 10)
    status, body = await c.api("PATCH", f"/v1/projects/{project['id']}", {"plan": "pro"})
    assert status == 200, body
    want = quota_bytes("redis", None, 320)
    await wait_for(
        lambda: secrets.redis_maxmemory(a["id"]) == want, 30, "the new quota in redis.conf"
    )
    assert db_state(a["id"]) == "exited"  # written while it sleeps: nothing woke it
    client = Client(agent.host, project["id"], env)
    try:
        # The wake, and the quota the woken server holds.
        woke = await client.sh('redis-cli -u "$REDIS_URL" --no-auth-warning ping')
        assert woke.stdout.strip() == "PONG", woke
        admin = aioredis.Redis(
            host=json.loads(docker("inspect", f"orkestr-{a['id']}-net"))[0]["NetworkSettings"][
                "Networks"
            ][f"orkestr-{project['id']}"]["IPAddress"],
            username=ADMIN_USER,
            password=secrets.admin_password(a["id"]),
        )
        try:
            config = await admin.config_get("maxmemory")
        finally:
            await admin.aclose()
        assert config == {"maxmemory": str(want)}, config
    finally:
        client.remove()
