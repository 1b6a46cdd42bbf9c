"""A job's or app's image that declares a VOLUME gets a tmpfs there, not an anonymous
volume on the host's disk: a real controller, agent and dockerd.

The postgres image (the official one and ours) declares its data directory a VOLUME with
mode 1777, and `postgres:*` is on the default job allowlist: a job running it as nobody
wrote to an anonymous volume on the host's root disk, past the read-only root and the
tmpfs scratch that keep every other write in the job's memory (found by probe14).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from controller.releases import app_id
from tests.agent_fixtures import (
    IMAGES,
    TOOLBOX,
    AgentProcess,
    Stack,
    create_project,
    docker,
    run_job,
    running_agent,
    wait_for,
)
from tests.services import ControllerProcess

pytest_plugins = ["tests.agent_fixtures"]

POSTGRES = IMAGES["postgres"]
JOB_IMAGES = (f"{TOOLBOX.rpartition(':')[0]}:*", f"{POSTGRES.rpartition(':')[0]}:*")
DATA = "/var/lib/postgresql/data"


class VolumeImagesController(ControllerProcess):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allowed_images=JOB_IMAGES, **kwargs)


class VolumeImagesStack(Stack):
    controller_class = VolumeImagesController


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[Stack]:
    s = VolumeImagesStack()
    await s.start()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def agent(stack: Stack) -> AsyncIterator[AgentProcess]:
    async with running_agent(stack, job_images=JOB_IMAGES) as proc:
        yield proc


def outcomes(output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def inspect(name: str) -> dict[str, Any] | None:
    found = json.loads(docker("inspect", name, check=False) or "[]")
    return found[0] if found else None


async def test_an_images_volume_is_scratch_in_memory_not_the_hosts_disk(
    stack: Stack, agent: AgentProcess
) -> None:
    assert json.loads(docker("image", "inspect", "-f", "{{json .Config.Volumes}}", POSTGRES))
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    pid = project["id"]
    script = (
        # Every directory this job may write to that is not a tmpfs (-xdev would skip a
        # volume: it is another filesystem than the root).
        "on_disk=; for d in $(find / \\( -path /proc -o -path /sys -o -path /dev \\) -prune "
        "-o -type d -writable -print 2>/dev/null); do "
        '[ "$(stat -f -c %T $d)" = tmpfs ] || on_disk="$on_disk $d"; done; '
        'echo "on_disk=$on_disk"; '
        f'echo "data=$(stat -f -c %T {DATA})"; '
        # The image's data directory still takes writes, within the job's memory.
        f"dd if=/dev/zero of={DATA}/fill bs=1M count=50 2>/dev/null; "
        f'echo "written=$(($(stat -c %s {DATA}/fill) / 1048576))"'
    )
    job = await run_job(c, pid, script, image=POSTGRES)
    assert job["state"] == "succeeded", job
    seen = outcomes(job["output"])
    assert seen.get("on_disk") == "", job["output"]
    assert seen.get("data") == "tmpfs" and seen.get("written") == "50", job["output"]

    # An app of that image: the same, and it runs for as long as the release does.
    name = f"orkestr-app-{app_id(pid, 'web')}"
    apps = {"web": {"image": POSTGRES, "command": ["sh", "-c", "exec sleep infinity"]}}
    status, body = await c.api("POST", f"/v1/projects/{pid}/releases", {"apps": apps})
    assert status == 201, body

    def running() -> dict[str, Any] | None:
        info = inspect(name)
        return info if info and info["State"]["Running"] else None

    info = await wait_for(running, 120, f"{name} running")
    assert [m for m in info["Mounts"] if m["Type"] == "volume"] == [], info["Mounts"]
    assert DATA in info["HostConfig"]["Tmpfs"], info["HostConfig"]
    status, body = await c.api("POST", f"/v1/projects/{pid}/releases", {"apps": {}})
    assert status == 201, body
    await wait_for(lambda: inspect(name) is None, 60, "the app container removed")


async def test_an_app_made_with_an_anonymous_volume_is_made_again_without_it(
    stack: Stack, agent: AgentProcess
) -> None:
    # An app container made before the fix (an anonymous volume at the image's VOLUME)
    # kept it until its next release: the tenant could fill the host's disk meanwhile.
    c = stack.controller
    assert c is not None
    pid = (await create_project(c, "team"))["id"]
    name = f"orkestr-app-{app_id(pid, 'web')}"
    apps = {"web": {"image": POSTGRES, "command": ["sh", "-c", "exec sleep infinity"]}}
    status, body = await c.api("POST", f"/v1/projects/{pid}/releases", {"apps": apps})
    assert status == 201, body
    made = await wait_for(lambda: inspect(name), 120, f"{name} made")

    # The agent stops; its container is made again as an agent before the fix made it:
    # the same name, labels (release, spec hash), image, command and network.
    await agent.stop()
    docker("rm", "-f", name)
    labels = [f"--label={k}={v}" for k, v in made["Config"]["Labels"].items()]
    network = made["HostConfig"]["NetworkMode"]
    docker("create", "--name", name, *labels, f"--network={network}", "--user=nobody",
           POSTGRES, *made["Config"]["Cmd"])  # fmt: skip
    docker("start", name)
    old = inspect(name)
    assert old is not None
    (volume,) = [m["Name"] for m in old["Mounts"] if m["Type"] == "volume"]

    await agent.start()

    def replaced() -> dict[str, Any] | None:
        info = inspect(name)
        fresh = info and info["Id"] != old["Id"] and info["State"]["Running"]
        return info if fresh else None

    info = await wait_for(replaced, 60, f"{name} made again")
    assert [m for m in info["Mounts"] if m["Type"] == "volume"] == [], info["Mounts"]
    assert DATA in info["HostConfig"]["Tmpfs"], info["HostConfig"]
    # The anonymous volume went with the old container.
    assert docker("volume", "ls", "-q", "--filter", f"name={volume}", check=False) == ""
    status, body = await c.api("POST", f"/v1/projects/{pid}/releases", {"apps": {}})
    assert status == 201, body
    await wait_for(lambda: inspect(name) is None, 60, "the app container removed")
