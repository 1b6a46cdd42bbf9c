"""The user story end to end: a real controller, a real agent, real dockerd and mosquitto.

Controller and agent run as separate processes, the way a user runs them. These tests use
the Team plan (its add-ons never sleep); tests/test_sleep.py covers sleeping.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import topics
from schemas.signed import Signer
from tests.agent_fixtures import (
    AgentProcess,
    Stack,
    addon,
    agent_metric,
    container_state,
    create_addon,
    create_project,
    docker,
    more_passes,
    run_job,
    wait_for,
    wait_passes,
    wait_phase,
)
from tests.services import unsigned

pytest_plugins = ["tests.agent_fixtures"]
# One agent for the module; a fresh one for a test marked `own_agent` (tests/agent_fixtures.py).
pytestmark = pytest.mark.shared_agent


def inspect(name: str) -> dict:  # type: ignore[type-arg]
    return json.loads(docker("inspect", name))[0]  # type: ignore[no-any-return]


def db(addon_id: str) -> str:
    return f"orkestr-{addon_id}-db"


def holder(addon_id: str) -> str:
    return f"orkestr-{addon_id}-net"


def cpu_stat(container_id: str) -> dict[str, int]:
    """The container's CFS counters, from its cgroup (v1 cgroupfs, v2 cgroupfs or systemd)."""
    for path in (
        Path(f"/sys/fs/cgroup/cpu/docker/{container_id}/cpu.stat"),
        Path(f"/sys/fs/cgroup/docker/{container_id}/cpu.stat"),
        Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat"),
    ):
        if path.exists():
            return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}
    raise AssertionError(f"no cgroup found for container {container_id}")


async def test_user_story_postgres_and_redis(stack: Stack, agent: AgentProcess) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    assert project["host"] == agent.host
    pg = await create_addon(c, project["id"], "orders-db", "postgres")
    rd = await create_addon(c, project["id"], "cache", "redis")
    await wait_phase(c, project["id"], pg["id"], "ready")
    ready = await wait_phase(c, project["id"], rd["id"], "ready")
    assert any(
        x["type"] == "Ready" and x["reason"] == "ClientConnected" for x in ready["conditions"]
    )

    status, env = await c.api("GET", f"/v1/projects/{project['id']}/env")
    assert status == 200
    assert set(env["env"]) == {"DATABASE_URL", "ORDERS_DB_URL", "REDIS_URL", "CACHE_URL"}
    assert "@orders-db:5432/" in env["env"]["DATABASE_URL"]

    job = await run_job(
        c,
        project["id"],
        'psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -qc "create table t(x int); insert into t values (42)" '
        '&& psql "$ORDERS_DB_URL" -tAc "select x from t" '
        '&& redis-cli -u "$REDIS_URL" set greeting hello && redis-cli -u "$CACHE_URL" get greeting',
    )
    assert job["state"] == "succeeded", job
    assert job["exit_code"] == 0
    assert "42" in job["output"] and "hello" in job["output"]
    # The job container is gone once its result is recorded.
    assert docker("ps", "-aq", "--filter", f"label=orkestr.job={job['id']}") == ""

    # Plan sizing, labels, no published port, no password in the environment or arguments.
    info = inspect(db(pg["id"]))
    assert info["HostConfig"]["Memory"] == 512 * 1024 * 1024
    assert info["HostConfig"]["NanoCpus"] == 1_000_000_000
    assert info["HostConfig"]["NetworkMode"].startswith("container:")
    assert info["Config"]["Labels"]["orkestr.spec-hash"]
    # The holder's tenth of a CPU never held its start back (a 100 ms period did, 45-90 ms
    # of every create: runc's init in the holder's cgroup takes ~25 ms of CPU).
    for name in (holder(pg["id"]), holder(rd["id"])):
        hinfo = inspect(name)
        hc = hinfo["HostConfig"]
        assert (hc["CpuQuota"], hc["CpuPeriod"], hc["NanoCpus"]) == (100_000, 1_000_000, 0)
        assert cpu_stat(hinfo["Id"])["nr_throttled"] == 0, name
    password = env["env"]["DATABASE_URL"].split(":")[2].split("@")[0]
    assert password not in json.dumps(info["Config"]["Env"]) + json.dumps(info["Args"])
    for name in (db(pg["id"]), holder(pg["id"]), db(rd["id"]), holder(rd["id"])):
        ports = inspect(name)["NetworkSettings"]["Ports"] or {}
        assert all(not bindings for bindings in ports.values()), f"{name} publishes {ports}"
        assert not inspect(name)["HostConfig"]["PortBindings"], f"{name} binds a host port"
    rinfo = inspect(db(rd["id"]))
    assert password not in json.dumps(rinfo["Args"]) and password not in json.dumps(rinfo["Config"])

    # Nor in the retained desired state, which the broker writes to disk.
    peer = await stack.mosquitto.identity("peer.e2e", "peer")
    async with stack.mosquitto.client(peer) as client:
        await client.subscribe(topics.desired(agent.host), qos=1)
        message = await asyncio.wait_for(anext(aiter(client.messages)), 10)
        assert password.encode() not in bytes(message.payload)
        # The state itself travels base64-encoded inside the signed envelope.
        assert password.encode() not in unsigned(bytes(message.payload))

    # Deleting removes the containers and, because the add-on was deleted, its volume.
    status, _ = await c.api("DELETE", f"/v1/projects/{project['id']}/addons/{rd['id']}")
    assert status == 202

    async def gone() -> bool:
        s, _ = await c.api("GET", f"/v1/projects/{project['id']}/addons/{rd['id']}")
        return s == 404

    await wait_for(gone, 60, "deleted add-on purged")
    assert container_state(db(rd["id"])) == {}
    assert docker("volume", "ls", "-q", "--filter", f"name=orkestr-{rd['id']}-data") == ""
    assert container_state(db(pg["id"]))["Running"]


