"""A project network Docker will not remove, against the real dockerd (agent/netremoval.py).

Docker's endpoint-count leak (moby#42119) cannot be provoked at will, so the refusal here
is for a container attached that the platform does not manage (the agent's own check,
before Docker's "has active endpoints": agent/docker.py `remove_network`), recorded and
scheduled the same way. What differs (whether a container is listed on the network) is
classified by the pure code, tested in test_netremoval.py.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from agent import model, netremoval
from schemas import topics
from tests.agent_fixtures import (
    TOOLBOX,
    AgentProcess,
    Stack,
    agent_metric,
    create_addon,
    create_project,
    docker,
    wait_for,
    wait_phase,
)

pytest_plugins = ["tests.agent_fixtures"]

STUCK = "orkestr_agent_networks_unremovable"


async def host_condition(stack: Stack, host: str) -> dict[str, Any] | None:
    """The host's NetworksRemovable condition in its retained status, if any."""
    peer = await stack.mosquitto.identity("peer.netremoval", "peer")
    async with stack.mosquitto.client(peer) as client:
        await client.subscribe(topics.status(host), qos=1)
        message = await asyncio.wait_for(anext(aiter(client.messages)), 10)
    status = json.loads(bytes(message.payload))
    return next((c for c in status["conditions"] if c["type"] == netremoval.CONDITION), None)


async def test_a_network_docker_refuses_to_remove_is_bounded_visible_and_harmless(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    pid = project["id"]
    network = model.network_name(pid)
    first = await create_addon(c, pid, "first", "redis")
    await wait_phase(c, pid, first["id"], "ready")
    net_id = docker("network", "inspect", "-f", "{{.Id}}", network)
    # Something the platform does not manage joins the project network (labelled for the
    # fixture's clean-up only): Docker then refuses the network's removal.
    box = f"orkestr-test-{uuid.uuid4().hex[:10]}"
    docker("run", "-d", "--name", box, "--network", network,
           "--label", f"orkestr.host={agent.host}", TOOLBOX, "sleep", "600")  # fmt: skip
    try:
        status, _ = await c.api("DELETE", f"/v1/projects/{pid}/addons/{first['id']}")
        assert status == 202

        async def gone() -> bool:
            s, _ = await c.api("GET", f"/v1/projects/{pid}/addons/{first['id']}")
            return s == 404

        # The add-on's deletion completes: the network's refusal holds nothing up.
        await wait_for(gone, 60, "the deleted add-on gone")
        await wait_for(
            lambda: (
                f"network.removal_stuck network={network} attached={box}" in agent.log_tail(400)
            ),
            60,
            "the stuck removal logged",
        )

        async def stuck_metric() -> bool:  # set by the pass after the refusal
            return await agent_metric(agent, STUCK) == 1

        await wait_for(stuck_metric, 20, "the gauge at 1")
        cond = await wait_for(lambda: host_condition(stack, agent.host), 20, "the condition")
        assert cond["status"] == "False" and cond["reason"] == "RemovalRefused"
        assert f"{network} ({box})" in cond["message"] and "disconnect" in cond["message"]
        # Bounded: the removal is asked for on a doubling schedule, not every pass
        # (passes come every resync, 2 s here, and on every Docker event).
        before = agent.log_tail(2000).count(f"network.removal_refused network={network}")
        await asyncio.sleep(12)
        during = agent.log_tail(2000).count(f"network.removal_refused network={network}") - before
        assert during <= 2, f"{during} refusals in 12 s"

        # A new add-on of the same project: made on the network that is still there.
        second = await create_addon(c, pid, "second", "redis")
        await wait_phase(c, pid, second["id"], "ready", timeout=60)
        assert docker("network", "inspect", "-f", "{{.Id}}", network) == net_id

        async def no_stuck_metric() -> bool:
            return await agent_metric(agent, STUCK) == 0

        await wait_for(no_stuck_metric, 20, "the gauge back at 0")

        async def cleared() -> bool:
            found = await host_condition(stack, agent.host)
            return found is not None and found["status"] == "True"

        await wait_for(cleared, 20, "the condition cleared")
        status, _ = await c.api("DELETE", f"/v1/projects/{pid}/addons/{second['id']}")
        assert status == 202
    finally:
        docker("rm", "-f", "-v", box, check=False)
    # Nothing attached any more: the network goes (the record started afresh with the
    # second add-on, so no long wait is left over).
    await wait_for(
        lambda: docker("network", "ls", "-q", "--filter", f"name=^{network}$") == "",
        60,
        "the network removed",
    )
