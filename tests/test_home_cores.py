"""Home cores applied by the upkeep, against a real Docker: in place, and a cpuset Docker
refuses does not stop the round (the quota and credentials steps come after it)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from agent import model, placement
from agent.conditions import ConditionBook
from agent.docker import Docker
from agent.secrets import SecretStore
from agent.upkeep import Upkeep
from schemas.messages import AddonSpec, Resources
from tests.agent_fixtures import TOOLBOX, docker

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs")


async def test_upkeep_sets_home_cores_in_place_and_survives_a_refused_cpuset(
    tmp_path: Path,
) -> None:
    host = f"homecores-{uuid.uuid4().hex[:8]}"
    addon = AddonSpec(id=uuid.uuid4().hex, name="db", kind="postgres", resources=Resources(0.5, 64))
    name = model.db_name(addon.id)
    docker(
        "run", "-d", "--name", name, "--label", f"{model.LABEL_HOST}={host}",
        "--cpus", "0.5", "-m", "64m", "--memory-swap", "64m", TOOLBOX, "sleep", "infinity",
    )  # fmt: skip
    try:
        started = json.loads(docker("inspect", name))[0]["State"]["StartedAt"]
        async with Docker(host) as d:
            upkeep = Upkeep(d, SecretStore(tmp_path), ConditionBook())
            upkeep.homes = {addon.id: "1"}
            await upkeep._limits(addon)
            info = json.loads(docker("inspect", name))[0]
            assert info["HostConfig"]["CpusetCpus"] == "1"
            assert info["HostConfig"]["NanoCpus"] == 500_000_000
            assert info["State"]["StartedAt"] == started  # in place
            # A CPU the host does not have: Docker refuses, the round goes on.
            upkeep.homes = {addon.id: "4095"}
            returned = await upkeep._limits(addon)
            assert returned["HostConfig"]["CpusetCpus"] == "1"
            assert json.loads(docker("inspect", name))[0]["HostConfig"]["CpusetCpus"] == "1"
    finally:
        docker("rm", "-f", name, check=False)


async def test_a_move_waits_while_other_addons_start_but_not_for_ever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst's first answers used to move (`docker update`) while the rest started."""
    host = f"homecores-{uuid.uuid4().hex[:8]}"
    addon = AddonSpec(id=uuid.uuid4().hex, name="db", kind="postgres", resources=Resources(0.5, 64))
    name = model.db_name(addon.id)
    docker(
        "run", "-d", "--name", name, "--label", f"{model.LABEL_HOST}={host}",
        "--cpus", "0.5", "-m", "64m", "--memory-swap", "64m", TOOLBOX, "sleep", "infinity",
    )  # fmt: skip

    def cores() -> str:
        return str(json.loads(docker("inspect", name))[0]["HostConfig"]["CpusetCpus"])

    try:
        async with Docker(host) as d:
            upkeep = Upkeep(d, SecretStore(tmp_path), ConditionBook())
            upkeep.homes = {addon.id: "1"}
            starting = {"other"}
            upkeep.others_starting = lambda aid: bool(starting - {aid})
            await upkeep._limits(addon)
            await upkeep._limits(addon)
            assert cores() == ""  # waits: another add-on is starting
            starting.clear()
            await upkeep._limits(addon)
            assert cores() == "1"  # nothing starts any more: moved
            # Something always starting (a crash loop) delays a move, never stops it.
            upkeep.homes = {addon.id: "0"}
            starting.add("looping")
            monkeypatch.setattr(placement, "MOVE_WAIT_MAX_S", 0.0)
            await upkeep._limits(addon)  # starts the wait
            await upkeep._limits(addon)  # the wait is over
            assert cores() == "0"
    finally:
        docker("rm", "-f", name, check=False)
