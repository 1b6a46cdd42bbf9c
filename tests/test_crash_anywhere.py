"""Crash anywhere: the agent is killed with -9 at random points of its work, and recovers.

Real controller, agent, dockerd and mosquitto. Each round starts something (an add-on
created or deleted, a job, a wake of a sleeping add-on; sleeps happen on their own), kills
the agent after a random delay, restarts it, and checks within 30 s:
- converged: live add-ons ready (or asleep), deleted ones gone with their volume, jobs done;
- 0 orphans and 0 duplicates among the host's containers and volumes;
- 0 volumes recreated (a live add-on's volume keeps its creation time);
- 0 restarts of a running database (a never-sleeping add-on keeps its container and start);
- every job ran exactly once (each inserts a token into a table; no token twice).

ORKESTR_CRASH_SECONDS bounds the rounds (default 60 s of kills, at least MIN_KILLS: the
suite's share on a 2-core CI); raise it for a deeper run. ORKESTR_CRASH_KINDS narrows the
work killed during, ORKESTR_CRASH_SEED replays a run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from typing import Any

import pytest

from agent import model
from tests.agent_fixtures import (
    TOOLBOX,
    AgentProcess,
    Stack,
    addon,
    create_addon,
    create_project,
    docker,
    run_job,
    wait_for,
    wait_phase,
)

pytest_plugins = ["tests.agent_fixtures"]

BUDGET_S = float(os.environ.get("ORKESTR_CRASH_SECONDS", "60"))
# Which kinds of work to kill during (comma-separated; default all): "wake" alone digs
# into the wake path.
KINDS = set(os.environ.get("ORKESTR_CRASH_KINDS", "create,delete,job,wake").split(","))
MIN_KILLS = 10
CONVERGE_S = 30


@pytest.fixture(scope="module")
def plans_text() -> str:
    return """
[pro]
max_addons = 2
cpus = 0.5
memory_mb = 256
sleep = { enabled = true, light_after_s = 2, deep_after_s = 5 }

[team]
max_addons = 5
cpus = 0.5
memory_mb = 256
sleep = { enabled = false }
"""


def addon_of(container: dict[str, Any]) -> str | None:
    """The add-on a container belongs to: its label, or for a claimed parked holder
    (agent/pool.py), whose labels cannot change, its name."""
    labels = container["Config"]["Labels"]
    if labels.get("orkestr.role") == "parked":
        return model.addon_of_holder(container["Name"].lstrip("/"))
    aid = labels.get("orkestr.addon")
    return str(aid) if aid is not None else None


def host_objects(host: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The host's containers and volumes; ones removed while we look are skipped."""
    label = f"label=orkestr.host={host}"
    containers: list[dict[str, Any]] = []
    for cid in docker("ps", "-aq", "--filter", label).split():
        containers += json.loads(docker("inspect", cid, check=False) or "[]")
    volumes: list[dict[str, Any]] = []
    for name in docker("volume", "ls", "-q", "--filter", label).split():
        volumes += json.loads(docker("volume", "inspect", name, check=False) or "[]")
    return containers, volumes


async def post_job(stack: Stack, project_id: str, script: str) -> str:
    assert stack.controller is not None
    status, body = await stack.controller.api(
        "POST",
        f"/v1/projects/{project_id}/jobs",
        {"image": TOOLBOX, "command": ["sh", "-c", script], "timeout_s": 120},
    )
    assert status == 201, body
    return str(body["id"])


