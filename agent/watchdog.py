"""systemd's watchdog, petted only while the agent's loops make progress.

The unit sets `WatchdogSec=`; systemd then passes `WATCHDOG_USEC` and restarts the agent
when no `WATCHDOG=1` arrives in time. A live event loop alone proves little (a reconcile
pass stuck on a hung Docker call still lets a timer run), so each watched loop reports
progress with `beat(name)`, and `WATCHDOG=1` is sent only while every one of them has
beaten within the last `stall_s`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable

from agent.sdnotify import notify


def interval_from_env() -> float | None:
    """systemd's watchdog timeout in seconds, or None when the watchdog is off for us."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000


class Watchdog:
    def __init__(
        self,
        loops: Iterable[str],
        stall_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stall_s = stall_s
        self._clock = clock
        now = clock()
        # Start counted as progress: the first pass gets a full stall_s.
        self._last: dict[str, float] = {name: now for name in loops}

    def beat(self, name: str) -> None:
        self._last[name] = self._clock()

    def stalled(self) -> list[str]:
        now = self._clock()
        return sorted(n for n, t in self._last.items() if now - t > self.stall_s)

    def tick(self) -> bool:
        """Pet the watchdog if nothing stalled; True if it was petted."""
        if self.stalled():
            return False
        notify("WATCHDOG=1")
        return True

    async def run(self, timeout_s: float) -> None:
        """Tick at half the timeout, as sd_watchdog_enabled(3) advises."""
        while True:
            self.tick()
            await asyncio.sleep(timeout_s / 2)
