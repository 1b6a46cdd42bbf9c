"""Holders started ahead of need: a new add-on claims one instead of starting its own.

A container's start on a network costs ~250 ms more than one without (its sandbox, veth
and embedded DNS), and a new add-on's database can start only once its holder runs; a
running namespace joins one more network in ~40 ms. So the pool keeps `size` holders of
each kind's image running, parked on the host's parking network: internal (no route
out) and without inter-container traffic, so a parked holder, which runs `sleep` as
nobody, reaches nothing and is reached by nothing.

A claim (apply.py, in place of the holder's create) connects a parked holder to the
project network under the add-on's name, disconnects it from the parking network and
renames it to the add-on's holder; the chain then fences it before its database starts,
as it fences a holder it started. Docker cannot change labels: observe.py knows a claimed
holder by its name and its one project network, specs.drifted by its parked shape. The
rename comes last, so a claim cut off leaves either a parked-named container off the
parking network, which the pool removes, or a complete holder.

The pool refills only once no chain has run for a second: a burst's own starts, and the
work right after it, come first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from agent import model, specs
from agent.docker import Docker
from agent.errors import AgentError, TransientError

log = logging.getLogger("orkestr.agent.pool")
KINDS = ("postgres", "redis")
# How often a full pool looks again (a claim asks at once), and one short of holders
# while chains run (it refills as soon as they are done).
RECHECK_S = 2.0
SHORT_RECHECK_S = 0.1
# A full pool lists its holders this often (to sweep what a crash or a hand left).
SWEEP_S = 30.0
# Chains quiet this long before a refill: the work that follows a burst of creates (the
# client's deletes, its next creates) does not find dockerd busy with the pool's starts.
IDLE_S = 1.0
# Add-ons still starting (readiness polls without an answer) that hold a refill back: a
# burst's four holder starts landed in its last Postgres initdb, on the cores it needed.
# One add-on alone does not: the next create of a client that makes one at a time
# (bench/provision.py) must find a parked holder, and waiting for every starting add-on
# left it none (79ae8f5).
BURST_STARTING = 2


def refill_waits(chains_in_flight: int, starting: int) -> bool:
    """Whether the host is too busy for the pool's refill now."""
    return chains_in_flight > 0 or starting >= BURST_STARTING


class HolderPool:
    def __init__(
        self, docker: Docker, images: specs.Images, size: int, busy: Callable[[], bool]
    ) -> None:
        self.docker = docker
        self.size = size
        self.network = model.parking_network_name(docker.host)
        self._busy = busy
        self._templates = [specs.parked_holder_spec(kind, images) for kind in KINDS]
        self._ready: dict[str, list[str]] = {}  # parked shape hash -> parked, running names
        self._claimed: set[str] = set()  # names handed out: never parked again
        self._wake = asyncio.Event()
        self._idle_since: float | None = None
        self._swept = -SWEEP_S  # when the parked holders were last listed
        self._network_made = False
        self._network_gone = False  # removed, with no pool wanted

    def ready(self) -> int:
        return sum(len(names) for names in self._ready.values())

    async def claim(self, holder: specs.ContainerSpec) -> bool:
        """Make a parked holder `holder`, if one of its image is ready; False: none is."""
        if holder.network is None:
            return False
        names = self._ready.get(holder.parked_shape_hash)
        if not names:
            return False
        name = names.pop()
        self._claimed.add(name)
        self._wake.set()
        try:
            await asyncio.gather(
                self.docker.connect(holder.network, name, holder.aliases),
                self.docker.disconnect(self.network, name),
            )
            await self.docker.rename(name, holder.name)
        except AgentError as exc:
            # Never left half claimed: its alias may already resolve on the project network.
            with contextlib.suppress(AgentError):
                await self.docker.remove(name)
            raise TransientError(f"claiming parked holder {name}: {exc}") from None
        log.info("pool.claimed parked=%s holder=%s", name, holder.name)
        return True

    async def run(self) -> None:
        while True:
            full = True
            due = time.monotonic() - self._swept >= SWEEP_S
            # With no pool wanted the sweep still runs: it removes the holders (and the
            # network) a pool of an earlier configuration left.
            if due or (self.size > 0 and self.ready() < self.size * len(self._templates)):
                try:
                    full = await self.refill()
                except AgentError as exc:
                    self._network_made = False
                    log.warning("pool.refill_failed error=%s", exc)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RECHECK_S if full else SHORT_RECHECK_S)

    def _quiet(self) -> bool:
        """No chain has run for IDLE_S."""
        now = time.monotonic()
        if self._busy():
            self._idle_since = None
            return False
        if self._idle_since is None:
            self._idle_since = now
        return now - self._idle_since >= IDLE_S

    async def refill(self) -> bool:
        """Parked holders as they should be: `size` running per kind, parked only; any
        other parked container (cut off mid-claim, stopped, of an older spec) removed.
        False: short of holders (chains were running)."""
        if not self._quiet():
            return self.ready() >= self.size * len(self._templates)
        if self.size > 0 and not self._network_made:
            await self.docker.create_parking_network(self.network)
            self._network_made = True
        self._swept = time.monotonic()
        wanted = {t.shape_hash for t in self._templates}
        ready: dict[str, list[str]] = {shape: [] for shape in wanted}
        for raw in await self.docker.parked():
            name = (raw.get("Names") or ["/?"])[0].lstrip("/")
            if model.addon_of_holder(name) is not None:
                continue  # claimed: an add-on's holder now, the planner's
            if name in self._claimed:
                continue  # being claimed right now
            if _parked_ok(raw, self.network) and raw["Labels"][model.LABEL_SHAPE_HASH] in wanted:
                ready[raw["Labels"][model.LABEL_SHAPE_HASH]].append(name)
            else:
                log.info("pool.remove parked=%s state=%s", name, raw.get("State"))
                await self.docker.remove(name)
        for template in self._templates:
            names = ready[template.shape_hash]
            while len(names) > self.size:
                await self.docker.remove(names.pop())
            while len(names) < self.size and self._quiet():
                name = f"orkestr-pool-{uuid.uuid4().hex[:12]}"
                spec = msgspec.structs.replace(template, name=name, network=self.network)
                self._claimed.add(name)  # not handed out before it runs
                try:
                    await self.docker.run(spec)
                finally:
                    self._claimed.discard(name)
                names.append(name)
                log.info("pool.parked name=%s image=%s", name, template.image)
        self._ready = {
            shape: [n for n in names if n not in self._claimed] for shape, names in ready.items()
        }
        if self.size == 0 and not self._claimed and not self._network_gone:
            await self.docker.remove_network(self.network)  # none: nothing to do
            self._network_gone = True
        return self.ready() >= self.size * len(self._templates)


def _parked_ok(raw: dict[str, Any], network: str) -> bool:
    networks = set(((raw.get("NetworkSettings") or {}).get("Networks") or {}).keys())
    return raw.get("State") == "running" and networks == {network}
