"""The relay path: connections opened during a deep wake are relayed by the keeper and
outlive the agent (`agent.deep_wake = "relay"`, and the fallback where NFQUEUE is not
available; the default, the SYN queue, is tests/test_wake_queue.py).

Real add-ons, a real agent and keeper, real agent restarts. The client is a pool of ten
psql sessions in a toolbox container on the project network, started at once while the
add-on is stopped: the first wakes it, all ten are accepted by the wake listener and
handed to the keeper, and each then runs a query every `PAUSE_S` for the whole test with
ON_ERROR_STOP, so an error on any connection shows in its exit code and its output.
Once the test has done what the pool must outlive, it says so (`STOP`): the remaining
queries then run without the pause, so the pool lasts as long as the test needs, not a
fixed time that must cover a slow machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent.keeper_client import KeeperClient
from tests.agent_fixtures import (
    AgentProcess,
    Stack,
    addon,
    agent_metric,
    more_passes,
    running_agent,
    wait_for,
)
from tests.test_sleep import Client, db_state, setup_addon, wait_db

pytest_plugins = ["tests.agent_fixtures"]

LIGHT_S, DEEP_S = 2.0, 4.0
POOL = 10


@pytest.fixture(scope="module")
def plans_text() -> str:
    return f"""
[starter]
max_addons = 1
cpus = 0.5
memory_mb = 256
sleep = {{ enabled = true, light_after_s = {LIGHT_S}, deep_after_s = {DEEP_S} }}
"""


@pytest.fixture
async def agent(stack: Stack) -> AsyncIterator[AgentProcess]:
    """An agent that relays deep wakes, as one on a host without NFQUEUE does."""
    async with running_agent(stack, agent_extra='deep_wake = "relay"') as proc:
        yield proc


STOP = "touch /tmp/pool.stop"


def pool(queries: int, pause_s: float) -> str:
    """Ten psql sessions at once, each `queries` queries with `pause_s` idle between them
    (none once `STOP` has run in the client); prints one exit code per session, each
    session's answers, and when they all ended."""
    sql = "".join(
        f"select {n};\\n\\\\! [ -e /tmp/pool.stop ] || sleep {pause_s}\\n" for n in range(queries)
    )
    return (
        f"printf '{sql}' > /tmp/pool.sql; "
        f'for i in $(seq {POOL}); do (psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -qtA '
        "-f /tmp/pool.sql > /tmp/out.$i 2>&1; echo $?) & done; wait; "
        f"for i in $(seq {POOL}); do echo; cat /tmp/out.$i; done; echo; date +%s.%N"
    )


def check_pool(out: str, queries: int) -> None:
    codes, _, answers = out.rpartition("\n\n")[0].partition("\n\n")
    assert codes.split() == ["0"] * POOL, out
    want = "\n".join(str(n) for n in range(queries))
    sessions = answers.split("\n\n")
    assert len(sessions) == POOL and all(x.strip() == want for x in sessions), out


async def relayed_clients(stack: Stack, project_id: str, addon_id: str) -> list[dict[str, Any]]:
    assert stack.controller is not None
    view = await addon(stack.controller, project_id, addon_id)
    return [c for c in view["clients"] if c["via"] == "activator"]


async def test_a_pool_opened_during_a_deep_wake_survives_agent_restarts(
    stack: Stack, agent: AgentProcess
) -> None:
    project, a, env = await setup_addon(stack, "postgres")
    client = Client(agent.host, project["id"], env)
    try:
        await wait_db(a["id"], "exited", timeout=DEEP_S + 10)
        # 0.3 s apart: steady queries on every connection until STOP (after the restarts;
        # 400 of them would last two minutes).
        queries = 400
        run = asyncio.create_task(client.sh(pool(queries, 0.3), timeout=240))
        # All ten are relayed by the keeper, and listed so (the meter sees them).
        await wait_for(
            lambda: _count(relayed_clients(stack, project["id"], a["id"]), POOL),
            30, "ten relayed clients listed",
        )  # fmt: skip
        await kept_by_keeper(agent, a["id"], POOL)

        async def metric_counts_them() -> bool:
            return await agent_metric(agent, "orkestr_agent_wake_relays") == POOL

        await wait_for(metric_counts_them, 10, "the relay gauge counting the keeper's relays")
        await restart_twice(agent, run)
        # The restarted agent learns the relays from the keeper.
        await wait_for(
            lambda: _count(relayed_clients(stack, project["id"], a["id"]), POOL),
            30, "ten relayed clients listed after the restarts",
        )  # fmt: skip
        assert not run.done(), await run
        assert (await client.sh(STOP)).returncode == 0
        r = await run
        check_pool(r.stdout, queries)
        await wait_for(
            lambda: _count(relayed_clients(stack, project["id"], a["id"]), 0),
            10, "the relays gone once pgbench closed them",
        )  # fmt: skip
    finally:
        client.remove()


