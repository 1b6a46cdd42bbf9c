"""Slots for calls to a shared daemon, handed out to the oldest work first.

`KeyedWorkers` runs every key's chain at once; the Docker adapter lets a few calls run at a
time. With a first-come queue, sixty chains advanced in lockstep: every chain's first call,
then every chain's second, so the first database started only once every holder had, and
the slowest to become ready (a Postgres in initdb) started last. Here a waiting call goes
ahead of the calls of work submitted after its own (`ORDER`, set by the worker running the
chain), so chains finish one after another in the order they were handed out, except that
chains handed out `first` (those that start a Postgres) go ahead of all others; calls made
outside any chain (the pass's observation, probes, upkeep, wakes) go first of all.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator
from contextvars import ContextVar

# The running chain's place in line: lower goes first; 0 outside any chain.
ORDER: ContextVar[int] = ContextVar("slot_order", default=0)


class PrioritySlots:
    """A semaphore whose waiters are served lowest `ORDER` first, then first come."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for *_, f in self._waiters if not f.done())

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire(ORDER.get())
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, order: int) -> None:
        if self._free > 0 and not self.waiting:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (order, next(self._arrivals), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # granted as we were cancelled: pass it on
            raise

    def _release(self) -> None:
        while self._waiters:
            *_, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1
