"""A job's container is started once, against the real dockerd.

The crash test saw a job run twice: the agent sent a job's start and was killed -9; the
next agent's listing still said `created` (dockerd was carrying the start out), so it
planned a start of its own, which reached the container after the job had exited and ran
it again. `Docker.start_once` inspects first (an inspect waits for a start in progress)
and starts only a container that never ran.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from agent.docker import Docker
from tests.agent_fixtures import TOOLBOX, docker
from tests.docker_leaks import host_name

pytestmark = pytest.mark.integration


async def test_a_jobs_container_that_already_ran_is_not_started_again(tmp_path: Path) -> None:
    host = host_name("j")
    name = f"orkestr-test-job-{uuid.uuid4().hex[:10]}"
    runs = tmp_path / "runs"
    docker(
        "create", "--name", name, "--label", f"orkestr.host={host}", "--network", "none",
        "-v", f"{tmp_path}:/out", TOOLBOX, "sh", "-c", "echo ran >> /out/runs",
    )  # fmt: skip
    try:
        async with Docker(host) as d:
            assert await d.start_once(name)  # never ran: started
            assert await d.wait(name, 60) == 0
            first = (await d.inspect(name))["State"]["StartedAt"]
            # What the next agent does with a container it saw `created`: no second run
            # (a start would give it a new StartedAt at once).
            assert not await d.start_once(name)
            state = (await d.inspect(name))["State"]
        assert state["StartedAt"] == first and state["Status"] == "exited", state
        assert runs.read_text().splitlines() == ["ran"]
    finally:
        docker("rm", "-f", name, check=False)
