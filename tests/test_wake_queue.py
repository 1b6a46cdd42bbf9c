"""The SYN queue: connections opened during a deep wake are the database's own.

Real add-ons, a real agent and keeper, real agent restarts. While the database is stopped
a client's SYN waits in the kernel's NFQUEUE (agent/synqueue.py); once the database answers
it goes on to the database's own socket. So no keeper relay exists (its LIST is empty),
the database sees the client's own address, the meter lists the connections `via:
direct`, and no agent restart can touch them. The client is a pool of ten psql sessions
started at once while the add-on is stopped (tests/test_wake_relay.py's, which covers the
relay path: `deep_wake = "relay"` and the fallback where NFQUEUE is missing).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agent import netns, synqueue
from agent.keeper_client import KeeperClient
from tests.agent_fixtures import (
    AgentProcess,
    Stack,
    addon,
    agent_metric,
    container_state,
    more_passes,
    running_agent,
    wait_for,
)
from tests.test_sleep import Client, db_state, setup_addon, wait_db
from tests.test_wake_relay import (
    DEEP_S,
    LIGHT_S,
    POOL,
    STOP,
    check_pool,
    plans_text,
    pool,
    restart_twice,
)

pytest_plugins = ["tests.agent_fixtures"]
__all__ = ["plans_text"]  # the module's plans: the relay tests' (2 s light, 4 s deep)

QUEUE_RULE = synqueue.COMMENT


def holder_pid(addon_id: str) -> int:
    return int(container_state(f"orkestr-{addon_id}-net")["Pid"])


async def rules(pid: int) -> str:
    _code, filt = await netns.iptables(pid, "-S", "INPUT")
    _code, nat = await netns.iptables(pid, "-t", "nat", "-S", "PREROUTING")
    return f"{filt}\n{nat}"


async def direct_clients(
    stack: Stack, project_id: str, addon_id: str, ip: str
) -> list[dict[str, Any]]:
    assert stack.controller is not None
    view = await addon(stack.controller, project_id, addon_id)
    assert not [c for c in view["clients"] if c["via"] != "direct"], view["clients"]
    return [c for c in view["clients"] if c["source"].startswith(f"{ip}:")]


async def own_backends(client: Client) -> int:
    """Sessions the database sees from the client's own address, besides the asking one."""
    r = await client.sh(
        'psql "$DATABASE_URL" -tAc "select count(*) from pg_stat_activity '
        'where client_addr = inet_client_addr() and pid <> pg_backend_pid()"'
    )
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


async def test_a_pool_opened_during_a_deep_wake_is_the_databases_own_through_agent_restarts(
    stack: Stack, agent: AgentProcess
) -> None:
    project, a, env = await setup_addon(stack, "postgres")
    client = Client(agent.host, project["id"], env)
    keeper = KeeperClient(str(agent.dir / "keeper.sock"))
    states: list[str] = []
    try:
        await wait_db(a["id"], "exited", timeout=DEEP_S + 10)
        assert QUEUE_RULE in await rules(holder_pid(a["id"]))
        queued = await agent_metric(agent, "orkestr_agent_wake_syns_queued_total") or 0
        # 0.3 s apart: steady queries on every connection until STOP (after the restarts;
        # 400 of them would last two minutes).
        queries = 400
        run = asyncio.create_task(client.sh(pool(queries, 0.3), timeout=240))

        async def ten_direct() -> bool:
            return len(await direct_clients(stack, project["id"], a["id"], client.ip)) == POOL

        await wait_for(ten_direct, 30, "ten direct clients listed")
        assert await keeper.relays(a["id"]) == []  # no relay anywhere
        assert await agent_metric(agent, "orkestr_agent_wake_relays") == 0
        assert (await agent_metric(agent, "orkestr_agent_wake_syns_queued_total") or 0) > queued
        assert await own_backends(client) == POOL
        assert QUEUE_RULE not in await rules(holder_pid(a["id"]))

        async def watch() -> None:  # awake throughout: the pool keeps it so
            while not run.done():
                states.append(db_state(a["id"]))
                await asyncio.sleep(0.25)

        watcher = asyncio.create_task(watch())
        await restart_twice(agent, run)
        await wait_for(ten_direct, 30, "ten direct clients listed after the restarts")
        assert not run.done(), await run
        assert (await client.sh(STOP)).returncode == 0
        r = await run
        await watcher
        check_pool(r.stdout, queries)
        assert set(states) == {"running"}, states
        closed = float(r.stdout.split()[-1])  # the container's clock is the host's
        # Then it sleeps on time: not before light_after_s, and within a tick or two.
        await wait_db(a["id"], "paused", timeout=LIGHT_S + 4)
        slept_after = time.time() - closed
        assert LIGHT_S - 0.2 <= slept_after <= LIGHT_S + 4, slept_after
        print(f"paused {slept_after:.1f} s after the pool closed (light_after_s={LIGHT_S})")
    finally:
        client.remove()


