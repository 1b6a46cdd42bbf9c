"""Data path once awake: pgbench and redis-benchmark throughput, add-on vs plain container.

Both targets sit on the same project network and are driven from the same toolbox
container on it (`docker exec`), by address:

  orkestr   a Team add-on (the Team plan never sleeps, so nothing can put it to sleep
            mid-run): the client talks to the holder's address, the database lives in
            the holder's network namespace; no proxy while awake.
  baseline  a plain database container straight on the network: the agent's own container
            spec (same image, env, secret files, volume, CPU and memory limits).
  light     a Starter add-on that falls into light sleep (paused) after 2 s idle: before
            each of its runs the bench waits until it is paused, so the run's client
            connections are opened while it sleeps (the first one wakes it; issue 12:
            those connections must not be relayed). Its own toolbox client, on its network.

  deep      a Pro add-on stopped after 2 s idle (light after 1 s): its connections are
            opened while the database is stopped. By default (agent.deep_wake = "queue")
            their SYNs wait in the kernel's NFQUEUE until the database answers and the
            connections are the database's own; ORKESTR_BENCH_DEEP_WAKE=relay measures
            the fallback instead, where the wake-socket keeper relays them for their
            whole life (splice(2)). Each run checks which path it measured (the keeper's
            relays and the add-on's direct clients, mid-run). pgbench and redis-benchmark
            open a set-up connection first, which completes the wake, so their own
            connections would go direct; the deep rows therefore use the pool load below.

Runs rotate orkestr / baseline / light across rounds to spread drift over all three.

Placement, alike for every row (pgbench and redis-benchmark): the agent pins each add-on
to home cores (agent/placement.py), and where it puts the awake add-on and the light one
depends on their ids, so the two often get different cores. Before each run the bench
reads the server's cores afresh (the agent moves add-ons while they are being created),
pins the plain container like the add-on it is compared with, and confines the client's
toolbox container (so pgbench and redis-benchmark, which `docker exec` runs in it) to the
cores its server is not on. Unpinned, the scheduler put the client now on the server's
core, now on the other, within one run: on this 2-vCPU VM that alone moved
redis-benchmark by up to 1.5x, more than any difference between the rows, and
differently for the light row (its own client, its own core) than for the baseline. When
the light add-on's cores differ from the awake one's, the plain container runs a second
time per round pinned like the light add-on (`baseline_light`), and the light ratio is
taken against that; otherwise the baseline run serves both. No row gets a placement the
others do not: the baseline is moved only to where the add-on it stands in for runs.
Every run records its cores, the load average, the CPU the agent, keeper and
controller used meanwhile, and the CPU per request (per pgbench transaction) of the
server's and the client's containers, read from their cgroups (`runs`;
`cpu_us_per_request_median` per row). That last figure is what a slower data path (a
rule in every packet's way, a quota) would raise, and other work on a shared machine
moves it far less than throughput. `cores_moved_during_runs` lists any move the agent
made while the rows ran. The pool load's clients are processes in the client's
namespace, not in its container: they stay free (every core), and the plain container is
pinned like the awake add-on for `baseline` and, when the light add-on's cores differ,
like the light one for `baseline_light`, with which the light pool is compared (as the
rows above do). Before every pool run, the baseline's included, every sleepy add-on is
asleep: one falling asleep (a pause; a Postgres shutdown and its checkpoint) lands in no
row's window.
  pgbench          scale 5 (pgbench -i -s 5 on each), -c 4 -j 2, -T 10 s (--quick: 3 s),
                   select-only (-S) and TPC-B-like (default script); TPS without the
                   initial connection time.
  redis-benchmark  -n 100000 (--quick: 20000) -c 20 -t get,set; requests per second.
  pool load       bench/_client.py's "load": 4 processes in the client's namespace each
                  open one connection at the same instant (all of them during the wake,
                  as an app's pool does), then run a closed loop for 5 s (--pool-seconds;
                  --quick: 3 s): pgbench -S's query (asyncpg, prepared), redis GET and SET
                  (raw RESP). Against baseline (opened while up), light and deep; q/s, p50.
Rounds: 5 (--quick: 1). Ratio = median(orkestr) / median(baseline), and
light_ratio = median(light) / median(baseline on the light add-on's cores); target >= 0.95
for both.
Pool rounds: 4 (--pool-rounds; --quick: 1), each mirrored: every target runs twice per
row, A B C C B A (A B C D D C B A with baseline_light), the first target rotating across
rounds, so a drift of the shared machine within a round weighs on both sides alike. A
round's ratio is the sum of its two runs over the baseline's two; a row's ratio is the
median of its rounds' ratios: light against baseline_light (baseline when the cores are
the same), target >= 0.95; deep against baseline, target >= 0.90. Each pool run records
the server's cores (and a move during the run), its CPU per query (cgroup), the CPU our
services used meanwhile and the load average before and after (`pool_runs`); --ss adds
`ss -ti` of the pool's sockets at both ends, mid-run. --pools runs the pool rows only;
--pool-modes set (or get,set, ...) some of them; --pool-awake adds the awake add-on's pool
(no wake; against `baseline`). After each Redis pool run the server's AOF counters (INFO
persistence) and its memory cgroup are recorded (`server_after`).
Storage: the bench's plans have no storage quota, so every add-on's data is a plain Docker
volume, like the plain container's. --storage-mb N gives every plan a quota: each add-on's
data then lives on its own loop filesystem (agent/loopfs.py), as with the shipped plans,
while the plain container keeps a plain volume (what `docker run` gives a user).

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import re
from typing import Any

from _harness import (
    Bench,
    Client,
    Plain,
    activity,
    adocker_cli,
    container_cpu_ns,
    container_memory,
    cpu_ms,
    credentials,
    deep_wake_mode,
    log,
    machine_facts,
    percentile,
    plans_toml,
    print_context,
    rnd,
    table,
)

from agent import model, netns
from agent.keeper_client import KeeperClient
from schemas.messages import PORTS, Resources

CPUS, MEMORY_MB = 1.0, 512
TARGET_RATIO = 0.95
LIGHT_AFTER_S = 2.0
DEEP_TARGET_RATIO = 0.90
POOL_CLIENTS = 4
POOL_ROUNDS, POOL_SECONDS = 4, 5.0
POOL_WHO = ("baseline", "light", "deep")
POOL_MODES = ("select", "get", "set")
WHO = ("orkestr", "baseline", "light")
TPS = re.compile(r"tps = ([\d.]+) \(without initial connection time\)")


async def pgbench(client: Client, t: dict[str, Any], args: list[str]) -> str:
    return await client.sh(
        "pgbench", "-h", t["host"], "-p", str(t["port"]), "-U", t["user"], *args, t["database"],
        env={"PGPASSWORD": t["password"]},
    )  # fmt: skip


async def pg_run(client: Client, t: dict[str, Any], mode: str, seconds: int) -> float:
    args = ["-c", "4", "-j", "2", "-T", str(seconds)] + (["-S"] if mode == "select" else [])
    out = await pgbench(client, t, args)
    m = TPS.search(out)
    if m is None:
        raise RuntimeError(f"no TPS in pgbench output:\n{out}")
    return float(m.group(1))


async def redis_run(client: Client, t: dict[str, Any], requests: int) -> dict[str, float]:
    out = await client.sh(
        "redis-benchmark", "-h", t["host"], "-p", str(t["port"]), "-a", t["password"],
        "-n", str(requests), "-c", "20", "-t", "get,set", "--csv",
    )  # fmt: skip
    rps: dict[str, float] = {}
    for row in csv.DictReader(io.StringIO(out)):
        rps[row["test"].lower()] = float(row["rps"])
    if set(rps) != {"get", "set"}:
        raise RuntimeError(f"unexpected redis-benchmark output:\n{out}")
    return rps


def per_request(before: list[float], after: list[float], requests: float) -> dict[str, float]:
    """CPU microseconds per request in the server's and the client's containers (their
    cgroups): unlike throughput, hardly moved by other work on the machine, so a data
    path that costs more per packet shows here even when the load hides it."""
    server, client = ((a - b) * 1000 / max(requests, 1) for a, b in zip(after, before, strict=True))
    return {"server": rnd(server, 2), "client": rnd(client, 2), "total": rnd(server + client, 2)}


async def own_connections(b: Bench, addon: dict[str, Any], client_ip: str) -> int:
    """The database's connections from the client's own address (a relayed one comes from
    the gateway), read in the holder's namespace."""
    info = await b.docker.containers.container(model.holder_name(addon["id"])).show()
    port = PORTS[addon["kind"]]
    return sum(
        1
        for s in netns.tcp_table(int(info["State"]["Pid"]))
        if s.state == netns.ESTABLISHED and s.local_port == port and s.remote_ip == client_ip
    )