async def test_other_project_cannot_reach_addon_by_name_or_ip(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    a = await create_project(c, "team")
    b = await create_project(c, "team")
    pg = await create_addon(c, a["id"], "shared-db", "postgres")
    await wait_phase(c, a["id"], pg["id"], "ready")
    ip = inspect(holder(pg["id"]))["NetworkSettings"]["Networks"][f"orkestr-{a['id']}"]["IPAddress"]
    # Both targets at once: from b each costs its 3 s timeout (the lines are short, so
    # they reach the output whole).
    probe = (
        f"for target in shared-db {ip}; do "
        '(if timeout 3 bash -c "echo > /dev/tcp/$target/5432" 2>/dev/null; '
        "then echo REACHED-$target; else echo BLOCKED-$target; fi) & done; wait"
    )
    same, other = await asyncio.gather(run_job(c, a["id"], probe), run_job(c, b["id"], probe))
    assert "REACHED-shared-db" in same["output"] and f"REACHED-{ip}" in same["output"], same
    assert "BLOCKED-shared-db" in other["output"], other
    assert f"BLOCKED-{ip}" in other["output"], other


@pytest.mark.own_agent
async def test_agent_kill9_adopts_and_hand_removed_container_is_recreated(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    pg = await create_addon(c, project["id"], "keep-db", "postgres")
    await wait_phase(c, project["id"], pg["id"], "ready")
    job = await run_job(
        c,
        project["id"],
        'psql "$DATABASE_URL" -qc "create table k(v text); insert into k values (\'kept\')"',
    )
    assert job["exit_code"] == 0, job
    before = {n: inspect(n)["Id"] for n in (db(pg["id"]), holder(pg["id"]))}

    await agent.kill9()
    await agent.start()
    await wait_passes(agent, 3)  # a few full passes of the restarted agent
    after = {n: inspect(n)["Id"] for n in (db(pg["id"]), holder(pg["id"]))}
    assert after == before, "a restarted agent recreated containers"
    await wait_phase(c, project["id"], pg["id"], "ready")

    docker("rm", "-f", db(pg["id"]))
    await wait_for(lambda: container_state(db(pg["id"])).get("Running"), 60, "database recreated")
    assert inspect(db(pg["id"]))["Id"] != before[db(pg["id"])]
    await wait_phase(c, project["id"], pg["id"], "ready")
    job = await run_job(c, project["id"], 'psql "$DATABASE_URL" -tAc "select v from k"')
    assert "kept" in job["output"], job


@pytest.mark.own_agent
async def test_broker_outage_keeps_addons_running_and_converges(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    first = await create_addon(c, project["id"], "first-db", "postgres")
    await wait_phase(c, project["id"], first["id"], "ready")
    started = inspect(db(first["id"]))["State"]["StartedAt"]

    await stack.mosquitto.stop()
    # The API keeps working; the change waits for the broker.
    second = await create_addon(c, project["id"], "second", "redis")
    await more_passes(agent, 2)  # the agent keeps reconciling, with what it has
    assert inspect(db(first["id"]))["State"]["StartedAt"] == started
    assert container_state(db(first["id"]))["Running"]
    assert container_state(db(second["id"])) == {}

    await stack.mosquitto.start()
    await wait_phase(c, project["id"], second["id"], "ready", timeout=120)
    assert inspect(db(first["id"]))["State"]["StartedAt"] == started


junk = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=4).map(
        lambda d: json.dumps(d).encode()
    ),
    st.integers(2, 99).map(
        lambda v: json.dumps({"version": v, "host": "x", "generation": 1}).encode()
    ),
    st.just(b"{" * 10 + b" " * (1024 * 1024 + 1)),
)


@pytest.mark.own_agent
async def test_bad_desired_state_is_rejected_and_changes_nothing(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    pg = await create_addon(c, project["id"], "steady", "postgres")
    await wait_phase(c, project["id"], pg["id"], "ready")
    container_id = inspect(db(pg["id"]))["Id"]
    # The counter an alert watches exists at zero before the first rejection.
    assert (
        await agent_metric(agent, 'orkestr_agent_desired_rejected_total{reason="StaleGeneration"}')
        == 0
    )
    payloads: list[bytes] = []

    @settings(max_examples=15, suppress_health_check=list(HealthCheck), deadline=None)
    @given(junk)
    def collect(payload: bytes) -> None:
        payloads.append(payload)

    collect()
    # A peer that may write every topic: a broken broker or a stolen credential.
    peer = await stack.mosquitto.identity("peer.junk", "peer")
    async with stack.mosquitto.client(peer) as client:
        for payload in payloads:
            await client.publish(topics.desired(agent.host), payload, qos=1)
    # An older generation is refused too, even signed with the controller's key.
    stale = json.dumps({"version": 1, "host": agent.host, "generation": 1, "projects": []}).encode()
    async with stack.mosquitto.client(peer) as client:
        sealed = Signer(c.signing_key).seal(stale)
        await client.publish(topics.desired(agent.host), sealed, qos=1)
        await client.subscribe(topics.status(agent.host), qos=1)

        async def rejected() -> dict | None:  # type: ignore[type-arg]
            message = await asyncio.wait_for(anext(aiter(client.messages)), 10)
            status = json.loads(bytes(message.payload))
            cond = next(x for x in status["conditions"] if x["type"] == "DesiredStateAccepted")
            return cond if cond["reason"] == "StaleGeneration" else None

        cond = await wait_for(rejected, 30, "StaleGeneration condition")
        assert "older" in cond["message"]
    assert agent.proc is not None and agent.proc.returncode is None, "agent crashed"
    assert inspect(db(pg["id"]))["Id"] == container_id
    assert container_state(db(pg["id"]))["Running"]
    view = await addon(c, project["id"], pg["id"])
    assert view["phase"] == "ready"
    assert "desired.rejected" in agent.log_tail(400)
    series = 'orkestr_agent_desired_rejected_total{reason="StaleGeneration"}'
    assert (await agent_metric(agent, series) or 0) >= 1


async def test_holder_restarted_in_place_gets_its_database_back(
    stack: Stack, agent: AgentProcess
) -> None:
    """`docker restart` of a holder keeps its id but not its namespace: the db is cut off."""
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    pg = await create_addon(c, project["id"], "split-db", "postgres")
    await wait_phase(c, project["id"], pg["id"], "ready")
    job = await run_job(
        c,
        project["id"],
        'psql "$DATABASE_URL" -qc "create table s(v int); insert into s values (7)"',
    )
    assert job["exit_code"] == 0, job
    docker("restart", "-t", "0", holder(pg["id"]))

    async def answers() -> bool:
        j = await run_job(
            c, project["id"], 'psql "$DATABASE_URL" -tAc "select v from s"', timeout=20
        )
        return bool(j["exit_code"] == 0 and j["output"].strip() == "7")

    await wait_for(
        answers, 120, "the add-on answering again after its holder restarted", interval=1
    )


async def test_last_addon_deleted_removes_network_and_anonymous_volumes(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    rd = await create_addon(c, project["id"], "only-cache", "redis")
    await wait_phase(c, project["id"], rd["id"], "ready")
    job = await run_job(c, project["id"], 'redis-cli -u "$REDIS_URL" ping')
    assert "PONG" in job["output"], job
    network = f"orkestr-{project['id']}"
    assert inspect_network(network)
    # Any anonymous volume (e.g. from the image's VOLUME) must go with its container.
    anonymous = [
        m["Name"]
        for name in (holder(rd["id"]), db(rd["id"]))
        for m in inspect(name)["Mounts"]
        if m["Type"] == "volume" and m["Name"] != f"orkestr-{rd['id']}-data"
    ]

    status, _ = await c.api("DELETE", f"/v1/projects/{project['id']}/addons/{rd['id']}")
    assert status == 202
    await wait_for(lambda: not inspect_network(network), 60, "project network removed")
    assert container_state(holder(rd["id"])) == {}
    left = docker("volume", "ls", "-q").split()
    assert not set(anonymous) & set(left), "anonymous volumes outlived their containers"

    # A new add-on in the same project gets a network again.
    again = await create_addon(c, project["id"], "second-cache", "redis")
    await wait_phase(c, project["id"], again["id"], "ready")
    assert inspect_network(network)


def inspect_network(name: str) -> list[dict]:  # type: ignore[type-arg]
    return json.loads(docker("network", "inspect", name, check=False) or "[]")  # type: ignore[no-any-return]