class World:
    """What the test asked for, and what must never change about it."""

    def __init__(self, stack: Stack, agent: AgentProcess) -> None:
        assert stack.controller is not None
        self.c = stack.controller
        self.stack = stack
        self.agent = agent
        self.team = ""
        self.pro = ""
        self.live: dict[str, str] = {}  # add-on id -> project id
        self.steady = ""  # the team project's Postgres: the jobs' table lives in it
        self.sleepy = ""  # the pro project's add-on, asleep between rounds
        self.deleted: set[str] = set()
        self.jobs: dict[str, str] = {}  # job id -> project id
        self.token_jobs: set[str] = set()  # the jobs that insert a token each
        self.volume_inode: dict[str, int] = {}  # add-on id -> its data directory's inode
        self.db_started: dict[str, tuple[str, str]] = {}  # never-sleeping: (Id, StartedAt)
        self.serial = 0

    async def round(self, rng: random.Random) -> str:
        """Start one piece of work; return what it was."""
        churn = [a for a, p in self.live.items() if p == self.team and a != self.steady]
        choices = ["job", "wake"]
        if len(churn) < 3:
            choices.append("create")
        if churn:
            choices.append("delete")
        what = rng.choice([c for c in choices if c in KINDS] or choices)
        if what == "create":
            self.serial += 1
            a = await create_addon(self.c, self.team, f"churn-{self.serial}", "redis")
            self.live[a["id"]] = self.team
        elif what == "delete":
            aid = rng.choice(churn)
            status, _ = await self.c.api("DELETE", f"/v1/projects/{self.team}/addons/{aid}")
            assert status == 202
            del self.live[aid]
            self.db_started.pop(aid, None)
            self.volume_inode.pop(aid, None)
            self.deleted.add(aid)
        elif what == "job":
            token = uuid.uuid4().hex
            script = f'psql "$DATABASE_URL" -qc "insert into runs values (\'{token}\')"'
            job_id = await post_job(self.stack, self.team, script)
            self.jobs[job_id] = self.team
            self.token_jobs.add(job_id)
        else:  # a client of the sleeping add-on, through the wake path
            self.jobs[await post_job(self.stack, self.pro, 'redis-cli -u "$REDIS_URL" ping')] = (
                self.pro
            )
        return what

    async def converged(self) -> bool:
        for aid, project in self.live.items():
            phase = (await addon(self.c, project, aid))["phase"]
            if phase not in (("ready", "sleeping") if aid == self.sleepy else ("ready",)):
                return False
        for job_id, project in self.jobs.items():
            _, job = await self.c.api("GET", f"/v1/projects/{project}/jobs/{job_id}")
            if job["state"] not in ("succeeded", "failed"):
                return False
        containers, volumes = host_objects(self.agent.host)
        addons = {addon_of(c) for c in containers}
        addons |= {v["Labels"].get("orkestr.addon") for v in volumes}
        return not (addons & self.deleted)

    def check_host(self) -> None:
        containers, volumes = host_objects(self.agent.host)
        seen: dict[tuple[str, str], int] = {}
        for c in containers:
            labels = c["Config"]["Labels"]
            role = labels.get("orkestr.role", "")
            if role == "job":
                job_id = labels["orkestr.job"]
                assert job_id in self.jobs, f"orphan job container {c['Name']}"
                continue
            aid = addon_of(c)
            if aid is None:
                continue  # a test client of the project network, or a parked holder
            role = "holder" if role == "parked" else role
            assert aid in self.live, f"orphan {role} {c['Name']} of add-on {aid}"
            seen[(aid, role)] = seen.get((aid, role), 0) + 1
        for aid in self.live:
            assert seen.get((aid, "holder")) == 1, f"{aid}: {seen.get((aid, 'holder'))} holders"
            assert seen.get((aid, "db")) == 1, f"{aid}: {seen.get((aid, 'db'))} databases"
        by_addon: dict[str, list[dict[str, Any]]] = {}
        for v in volumes:
            by_addon.setdefault(v["Labels"]["orkestr.addon"], []).append(v)
        assert set(by_addon) == set(self.live), f"volumes {set(by_addon)} for {set(self.live)}"
        for aid, vols in by_addon.items():
            assert len(vols) == 1, f"{aid}: {len(vols)} volumes"
            # Docker's CreatedAt is the data directory's mtime: the inode is the identity.
            inode = os.stat(vols[0]["Mountpoint"]).st_ino
            assert self.volume_inode.setdefault(aid, inode) == inode, f"volume of {aid} recreated"
        log = self.agent.log_path.read_text(errors="replace")
        for aid in self.live:
            made = log.count(f"action.done action=EnsureVolume key={aid}")
            assert made <= 1, f"volume of {aid} created {made} times"
        for c in containers:
            labels = c["Config"]["Labels"]
            aid = labels.get("orkestr.addon", "")
            if labels.get("orkestr.role") != "db" or aid == self.sleepy:
                continue
            now = (c["Id"], c["State"]["StartedAt"])
            before = self.db_started.setdefault(aid, now)
            assert now == before, f"running database of {aid} restarted or recreated"


async def test_kill9_at_random_points_loses_nothing(stack: Stack, agent: AgentProcess) -> None:
    assert stack.controller is not None
    c = stack.controller
    w = World(stack, agent)
    w.team = (await create_project(c, "team"))["id"]
    w.pro = (await create_project(c, "pro"))["id"]
    steady = await create_addon(c, w.team, "steady", "postgres")
    sleepy = await create_addon(c, w.pro, "sleepy", "redis")
    w.steady, w.sleepy = steady["id"], sleepy["id"]
    w.live = {w.steady: w.team, w.sleepy: w.pro}
    await wait_phase(c, w.team, w.steady, "ready")
    await wait_for(w.converged, 90, "both add-ons ready (the sleepy one may be asleep already)")
    job = await run_job(c, w.team, 'psql "$DATABASE_URL" -qc "create table runs(token text)"')
    assert job["exit_code"] == 0, job
    w.jobs[job["id"]] = w.team
    w.check_host()

    seed = os.environ.get("ORKESTR_CRASH_SEED", str(time.time_ns()))
    print(f"ORKESTR_CRASH_SEED={seed}")
    rng = random.Random(seed)
    kills: list[str] = []
    deadline = time.monotonic() + BUDGET_S
    while time.monotonic() < deadline or len(kills) < MIN_KILLS:
        what = await w.round(rng)
        delay = rng.uniform(0, 2.5)
        await asyncio.sleep(delay)
        await agent.kill9()
        kills.append(f"{what}+{delay:.2f}s")
        await agent.start()
        started = time.monotonic()
        try:
            await wait_for(w.converged, CONVERGE_S, "convergence after kill -9", interval=0.25)
        except AssertionError:
            print(agent.log_tail(80))
            raise AssertionError(f"not converged {CONVERGE_S}s after kill {kills[-1]}") from None
        w.check_host()
        print(f"kill {len(kills)}: {kills[-1]}, converged in {time.monotonic() - started:.1f}s")
    print(f"{len(kills)} kill points: {', '.join(kills)}")

    for job_id, project in w.jobs.items():
        _, job = await c.api("GET", f"/v1/projects/{project}/jobs/{job_id}")
        assert job["state"] == "succeeded", job
    twice = await run_job(
        c, w.team, 'psql "$DATABASE_URL" -tAc "select count(*) - count(distinct token) from runs"'
    )
    assert twice["exit_code"] == 0 and twice["output"].strip() == "0", twice
    counted = await run_job(c, w.team, 'psql "$DATABASE_URL" -tAc "select count(*) from runs"')
    assert counted["output"].strip() == str(len(w.token_jobs)), "a job did not run exactly once"
