"""Home cores: which host CPUs each add-on's database may run on (Docker's CpusetCpus).

A CPU quota caps how much CPU an add-on gets, not where: a 0.5-CPU add-on with four busy
sessions runs on every core at once for a quarter of each period, and a neighbour's query
that wakes on one of those cores waits behind it. On this project's 2-vCPU machine that
put 3-5 ms on the neighbour's p99 (0.7 ms alone); a shorter CFS period or CpuShares by
plan did not help, keeping the two on different cores did (docs/benchmarks.md, "Noisy
neighbours"). So each add-on gets ceil(cpus) consecutive cores, the least loaded by the
plans' CPU already placed there: a hog then disturbs only the add-ons that share its
cores, and each quota can still be used in full.

Pure: desired add-ons and the host's CPU ids in, a cpuset string per add-on out. The
agent applies it in place (`docker update`, agent/upkeep.py), so a new placement moves
no data and restarts nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from schemas.messages import AddonSpec


def cpuset(cpus: Sequence[int]) -> str:
    """Docker's notation: "0-3", "2", "0,2"."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def cpus_of(cores: str) -> set[int]:
    """The inverse of `cpuset`: "0-3", "2", "0,2" to CPU ids ("" : none)."""
    out: set[int] = set()
    for part in filter(None, cores.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def homes(addons: Iterable[AddonSpec], host_cpus: Sequence[int]) -> dict[str, str]:
    """Add-on id -> its cpuset. The largest plans are placed first (they have the fewest
    choices), ties by id, so the same add-ons always get the same cores. One host CPU: no
    placement (every add-on on it anyway)."""
    cores = sorted(set(host_cpus))
    if len(cores) < 2:
        return {}
    load = [0.0] * len(cores)
    placed: dict[str, str] = {}
    live = [a for a in addons if not a.deleted]
    for addon in sorted(live, key=lambda a: (-a.resources.cpus, a.id)):
        width = min(len(cores), max(1, math.ceil(addon.resources.cpus - 1e-9)))
        # The window of `width` cores whose busiest core is least loaded, then the least
        # loaded in total, then the lowest.
        start = min(
            range(len(cores) - width + 1),
            key=lambda s: (max(load[s : s + width]), sum(load[s : s + width]), s),
        )
        for i in range(start, start + width):
            load[i] += addon.resources.cpus / width
        placed[addon.id] = cpuset(cores[start : start + width])
    return placed


# A home-core move (`docker update`: a `runc update` per container, ~25 ms of the daemon's
# CPU) waits while other add-ons on the host are starting, at most this long: sixty moves
# landed in the Postgres initdb of a burst of creates, on the cores it needed.
MOVE_WAIT_MAX_S = 120.0


def move_now(others_starting: bool, waiting_since: float | None, now: float) -> bool:
    """Whether an add-on whose cores differ from its home cores moves now. It waits while
    other add-ons start (the first answers of a burst would otherwise move while the rest
    still start), but never longer than MOVE_WAIT_MAX_S: a host where something always
    starts (a crash loop) still places its add-ons."""
    if not others_starting or waiting_since is None:
        return not others_starting
    return now - waiting_since >= MOVE_WAIT_MAX_S
