"""Backup and restore throughput: orkestr against the raw tools on the same data, same run.

One Team project with a Postgres and a Redis add-on, filled by a job (Postgres: a table
of ~130-byte rows, --pg-mb of table data; Redis: --redis-mb of incompressible 1 KiB
values). Then, alternating, N runs (default 1) of:

  raw backup    pg_dump -Fc / redis-cli --rdb from a toolbox container on the project
                network into a new file (the last run's removed, untimed) in a directory
                on the same disk; timed inside the container.
  orkestr       POST .../backups, until the backup is listed; time = finished_at -
  backup        created_at (API to result, one-shot container start, dump, sha256, rename)
                minus the verification, which is reported apart (verify_seconds).
                The two backups go raw first in odd runs, ours first in even ones, and so
                do the restores (Redis: ours and by hand, after the floor); before each,
                untimed, a Redis is waited on until it has no child at work (an AOF
                rewrite, a save rule's BGSAVE) and the page cache is flushed; a Postgres
                gets a CHECKPOINT, a sync and the page cache dropped (every side reads
                from disk). Each run's pair is reported (`backup_pairs`), and the agent's
                phases of ours.
  raw restore   Postgres: createdb + pg_restore into a new database of the same server;
                Redis: the RDB copied from the same host directory into a scratch Docker
                volume (the add-on's data volume is one of the same driver) and loaded by
                a fresh redis-server of the add-on's image with the add-on's CPU and memory
                limits; timed inside the container (its start not counted). A floor:
                it never stops a running server.
  by hand       Redis only: what an operator does to restore a live Redis without us.
                A server of the add-on's image and limits holding the data set is
                killed, the RDB copied into its volume, the server started and polled
                (every 10 ms) until loaded; timed from the host through the Docker API.
                The raw counterpart of a Redis restore (the data of a live server
                replaced), so the target is judged against it; the floor is reported
                as a lower bound that no restore of a running add-on can reach.
  orkestr       POST .../restore, until it succeeded; finished_at - created_at (checksum,
  restore       restore beside the live data, swap; Redis: the copy staged (and flushed) in the volume
                while the checksum runs, then Redis killed, the files swapped, Redis
                started and probed until it has loaded). The agent's time per phase is in
                the JSON (`agent_phases`).

Throughput = database size (pg_database_size / used_memory_dataset) / time; the ratio
is ours / raw (target >= 0.90), reported as the best of the runs and as the median of
each run's pair (raw and ours back to back), which a moving load disturbs less. Sizes are modest by default so a run takes a few
minutes; --pg-mb 1024 --redis-mb 500 is the full-size run (give Redis memory: the plan
here allows 2 GiB per add-on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from _harness import (
    Bench,
    activity,
    docker_cli,
    log,
    machine_facts,
    print_context,
    rnd,
    table,
)

from agent import model
from tests.agent_fixtures import IMAGES

TARGET_RATIO = 0.90
BY_HAND_ARGS = (
    "--port 0 --unixsocket /data/s --unixsocketperm 700 --dir /data --dbfilename dump.rdb"
    " --appendonly no"
)
TOOLBOX = "orkestr-local/toolbox:bookworm"
CPUS, MEMORY_MB = 2.0, 2048
PLANS = f"""
[team]
max_addons = 5
cpus = {CPUS}
memory_mb = {MEMORY_MB}
manual_backups_per_day = 1000
backup_retention_days = 30
sleep = {{ enabled = false }}
"""

PG_FILL = (
    'psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -qc "create table bench(id bigint primary key, '
    "a text, b text, n double precision); insert into bench select g, md5(g::text), "
    'md5((g * 7)::text) || md5((g * 13)::text), random() from generate_series(1, {rows}) g"'
    ' -c "vacuum analyze bench"'
)
# 64 random 1 KiB blobs (LZF does not shrink them), SET key:i to one of them.
REDIS_FILL = (
    'redis-cli --no-auth-warning -u "$REDIS_URL" EVAL "local blobs = {{}} '
    "for b = 1, 64 do local t = {{}} for i = 1, 1024 do t[i] = string.char(math.random(33, 126)) end "
    "blobs[b] = table.concat(t) end "
    "for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'key:' .. i, blobs[i % 64 + 1]) end "
    "return redis.call('DBSIZE')\" 0 {keys}"
)

# The baselines use the platform's role, as the agent's own backups do: the tenant's role
# may neither create databases nor replicate.
RAW_PG_BACKUP = """
set -e
export PGPASSWORD="$(cat /run/orkestr/admin_password)"
s=$(date +%s.%N); pg_dump -Fc -h "$H" -U orkestr_admin -d app -f /out/raw.dump; e=$(date +%s.%N)
echo "$s $e"
"""
RAW_PG_RESTORE = """
set -e
export PGPASSWORD="$(cat /run/orkestr/admin_password)" PGHOST="$H" PGUSER=orkestr_admin
dropdb --if-exists rawrestore -d app >/dev/null 2>&1 || true
s=$(date +%s.%N)
createdb -O app rawrestore
pg_restore --exit-on-error --no-owner --no-acl -d rawrestore /out/raw.dump
e=$(date +%s.%N)
dropdb rawrestore
echo "$s $e"
"""
# A new file each run, as ours writes: redis-cli 7.0 opens --rdb's file without O_TRUNC,
# so from run 2 on it wrote over the last run's 531 MB still in the page cache (0.3-0.8
# CPU-s less for the client, branch redis9 in docs/benchmarks.md). pg_dump truncates.
RAW_REDIS_BACKUP = """
set -e
export REDISCLI_AUTH="$(cat /run/orkestr/admin_password)"
rm -f /out/raw.rdb
s=$(date +%s.%N); redis-cli -h "$H" --user orkestr_admin --rdb /out/raw.rdb >/dev/null; e=$(date +%s.%N)
echo "$s $e"
"""
# Before each timed Redis backup, either side: until the add-on's Redis has no child (the
# AOF rewrite of the fill, a replica transfer's fork) it would share the CPU with it.
REDIS_QUIET = """
set -e
export REDISCLI_AUTH="$(cat /run/orkestr/admin_password)"
s=$(date +%s.%N)
# What the server was doing when asked first (its child's kind, the last save's outcome).
redis-cli --no-auth-warning -h "$H" --user orkestr_admin INFO persistence | tr -d '\\r' \\
  | grep -E '^(rdb_bgsave_in_progress|rdb_last_bgsave_status|rdb_changes_since_last_save|aof_rewrite_in_progress|aof_rewrite_scheduled):' \\
  | tr '\\n' ' '
