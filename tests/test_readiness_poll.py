"""A starting add-on's readiness poll (agent/runtime.py, `_await_readiness`) ends with it.

Real controller, agent, dockerd and mosquitto. A Postgres add-on is deleted during its
initdb, while the agent polls it for its first answer. Its processes are stopped (SIGSTOP
from the host) first, so its removal takes the agent's full stop timeout (30 s) with its
secret still on the host: the poll, had it gone on, would have kept connecting to the
database being removed, four times a second (for up to two minutes, holding the pool's
refill and the home-core moves back as a starting add-on). The agent's probes leave from
the host, so a counting rule in the host's OUTPUT chain (no target: it changes nothing)
sees each of their SYNs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import uuid

from agent import model
from tests.agent_fixtures import (
    AgentProcess,
    Stack,
    addon,
    container_state,
    create_addon,
    create_project,
    docker,
    wait_for,
    wait_phase,
)

pytest_plugins = ["tests.agent_fixtures"]


def iptables(*args: str) -> str:
    return subprocess.run(
        ["iptables", "-w", *args], check=True, capture_output=True, text=True
    ).stdout


def syns_counted(comment: str) -> int:
    """Packets the counting rule with this comment has seen."""
    for line in iptables("-L", "OUTPUT", "-v", "-n", "-x").splitlines():
        if f"/* {comment} */" in line:
            return int(line.split()[0])
    raise AssertionError(f"counting rule {comment} is gone")


async def test_a_readiness_poll_ends_when_its_addon_is_deleted(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = (await create_project(c, "team"))["id"]
    # Keeps the project's network (and so the deleted add-on's subnet) in place.
    keep = (await create_addon(c, project, "keep", "redis"))["id"]
    await wait_phase(c, project, keep, "ready")
    slow = (await create_addon(c, project, "slow", "postgres"))["id"]
    db = model.db_name(slow)
    await wait_for(
        lambda: container_state(db).get("Running"), 60, "the database started", interval=0.05
    )
    networks = json.loads(docker("inspect", model.holder_name(slow)))[0]["NetworkSettings"]
    ip = networks["Networks"][model.network_name(project)]["IPAddress"]
    # Every process of it, initdb's too: it does not answer (whatever a quiet machine's
    # initdb would have done by now), and `docker stop`'s signal waits for the timeout.
    for _ in range(3):
        for pid in docker("top", db, "-eo", "pid").split()[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGSTOP)
    # The pass has probed it (no answer) and handed it to a readiness poll.
    await asyncio.sleep(3)
    assert (await addon(c, project, slow))["phase"] != "ready", "answered before its delete"

    status, _ = await c.api("DELETE", f"/v1/projects/{project}/addons/{slow}")
    assert status == 202
    await wait_for(
        lambda: f"container.remove name={db}" in agent.log_tail(400),
        30,
        "the agent stopping the database",
        interval=0.05,
    )
    comment = f"orkestr-test-{uuid.uuid4().hex[:10]}"
    rule = ("OUTPUT", "-d", ip, "-p", "tcp", "--dport", "5432", "--syn",
            "-m", "comment", "--comment", comment)  # fmt: skip
    iptables("-I", *rule)
    try:
        # The poll tried every 0.25 s (+ a 1 s attempt timeout). A database that never
        # answered is killed at its delete (agent/plan.py), so it may be gone already:
        # its address then answers nobody, and a poll still running still sends its SYNs.
        await asyncio.sleep(4)
        assert syns_counted(comment) == 0, f"the agent still connects to {ip}:5432"
    finally:
        iptables("-D", *rule)
    await wait_for(lambda: container_state(db) == {}, 90, "the database removed at last")
    assert container_state(model.db_name(keep))["Running"]


async def test_a_readiness_poll_backs_off_while_its_database_refuses(
    stack: Stack, agent: AgentProcess
) -> None:
    """A Postgres refuses connections through its initdb (its first server listens on a
    socket file only): the poll backs off with the time waited, to one attempt a second,
    and still sees the answer once it comes. Here the refusal is a host rule that resets
    the agent's SYNs to the database (and counts them), for as long as the test wants."""
    c = stack.controller
    assert c is not None
    project = (await create_project(c, "team"))["id"]
    pg = (await create_addon(c, project, "refusing", "postgres"))["id"]
    holder = model.holder_name(pg)

    def holder_ip() -> str:
        found = json.loads(docker("inspect", holder, check=False) or "[]")
        networks = found[0]["NetworkSettings"]["Networks"] if found else {}
        return str((networks.get(model.network_name(project)) or {}).get("IPAddress") or "")

    # In place before the database starts (the holder runs first), so no attempt gets in.
    ip = await wait_for(holder_ip, 60, "the holder's address", interval=0.02)
    comment = f"orkestr-test-{uuid.uuid4().hex[:10]}"
    rule = ("OUTPUT", "-d", ip, "-p", "tcp", "--dport", "5432", "--syn",
            "-m", "comment", "--comment", comment,
            "-j", "REJECT", "--reject-with", "tcp-reset")  # fmt: skip
    iptables("-I", *rule)
    try:
        await wait_for(
            lambda: container_state(model.db_name(pg)).get("Running"), 60, "the database started"
        )
        await wait_for(lambda: syns_counted(comment) > 0, 30, "the first attempt")
        await asyncio.sleep(12)  # the poll has waited 10 s or more: an attempt a second
        before = syns_counted(comment)
        await asyncio.sleep(8)
        tried = syns_counted(comment) - before
        # Every 250 ms, as before, would be ~32 here.
        assert 3 <= tried <= 12, f"{tried} attempts in 8 s"
        assert (await addon(c, project, pg))["phase"] != "ready"
    finally:
        iptables("-D", *rule)
    await wait_phase(c, project, pg, "ready", 60)
