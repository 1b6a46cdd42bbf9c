"""The Docker adapter's slots against the real dockerd: which calls wait for one.

A slot bounds the calls the agent has in the daemon at once (agent/slots.py). A call that
mostly waits there holds none: a stop on a database's shutdown, a volume removal on the
local driver's one-at-a-time queue, a container removal. In sixty deletions at once,
10-14 of the 16 slots were held by volume removals queued in the daemon, the rest by
holder removals (a network teardown each), and a stopped database's quick removal
waited seconds behind them (docs/benchmarks.md, branch delete7).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from agent import model
from agent.docker import Docker
from agent.errors import NotFound
from tests.agent_fixtures import docker
from tests.docker_leaks import host_name

pytestmark = pytest.mark.integration


async def test_removals_hold_no_slot_and_an_inspection_does() -> None:
    host = host_name("s")
    addon = uuid.uuid4().hex
    volume = model.volume_name(addon)
    async with Docker(host, max_in_flight=1) as d:
        await d.create_volume(volume, addon, uuid.uuid4().hex)
        box = f"orkestr-test-{uuid.uuid4().hex[:10]}"
        docker(
            "create", "--name", box, "--label", f"orkestr.host={host}",
            "orkestr-local/toolbox:bookworm", "true",
        )  # fmt: skip
        blocked = None
        try:
            async with d._slots.slot():  # every slot taken, as by a burst's other calls
                # A slotted call waits for the slot (the test's hold is real) ...
                blocked = asyncio.create_task(d.inspect(box))
                await asyncio.sleep(0.5)
                assert not blocked.done()
                # ... and the removals go ahead without one.
                await asyncio.wait_for(d.remove(box), 20)
                await asyncio.wait_for(d.remove_volume(volume), 20)
            with pytest.raises(NotFound):  # the slot freed: it runs, and finds none
                await asyncio.wait_for(blocked, 20)
        finally:
            if blocked is not None and not blocked.done():
                blocked.cancel()
            docker("rm", "-f", "-v", box, check=False)
            docker("volume", "rm", "-f", volume, check=False)
        assert docker("volume", "ls", "-q", "--filter", f"name={volume}") == ""
        assert docker("ps", "-aq", "--filter", f"name={box}") == ""
