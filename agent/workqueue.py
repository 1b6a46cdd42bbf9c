"""The keyed work queue: one serial worker per key, keys in parallel, backoff per key.

A key is what a plan action belongs to: an add-on, a job or a project network. Each pass
hands every key's chain of actions to `KeyedWorkers.submit`; a key whose worker is still
busy, backing off or permanently failed is skipped, and a worker that finishes asks for
another pass, so events that arrive mid-chain coalesce into one more plan (kopf's
`queueing.py`). Nothing here interprets an event: the planner decides, this only runs.

Three outcomes per chain (controller-runtime, kopf):
- done: the key's failure record and backoff reset;
- transient failure: retried after a capped, jittered delay that doubles per attempt;
- permanent failure: not retried until the key's fingerprint (its spec) changes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from agent import slots

log = logging.getLogger("orkestr.agent.queue")


def backoff_delay(attempt: int, u: float, first: float = 0.5, cap: float = 30.0) -> float:
    """The wait before retry number `attempt` (1-based), `u` in [0, 1) the jitter draw.

    first, 2*first, 4*first, ... up to cap, each scaled into [0.8, 1.2) so keys that failed
    together (the daemon restarted) do not retry in lockstep.
    """
    base = min(cap, first * 2.0 ** min(max(attempt - 1, 0), 32))
    return base * (0.8 + 0.4 * u)


@dataclass(frozen=True)
class ChainResult:
    """What running one key's chain came to; `error` None means every action succeeded."""

    error: str | None = None
    permanent: bool = False


@dataclass
class _Failure:
    message: str
    attempts: int
    not_before: float  # monotonic
    fingerprint: str
    permanent: bool


A = TypeVar("A")
# Added to the place in line of a chain not handed out `first`.
LATER = 1 << 40


class KeyedWorkers(Generic[A]):
    def __init__(
        self,
        run: Callable[[str, Sequence[A]], Awaitable[ChainResult]],
        on_done: Callable[[], None],
        first_s: float = 0.5,
        cap_s: float = 30.0,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run = run
        self._on_done = on_done
        self._first = first_s
        self._cap = cap_s
        self._rng = rng
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, _Failure] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # Completions are numbered, so a pass can tell a chain that finished after its
        # snapshot (the snapshot is stale for that key) from one that finished before.
        self.epoch = 0
        self._done_epoch: dict[str, int] = {}
        # Work that goes ahead of anything queued for its key (a wake a client waits for).
        self._urgent: dict[str, Sequence[A]] = {}
        self._submitted = 0  # chains handed out so far: each one's place in line

    def busy(self, key: str) -> bool:
        task = self._tasks.get(key)
        return task is not None and not task.done()

    def in_flight(self) -> int:
        return sum(1 for t in self._tasks.values() if not t.done())

    def submit(
        self,
        key: str,
        chain: Sequence[A],
        fingerprint: str = "",
        seen_epoch: int | None = None,
        first: bool = False,
    ) -> bool:
        """Start `chain` on `key`'s worker; False if the key is not due for one now.

        `seen_epoch`: the epoch at which the plan's observation was taken; a key whose
        last chain finished after it is skipped, since its completion asks for a new pass.
        `first`: its calls to the daemon go ahead of every other chain's (agent/slots.py).
        """
        if not chain or self.busy(key):
            return False
        if seen_epoch is not None and self._done_epoch.get(key, -1) > seen_epoch:
            return False
        failure = self._failures.get(key)
        if failure is not None:
            if failure.permanent:
                if failure.fingerprint == fingerprint:
                    return False
                del self._failures[key]  # the spec changed: a fresh start
            elif self._clock() < failure.not_before:
                return False
        self._submitted += 1
        order = self._submitted + (0 if first else LATER)
        self._tasks[key] = asyncio.create_task(
            self._work(key, chain, fingerprint, order), name=f"key-{key}"
        )
        return True

    def urgent(self, key: str, chain: Sequence[A]) -> None:
        """Run `chain` on `key`'s worker ahead of any work queued for the key.

        At once if the worker is idle (a key backing off waits no longer for this), else
        right after the chain it runs: never beside it. Its success leaves the key's
        failure record alone (the failed work is still to do); its failure is recorded,
        so the next passes retry it with the key's backoff.
        """
        if not chain:
            return
        if self.busy(key):
            self._urgent[key] = chain
            return
        self._tasks[key] = asyncio.create_task(self._work(key, (), "", 0), name=f"key-{key}")
        self._urgent[key] = chain

    async def _work(self, key: str, chain: Sequence[A], fingerprint: str, order: int) -> None:
        # The chain's place in line for the daemon's slots (agent/slots.py): chains handed
        # out earlier go first, so they finish one after another instead of in lockstep.
        slots.ORDER.set(order)
        if chain:
            self._record(key, await self._guarded(key, chain), fingerprint)
        slots.ORDER.set(0)  # urgent work (a wake a client waits for) goes first
        while (urgent := self._urgent.pop(key, None)) is not None:
            result = await self._guarded(key, urgent)
            if result.error is not None:
                previous = self._failures.get(key)
                self._record(key, result, previous.fingerprint if previous is not None else "")
        self.epoch += 1
        self._done_epoch[key] = self.epoch
        self._on_done()

    async def _guarded(self, key: str, chain: Sequence[A]) -> ChainResult:
        try:
            return await self._run(key, chain)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in one chain must not stop the other keys
            log.exception("key.crashed key=%s", key)
            return ChainResult(f"internal error: {exc!r}")

    def _record(self, key: str, result: ChainResult, fingerprint: str) -> None:
        if result.error is None:
            self._failures.pop(key, None)
            return
        previous = self._failures.get(key)
        attempts = (previous.attempts if previous is not None else 0) + 1
        delay = backoff_delay(attempts, self._rng(), self._first, self._cap)
        self._failures[key] = _Failure(
            result.error, attempts, self._clock() + delay, fingerprint, result.permanent
        )
        if result.permanent:
            log.error("key.failed_permanently key=%s error=%s", key, result.error)
            return
        log.warning("key.retry key=%s attempt=%d in=%.2fs", key, attempts, delay)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._on_done)

    def failed(self) -> dict[str, str]:
        """key -> message of every key whose last chain failed (transient or permanent)."""
        return {k: f.message for k, f in self._failures.items()}

    def permanent(self) -> dict[str, str]:
        return {k: f.message for k, f in self._failures.items() if f.permanent}

    def settle(self, planned: set[str], seen_epoch: int) -> None:
        """After a pass: a key with nothing planned is done, its failure record with it.

        Only for keys whose last chain finished before the pass's snapshot: that plan
        saw the chain's effects. Finished tasks and their bookkeeping are dropped too.
        """
        for key in list(self._failures):
            if (
                key not in planned
                and not self.busy(key)
                and self._done_epoch.get(key, -1) <= seen_epoch
            ):
                del self._failures[key]
                timer = self._timers.pop(key, None)
                if timer is not None:
                    timer.cancel()
        for key in [k for k, t in self._tasks.items() if t.done()]:
            del self._tasks[key]
        for key in [k for k, e in self._done_epoch.items() if e <= seen_epoch and k not in planned]:
            del self._done_epoch[key]

    async def idle(self) -> None:
        """Until every worker has finished (tests and shutdown)."""
        while running := [t for t in self._tasks.values() if not t.done()]:
            await asyncio.gather(*running, return_exceptions=True)

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
