"""Where a Redis restore's downtime goes: one filled Redis add-on, restored N times.

Per restore, beside the agent's own phases (`backup.restore_phases`): the db container's
memory cgroup just before the kill (rss, page cache, dirty, writeback), the kill timed
three ways from the host (the Docker `kill` event -> the Redis process gone from /proc
-> the `die` event -> the `start` event), and Redis's own log of its start and load
(`docker logs -t`), so the "ready" phase splits into container start, Redis's init, the
load Redis reports, and what follows it. Also, once, the data volume's files and
`INFO persistence` (an AOF rewrite under way?).

    .venv/bin/python bench/restore_probe.py --redis-mb 500 --runs 3

--storage-mb gives the plan a storage quota, so the volume is a loop-device ext4 (without
one, as in bench/backup.py, it is a plain directory on the host's disk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _harness import Bench, EventLog, docker_cli, log
from backup import PLANS, REDIS_FILL, Run

from agent import model

STAT_KEYS = ("rss", "cache", "dirty", "writeback", "mapped_file", "hierarchical_memory_limit")


def memcg(container_id: str) -> dict[str, int]:
    path = Path(f"/sys/fs/cgroup/memory/docker/{container_id}/memory.stat")
    if not path.exists():  # cgroup v2
        path = Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/memory.stat")
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        k, v = line.split()
        if k in STAT_KEYS or k in ("anon", "file", "file_dirty", "file_writeback"):
            out[k] = int(v) >> 20
    return out


def dirty_kb() -> dict[str, int]:
    """The host's dirty and under-writeback page cache (/proc/meminfo, kB)."""
    with open("/proc/meminfo") as f:
        rows = [line.split() for line in f if line.startswith(("Dirty:", "Writeback:"))]
    return {row[0].rstrip(":"): int(row[1]) for row in rows}


def watch_pid(pid: int, seen: dict[str, float], stop: threading.Event) -> None:
    """Poll /proc/<pid> every 0.5 ms until the process is gone (zombie counts as gone)."""
    stat = f"/proc/{pid}/stat"
    while not stop.is_set():
        try:
            with open(stat) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X") and "zombie" not in seen:
                seen["zombie"] = time.monotonic()
        except OSError:
            seen["gone"] = time.monotonic()
            return
        time.sleep(0.0005)


def redis_log(name: str, since: str) -> list[str]:
    out = docker_cli("logs", "-t", "--since", since, name, check=False)
    keep = ("Server initialized", "Loading", "loaded", "Done loading", "Ready to accept",
            "rewrit", "Reading", "DB loaded", "AOF", "SIGTERM", "started")  # fmt: skip
    return [line for line in out.splitlines() if any(k in line for k in keep)]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"redis_mb": args.redis_mb, "restores": []}
    out = Path(tempfile.mkdtemp(prefix="orkestr-probe-"))  # only the Run's raw baselines use it
    plans = PLANS
    if args.storage_mb:  # a storage quota: the volume is a loop-device ext4 (agent/loopfs.py)
        plans = PLANS.replace("[team]\n", f"[team]\nstorage_mb = {args.storage_mb}\n")
    async with Bench(plans) as b:
        project = await b.project("team")
        run = Run(b, project["id"], out)
        rd = await b.ready_addon(project["id"], "probe-cache", "redis")
        await run.job(REDIS_FILL.format(keys=args.redis_mb * 1024))
        db = model.db_name(rd["id"])
        vol = docker_cli("volume", "inspect", "-f", "{{.Mountpoint}}", model.volume_name(rd["id"]))
        results["volume_after_fill"] = docker_cli("run", "--rm", "-v", f"{model.volume_name(rd['id'])}:/d",
            "--label", f"orkestr.host={b.host}", "--entrypoint", "sh", "orkestr-local/toolbox:bookworm",
            "-c", "du -a /d | sort -n | tail; df -h /d").splitlines()  # fmt: skip
        results["volume_mountpoint"] = vol.strip()
        results["info_persistence"] = (await run.job(
            'redis-cli --no-auth-warning -u "$REDIS_URL" INFO persistence'
            " | grep -E 'aof_rewrite|aof_current|rdb_bgsave|aof_last'"
        )).split()  # fmt: skip
        backup = await run.ours_backup(rd)
        log(f"backup {backup}")
        for _ in range(args.runs):
            cid = docker_cli("inspect", "-f", "{{.Id}}", db).strip()
            pid = int(docker_cli("inspect", "-f", "{{.State.Pid}}", db).strip())
            before = memcg(cid)
            seen: dict[str, float] = {}
            done = threading.Event()
            watcher = threading.Thread(target=watch_pid, args=(pid, seen, done), daemon=True)
            watcher.start()
            since = docker_cli("info", "-f", "{{.SystemTime}}").strip()
            dirty_before = dirty_kb()
            if args.sync_first:
                os.sync()
            async with EventLog(b) as ev:
                t0 = time.monotonic()
                seconds = await run.ours_restore(rd, backup["id"])
                await asyncio.sleep(0.5)
            done.set()
            evs = [(t, a) for t, type_, a, name in ev.events if type_ == "container" and name == db]
            kill = next((t for t, a in evs if a == "kill"), None)
            rel = {a: round(t - kill, 3) for t, a in evs} if kill else {}
            if kill and "gone" in seen:
                rel["proc_gone"] = round(seen["gone"] - kill, 3)
            if kill and "zombie" in seen:
                rel["proc_zombie"] = round(seen["zombie"] - kill, 3)
            phases = [
                line.split(" backup.restore_phases ", 1)[1]
                for line in b.agent.log_path.read_text(errors="replace").splitlines()  # type: ignore[union-attr]
                if " backup.restore_phases " in line
            ][-1]
            r = {
                "dirty_before_kb": dirty_before,
                "seconds": round(seconds, 3),
                "since_call": round(time.monotonic() - t0, 3),
                "memcg_before_mb": before,
                "host_events_from_kill": rel,
                "phases": phases,
                "redis_log": redis_log(db, since),
                "load": os.getloadavg(),
            }
            log(json.dumps(r, indent=1))
            results["restores"].append(r)
    shutil.rmtree(out, ignore_errors=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--redis-mb", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--storage-mb", type=int, default=0, help="the plan's storage quota")
    parser.add_argument(
        "--sync-first", action="store_true", help="flush the host's page cache before each"
    )
    print(json.dumps(asyncio.run(main(parser.parse_args())), separators=(",", ":")))
