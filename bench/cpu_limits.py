"""CPU limit shapes against a busy neighbour: which one keeps the neighbour's query tail?

A stripped-down noisy-neighbour set-up, to test scheduling hypotheses quickly without the
agent: a plain Postgres container (1 CPU, 512 MB, the neighbour; the same small indexed
query as bench/neighbours.py from a client on the host) and a hog container (0.5 CPU,
256 MB) running four shell busy loops, as the PL/pgSQL loops of bench/neighbours.py's
CPU hog. Each *shape* sets both containers' CPU limits in place (`docker update`):

  period-100ms     CpuPeriod 100 ms, CpuQuota scaled: what Docker's `--cpus` sets
  period-10ms      bursts of 2.5 ms instead of 25 ms (the hog's 4 threads on 2 cores)
  period-5ms
  period-2ms-shares  plus CpuShares by plan (1024 the neighbour, 512 the hog)
  shares           100 ms period, CpuShares by plan
  pin-hog          the hog confined to CPU 1, the neighbour anywhere
  pin-both         the neighbour on CPU 0, the hog on CPU 1 (home cores, agent/placement.py)
  same-core        both on CPU 1: two add-ons sharing a home core on a crowded host

Rounds visit the shapes in a shuffled order; in each, a block of queries alone then a
block with the hog's loops running (`docker exec -d`, killed after), so the machine's
drift lands on every shape. Ratio = p99 hogged / p99 alone. Needs 2 CPUs or more.

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from typing import Any

import asyncpg
from _harness import adocker_cli, log, machine_facts, percentile, rnd, run_cli, table

from tests.noisy import NEIGHBOUR_QUERY, NEIGHBOUR_SETUP

POSTGRES = "orkestr-local/postgres:15"
TOOLBOX = "orkestr-local/toolbox:bookworm"
HOG = "for i in 1 2 3 4; do (while :; do :; done) & done; wait"
NEIGHBOUR_CPUS, HOG_CPUS = 1.0, 0.5


class Shape:
    def __init__(
        self,
        period_us: int,
        shares: tuple[int, int] = (1024, 1024),
        cpusets: tuple[str, str] = ("", ""),
    ) -> None:
        # (neighbour, hog) for shares and cpusets; "" is every CPU.
        self.period_us, self.shares, self.cpusets = period_us, shares, cpusets


ALL_CPUS = f"0-{(os.cpu_count() or 1) - 1}"
SHAPES = {
    "period-100ms": Shape(100_000),
    "period-10ms": Shape(10_000),
    "period-5ms": Shape(5_000),
    "period-2ms-shares": Shape(2_000, (1024, 512)),
    "shares": Shape(100_000, (1024, 512)),
    "pin-hog": Shape(100_000, cpusets=(ALL_CPUS, "1")),
    "pin-both": Shape(100_000, cpusets=("0", "1")),
    "same-core": Shape(100_000, cpusets=("1", "1")),
}


async def time_queries(conn: asyncpg.Connection, count: int) -> list[float]:
    samples: list[float] = []
    for i in range(count):
        t0 = time.perf_counter()
        await conn.fetchval(NEIGHBOUR_QUERY, (i * 7919) % 99000 + 1)
        samples.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.002)
    return samples


async def shape_up(name: str, neighbour: str, hog: str) -> None:
    s = SHAPES[name]
    for container, cpus, shares, cpuset in (
        (neighbour, NEIGHBOUR_CPUS, s.shares[0], s.cpusets[0] or ALL_CPUS),
        (hog, HOG_CPUS, s.shares[1], s.cpusets[1] or ALL_CPUS),
    ):
        quota = int(s.period_us * cpus)
        await adocker_cli(
            "update", "--cpu-period", str(s.period_us), "--cpu-quota", str(quota),
            "--cpu-shares", str(shares), "--cpuset-cpus", cpuset, container,
        )  # fmt: skip


async def main(quick: bool) -> dict[str, Any]:
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("cpu_limits needs 2 CPUs or more (the pinned shapes use CPUs 0 and 1)")
    queries, rounds = (200, 3) if quick else (300, 6)
    tag = f"bench-cpu-{uuid.uuid4().hex[:8]}"
    net, neighbour, hog = f"{tag}-net", f"{tag}-neighbour", f"{tag}-hog"
    label = ["--label", f"orkestr.bench={tag}"]
    limits = ["--cpu-period", "100000"]
    samples: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in SHAPES}
    results: dict[str, Any] = {
        "bench": "cpu_limits",
        "quick": quick,
        "queries_per_block": queries,
        "rounds": rounds,
        "machine": machine_facts(),
    }
    try:
        await adocker_cli("network", "create", *label, net)
        await adocker_cli(
            "run", "-d", "--name", neighbour, *label, "--network", net, "-m", "512m",
            "--memory-swap", "512m", *limits, "--cpu-quota", "100000",
            "-e", "POSTGRES_HOST_AUTH_METHOD=trust", POSTGRES,
        )  # fmt: skip
        await adocker_cli(
            "run", "-d", "--name", hog, *label, "--network", "none", "-m", "256m",
            "--memory-swap", "256m", *limits, "--cpu-quota", "50000", TOOLBOX, "sleep", "infinity",
        )  # fmt: skip
        _, ip, _ = await adocker_cli(
            "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", neighbour
        )
        conn: asyncpg.Connection | None = None
        for _ in range(60):
            try:
                conn = await asyncpg.connect(host=ip.strip(), user="postgres", ssl=False, timeout=2)
                await conn.execute(NEIGHBOUR_SETUP)
                break
            except (TimeoutError, OSError, asyncpg.PostgresError):
                conn = None
                await asyncio.sleep(1)
        assert conn is not None, "the neighbour never answered"
        for i in range(300):  # warm the plan cache and the buffers
            await conn.fetchval(NEIGHBOUR_QUERY, i * 100 + 1)
        results["load_before"] = round(os.getloadavg()[0], 2)
        for r in range(rounds):
            order = list(SHAPES)
            random.shuffle(order)
            log(f"round {r + 1}/{rounds}")
            for name in order:
                await shape_up(name, neighbour, hog)
                samples[name][0].extend(await time_queries(conn, queries))
                await adocker_cli("exec", "-d", hog, "sh", "-c", HOG)
                await asyncio.sleep(0.3)
                samples[name][1].extend(await time_queries(conn, queries))
                # Everything but the container's init (`sleep`): the loops and their shells.
                await adocker_cli("exec", hog, "sh", "-c", "kill -9 -1", check=False)
        await conn.close()
        results["load_after"] = round(os.getloadavg()[0], 2)
    finally:
        await adocker_cli("rm", "-f", neighbour, hog, check=False)
        await adocker_cli("network", "rm", net, check=False)
    for name, (alone, under) in samples.items():
        results[name] = {
            "p50_alone_ms": rnd(percentile(alone, 50)),
            "p50_hogged_ms": rnd(percentile(under, 50)),
            "p95_hogged_ms": rnd(percentile(under, 95)),
            "p99_alone_ms": rnd(percentile(alone, 99)),
            "p99_hogged_ms": rnd(percentile(under, 99)),
            "ratio_p99": rnd(percentile(under, 99) / percentile(alone, 99), 2),
        }
    return results


def report(results: dict[str, Any]) -> None:
    keys = ("p50_alone_ms", "p50_hogged_ms", "p95_hogged_ms", "p99_alone_ms", "p99_hogged_ms")
    rows = [[n, *(results[n][k] for k in keys), results[n]["ratio_p99"]] for n in SHAPES]
    print()
    print(
        table(
            ["shape", "p50 alone", "p50 hogged", "p95 hogged", "p99 alone", "p99 hogged", "ratio"],
            rows,
            "CPU limit shapes: the neighbour's query latency (ms) beside a 4-thread hog",
        )
    )
    print(f"load average: before {results['load_before']}, after {results['load_after']}")


if __name__ == "__main__":
    run_cli(__doc__, main, report, quick_help="200 queries per block, 3 rounds")