async def test_a_pool_whose_wake_the_agent_died_in_is_let_through_by_the_next_agent(
    stack: Stack, agent: AgentProcess
) -> None:
    """kill -9 while the database starts for the held SYNs: the keeper keeps the queue,
    and the next agent lets them go once the database answers (not before: a SYN let
    through to a database still starting would be refused)."""
    project, a, env = await setup_addon(stack, "postgres")
    client = Client(agent.host, project["id"], env)
    try:
        await wait_db(a["id"], "exited", timeout=DEEP_S + 10)
        pid = holder_pid(a["id"])
        queries = 10
        run = asyncio.create_task(client.sh(pool(queries, 0.3), timeout=180))

        def starting() -> bool:
            stats = synqueue.read_stats(pid, 5432)
            return stats is not None and stats.waiting > 0 and db_state(a["id"]) == "running"

        # A Postgres start takes a few hundred ms: poll fast to kill inside it.
        await wait_for(starting, 30, "SYNs held while the database starts", interval=0.005)
        await agent.kill9()
        held = synqueue.read_stats(pid, 5432)
        assert held is not None and held.waiting > 0, held  # killed before they went on
        await asyncio.sleep(1)
        assert not run.done(), await run
        await agent.start()
        r = await run
        check_pool(r.stdout, queries)
        keeper = KeeperClient(str(agent.dir / "keeper.sock"))
        assert await keeper.relays(a["id"]) == []
        print(f"held at the kill: {held.waiting} SYNs")
    finally:
        client.remove()


async def test_an_agent_converges_the_rules_an_agent_of_the_other_mode_left(
    stack: Stack,
) -> None:
    """An upgrade from a relaying agent (its redirect in place, the add-on asleep), and a
    switch back: each agent replaces the other's rule, keeps the add-on asleep, and the
    next client wakes it its own way (direct; relayed: the database sees the gateway)."""
    async with running_agent(stack, agent_extra='deep_wake = "relay"') as agent:
        project, a, env = await setup_addon(stack, "postgres")
        client = Client(agent.host, project["id"], env)
        ask = 'psql "$DATABASE_URL" -tAc "select host(inet_client_addr())"'

        async def restart_as(mode: str) -> None:
            await agent.stop()
            text = agent.config_path.read_text()
            agent.config_path.write_text(text.replace("deep_wake = ", f'deep_wake = "{mode}" #'))
            await agent.start()
            await more_passes(agent, 2)

        try:
            await wait_db(a["id"], "exited", timeout=DEEP_S + 10)
            pid = holder_pid(a["id"])
            text = await rules(pid)
            assert "REDIRECT" in text and QUEUE_RULE not in text, text

            await restart_as("queue")
            text = await rules(pid)
            assert "REDIRECT" not in text and QUEUE_RULE in text, text
            assert db_state(a["id"]) == "exited"
            r = await client.sh(ask)
            assert r.returncode == 0 and r.stdout.strip() == client.ip, r

            await wait_db(a["id"], "exited", timeout=DEEP_S + 10)
            await restart_as("relay")
            text = await rules(pid)
            assert "REDIRECT" in text and QUEUE_RULE not in text, text
            assert db_state(a["id"]) == "exited"
            r = await client.sh(ask)
            assert r.returncode == 0 and r.stdout.strip() not in ("", client.ip), r
        finally:
            client.remove()


async def test_a_redis_client_of_a_deep_wake_is_its_own(stack: Stack, agent: AgentProcess) -> None:
    project, a, env = await setup_addon(stack, "redis")
    client = Client(agent.host, project["id"], env)
    try:
        await wait_db(a["id"], "exited", timeout=DEEP_S + 10)
        r = await client.sh(
            'redis-cli --no-auth-warning -u "$REDIS_URL" client info | grep -o "addr=[^ ]*"'
        )
        assert r.returncode == 0 and r.stdout.strip().startswith(f"addr={client.ip}:"), r
        assert db_state(a["id"]) == "running"
    finally:
        client.remove()
