"""A database the kernel kills at its memory limit before it ever answers says so.

The upkeep's rounds, which set the MemoryLimit condition, reach ready databases only: a
Postgres whose initdb was OOM-killed at every restart (a 32 MB plan) showed as `Ready
Unreachable` / "container is restarting" for ever, never why. Real Docker: a container
under the add-on's database name that the kernel kills at its 16 MB limit, restarted by
Docker as a database is.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from agent import model, status
from agent.conditions import ConditionBook
from agent.docker import Docker
from agent.runtime import Agent
from agent.secrets import SecretStore
from agent.upkeep import Upkeep
from schemas.messages import AddonSpec, DesiredState, ProjectSpec, Resources
from tests.agent_fixtures import TOOLBOX, docker, wait_for


def _observed(addon: AddonSpec, state: model.ContainerState) -> model.Observed:
    db = model.ObservedContainer(
        id="x", name=model.db_name(addon.id), role="db", project_id="p", state=state,
        addon_id=addon.id,
    )  # fmt: skip
    return model.Observed(containers=(db,))


def test_only_awake_unready_databases_that_exist_are_checked() -> None:
    a, b, c, d = (
        AddonSpec(id=f"{i}" * 32, name=f"n{i}", kind="postgres", resources=Resources(0.5, 64))
        for i in range(4)
    )
    desired = DesiredState(version=1, host="h", generation=1, projects=(
        ProjectSpec(id="p", name="p", addons=(a, b, c, d)),))  # fmt: skip
    observed = model.Observed(
        containers=(
            *_observed(a, "restarting").containers,
            *_observed(b, "running").containers,
            *_observed(c, "restarting").containers,
        )
    )
    derived = status.Derived((), (), {a.id: False, b.id: True, c.id: False, d.id: False})
    views = {c.id: status.SleepView(state="deep")}
    got = Agent._unanswered(desired, observed, derived, views)
    # b is ready, c is asleep, d has no database container.
    assert [x.id for x, _db in got] == [a.id]


async def test_a_database_killed_at_its_limit_before_it_answers_shows_oomkilled(
    tmp_path: Path,
) -> None:
    host = f"oomunready-{uuid.uuid4().hex[:8]}"
    addon = AddonSpec(id=uuid.uuid4().hex, name="db", kind="postgres", resources=Resources(0.5, 16))
    name = model.db_name(addon.id)
    docker(
        "run", "-d", "--name", name, "--label", f"{model.LABEL_HOST}={host}",
        "--restart", "on-failure", "-m", "16m", "--memory-swap", "16m", "--entrypoint", "sh",
        TOOLBOX, "-c", "sleep 0.5; head -c 200m /dev/zero | tail >/dev/null",
    )  # fmt: skip
    try:
        book = ConditionBook()
        async with Docker(host) as d:
            upkeep = Upkeep(d, SecretStore(tmp_path), book)

            async def killed() -> bool:
                info = json.loads(docker("inspect", name))[0]
                db = model.ObservedContainer(
                    id=info["Id"], name=name, role="db", project_id="p",
                    state=info["State"]["Status"], addon_id=addon.id,
                )  # fmt: skip
                upkeep._inspected.pop(addon.id, None)  # the agent drops it on each event
                await upkeep.memory_check(addon, db)
                found = [c for c in book.of(addon.id) if c.type == "MemoryLimit"]
                return bool(found) and found[0].reason == "OOMKilled"

            await wait_for(killed, 60, "the MemoryLimit condition to say OOMKilled")
            (cond,) = [c for c in book.of(addon.id) if c.type == "MemoryLimit"]
            assert cond.status == "False" and "16 MB limit" in cond.message, cond
    finally:
        docker("rm", "-f", name, check=False)
