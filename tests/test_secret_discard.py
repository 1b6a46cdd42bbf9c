"""A deleted add-on's secret files go without holding the event loop (agent/secrets.py).

Sixty deletions at once, beside dockerd deleting their volumes, spent ~20 ms each in the
files' `rmtree` on the loop: a quarter of the agent's samples in the burst, while every
other chain's calls waited (docs/benchmarks.md, branch delete7).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from agent.secrets import SecretStore


async def test_discarding_secret_files_leaves_the_event_loop_free(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "secrets")
    store.ensure_root()
    addon = uuid.uuid4().hex
    store.write(addon, "redis", "pw", 1, None, 1 << 20)
    assert store.redis_conf_quotas([addon]) == {addon: 1 << 20}
    # Enough files that their deletion takes a while on any disk: the loop must tick on.
    bulk = store.dir(addon) / "bulk"
    bulk.mkdir()
    for i in range(10000):
        (bulk / str(i)).touch()
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await store.discard(addon)
    took = time.monotonic() - started
    await asyncio.sleep(0.05)  # the tick that a blocked loop owes, recorded
    ticking.cancel()
    assert not store.dir(addon).exists()
    assert store.redis_conf_quotas([addon]) == {}  # no complete secret: no quota kept
    assert took > 0.1, f"the deletion took {took:.3f}s: too quick to tell"
    # On the loop, one gap as long as the whole deletion; in a thread, the ticks go on.
    assert max(gaps) < took / 2, (max(gaps), took)
