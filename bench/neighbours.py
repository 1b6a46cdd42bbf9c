"""Noisy neighbours: a neighbour's query p99 while another add-on hogs memory, CPU or disk.

Two Postgres add-ons on one host agent, in two projects:

  neighbour  Team plan (1 CPU, 512 MB): a client on the host times a small indexed
             range query (`SELECT sum(v) FROM items WHERE id BETWEEN x AND x + 100`,
             100k rows) on one open connection, QUERIES queries per block.
  hog        `hog` plan (0.5 CPU, 256 MB, 24 MB storage), its tenant's own SQL run by
             psql inside its container (so the hog's client is charged to it too):
               memory  SELECT length(repeat('x', 600000000)): OOM-killed at its limit
               cpu     4 sessions of a PL/pgSQL busy loop: capped by its CPU quota
               disk    INSERTs until the storage quota refuses them, then retries

Blocks alternate alone / hogged, CYCLES times per hog, plus one last alone block, so
drift in the machine's other load lands on both sides. Ratio = p99(hogged) / p99(alone),
target <= 1.20. The figures are only as quiet as the machine: the load average before
and after is recorded.

ORKESTR_BENCH_PIN=1 is an experiment, not what the agent does: after both add-ons are
ready the bench pins the neighbour's database container to CPU 0 and the hog's to CPU 1
(`docker update --cpuset-cpus`), to measure what keeping them off each other's cores buys
(docs/benchmarks.md, "Noisy neighbours").

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from typing import Any

from _harness import (
    Bench,
    activity,
    adocker_cli,
    log,
    machine_facts,
    print_context,
    run_cli,
    table,
)

from agent import model
from tests.noisy import HOGS, Target, hogging, percentile, prepare_neighbour, time_queries

TARGET_RATIO = 1.20
PLANS = """
[team]
max_addons = 5
cpus = 1.0
memory_mb = 512
storage_mb = 1024
sleep = { enabled = false }

[hog]
max_addons = 1
cpus = 0.5
memory_mb = 256
storage_mb = 24
sleep = { enabled = false }
"""


async def target(b: Bench, project_id: str, addon: dict[str, Any]) -> Target:
    env = await b.env(project_id)
    url = urllib.parse.urlsplit(env[addon["env_var"]])
    ip = await b.ip_on(model.holder_name(addon["id"]), model.network_name(project_id))
    return Target(
        host=ip,
        user=urllib.parse.unquote(url.username or ""),
        password=urllib.parse.unquote(url.password or ""),
    )


async def main(quick: bool) -> dict[str, Any]:
    queries, cycles = (300, 2) if quick else (500, 5)
    results: dict[str, Any] = {
        "bench": "neighbours",
        "quick": quick,
        "queries_per_block": queries,
        "cycles": cycles,
        "machine": machine_facts(),
        "pinned": os.environ.get("ORKESTR_BENCH_PIN") == "1",
    }
    async with Bench(PLANS) as b:
        results["code"] = b.code
        quiet, noisy = await b.project("team"), await b.project("hog")
        nb = await b.ready_addon(quiet["id"], "neighbour", "postgres")
        hg = await b.ready_addon(noisy["id"], "hog", "postgres")
        neighbour = await target(b, quiet["id"], nb)
        hog_target = await target(b, noisy["id"], hg)
        await prepare_neighbour(neighbour)
        if results["pinned"]:
            await adocker_cli("update", "--cpuset-cpus", "0", model.db_name(nb["id"]))
            await adocker_cli("update", "--cpuset-cpus", "1", model.db_name(hg["id"]))
        results["activity_before"] = activity(b.host)
        results["load_before"] = round(os.getloadavg()[0], 2)
        for hog in HOGS:
            log(f"hog: {hog}")
            alone: list[float] = []
            under: list[float] = []
            failed = 0
            started = time.monotonic()
            for _ in range(cycles):
                alone += await time_queries(neighbour, queries)
                async with hogging(model.db_name(hg["id"]), hog_target, hog) as failures:
                    under += await time_queries(neighbour, queries)
                failed += sum(failures)
            alone += await time_queries(neighbour, queries)
            p99_alone, p99_under = percentile(alone, 99), percentile(under, 99)
            results[hog] = {
                "p50_alone_ms": round(percentile(alone, 50), 3),
                "p50_hogged_ms": round(percentile(under, 50), 3),
                "p99_alone_ms": round(p99_alone, 3),
                "p99_hogged_ms": round(p99_under, 3),
                "ratio_p99": round(p99_under / p99_alone, 3),
                "ratio_p50": round(percentile(under, 50) / percentile(alone, 50), 3),
                "hog_failed_runs": failed,
                "seconds": round(time.monotonic() - started, 1),
            }
        view = await b.addon(noisy["id"], hg["id"])
        results["hog_conditions"] = {
            c["type"]: c["reason"] for c in view["conditions"] if c["type"] != "Ready"
        }
        results["load_after"] = round(os.getloadavg()[0], 2)
        results["activity_after"] = activity(b.host)
    results["ratios"] = {h: results[h]["ratio_p99"] for h in HOGS}
    results["pass"] = all(r <= TARGET_RATIO for r in results["ratios"].values())
    return results


def report(results: dict[str, Any]) -> None:
    rows = [
        [
            hog,
            results[hog]["p50_alone_ms"],
            results[hog]["p50_hogged_ms"],
            results[hog]["p99_alone_ms"],
            results[hog]["p99_hogged_ms"],
            results[hog]["ratio_p99"],
            f"<= {TARGET_RATIO}",
            "PASS" if results[hog]["ratio_p99"] <= TARGET_RATIO else "FAIL",
        ]
        for hog in HOGS
    ]
    print()
    print(
        table(
            ["hog", "p50 alone", "p50 hogged", "p99 alone", "p99 hogged", "ratio", "target", ""],
            rows,
            "Noisy neighbours: the neighbour's query latency (ms)",
        )
    )
    print(f"hog conditions: {json.dumps(results['hog_conditions'])}")
    if results.get("pinned"):
        print("pinned (experiment): the neighbour's database on CPU 0, the hog's on CPU 1")
    print(f"load average: before {results['load_before']}, after {results['load_after']}")
    print_context(results)


if __name__ == "__main__":
    run_cli(__doc__, main, report, quick_help="300 queries per block, 2 cycles")
