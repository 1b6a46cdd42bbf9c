"""The agent's heartbeat (agent/runtime.py `heartbeat_loop`): a status at least every
`heartbeat_s`, and no heartbeat right after a status a pass sent.

Real controller, agent, dockerd and mosquitto; the host's status messages are read off the
broker as the controller gets them. A heartbeat is a status equal to the one before it
apart from its time (a pass sends one only when something changed).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime

import msgspec

from schemas import topics
from schemas.codec import decode, encode
from schemas.messages import HostStatus
from tests.agent_fixtures import AgentProcess, Stack, create_addon, create_project, wait_phase

pytest_plugins = ["tests.agent_fixtures"]

HEARTBEAT_S = 1.0  # the agent fixture's heartbeat_s
EPOCH = datetime.fromtimestamp(0, UTC)


async def test_no_heartbeat_right_after_a_pass_status_and_one_at_least_every_interval(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    seen: list[HostStatus] = []
    reader = await stack.mosquitto.identity(f"hb-{uuid.uuid4().hex[:8]}", "peer")

    async def read() -> None:
        async with stack.mosquitto.client(reader) as client:
            await client.subscribe(topics.status(agent.host), qos=1)
            async for message in client.messages:
                if not message.retain:
                    seen.append(decode(bytes(message.payload), HostStatus))

    task = asyncio.create_task(read())
    try:
        await asyncio.sleep(1.5)  # subscribed, a heartbeat or two of the idle host
        project = (await create_project(c, "team"))["id"]
        ids = [(await create_addon(c, project, f"r{i}", "redis"))["id"] for i in range(3)]
        for aid in ids:
            await wait_phase(c, project, aid, "ready")
        await asyncio.sleep(3 * HEARTBEAT_S)  # idle again: heartbeats only
    finally:
        task.cancel()
    bodies = [encode(msgspec.structs.replace(s, sent_at=EPOCH)) for s in seen]
    gaps = [(b.sent_at - a.sent_at).total_seconds() for a, b in itertools.pairwise(seen)]
    changed = [bodies[i + 1] != bodies[i] for i in range(len(gaps))]
    assert sum(changed) >= 3, "passes sent no statuses: nothing was tested"
    assert changed.count(False) >= 2, "no heartbeat seen"
    early = [
        round(g, 3) for g, ch in zip(gaps, changed, strict=True) if not ch and g < 0.9 * HEARTBEAT_S
    ]
    assert not early, f"heartbeats this soon after the status before: {early}"
    # Never longer apart than the interval (and the event loop's delay on a busy machine).
    assert max(gaps) < 2 * HEARTBEAT_S, gaps
