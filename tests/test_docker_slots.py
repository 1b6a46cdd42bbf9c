"""The Docker adapter's slots against the real dockerd: which calls wait for one.

A slot bounds the calls the agent has in the daemon at once (agent/slots.py). A call that
only waits there, a stop on a database's shutdown or a volume removal on the local
driver's one-at-a-time queue, holds none: sixty deletions at once had 10-14 of the 16
slots held by volume removals queued in the daemon, and every other key's quick
container removal waited seconds behind them (docs/benchmarks.md, branch delete7).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from agent import model
from agent.docker import Docker
from tests.agent_fixtures import docker
from tests.docker_leaks import host_name

pytestmark = pytest.mark.integration


async def test_a_volume_removal_holds_no_slot_and_a_container_removal_does() -> None:
    host = host_name("s")
    addon = uuid.uuid4().hex
    volume = model.volume_name(addon)
    async with Docker(host, max_in_flight=1) as d:
        await d.create_volume(volume, addon, uuid.uuid4().hex)
        blocked = None
        try:
            async with d._slots.slot():  # every slot taken, as by a burst's other calls
                # A slotted call waits for the slot (the test's hold is real) ...
                blocked = asyncio.create_task(d.remove(f"orkestr-test-{uuid.uuid4().hex[:10]}"))
                await asyncio.sleep(0.5)
                assert not blocked.done()
                # ... and the volume's removal goes ahead without one.
                await asyncio.wait_for(d.remove_volume(volume), 20)
            await asyncio.wait_for(blocked, 20)  # the slot freed: it runs (404: no such)
        finally:
            if blocked is not None and not blocked.done():
                blocked.cancel()
            docker("volume", "rm", "-f", volume, check=False)
        assert docker("volume", "ls", "-q", "--filter", f"name={volume}") == ""
