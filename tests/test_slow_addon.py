"""A slow add-on holds nobody up: each add-on has its own worker (agent/workqueue.py).

Real controller, agent, dockerd and mosquitto. The slow removal is a Postgres whose server
process is stopped (SIGSTOP from the host), so it ignores the SIGTERM of `docker stop` and
its removal takes the agent's full stop timeout before Docker kills it: a database that
has answered gets its clean shutdown even when its add-on is deleted. One that never did
(held in initdb) is killed. The long wake is a
deep-sleeping Postgres that, once started, refuses connections for as long as the test
says (a REJECT rule in its holder's namespace): from the agent's side, a slow start.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid

from agent import model, netns
from tests.agent_fixtures import (
    TOOLBOX,
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


def descendants(pid: int) -> list[int]:
    """The processes under `pid` (a container's entrypoint), read from the host's /proc."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    children = [int(x) for x in f.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


async def test_a_deleted_postgres_still_in_initdb_goes_without_the_stop_timeout(
    stack: Stack, agent: AgentProcess
) -> None:
    """Its volume goes with it, and it never answered: the agent kills it. Stopped, the
    entrypoint's shell (PID 1, no handler) ignores the stop signal for the whole timeout."""
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    a = await create_addon(c, project["id"], "initdb", "postgres")
    name = db(a["id"])
    pid = await wait_for(
        lambda: (s := container_state(name)).get("Running") and descendants(s["Pid"]) and s["Pid"],
        60,
        "the entrypoint running initdb",
        interval=0.05,
    )
    with open(f"/proc/{pid}/comm") as f:
        assert f.read().strip() != "postgres", "initdb was over before the test could hold it"
    # Held in initdb, as a slow disk would hold it: everything under the entrypoint stopped.
    for _ in range(3):
        for child in descendants(pid):
            os.kill(child, signal.SIGSTOP)
        await asyncio.sleep(0.1)
    started = time.monotonic()
    status, _ = await c.api("DELETE", f"/v1/projects/{project['id']}/addons/{a['id']}")
    assert status == 202
    await wait_for(
        lambda: container_state(name) == {} and container_state(model.holder_name(a["id"])) == {},
        STOP_GRACE_S - 10,
        "the deleted add-on's containers gone before the stop timeout",
    )
    took = time.monotonic() - started
    log = agent.log_tail(2000)
    assert f"addon.answered addon={a['id']}" not in log  # it never did: still in initdb
    assert f"container.remove name={name} reason=AddonDeleted kill=yes" in log
    print(f"deleted mid-initdb in {took:.1f}s")


def holder_pid(addon_id: str) -> int:
    return int(json.loads(docker("inspect", model.holder_name(addon_id)))[0]["State"]["Pid"])


async def env_of(stack: Stack, project_id: str) -> dict[str, str]:
    assert stack.controller is not None
    status, body = await stack.controller.api("GET", f"/v1/projects/{project_id}/env")
    assert status == 200, body
    return dict(body["env"])


async def client(
    host: str, project_id: str, env: dict[str, str], script: str, timeout: float = 150
) -> subprocess.CompletedProcess[str]:
    """A one-off client container on the project's network, as an app would connect."""
    name = f"orkestr-test-client-{uuid.uuid4().hex[:10]}"
    env_args = [arg for k, v in env.items() for arg in ("-e", f"{k}={v}")]
    proc = await asyncio.create_subprocess_exec(
        "docker", "run", "--rm", "--name", name, "--label", f"orkestr.host={host}",
        "--network", f"orkestr-{project_id}", *env_args, TOOLBOX, "sh", "-c", script,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        docker("rm", "-f", name, check=False)
    return subprocess.CompletedProcess(script, proc.returncode or 0, out.decode(), err.decode())


# Refused at once, as a database that is still starting refuses: the agent's probes (from
# the gateway) and the relay's upstream leg alike. Appended: a client's SYN meets the SYN
# queue's rule first and waits there, as it would for a database that is slow to start.
REFUSE = ("INPUT", "-p", "tcp", "--dport", "5432", "-j", "REJECT", "--reject-with", "tcp-reset")


async def test_a_long_wake_holds_up_no_other_addon(stack: Stack, agent: AgentProcess) -> None:
    c = stack.controller
    assert c is not None
    team = (await create_project(c, "team"))["id"]
    sleepy = (await create_project(c, "starter"))["id"]
    other = (await create_project(c, "starter"))["id"]
    slow = (await create_addon(c, sleepy, "slow-wake", "postgres"))["id"]
    woken = (await create_addon(c, other, "woken", "redis"))["id"]
    repaired = (await create_addon(c, team, "repaired", "redis"))["id"]
    await wait_phase(c, team, repaired, "ready")

    async def answered(project: str, a: str) -> bool:
        # A Starter add-on may already sleep again (3 s idle) by the time it is looked at.
        return bool((await addon(c, project, a))["phase"] in ("ready", "sleeping"))

    for project, a in ((sleepy, slow), (other, woken)):
        await wait_for(lambda p=project, x=a: answered(p, x), 90, f"add-on {a} provisioned")
    _, alone = await time_to_ready(stack, team, "alone")
    # Idle: both sleepy add-ons fall into deep sleep (stopped).
    await wait_for(
        lambda: all(container_state(db(a)).get("Status") == "exited" for a in (slow, woken)),
        60,
        "both add-ons in deep sleep",
    )
    pid = holder_pid(slow)
    code, out = await netns.iptables(pid, "-A", *REFUSE)
    assert code == 0, out
    try:
        # A client of the slow add-on: its wake now lasts until the rule goes.
        waiting = asyncio.create_task(
            client(
                agent.host,
                sleepy,
                await env_of(stack, sleepy),
                'psql "$DATABASE_URL" -tAc "select 6 * 7"',
            )
        )
        await wait_for(
            lambda: container_state(db(slow)).get("Running"), 60, "the slow wake under way"
        )

        # Meanwhile, on the same host: a repair, a create and another wake.
        docker("rm", "-f", db(repaired))
        creating = asyncio.create_task(time_to_ready(stack, team, "busy"))
        started = time.monotonic()
        r = await client(
            agent.host,
            other,
            await env_of(stack, other),
            'redis-cli --no-auth-warning -u "$REDIS_URL" ping',
            timeout=60,
        )
        woke_in = time.monotonic() - started
        assert r.returncode == 0 and r.stdout.strip() == "PONG", r
        busy_id, busy = await creating
        await wait_for(
            lambda: container_state(db(repaired)).get("Running"),
            60,
            "the removed database recreated",
        )
        await wait_phase(c, team, repaired, "ready", timeout=60)
        print(
            f"ready in {alone:.1f}s alone, {busy:.1f}s beside a long wake; a wake took {woke_in:.1f}s"
        )
        assert busy <= alone + 3, f"{busy:.1f}s beside a long wake, {alone:.1f}s alone"
        assert container_state(db(busy_id))["Running"]
        # The long wake was in flight all along: its client still waits, nothing logged it done.
        assert not waiting.done(), "the slow add-on's client finished before its database answered"
        assert f"addon.wake addon={slow}" not in agent.log_tail(2000)
        assert f"addon.wake addon={woken}" in agent.log_tail(2000)
    finally:
        await netns.iptables(pid, "-D", *REFUSE)
    # Once the database answers, the wake completes and its waiting client is served.
    r = await asyncio.wait_for(waiting, 150)
    assert r.returncode == 0 and r.stdout.strip() == "42", r
    await wait_for(
        lambda: f"addon.wake addon={slow} stage=deep reason=connection" in agent.log_tail(2000),
        30,
        "the slow wake logged",
    )
