"""A slow add-on holds nobody up: each add-on has its own worker (agent/workqueue.py).

Real controller, agent, dockerd and mosquitto. The slow add-on is a Postgres whose server
process is stopped (SIGSTOP from the host), so it ignores the SIGTERM of `docker stop` and
its removal takes the agent's full stop timeout before Docker kills it.
"""

from __future__ import annotations

import json
import os
import signal
import time

from tests.agent_fixtures import (
    AgentProcess,
    Stack,
    container_state,
    create_addon,
    create_project,
    docker,
    wait_for,
    wait_phase,
)

pytest_plugins = ["tests.agent_fixtures"]

STOP_GRACE_S = 30  # agent/apply.py: a database gets this long to shut down cleanly


def db(addon_id: str) -> str:
    return f"orkestr-{addon_id}-db"


async def time_to_ready(stack: Stack, project_id: str, name: str) -> tuple[str, float]:
    c = stack.controller
    assert c is not None
    started = time.monotonic()
    a = await create_addon(c, project_id, name, "redis")
    await wait_phase(c, project_id, a["id"], "ready", timeout=120)
    return a["id"], time.monotonic() - started


async def test_a_database_that_ignores_sigterm_blocks_only_its_own_removal(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    slow = await create_addon(c, project["id"], "slow-db", "postgres")
    await wait_phase(c, project["id"], slow["id"], "ready")
    # The time another add-on takes when nothing else is going on, in this run.
    _, alone = await time_to_ready(stack, project["id"], "alone")

    pid = json.loads(docker("inspect", db(slow["id"])))[0]["State"]["Pid"]
    os.kill(pid, signal.SIGSTOP)  # SIGTERM now stays pending until Docker's SIGKILL
    status, _ = await c.api("DELETE", f"/v1/projects/{project['id']}/addons/{slow['id']}")
    assert status == 202
    await wait_for(
        lambda: f"container.remove name={db(slow['id'])}" in agent.log_tail(400),
        30,
        "the agent stopping the slow database",
        interval=0.05,
    )
    removal_started = time.monotonic()

    busy_id, busy = await time_to_ready(stack, project["id"], "busy")
    print(f"ready in {alone:.1f}s alone, {busy:.1f}s beside a slow removal")
    assert busy <= alone + 3, f"{busy:.1f}s beside a slow removal, {alone:.1f}s alone"
    # The slow removal really was in progress all along, and still completes.
    assert container_state(db(slow["id"])) != {}, "the slow database went before its timeout"
    await wait_for(
        lambda: container_state(db(slow["id"])) == {}, STOP_GRACE_S + 60, "slow db removed"
    )
    assert time.monotonic() - removal_started >= STOP_GRACE_S - 2
    assert container_state(db(busy_id))["Running"]
