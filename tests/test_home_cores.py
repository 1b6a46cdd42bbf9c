"""Home cores applied by the upkeep, against a real Docker: in place, and a cpuset Docker
refuses does not stop the round (the quota and credentials steps come after it)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from agent import model
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
    addon = AddonSpec(
        id=uuid.uuid4().hex, name="db", kind="postgres", resources=Resources(0.5, 64)
    )
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
