"""Project networks against the real dockerd: a host holds 250 of them, and they go away.

The address pools come from deploy/services.sh (daemon.json `default-address-pools`);
Docker's defaults give about 31 bridge networks, so the first test fails without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest

from agent import model
from agent.docker import Docker
from agent.errors import NetworkRefused
from tests.agent_fixtures import docker
from tests.docker_leaks import host_name

pytestmark = pytest.mark.integration

COUNT = 250


async def test_host_holds_250_project_networks() -> None:
    host = host_name("n")
    projects = [uuid.uuid4().hex for _ in range(COUNT)]
    gate = asyncio.Semaphore(8)  # other tests share this dockerd

    async def create(d: Docker, project: str) -> None:
        async with gate:
            await d.create_network(model.network_name(project), project)

    async def remove(d: Docker, project: str) -> None:
        async with gate:
            await d.remove_network(model.network_name(project))

    async with Docker(host) as d:
        try:
            await asyncio.gather(*(create(d, p) for p in projects))
            observed = await d.snapshot()
            assert {n.project_id for n in observed.networks} == set(projects)
            subnets = {
                docker("network", "inspect", "-f", "{{range .IPAM.Config}}{{.Subnet}}{{end}}", n.id)
                for n in observed.networks[:3]
            }
            assert all(s.startswith("10.") and s.endswith("/24") for s in subnets), subnets
        finally:
            await asyncio.gather(*(remove(d, p) for p in projects), return_exceptions=True)
        assert (await d.snapshot()).networks == ()
    assert docker("network", "ls", "-q", "--filter", f"label=orkestr.host={host}") == ""


@contextlib.asynccontextmanager
async def one_network() -> AsyncIterator[tuple[Docker, str, str, str]]:
    """A project network of a host of its own, and the name of a container the test may put
    on it: (client, host, network, container). Both are removed at the end, and the host
    must then hold no network."""
    host = host_name("n")
    project = uuid.uuid4().hex
    name = model.network_name(project)
    box = f"orkestr-test-{uuid.uuid4().hex[:10]}"
    async with Docker(host) as d:
        await d.create_network(name, project)
        try:
            yield d, host, name, box
        finally:
            docker("rm", "-f", "-v", box, check=False)
            docker("network", "rm", name, check=False)
        assert (await d.snapshot()).networks == ()


async def test_remove_network_refuses_while_a_container_is_attached() -> None:
    async with one_network() as (d, host, name, box):
        docker(
            "run", "-d", "--name", box, "--network", name, "--label", f"orkestr.host={host}",
            "--label", "orkestr.managed=1", "orkestr-local/toolbox:bookworm", "sleep", "600",
        )  # fmt: skip
        with pytest.raises(NetworkRefused) as refused:
            await d.remove_network(name)
        assert refused.value.attached == (box,)  # what the operator is told to detach
        docker("rm", "-f", "-v", box)
        await d.remove_network(name)
        await d.remove_network(name)  # already gone: fine


async def test_remove_network_refuses_while_a_stopped_container_is_on_it() -> None:
    """Docker removes a network that only stopped containers are on (it counts running
    endpoints), and such a container can never start again. The agent leaves it, and says
    which container holds it; once that container is gone the network goes."""
    async with one_network() as (d, host, name, box):
        # An operator's container (not managed: no orkestr.managed label), exited.
        docker(
            "create", "--name", box, "--network", name, "--label", f"orkestr.host={host}",
            "orkestr-local/toolbox:bookworm", "true",
        )  # fmt: skip
        docker("start", "-a", box)
        with pytest.raises(NetworkRefused) as refused:
            await d.remove_network(name)
        assert refused.value.attached == (box,)
        assert [n.name for n in (await d.snapshot()).networks] == [name]
        docker("start", "-a", box)  # still starts: its network is there
        docker("rm", "-f", "-v", box)
        await d.remove_network(name)
