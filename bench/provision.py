"""Provisioning latency: API create call -> first successful query from the project network.

For each kind (postgres, redis), N runs (default 5, --quick 2), alternating with two
baselines measured in the same run, on the same project network, by the same client:

  orkestr      t0 = just before POST /v1/projects/{id}/addons (the agent's default holder
               pool: a holder parked before the call, if the pool has refilled since the
               previous create, is claimed; see agent/pool.py); the client (bench/_client.py,
               in a toolbox container's network namespace) starts polling as soon as the
               connection details are known: resolve the add-on name through Docker's DNS,
               connect afresh, SELECT 1 / PING, every 5 ms until one succeeds (t1).
  docker run   t0 = just before `docker run -d` (the docker CLI) of the same image with the
               agent's own container spec (same env incl. POSTGRES_PASSWORD_FILE, secret
               files, named volume, CPU/memory limits), straight on the project network
               under an alias; same polling client.
  engine API   the same container created and started through the Docker Engine API
               (aiodocker), i.e. without the CLI's own start-up.

Team plan (never sleeps). Each add-on is deleted (through the API) after its run and each
baseline container removed, so every run starts from the same state. One warm-up run of
each variant is not counted.

Prints a table and ends with one JSON line. Ratio = p50(orkestr) / p50(docker run),
target <= 1.3.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from _harness import (
    Bench,
    EventLog,
    activity,
    credentials,
    log,
    machine_facts,
    percentile,
    plans_toml,
    print_context,
    rnd,
    run_cli,
    table,
)

from agent import model
from schemas.messages import Resources

CPUS, MEMORY_MB = 1.0, 512
TARGET_RATIO = 1.3
POLL = {"interval_ms": 5, "attempt_timeout_s": 1.0, "deadline_s": 180}


async def run_ours(b: Bench, events: EventLog, project_id: str, kind: str) -> dict[str, Any]:
    client = b.clients[0]
    name = f"{kind[:2]}-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    a = await b.create_addon(project_id, name, kind)
    t_api = time.monotonic()
    target = credentials(await b.env(project_id), name)
    await client.poll_start(target, **POLL)
    r = await client.poll_result()
    if not r["ok"]:
        raise RuntimeError(f"orkestr {kind}: no successful query: {r}")
    holder, db = model.holder_name(a["id"]), model.db_name(a["id"])
    marks = {
        "api_ms": t_api,
        "holder_created_ms": events.first("container", "create", holder, t0),
        "holder_started_ms": events.first("container", "start", holder, t0),
        # A parked holder claimed instead (agent/pool.py): renamed to the add-on's holder.
        "holder_claimed_ms": events.first("container", "rename", holder, t0),
        "db_created_ms": events.first("container", "create", db, t0),
        "db_started_ms": events.first("container", "start", db, t0),
    }
    out = {k: rnd((v - t0) * 1000, 1) if v else None for k, v in marks.items()}
    out["total_ms"] = (r["t1"] - t0) * 1000
    out["attempts"] = r["attempts"]
    await b.delete_addon(project_id, a["id"])
    return out


async def run_plain(
    b: Bench, events: EventLog, network: str, kind: str, how: str
) -> dict[str, Any]:
    client = b.clients[0]
    plain = b.plain(kind, network, Resources(cpus=CPUS, memory_mb=MEMORY_MB), shared_netns=False)
    try:
        t0 = time.monotonic()
        start = asyncio.create_task(plain.run_cli() if how == "cli" else plain.run_api())
        await client.poll_start(plain.target(), **POLL)
        r = await client.poll_result()
        await start
        if not r["ok"]:
            raise RuntimeError(f"plain {kind} ({how}): no successful query: {r}")
        created = events.first("container", "create", plain.db_name, t0)
        started = events.first("container", "start", plain.db_name, t0)
        return {
            "total_ms": (r["t1"] - t0) * 1000,
            "db_created_ms": rnd((created - t0) * 1000, 1) if created else None,
            "db_started_ms": rnd((started - t0) * 1000, 1) if started else None,
            "attempts": r["attempts"],
        }
    finally:
        await plain.remove()


async def main(quick: bool) -> dict[str, Any]:
    runs = 2 if quick else 5
    kinds = ("postgres", "redis")
    results: dict[str, Any] = {"bench": "provision", "quick": quick, "runs": runs}
    results["machine"] = machine_facts()
    async with Bench(plans_toml(cpus=CPUS, memory_mb=MEMORY_MB)) as b, EventLog(b) as events:
        results["code"] = b.code
        project = await b.project("team")
        pid = project["id"]
        network = model.network_name(pid)
        # A first add-on makes the agent create the project network, which the client joins.
        warm = await b.ready_addon(pid, "warm", "postgres")
        await b.client(pid)
        await b.delete_addon(pid, warm["id"])
        variants: dict[str, Callable[[str], Awaitable[dict[str, Any]]]] = {
            "orkestr": lambda kind: run_ours(b, events, pid, kind),
            "docker_run": lambda kind: run_plain(b, events, network, kind, "cli"),
            "engine_api": lambda kind: run_plain(b, events, network, kind, "api"),
        }
        results["activity_before"] = activity(b.host)
        for kind in kinds:
            log(f"{kind}: warm-up")
            for fn in variants.values():
                await fn(kind)
            samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
            for i in range(runs):
                order = list(variants) if i % 2 == 0 else list(reversed(variants))
                for v in order:
                    s = await variants[v](kind)
                    samples[v].append(s)
                    log(f"{kind} run {i + 1}/{runs} {v}: {s['total_ms']:.0f} ms")
            results[kind] = summarise(samples)
        results["activity_after"] = activity(b.host)
    return results


def summarise(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v, runs in samples.items():
        totals = [r["total_ms"] for r in runs]
        out[v] = {
            "ms": [rnd(x, 1) for x in totals],
            "p50_ms": rnd(percentile(totals, 50), 1),
            "min_ms": rnd(min(totals), 1),
            "max_ms": rnd(max(totals), 1),
        }
        # How many of ours claimed a parked holder (the others started their own).
        out[v]["claimed_runs"] = sum(1 for r in runs if r.get("holder_claimed_ms") is not None)
        # Median of each step's offset from t0, where Docker reported it.
        for key in runs[0]:
            if key.endswith("_ms") and key != "total_ms":
                vals = [r[key] for r in runs if r.get(key) is not None]
                if vals:
                    out[v].setdefault("steps_p50_ms", {})[key] = rnd(percentile(vals, 50), 1)
    ours = out["orkestr"]["p50_ms"]
    out["ratio_p50"] = rnd(ours / out["docker_run"]["p50_ms"])
    out["ratio_p50_vs_engine_api"] = rnd(ours / out["engine_api"]["p50_ms"])
    out["target_ratio"] = TARGET_RATIO
    out["pass"] = out["ratio_p50"] <= TARGET_RATIO
    return out


def report(results: dict[str, Any]) -> None:
    rows = []
    for kind in ("postgres", "redis"):
        r = results[kind]
        for v in ("orkestr", "docker_run", "engine_api"):
            rows.append([kind, v, len(r[v]["ms"]), r[v]["p50_ms"], r[v]["min_ms"], r[v]["max_ms"]])
    print()
    print(table(["kind", "variant", "n", "p50 ms", "min ms", "max ms"], rows,
                "Provisioning: create call -> first successful query (client on the project network)"))  # fmt: skip
    print()
    rows = []
    for kind in ("postgres", "redis"):
        r = results[kind]
        rows.append([kind, r["ratio_p50"], r["ratio_p50_vs_engine_api"], f"<= {TARGET_RATIO}",
                     "PASS" if r["pass"] else "FAIL"])  # fmt: skip
    print(
        table(["kind", "ours/docker run", "ours/engine API", "target", ""], rows, "Ratios of p50")
    )
    print()
    rows = []
    for kind in ("postgres", "redis"):
        steps = results[kind]["orkestr"].get("steps_p50_ms", {})
        rows.append([kind, *(steps.get(k, "-") for k in (
            "api_ms", "holder_created_ms", "holder_started_ms", "holder_claimed_ms",
            "db_created_ms", "db_started_ms")),
            results[kind]["orkestr"]["p50_ms"],
            *(results[kind]["docker_run"].get("steps_p50_ms", {}).get(k, "-") for k in ("db_created_ms", "db_started_ms")),
            results[kind]["docker_run"]["p50_ms"]])  # fmt: skip
    print(table(
        ["kind", "API answered", "holder created", "holder started", "holder claimed",
         "db created", "db started",
         "first query", "docker run: created", "started", "first query"],
        rows, "Where the time goes (orkestr, p50 ms after the create call; from Docker events)"))  # fmt: skip
    print()
    print_context(results)


if __name__ == "__main__":
    run_cli(__doc__, main, report, quick_help="2 runs instead of 5")