async def main(
    quick: bool,
    pools_only: bool = False,
    pool_rounds: int = POOL_ROUNDS,
    pool_seconds: float = POOL_SECONDS,
    with_ss: bool = False,
    pool_modes: tuple[str, ...] = POOL_MODES,
    pool_awake: bool = False,
    storage_mb: int | None = None,
) -> dict[str, Any]:
    rounds = 1 if quick else 5
    seconds = 3 if quick else 10
    if quick:
        pool_rounds, pool_seconds = 1, 3
    requests = 20000 if quick else 100000
    results: dict[str, Any] = {
        "bench": "datapath", "quick": quick, "rounds": 0 if pools_only else rounds,
        "pool_rounds": pool_rounds, "pool_seconds": pool_seconds, "pool_modes": list(pool_modes),
        "pool_awake": pool_awake, "storage_mb": storage_mb,
        "pgbench": {"scale": 5, "clients": 4, "threads": 2, "seconds": seconds},
        "redis_benchmark": {"requests": requests, "clients": 20},
    }  # fmt: skip
    results["machine"] = machine_facts()
    plans = plans_toml(
        cpus=CPUS, memory_mb=MEMORY_MB, light_after_s=LIGHT_AFTER_S, deep_after_s=24 * 3600,
        pro_sleep=(1.0, 2.0), storage_mb=storage_mb,
    )  # fmt: skip
    deep_wake = deep_wake_mode()
    results["deep_wake"] = deep_wake
    async with Bench(plans, agent_extra=f'deep_wake = "{deep_wake}"') as b:
        results["code"] = b.code
        project = await b.project("team")
        pid = project["id"]
        network = model.network_name(pid)
        pg = await b.ready_addon(pid, "pg-data", "postgres")
        rd = await b.ready_addon(pid, "rd-data", "redis")
        client = await b.client(pid)
        env = await b.env(pid)
        sleepy = (await b.project("starter"))["id"]
        pg_light = await b.ready_addon(sleepy, "pg-light", "postgres")
        rd_light = await b.ready_addon(sleepy, "rd-light", "redis")
        light_client = await b.client(sleepy)
        light_env = await b.env(sleepy)
        deepy = (await b.project("pro"))["id"]
        pg_deep = await b.ready_addon(deepy, "pg-deep", "postgres")
        rd_deep = await b.ready_addon(deepy, "rd-deep", "redis")
        deep_client = await b.client(deepy)
        deep_env = await b.env(deepy)
        clients = {
            "orkestr": client, "baseline": client, "light": light_client, "deep": deep_client
        }  # fmt: skip
        res = Resources(cpus=CPUS, memory_mb=MEMORY_MB)
        targets: dict[str, dict[str, dict[str, Any]]] = {"postgres": {}, "redis": {}}
        plains: dict[str, Plain] = {}
        for kind, addon in (("postgres", pg), ("redis", rd)):
            ip = await b.ip_on(model.holder_name(addon["id"]), network)
            targets[kind]["orkestr"] = {**credentials(env, addon["name"]), "host": ip}
            plain = plains[kind] = b.plain(kind, network, res, shared_netns=False)
            await plain.run_api()
            await plain.pin_like(addon["id"])
            plain_ip = await plain.ip()
            await client.poll_start(plain.target(plain_ip), interval_ms=20, deadline_s=120)
            if not (await client.poll_result(150))["ok"]:
                raise RuntimeError(f"plain {kind} never became ready")
            targets[kind]["baseline"] = targets[kind]["baseline_light"] = plain.target(plain_ip)
        for kind, addon in (("postgres", pg_light), ("redis", rd_light)):
            ip = await b.ip_on(model.holder_name(addon["id"]), model.network_name(sleepy))
            targets[kind]["light"] = {**credentials(light_env, addon["name"]), "host": ip}
        for kind, addon in (("postgres", pg_deep), ("redis", rd_deep)):
            ip = await b.ip_on(model.holder_name(addon["id"]), model.network_name(deepy))
            targets[kind]["deep"] = {**credentials(deep_env, addon["name"]), "host": ip}
        if not pools_only or "select" in pool_modes:
            log("pgbench -i -s 5 on all four")
            for who in (*WHO, "deep"):
                await pgbench(clients[who], targets["postgres"][who], ["-i", "-s", "5", "-q"])
        light_wakes: list[dict[str, Any]] = []
        clients["baseline_light"] = client
        paired = {"postgres": {"orkestr": pg, "light": pg_light}, "redis": {"orkestr": rd, "light": rd_light}}  # fmt: skip

        async def place(kind: str, who: str) -> dict[str, Any]:
            """Read the home cores now (the agent may have moved an add-on since: placement
            is over all add-ons), pin the plain container like the add-on it stands in for,
            and put the client on the other cores, alike for every row."""
            addon = paired[kind]["light" if who in ("light", "baseline_light") else "orkestr"]
            server = await b.home_cores(addon["id"], timeout_s=0)
            if who.startswith("baseline"):
                await plains[kind].pin(server)
            return {
                "server_cores": server,
                "client_cores": await clients[who].pin_away_from(server),
            }

        async def cgroups(kind: str, who: str) -> list[str]:
            """The server's and the client's container ids (their cgroups' CPU time)."""
            server = (
                plains[kind].db_name
                if who.startswith("baseline")
                else model.db_name(paired[kind][who]["id"])
            )
            return [
                (await b.docker.containers.container(n).show())["Id"]
                for n in (server, clients[who].name)
            ]

        def cgroup_cpu_ms(ids: list[str]) -> list[float]:
            return [(container_cpu_ns(i) or 0) / 1e6 for i in ids]

        async def rotation(kind: str, r: int) -> list[str]:
            """This round's rows: the plain container runs a second time, pinned like the
            light add-on, when the agent placed that one on other cores than the awake one."""
            homes = [
                await b.home_cores(paired[kind][w]["id"], timeout_s=0) for w in ("orkestr", "light")
            ]
            whos = [*WHO, "baseline_light"] if homes[0] != homes[1] else list(WHO)
            return [whos[(r + i) % len(whos)] for i in range(len(whos))]

        async def asleep(
            addon: dict[str, Any], state: str = "paused", project_id: str = ""
        ) -> None:
            """Wait until the add-on is paused (or stopped), so the next run's connections
            wake it."""
            for _ in range(600):
                if await b.state_of(model.db_name(addon["id"])) == state:
                    return
                await asyncio.sleep(0.1)
            view = await b.addon(project_id or sleepy, addon["id"])
            raise RuntimeError(f"{addon['name']} did not fall asleep ({state}): {view}")

        async def woken(addon: dict[str, Any], wakes_before: int) -> None:
            view = await b.addon(sleepy, addon["id"])
            if view["wakes"] <= wakes_before:
                raise RuntimeError(f"{addon['name']}: the run did not start in light sleep")
            light_wakes.append({"addon": addon["name"], "last_wake_ms": view["last_wake_ms"][-1]})

        results["activity_before"] = activity(b.host)
        assert b.agent is not None
        log_mark = b.agent.log_path.stat().st_size

        samples: dict[str, dict[str, list[float]]] = {
            test: {who: [] for who in (*WHO, "baseline_light")}
            for test in ("pgbench_select", "pgbench_tpcb", "redis_get", "redis_set")
        }
        runs: list[dict[str, Any]] = []  # every run: its figure, placement, load, our CPU
        results["runs"] = runs

        def record(
            test: str,
            r: int,
            who: str,
            where: dict[str, Any],
            figures: dict[str, float],
            cpu: float,
        ) -> None:
            load = os.getloadavg()[0]
            runs.append({"test": test, "round": r + 1, "who": who, **where,
                         **{k: rnd(v, 1) for k, v in figures.items()},
                         "services_cpu_ms": rnd(cpu, 0), "load": rnd(load, 2)})  # fmt: skip
            shown = ", ".join(f"{k} {v:.0f}" for k, v in figures.items())
            per = where.get("cpu_us_per_request") or where.get("cpu_us_per_tx") or {}
            log(f"round {r + 1}/{rounds} {test} {who}: {shown} (server cores {where['server_cores']}, "
                f"client {where['client_cores']}, cpu/request {per.get('server')} + {per.get('client')} us, "
                f"services cpu {cpu:.0f} ms, load {load:.2f})")  # fmt: skip

        for r in range(0 if pools_only else rounds):  # --pools: the pool rows only
            for mode in ("select", "tpcb"):
                order = await rotation("postgres", r)
                if mode == "tpcb":
                    order.reverse()  # ABBA within a round too
                for who in order:
                    wakes = 0
                    where = await place("postgres", who)
                    if who == "light":
                        await asleep(pg_light)
                        wakes = (await b.addon(sleepy, pg_light["id"]))["wakes"]
                    ids = await cgroups("postgres", who)
                    cpu0, cg0 = cpu_ms(b.service_pids()), cgroup_cpu_ms(ids)
                    tps = await pg_run(clients[who], targets["postgres"][who], mode, seconds)
                    cpu = cpu_ms(b.service_pids()) - cpu0
                    where["cpu_us_per_tx"] = per_request(cg0, cgroup_cpu_ms(ids), tps * seconds)
                    if who == "light":
                        await woken(pg_light, wakes)
                    samples[f"pgbench_{mode}"][who].append(tps)
                    record(f"pgbench_{mode}", r, who, where, {"tps": tps}, cpu)
                if "baseline_light" not in order:  # one placement: the baseline serves both
                    samples[f"pgbench_{mode}"]["baseline_light"].append(
                        samples[f"pgbench_{mode}"]["baseline"][-1]
                    )
            order = await rotation("redis", r)
            for who in order:
                wakes = 0
                where = await place("redis", who)
                if who == "light":
                    await asleep(rd_light)
                    wakes = (await b.addon(sleepy, rd_light["id"]))["wakes"]
                ids = await cgroups("redis", who)
                cpu0, cg0 = cpu_ms(b.service_pids()), cgroup_cpu_ms(ids)
                rps = await redis_run(clients[who], targets["redis"][who], requests)
                cpu = cpu_ms(b.service_pids()) - cpu0
                where["cpu_us_per_request"] = per_request(cg0, cgroup_cpu_ms(ids), 2 * requests)
                if who == "light":
                    await woken(rd_light, wakes)
                samples["redis_get"][who].append(rps["get"])
                samples["redis_set"][who].append(rps["set"])
                record("redis", r, who, where, rps, cpu)
            if "baseline_light" not in order:
                for test in ("redis_get", "redis_set"):
                    samples[test]["baseline_light"].append(samples[test]["baseline"][-1])
        # Home cores the agent moved while the rows ran (each run records its own).
        moves = b.agent.log_path.read_bytes()[log_mark:].decode(errors="replace")
        results["cores_moved_during_runs"] = [
            line.split("upkeep.limits_updated ", 1)[1]
            for line in moves.splitlines()
            if "upkeep.limits_updated" in line
        ]
        # The pool rows below keep the plain containers where the awake add-ons are, and
        # their clients (processes in the client's namespace, not in its container) free.
        for kind in ("postgres", "redis"):
            await place(kind, "baseline")
        for c in {id(c): c for c in clients.values()}.values():
            await c.pin_away_from("")

        keeper = KeeperClient(str(b.agent.dir / "keeper.sock"))
        sleepy_addons = {
            ("light", "postgres"): pg_light, ("light", "redis"): rd_light,
            ("deep", "postgres"): pg_deep, ("deep", "redis"): rd_deep,
        }  # fmt: skip
        # --pool-awake: the awake add-on too (connections opened while it is up, no wake).
        pool_who = (*POOL_WHO, "orkestr") if pool_awake else POOL_WHO
        pool_whos = (*pool_who, "baseline_light")
        pool: dict[str, dict[str, list[float]]] = {
            f"pool_{m}": {who: [] for who in pool_whos} for m in pool_modes
        }
        pool_p50: dict[str, dict[str, list[float]]] = {
            test: {who: [] for who in pool_whos} for test in pool
        }
        # test -> per round: who -> that round's figures (two per side, A B C C B A)
        pool_rounds_seen: dict[str, list[dict[str, list[float]]]] = {test: [] for test in pool}
        pool_runs: list[dict[str, Any]] = []
        results["pool_runs"] = pool_runs
        deep_seen: list[dict[str, int]] = []  # per deep run: the keeper's relays, direct
        sleeping_states = {
            ("light", "postgres"): "paused", ("light", "redis"): "paused",
            ("deep", "postgres"): "exited", ("deep", "redis"): "exited",
        }  # fmt: skip

        # At least the pool's connections on the path: a connection of the client's previous
        # run that the database has not closed yet is counted too (seen once: direct 5).
        def on_path(seen: dict[str, int]) -> bool:
            if deep_wake == "queue":
                return seen["keeper"] == 0 and seen["direct"] >= POOL_CLIENTS
            return seen["keeper"] >= POOL_CLIENTS and seen["direct"] == 0

        async def settle() -> None:
            """Every sleepy add-on asleep before any run, the baseline's too: an add-on
            falling asleep (a pause, a Postgres shutdown's checkpoint) must not land in
            another row's window."""
            for key, addon in sleepy_addons.items():
                await asleep(addon, sleeping_states[key], sleepy if key[0] == "light" else deepy)

        async def server_of(kind: str, who: str) -> tuple[str, str]:
            """The server's database container and the container whose namespace it
            listens in."""
            if who.startswith("baseline"):
                return plains[kind].db_name, plains[kind].db_name
            addon = paired[kind][who] if who == "orkestr" else sleepy_addons[(who, kind)]
            return model.db_name(addon["id"]), model.holder_name(addon["id"])

        async def cores_of(name: str) -> str:
            info = await b.docker.containers.container(name).show()
            return str((info.get("HostConfig") or {}).get("CpusetCpus") or "")

        async def tcp_info(kind: str, who: str, server_ns: str) -> dict[str, list[str]]:
            """`ss -ti` of the pool's connections on both ends, mid-run (--ss)."""
            port = str(PORTS["postgres" if kind == "postgres" else "redis"])
            out: dict[str, list[str]] = {}
            for side, name, filt in (
                ("server", server_ns, f"sport = :{port}"),
                ("client", clients[who].name, f"dport = :{port}"),
            ):
                info = await b.docker.containers.container(name).show()
                proc = await asyncio.create_subprocess_exec(
                    "nsenter", f"--net=/proc/{info['State']['Pid']}/ns/net",
                    "ss", "-tinH", "state", "established", filt,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                text = (await proc.communicate())[0].decode()
                # ss prints each socket on two lines (addresses, then its TCP info).
                lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
                out[side] = [" ".join(lines[i : i + 2]) for i in range(0, len(lines), 2)]
            return out

        async def redis_state(db: str, db_id: str, target: dict[str, Any]) -> dict[str, Any]:
            """After a run (a paused server refuses an exec): the AOF's counters and the
            server cgroup's memory, which only writes move."""
            _, text, _ = await adocker_cli(
                "exec", db, "redis-cli", "--no-auth-warning", "-a", target["password"],
                "info", "persistence", check=False,
            )  # fmt: skip
            info = dict(ln.strip().split(":", 1) for ln in text.splitlines() if ":" in ln)
            keep = ("aof_rewrites", "aof_delayed_fsync", "aof_current_size", "aof_base_size",
                    "aof_last_cow_size", "aof_rewrite_in_progress")  # fmt: skip
            out: dict[str, Any] = {k: int(info[k]) for k in keep if info.get(k, "").isdigit()}
            return {**out, **container_memory(db_id)}

        async def pool_run(r: int, mode: str, who: str) -> None:
            kind = "postgres" if mode == "select" else "redis"
            sleepy_addon = sleepy_addons.get((who, kind))
            project_id = sleepy if who == "light" else deepy
            await settle()
            if who.startswith("baseline"):
                # Where the add-on it stands in for runs: the awake one's cores (as every
                # run had them before), or the light one's for `baseline_light`.
                stands_for = paired[kind]["light" if who == "baseline_light" else "orkestr"]
                await plains[kind].pin(await b.home_cores(stands_for["id"], timeout_s=0))
            wakes = 0
            if sleepy_addon is not None:
                wakes = (await b.addon(project_id, sleepy_addon["id"]))["wakes"]
            db, server_ns = await server_of(kind, who)
            db_id = (await b.docker.containers.container(db).show())["Id"]
            cores_before = await cores_of(db)
            load0 = os.getloadavg()[0]
            cpu0, cg0 = cpu_ms(b.service_pids()), container_cpu_ns(db_id) or 0
            run = asyncio.create_task(
                clients[who].load(targets[kind][who], mode, POOL_CLIENTS, pool_seconds)
            )
            ss: dict[str, list[str]] = {}
            if who == "deep" and sleepy_addon is not None:
                # Read until the pool is on the path or the run ends: under load the wake
                # and the connects can take seconds, and the run's clock starts after them.
                while True:
                    await asyncio.sleep(0.5)
                    kept = await keeper.relays(sleepy_addon["id"])
                    direct = await own_connections(b, sleepy_addon, clients[who].ip)
                    seen = {"keeper": -1 if kept is None else len(kept), "direct": direct}
                    if on_path(seen) or run.done():
                        break
                deep_seen.append(seen)
            elif with_ss:
                await asyncio.sleep(pool_seconds / 2)
            if with_ss:
                ss = await tcp_info(kind, who, server_ns)
            out = await run
            cpu = cpu_ms(b.service_pids()) - cpu0
            server_us = ((container_cpu_ns(db_id) or 0) - cg0) / 1e3
            if not out["ok"]:
                raise RuntimeError(f"pool load {mode} {who}: {out['errors']}")
            if sleepy_addon is not None:
                view = await b.addon(project_id, sleepy_addon["id"])
                if view["wakes"] <= wakes:
                    raise RuntimeError(f"{who} {mode}: the run did not start asleep")
            test = f"pool_{mode}"
            pool[test][who].append(out["qps"])
            pool_rounds_seen[test][r].setdefault(who, []).append(out["qps"])
            pool_p50[test][who].append(out["p50_us"])
            cores_after = await cores_of(db)
            load = os.getloadavg()[0]
            server_state = (
                await redis_state(db, db_id, targets[kind][who]) if kind == "redis" else {}
            )
            queries = out["qps"] * pool_seconds
            pool_runs.append({
                "test": test, "round": r + 1, "who": who, "qps": rnd(out["qps"], 1),
                "p50_us": out["p50_us"], "p99_us": out["p99_us"],
                "server_cores": cores_before,
                **({"server_cores_after": cores_after} if cores_after != cores_before else {}),
                "server_cpu_us_per_query": rnd(server_us / max(queries, 1), 2),
                "services_cpu_ms": rnd(cpu, 0), "load_before": rnd(load0, 2), "load": rnd(load, 2),
                **({"ss": ss} if ss else {}),
                **({"server_after": server_state} if server_state else {}),
            })  # fmt: skip
            moved = f" -> {cores_after}" if cores_after != cores_before else ""
            log(
                f"pool round {r + 1}/{pool_rounds} {mode} {who}: {out['qps']:.0f} q/s, "
                f"p50 {out['p50_us']} us (server cores {cores_before}{moved}, "
                f"{server_us / max(queries, 1):.1f} us/query, services cpu {cpu:.0f} ms, "
                f"load {load0:.2f} -> {load:.2f})"
            )

        # Each round runs every row twice, mirrored (A B C C B A), so a drift of the machine
        # over the round weighs on each side alike; the first of the three rotates across
        # rounds. A round's figure per side is the mean of its two runs, its ratio is ours
        # over the baseline's of the same round, and a row's ratio is the median over rounds.
        # When the light add-on's home cores are not the awake one's, the plain container
        # also runs pinned like the light add-on (`baseline_light`, as in the rows above)
        # and the light pool is compared with that: a core's other tenants on this shared
        # machine are not the data path.
        for r in range(pool_rounds):
            for mode in pool_modes:
                kind = "postgres" if mode == "select" else "redis"
                pool_rounds_seen[f"pool_{mode}"].append({})
                homes = [
                    await b.home_cores(paired[kind][w]["id"], timeout_s=0)
                    for w in ("orkestr", "light")
                ]
                whos = [*pool_who, "baseline_light"] if homes[0] != homes[1] else list(pool_who)
                order = [whos[(r + i) % len(whos)] for i in range(len(whos))]
                for who in (*order, *reversed(order)):
                    await pool_run(r, mode, who)
        results["deep_connections"] = deep_seen
        # A deep row passes only if every deep run was seen on the path (the figures are
        # kept either way: a whole run's were once lost to a late check).
        results["deep_on_path"] = all(on_path(seen) for seen in deep_seen)

        # The add-ons must have stayed awake the whole time.
        for addon in (pg, rd):
            view = await b.addon(pid, addon["id"])
            state = await b.state_of(model.db_name(addon["id"]))
            if view["sleeps"] != 0 or view["sleep_state"] != "awake" or state != "running":
                raise RuntimeError(f"{addon['name']} slept during the run: {view}, {state}")
        results["addons_stayed_awake"] = True
        results["light_wakes"] = light_wakes
        results["activity_after"] = activity(b.host)

    for test, by in samples.items():
        if not by["orkestr"]:
            continue  # --pools
        ours, base, light = by["orkestr"], by["baseline"], by["light"]
        light_base = by["baseline_light"]  # the plain container on the light add-on's cores
        o50, b50, l50 = percentile(ours, 50), percentile(base, 50), percentile(light, 50)
        lb50 = percentile(light_base, 50)
        results[test] = {
            "unit": "tps" if test.startswith("pgbench") else "requests/s",
            "orkestr": [rnd(x, 1) for x in ours],
            "baseline": [rnd(x, 1) for x in base],
            "orkestr_median": rnd(o50, 1),
            "baseline_median": rnd(b50, 1),
            "ratio": rnd(o50 / b50),
            "ratio_per_round": [rnd(o / bb) for o, bb in zip(ours, base, strict=True)],
            "target_ratio": TARGET_RATIO,
            "pass": o50 / b50 >= TARGET_RATIO,
            "light": [rnd(x, 1) for x in light],
            "light_median": rnd(l50, 1),
            "light_baseline": [rnd(x, 1) for x in light_base],
            "light_baseline_median": rnd(lb50, 1),
            "light_ratio": rnd(l50 / lb50),
            "light_ratio_per_round": [rnd(x / bb) for x, bb in zip(light, light_base, strict=True)],
            "light_pass": l50 / lb50 >= TARGET_RATIO,
        }
    cpu_per: dict[str, dict[str, Any]] = {}
    for run in results["runs"]:
        per = run.get("cpu_us_per_request") or run.get("cpu_us_per_tx")
        cpu_per.setdefault(run["test"], {}).setdefault(run["who"], []).append(per["total"])
    results["cpu_us_per_request_median"] = {
        test: {who: rnd(percentile(v, 50), 2) for who, v in by_who.items()}
        for test, by_who in cpu_per.items()
    }
    for test, by in pool.items():
        base50 = percentile(by["baseline"], 50)
        seen = pool_rounds_seen[test]
        row: dict[str, Any] = {
            "unit": "queries/s",
            "clients": POOL_CLIENTS,
            "seconds": pool_seconds,
            "rounds": pool_rounds,
            **{who: [rnd(x, 1) for x in by[who]] for who in pool_whos},
            **{f"{who}_median": rnd(percentile(by[who], 50), 1) for who in pool_who},
            **{f"{who}_p50_us": [rnd(x, 1) for x in pool_p50[test][who]] for who in pool_whos},
            "per_round": [{who: [rnd(x, 1) for x in v] for who, v in one.items()} for one in seen],
        }

        def per_round(who: str, base: str, rounds: list[dict[str, list[float]]]) -> list[float]:
            """Each round's ratio: the sum of its two runs over the baseline's two."""
            return [sum(one[who]) / sum(one.get(base) or one["baseline"]) for one in rounds]

        for who, target in (
            ("light", TARGET_RATIO), ("deep", DEEP_TARGET_RATIO),
            *((("orkestr", TARGET_RATIO),) if pool_awake else ()),
        ):  # fmt: skip
            ratios = per_round(who, "baseline_light" if who == "light" else "baseline", seen)
            ratio = percentile(ratios, 50)
            row[f"{who}_ratio"] = rnd(ratio)
            row[f"{who}_ratio_per_round"] = [rnd(x) for x in ratios]
            row[f"{who}_ratio_of_medians"] = rnd(percentile(by[who], 50) / base50)
            row[f"{who}_pass"] = ratio >= target and (who != "deep" or results["deep_on_path"])
        # The light pool against the plain container on the awake add-on's cores, as before.
        row["light_ratio_awake_cores"] = rnd(percentile(per_round("light", "baseline", seen), 50))
        results[test] = row
    return results


def report(results: dict[str, Any]) -> None:
    rows = []
    for test in ("pgbench_select", "pgbench_tpcb", "redis_get", "redis_set"):
        r = results.get(test)
        if r is None:
            continue
        rows.append([
            test, r["unit"], r["orkestr_median"], r["baseline_median"], r["ratio"],
            " ".join(f"{x:.3f}" for x in r["ratio_per_round"]), f">= {TARGET_RATIO}",
            "PASS" if r["pass"] else "FAIL",
        ])  # fmt: skip
        rows.append([
            f"{test} (opened in light sleep)", r["unit"], r["light_median"], r["light_baseline_median"],
            r["light_ratio"], " ".join(f"{x:.3f}" for x in r["light_ratio_per_round"]),
            f">= {TARGET_RATIO}", "PASS" if r["light_pass"] else "FAIL",
        ])  # fmt: skip
    for test in ("pool_select", "pool_get", "pool_set"):
        r = results.get(test)
        if r is None:
            continue
        for who, target in (
            ("orkestr", TARGET_RATIO), ("light", TARGET_RATIO), ("deep", DEEP_TARGET_RATIO)
        ):  # fmt: skip
            if f"{who}_ratio" not in r:
                continue
            rows.append([
                f"{test} (opened {'awake' if who == 'orkestr' else f'in {who} sleep'})", r["unit"], r[f"{who}_median"],
                r["baseline_median"], r[f"{who}_ratio"],
                " ".join(f"{x:.3f}" for x in r[f"{who}_ratio_per_round"]), f">= {target}",
                "PASS" if r[f"{who}_pass"] else "FAIL",
            ])  # fmt: skip
    print()
    print(table(
        ["test", "unit", "orkestr (median)", "baseline (median)", "ratio", "per round",
         "target", ""],
        rows, "Data path: throughput from a client on the project network",
    ))  # fmt: skip
    if not results.get("deep_on_path", True):
        print(
            f"deep runs NOT all on the {results['deep_wake']} path: {results['deep_connections']}"
        )
    print()
    for test, by_who in results.get("cpu_us_per_request_median", {}).items():
        shown = ", ".join(f"{who} {v}" for who, v in by_who.items())
        print(f"CPU per request (server + client containers, median us), {test}: {shown}")
    print()
    print_context(results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 3 s runs")
    parser.add_argument("--pools", action="store_true", help="the pool rows only")
    parser.add_argument("--pool-rounds", type=int, default=POOL_ROUNDS, help="mirrored rounds")
    parser.add_argument("--pool-seconds", type=float, default=POOL_SECONDS, help="per pool run")
    parser.add_argument("--ss", action="store_true", help="record `ss -ti` of each pool mid-run")
    parser.add_argument(
        "--pool-modes", default=",".join(POOL_MODES), help="pool rows to run: select,get,set"
    )
    parser.add_argument(
        "--pool-awake", action="store_true", help="pool rows of the awake add-on too"
    )
    parser.add_argument(
        "--storage-mb", type=int, default=None,
        help="every plan's storage quota: each add-on's data on its own loop filesystem",
    )  # fmt: skip
    args = parser.parse_args()
    modes = tuple(m for m in args.pool_modes.split(",") if m)
    if not modes or set(modes) - set(POOL_MODES):
        parser.error(f"--pool-modes: a comma list of {', '.join(POOL_MODES)}")
    results = asyncio.run(
        main(
            args.quick,
            args.pools,
            args.pool_rounds,
            args.pool_seconds,
            args.ss,
            modes,
            args.pool_awake,
            args.storage_mb,
        )
    )
    report(results)
    print(json.dumps(results, separators=(",", ":")))