async def test_a_pool_opened_during_a_wake_keeps_it_awake_until_it_closes(
    stack: Stack, agent: AgentProcess
) -> None:
    project, a, env = await setup_addon(stack, "postgres")
    client = Client(agent.host, project["id"], env)
    try:
        await wait_db(a["id"], "exited", timeout=DEEP_S + 10)
        # Idle 1 s between queries, 12 s in all: past both idle timeouts.
        run = asyncio.create_task(client.sh(pool(12, 1.0), timeout=120))
        await wait_for(
            lambda: _count(relayed_clients(stack, project["id"], a["id"]), POOL),
            30, "ten relayed clients listed",
        )  # fmt: skip
        await kept_by_keeper(agent, a["id"], POOL)
        # Held well past both idle timeouts, and through an agent restart: awake.
        await agent.kill9()
        await agent.start()
        while not run.done():
            assert db_state(a["id"]) == "running"
            await asyncio.sleep(0.25)
        r = await run
        check_pool(r.stdout, 12)
        closed = float(r.stdout.split()[-1])  # the container's clock is the host's
        # Then it sleeps on time: not before light_after_s, and within a tick or two.
        await wait_db(a["id"], "paused", timeout=LIGHT_S + 4)
        slept_after = time.time() - closed
        assert LIGHT_S - 0.2 <= slept_after <= LIGHT_S + 4, slept_after
        print(f"paused {slept_after:.1f} s after the pool closed (light_after_s={LIGHT_S})")
    finally:
        client.remove()


async def test_a_pool_whose_wake_the_agent_died_in_is_served_by_the_next_agent(
    stack: Stack, agent: AgentProcess
) -> None:
    """kill -9 while the pool waits for the database to start: the keeper holds the
    clients, and the restarted agent wakes the add-on for them and attaches them."""
    project, a, env = await setup_addon(stack, "postgres")
    client = Client(agent.host, project["id"], env)
    keeper = KeeperClient(str(agent.dir / "keeper.sock"))
    try:
        await wait_db(a["id"], "exited", timeout=DEEP_S + 10)
        queries = 10
        run = asyncio.create_task(client.sh(pool(queries, 0.3), timeout=180))

        async def held() -> bool:
            kept = await keeper.relays(a["id"])
            return bool(kept) and any(r.held for r in kept or [])

        # A Postgres start takes a few hundred ms: poll fast to kill inside it.
        await wait_for(held, 30, "a client held by the keeper mid-wake", interval=0.005)
        await agent.kill9()
        kept = await keeper.relays(a["id"])
        assert kept and any(r.held for r in kept), kept
        await asyncio.sleep(1)
        assert not run.done(), await run
        await agent.start()

        async def attached() -> bool:
            kept = await keeper.relays(a["id"])
            return bool(kept) and not any(r.held for r in kept or [])

        # The held ones are attached (sessions that had not connected before the kill
        # may have gone direct: the new agent finds the database up and lifts the
        # redirect), and every session is served without an error.
        await wait_for(attached, 60, "the held clients attached by the new agent")
        check_pool((await run).stdout, queries)
    finally:
        client.remove()


async def restart_twice(agent: AgentProcess, run: asyncio.Task[Any]) -> None:
    """A SIGTERM restart, then a `kill -9` and a start, 2 s apart, while the pool runs:
    it must still be running after each (its queries fail it otherwise)."""
    for stop in (agent.stop, agent.kill9):
        await asyncio.sleep(2)
        await stop()
        await asyncio.sleep(2)
        assert not run.done(), await run
        await agent.start()
        await more_passes(agent, 2)


async def kept_by_keeper(agent: AgentProcess, addon_id: str, want: int) -> None:
    """Until the keeper relays `want` of the add-on's connections (handed over: the wake
    is done; before that they wait in the agent, and an agent killed then drops them)."""

    async def counted() -> bool:
        kept = await KeeperClient(str(agent.dir / "keeper.sock")).relays(addon_id)
        return kept is not None and len(kept) == want and not any(r.held for r in kept)

    await wait_for(counted, 30, f"{want} connections relayed by the keeper")


async def _count(clients: Any, want: int) -> bool:
    return len(await clients) == want