echo
for _ in $(seq 1200); do
  redis-cli --no-auth-warning -h "$H" --user orkestr_admin INFO persistence | tr -d '\\r' | awk -F: '
    /^(aof_rewrite_in_progress|aof_rewrite_scheduled|rdb_bgsave_in_progress):/ {n += $2}
    END {exit n != 0}' && break
  sleep 0.1
done
e=$(date +%s.%N)
echo "$s $e"
"""
# The add-on's own image and limits (raw_redis_restore), loading from a Docker volume of
# the same driver as the add-on's data volume: only the platform's work differs.
RAW_REDIS_RESTORE = """
set -e
d=/data/raw
rm -rf "$d"; mkdir -p "$d"
s=$(date +%s.%N)
cp /out/raw.rdb "$d/dump.rdb"
redis-server --port 0 --unixsocket "$d/s" --dir "$d" --dbfilename dump.rdb --appendonly no \
  --save '' --daemonize yes --logfile "$d/log"
until redis-cli -s "$d/s" INFO persistence 2>/dev/null | grep -q '^loading:0'; do sleep 0.01; done
e=$(date +%s.%N)
redis-cli -s "$d/s" DBSIZE >&2
redis-cli -s "$d/s" SHUTDOWN NOSAVE >/dev/null 2>&1 || true
rm -rf "$d"
echo "$s $e"
"""


def info_loaded(body: bytes) -> bool:
    """Whether an `INFO persistence` answer says the data set is loaded: its `loading`
    field, not the text "loading:0", which Redis 7's `async_loading:0` holds all along
    (the by-hand baseline ended at the server's first answer, mid-load, until 693b35e)."""
    return b"\nloading:0\r" in body or body.startswith(b"loading:0\r")


async def until_loaded(socket_path: Path, auth: bytes = b"", timeout: float = 600) -> None:
    """Poll a Redis on its unix socket every 10 ms until it answers with its data loaded.
    `auth`: an AUTH command sent first (its answer skipped), for a server that asks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
        except OSError:  # not listening yet (or the previous server's socket file)
            await asyncio.sleep(0.01)
            continue
        try:
            writer.write(auth + b"INFO persistence\r\n")
            await writer.drain()
            if auth:
                await reader.readline()
            header = await reader.readline()
            body = await reader.readexactly(int(header[1:]) + 2) if header[:1] == b"$" else b""
        except (OSError, ValueError, asyncio.IncompleteReadError):
            body = b""
        finally:
            writer.close()
        if info_loaded(body):
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"redis at {socket_path} not loaded after {timeout}s")


def _seconds(created: str, finished: str) -> float:
    return (datetime.fromisoformat(finished) - datetime.fromisoformat(created)).total_seconds()


class Run:
    def __init__(self, b: Bench, project_id: str, out: Path) -> None:
        self.b = b
        self.p = project_id
        self.out = out

    def base(self, addon_id: str) -> str:
        return f"/v1/projects/{self.p}/addons/{addon_id}"

    async def job(self, script: str, timeout: float = 3600) -> str:
        job = await self.b.api(
            "POST",
            f"/v1/projects/{self.p}/jobs",
            {"image": TOOLBOX, "command": ["sh", "-c", script], "timeout_s": timeout},
            201,
        )
        while True:
            await asyncio.sleep(1)
            job = await self.b.api("GET", f"/v1/projects/{self.p}/jobs/{job['id']}")
            if job["state"] != "pending":
                if job["state"] != "succeeded":
                    raise RuntimeError(f"job failed: {job}")
                return str(job["output"])

    def raw(
        self, addon: dict[str, Any], script: str, image: str = TOOLBOX, extra: tuple[str, ...] = ()
    ) -> float:
        assert self.b.agent is not None
        secrets = self.b.agent.state_dir / "secrets" / addon["id"]
        out = docker_cli(
            "run", "--rm", "--network", model.network_name(self.p),
            "--label", f"orkestr.host={self.b.host}", *extra,
            "-v", f"{self.out}:/out", "-v", f"{secrets}:/run/orkestr:ro",
            "-e", f"H={addon['name']}", "--entrypoint", "bash", image, "-c", script,
            timeout=7200,
        )  # fmt: skip
        start, end = (float(x) for x in out.split()[-2:])
        return end - start

    def settle(self, addon: dict[str, Any]) -> tuple[float, str]:
        """Wait until the add-on's Redis has no child at work (REDIS_QUIET): (seconds
        waited, what INFO persistence said first)."""
        assert self.b.agent is not None
        secrets = self.b.agent.state_dir / "secrets" / addon["id"]
        out = docker_cli(
            "run", "--rm", "--network", model.network_name(self.p),
            "--label", f"orkestr.host={self.b.host}", "-v", f"{secrets}:/run/orkestr:ro",
            "-e", f"H={addon['name']}", "--entrypoint", "bash", TOOLBOX, "-c", REDIS_QUIET,
        )  # fmt: skip
        lines = out.splitlines()
        start, end = (float(x) for x in lines[-1].split())
        return end - start, lines[0].strip() if len(lines) > 1 else ""

    def cold_postgres(self, addon: dict[str, Any]) -> None:
        """Before each timed Postgres side: a checkpoint and a sync (the other side's writes
        are not flushed inside this one's time), then the page cache dropped, so each side
        reads the database and its input from disk. The add-on's memory limit holds the
        page cache of its files too, and a 1.36 GB database beside a restore's copy does not
        fit in it: whichever dump went second found the first one's reads cached (534c441:
        raw first 91.0 s, ours second 79.1 s; then ours first 103.1 s, raw second 51.8 s)."""
        docker_cli(
            "exec", model.db_name(addon["id"]), "psql", "-U", "orkestr_admin", "-d", "postgres",
            "-XAtqc", "CHECKPOINT",
        )  # fmt: skip
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")

    def raw_redis_restore(self, addon: dict[str, Any], script: str) -> float:
        """The baseline load with the add-on's image, CPU and memory limits, into a
        scratch Docker volume (the add-on's data volume is one too)."""
        volume = f"orkestr-bench-{self.b.host}-raw"
        docker_cli("volume", "create", "--label", f"orkestr.host={self.b.host}", volume)
        try:
            limits = ("--cpus", str(CPUS), "--memory", f"{MEMORY_MB}m",
                      "--memory-swap", f"{MEMORY_MB}m", "-v", f"{volume}:/data")  # fmt: skip
            return self.raw(addon, script, IMAGES["redis"], limits)
        finally:
            docker_cli("volume", "rm", "-f", volume, check=False)

    async def by_hand_redis_restore(self, rdb: Path) -> float:
        """What an operator restoring a live Redis does without us, timed from the host
        through the Docker API: kill the server (holding the data set, with the add-on's
        image and limits), copy the RDB into its volume, start it, poll until loaded.
        Unlike the load-only baseline it pays, as ours does, for stopping a running
        server and starting another; it skips the checksum, the staging and the rollback
        guarantees."""
        name = f"orkestr-bench-{self.b.host}-byhand"
        volume = f"{name}-data"
        labels = {"orkestr.host": self.b.host}
        docker = self.b.docker
        docker_cli("volume", "create", "--label", f"orkestr.host={self.b.host}", volume)
        mountpoint = Path(docker_cli("volume", "inspect", "-f", "{{.Mountpoint}}", volume).strip())
        config: dict[str, Any] = {
            "Image": IMAGES["redis"],
            "Entrypoint": ["redis-server"],
            "Cmd": [*BY_HAND_ARGS.split(), "--save", ""],
            "User": "0",
            "Labels": labels,
            "HostConfig": {
                "NetworkMode": "none",
                "Binds": [f"{volume}:/data"],
                "NanoCpus": int(CPUS * 1e9),
                "Memory": MEMORY_MB << 20,
                "MemorySwap": MEMORY_MB << 20,
            },
        }
        try:
            container = await docker.containers.create(config, name=name)
            shutil.copyfile(rdb, mountpoint / "dump.rdb")
            await container.start()
            await until_loaded(mountpoint / "s")  # the live server, holding the data
            start = time.monotonic()
            await container.kill()
            await container.wait()
            shutil.copyfile(rdb, mountpoint / "dump.rdb")
            await container.start()
            await until_loaded(mountpoint / "s")
            return time.monotonic() - start
        finally:
            docker_cli("rm", "-f", name, check=False)
            docker_cli("volume", "rm", "-f", volume, check=False)

    async def ours_backup(self, addon: dict[str, Any]) -> dict[str, Any]:
        made = await self.b.api("POST", f"{self.base(addon['id'])}/backups", want=202)
        while True:
            await asyncio.sleep(0.5)
            got = await self.b.api("GET", f"{self.base(addon['id'])}/backups/{made['id']}")
            if got["state"] != "pending":
                break
        if got["state"] != "succeeded" or not got["verified"]:
            raise RuntimeError(f"backup not verified: {got}")
        total = _seconds(got["created_at"], got["finished_at"])
        return {
            "id": got["id"],
            "created_at": got["created_at"],
            "seconds": total - got["verify_seconds"],
            "verify_seconds": got["verify_seconds"],
            "size_bytes": got["size_bytes"],
        }

    async def ours_restore(self, addon: dict[str, Any], backup_id: str) -> float:
        r = await self.b.api(
            "POST", f"{self.base(addon['id'])}/backups/{backup_id}/restore", want=202
        )
        while True:
            await asyncio.sleep(0.5)
            r = await self.b.api("GET", f"{self.base(addon['id'])}/restores/{r['id']}")
            if r["state"] != "pending":
                break
        if r["state"] != "succeeded":
            raise RuntimeError(f"restore failed: {r}")
        return _seconds(r["created_at"], r["finished_at"])


async def main(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "bench": "backup",
        "pg_mb": args.pg_mb,
        "redis_mb": args.redis_mb,
        "runs": args.runs,
        "machine": machine_facts(),
    }
    out = Path(tempfile.mkdtemp(prefix="orkestr-bench-backup-"))
    try:
        async with Bench(PLANS) as b:
            results["code"] = b.code
            project = await b.project("team")
            run = Run(b, project["id"], out)
            pg = await b.ready_addon(project["id"], "bench-db", "postgres")
            rd = await b.ready_addon(project["id"], "bench-cache", "redis")
            t0 = time.monotonic()
            if "postgres" in args.kinds:
                await run.job(PG_FILL.format(rows=args.pg_mb * 7700))
                size = await run.job(
                    'psql "$DATABASE_URL" -tAc "select pg_database_size(current_database())"'
                )
                results["postgres_bytes"] = int(size.strip().splitlines()[-1])
            if "redis" in args.kinds:
                keys = await run.job(REDIS_FILL.format(keys=args.redis_mb * 1024))
                info = await run.job(
                    'redis-cli --no-auth-warning -u "$REDIS_URL" INFO memory'
                    " | grep used_memory_dataset:"
                )
                results["redis_keys"] = int(keys.strip().splitlines()[-1])
                results["redis_bytes"] = int(info.strip().split(":")[1])
            log(f"filled in {time.monotonic() - t0:.0f}s: {results}")
            results["activity_before"] = activity(b.host)
            for kind, addon, raw_backup, raw_restore in (
                ("postgres", pg, RAW_PG_BACKUP, RAW_PG_RESTORE),
                ("redis", rd, RAW_REDIS_BACKUP, RAW_REDIS_RESTORE),
            ):
                if kind not in args.kinds:
                    continue
                samples: dict[str, list[float]] = {k: [] for k in ("raw_b", "ours_b", "raw_r", "ours_r", "verify")}  # fmt: skip
                if kind == "redis" and not args.backups_only:
                    samples["hand_r"] = []
                size_bytes = 0
                pairs: list[dict[str, Any]] = []
                created: dict[str, str] = {}
                for i in range(args.runs):
                    # Alternate which side goes first; before each, the server settles
                    # (no child at work) and the page cache's dirty pages are written
                    # out, so neither side pays for what the other left behind.
                    settled: list[float] = []
                    states: list[str] = []
                    raw_b, ours = 0.0, {}
                    for side in ("raw", "ours") if i % 2 == 0 else ("ours", "raw"):
                        if kind == "redis":
                            waited, state = run.settle(addon)
                            settled.append(waited)
                            states.append(state)
                            os.sync()
                        else:
                            run.cold_postgres(addon)
                        if side == "raw":
                            raw_b = run.raw(addon, raw_backup)
                        else:
                            ours = await run.ours_backup(addon)
                    created[ours["id"]] = ours["created_at"]
                    pairs.append({
                        "first": "raw" if i % 2 == 0 else "ours", "raw": rnd(raw_b),
                        "ours": rnd(ours["seconds"]), "ratio": rnd(raw_b / ours["seconds"]),
                        "settle_waits": [rnd(x) for x in settled],
                        "settle_found": states,
                    })  # fmt: skip
                    raw_r = ours_r = float("nan")  # --backups-only: more backup pairs a minute
                    # The restores alternate too (Redis: ours and by hand, after the floor).
                    sides = ["raw", "ours"] + (["hand"] if kind == "redis" else [])
                    if i % 2:
                        sides = sides[:-2] + sides[:-3:-1]
                    for side in [] if args.backups_only else sides:
                        if kind == "postgres":
                            run.cold_postgres(addon)
                        else:
                            os.sync()
                        if side == "raw" and kind == "postgres":
                            raw_r = run.raw(addon, raw_restore)
                        elif side == "raw":
                            raw_r = run.raw_redis_restore(addon, raw_restore)
                        elif side == "ours":
                            ours_r = await run.ours_restore(addon, ours["id"])
                        else:
                            samples["hand_r"].append(
                                await run.by_hand_redis_restore(out / "raw.rdb")
                            )
                    for k, v in (("raw_b", raw_b), ("ours_b", ours["seconds"]), ("raw_r", raw_r),
                                 ("ours_r", ours_r), ("verify", ours["verify_seconds"])):  # fmt: skip
                        samples[k].append(v)
                    size_bytes = ours["size_bytes"]
                    log(
                        f"{kind} run {i + 1}: backup raw {raw_b:.2f}s ours {ours['seconds']:.2f}s "
                        f"(verify {ours['verify_seconds']:.2f}s), restore raw {raw_r:.2f}s "
                        f"ours {ours_r:.2f}s"
                        + (f", by hand {samples['hand_r'][-1]:.2f}s" if "hand_r" in samples else "")
                    )
                data = results[f"{kind}_bytes"]
                best = {k: min(v) for k, v in samples.items()}
                results[kind] = {
                    "seconds": {k: [rnd(x) for x in v] for k, v in samples.items()},
                    "dump_bytes": size_bytes,
                    "backup_mb_s": {
                        "raw": rnd(data / best["raw_b"] / 1e6, 1),
                        "ours": rnd(data / best["ours_b"] / 1e6, 1),
                    },
                    "restore_mb_s": {
                        "raw": rnd(data / best["raw_r"] / 1e6, 1),
                        "ours": rnd(data / best["ours_r"] / 1e6, 1),
                    },
                    "backup_ratio": rnd(best["raw_b"] / best["ours_b"]),
                    # Each run's own pair (raw and ours back to back), and their median.
                    "backup_pairs": pairs,
                    "backup_pair_ratio_median": rnd(statistics.median(x["ratio"] for x in pairs)),
                    "restore_ratio": rnd(best["raw_r"] / best["ours_r"]),
                    "verify_seconds": rnd(best["verify"]),
                }
                if "hand_r" in best:
                    results[kind]["restore_mb_s"]["by_hand"] = rnd(data / best["hand_r"] / 1e6, 1)
                    results[kind]["restore_by_hand_ratio"] = rnd(best["hand_r"] / best["ours_r"])
                    # Each run's by-hand restore and ours, back to back, and their median:
                    # the pairs say more than bests on a machine whose load moves.
                    hand_pairs = [
                        rnd(h / o)
                        for h, o in zip(samples["hand_r"], samples["ours_r"], strict=True)
                    ]
                    results[kind]["restore_by_hand_pairs"] = hand_pairs
                    results[kind]["restore_by_hand_pair_median"] = rnd(
                        statistics.median(hand_pairs)
                    )
                results[kind]["dispatch_s"] = dispatch(b, created)
            results["activity_after"] = activity(b.host)
            assert b.agent is not None  # where the agent's time went, step by step
            results["agent_phases"] = [
                line.split(" backup.", 1)[1]
                for line in b.agent.log_path.read_text(errors="replace").splitlines()
                if " backup.step " in line
                or " backup.restore_phases " in line
                or " backup.backup_phases " in line
            ]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return results


def dispatch(b: Bench, created: dict[str, str]) -> list[float]:
    """From the API's created_at to the agent's start of each backup of ours: the
    controller's publish and the agent's pass that picks it up."""
    assert b.agent is not None
    out = []
    for line in b.agent.log_path.read_text(errors="replace").splitlines():
        if " backup.backup_phases op=backup-" not in line:
            continue
        op = line.split(" op=backup-", 1)[1].split()[0]
        started = line.split(" started=", 1)[1].split()[0]
        if op in created:
            out.append(rnd(_seconds(created[op], started)))
    return out


def report(results: dict[str, Any]) -> None:
    rows, medians = [], []
    kinds = [k for k in ("postgres", "redis") if k in results]
    for kind in kinds:
        r = results[kind]
        mb = rnd(results[f"{kind}_bytes"] / 1e6, 1)
        for what in ("backup", "restore"):
            ratio = r[f"{what}_ratio"]
            if ratio != ratio:  # NaN: --backups-only
                continue
            # A Redis "raw restore" is the load-only floor: it never stops a live server.
            op = "restore (load-only floor)" if (kind, what) == ("redis", "restore") else what
            rows.append([
                kind, op, mb, r[f"{what}_mb_s"]["raw"], r[f"{what}_mb_s"]["ours"], ratio,
                "PASS" if ratio >= TARGET_RATIO else "FAIL",
            ])  # fmt: skip
        median = r["backup_pair_ratio_median"]
        medians.append([kind, "backup", "raw", len(r["backup_pairs"]), median,
                        "PASS" if median >= TARGET_RATIO else "FAIL"])  # fmt: skip
        if "restore_by_hand_ratio" in r:
            rows.append([
                kind, "restore (vs by hand)", mb, r["restore_mb_s"]["by_hand"],
                r["restore_mb_s"]["ours"], r["restore_by_hand_ratio"],
                "PASS" if r["restore_by_hand_ratio"] >= TARGET_RATIO else "FAIL",
            ])  # fmt: skip
            median = r["restore_by_hand_pair_median"]
            medians.append([kind, "restore", "by hand", len(r["restore_by_hand_pairs"]), median,
                            "PASS" if median >= TARGET_RATIO else "FAIL"])  # fmt: skip
    print()
    print(table(["kind", "op", "data MB", "raw MB/s", "ours MB/s", "ours/raw", f">= {TARGET_RATIO}"],
                rows, "Backup and restore throughput (best of the runs)"))  # fmt: skip
    print()
    print(table(["kind", "op", "against", "runs", "median of raw/ours", f">= {TARGET_RATIO}"],
                medians, "Each run's pair (measured back to back), median"))  # fmt: skip
    print()
    print(table(["kind", "run", "first", "raw s", "ours s", "raw/ours"],
                [[k, n + 1, x["first"], x["raw"], x["ours"], x["ratio"]]
                 for k in kinds for n, x in enumerate(results[k]["backup_pairs"])],
                "Backup, each run's pair"))  # fmt: skip
    print()
    print(table(["kind", "dump MB", "verification s"],
                [[k, rnd(results[k]["dump_bytes"] / 1e6, 1), results[k]["verify_seconds"]]
                 for k in kinds], "Verification (test restore), apart"))  # fmt: skip
    print()
    print_context(results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pg-mb", type=int, default=200, help="Postgres table data, MB")
    parser.add_argument("--redis-mb", type=int, default=100, help="Redis values, MB")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--kinds", type=lambda v: v.split(","), default=["postgres", "redis"],
        help="comma-separated: postgres,redis",
    )  # fmt: skip
    parser.add_argument(
        "--backups-only", action="store_true", help="time the backups only, no restores"
    )
    parser.add_argument("--quick", action="store_true", help="50 MB and 25 MB, one run")
    ns = parser.parse_args()
    if ns.quick:
        ns.pg_mb, ns.redis_mb, ns.runs = 50, 25, 1
    results = asyncio.run(main(ns))
    report(results)
    print(json.dumps(results, separators=(",", ":")))
