"""A Redis load timed four ways, to tell the load-only floor's method from Redis's own time.

Each way, in alternating order per round, starts a fresh container of the Redis add-on's
image with the bench's limits (2 CPUs, 2 GiB) on a scratch `local` volume (as
bench/backup.py) holding the same RDB, and reports its own wall time and Redis's own
log: `load` (the "DB loaded from ...: X seconds" line) and `init_to_ready` (from
"Server initialized" to "Ready to accept connections", the log's ms timestamps).

  floor        bench/backup.py's RAW_REDIS_RESTORE as it stands: in one container, cp into
               the volume, `redis-server --daemonize`, then `redis-cli INFO | grep` forked
               every 10 ms until loaded; its wall time is copy + start + load + poll.
  floor_log    the same copy and start, polled lightly (one redis-cli every 50 ms, its
               answer matched by bash), ended at the server's "ready" log line.
  by_hand      bench/backup.py's by-hand server (entrypoint redis-server, an RDB, no AOF)
               started through the Docker API and polled from the host on its unix socket
               every 10 ms; wall time = start call to loaded.
  addon        as the add-on runs after a restore: the image's entrypoint, the add-on's
               redis.conf (appendonly yes; a unix socket added for the poll), the RDB as the
               base of a one-file AOF (as REDIS_RESTORE stages it, owned by root); polled as
               by_hand.

    .venv/bin/python bench/restore_load.py [--rdb PATH | --mb 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

from _harness import docker_cli, log
from backup import until_loaded

from agent.secrets import redis_conf
from agent.specs import ADMIN_USER
from tests.agent_fixtures import IMAGES

LIMITS = ("--cpus", "2", "--memory", "2048m", "--memory-swap", "2048m")
FILL = (
    "local blobs = {} for b = 1, 64 do local t = {} for i = 1, 1024 do "
    "t[i] = string.char(math.random(33, 126)) end blobs[b] = table.concat(t) end "
    "for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'key:' .. i, blobs[i % 64 + 1]) end "
    "return redis.call('DBSIZE')"
)
FLOOR = r"""
set -e
d=/data/raw
rm -rf "$d"; mkdir -p "$d"
s=$(date +%s.%N)
cp /in/dump.rdb "$d/dump.rdb"
redis-server --port 0 --unixsocket "$d/s" --dir "$d" --dbfilename dump.rdb --appendonly no \
  --save '' --daemonize yes --logfile "$d/log"
until redis-cli -s "$d/s" INFO persistence 2>/dev/null | grep -q '^loading:0'; do sleep 0.01; done
e=$(date +%s.%N)
redis-cli -s "$d/s" SHUTDOWN NOSAVE >/dev/null 2>&1 || true
cat "$d/log" >&2
echo "$s $e"
"""
# The same copy and start, polled lightly (one redis-cli every 50 ms, its answer matched
# by bash), and ended at the server's own "Ready" line (its log's ms stamp): the poll's
# interval adds nothing to the time, and its forks are 20 a second instead of ~200.
FLOOR_LOG = r"""
set -e
d=/data/raw
rm -rf "$d"; mkdir -p "$d"
s=$(date +%s.%N)
cp /in/dump.rdb "$d/dump.rdb"
redis-server --port 0 --unixsocket "$d/s" --dir "$d" --dbfilename dump.rdb --appendonly no \
  --save '' --daemonize yes --logfile "$d/log"
until [[ $(redis-cli -s "$d/s" INFO persistence 2>/dev/null) == *$'\n'loading:0* ]]; do sleep 0.05; done
redis-cli -s "$d/s" SHUTDOWN NOSAVE >/dev/null 2>&1 || true
cat "$d/log" >&2
echo "$s $s"
"""


def _keep(text: str) -> None:
    """ORKESTR_BENCH_LOGS=<dir>: each server's log kept there, to read afterwards."""
    where = os.environ.get("ORKESTR_BENCH_LOGS")
    if where:
        Path(where, f"{time.time():.3f}.log").write_text(text)


def _stamp(line: str) -> float | None:
    m = re.search(r"(\d+ \w{3} \d{4} \d\d:\d\d:\d\d\.\d{3})", line)
    return datetime.strptime(m.group(1), "%d %b %Y %H:%M:%S.%f").timestamp() if m else None


def parse_log(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    init = ready = None
    for line in text.splitlines():
        if "DB loaded from" in line:
            m = re.search(r": ([0-9.]+) seconds", line)
            if m and "load" not in out:  # the base file's line comes first
                out["load"] = float(m.group(1))
        if "Server initialized" in line:
            init = _stamp(line)
        if "ready to accept connections" in line.lower() and ready is None:
            ready = _stamp(line)
    if init is not None and ready is not None:
        out["init_to_ready"] = round(ready - init, 3)
    if ready is not None:
        out["ready_at"] = ready
    return out


class Way:
    def __init__(self, rdb: Path, label: str) -> None:
        self.rdb, self.label = rdb, label

    def volume(self) -> tuple[str, Path]:
        name = f"orkestr-bench-load-{uuid.uuid4().hex[:8]}"
        docker_cli("volume", "create", "--label", self.label, name)
        mp = Path(docker_cli("volume", "inspect", "-f", "{{.Mountpoint}}", name))
        return name, mp

    def in_container(self, script: str) -> dict[str, float]:
        vol, _mp = self.volume()
        try:
            cmd = ["docker", "run", "--rm", "--label", self.label, *LIMITS, "--network", "none",
                   "-u", "0", "-v", f"{vol}:/data", "-v", f"{self.rdb.parent}:/in:ro",
                   "--entrypoint", "bash", IMAGES["redis"], "-c", script]  # fmt: skip
            out = subprocess_run(cmd)
        finally:
            docker_cli("volume", "rm", "-f", vol, check=False)
        s, e = (float(x) for x in out[0].split()[-2:])
        got = parse_log(out[1])
        _keep(out[1])
        ready = got.pop("ready_at", s)
        # wall: the script's own end; to_ready: its start to the server's "Ready" line.
        return {"wall": round(e - s, 3), "to_ready": round(ready - s, 3), **got}

    async def started(self, by_hand: bool) -> dict[str, float]:
        vol, mp = self.volume()
        name = f"orkestr-bench-load-{uuid.uuid4().hex[:8]}"
        conf_dir = Path(tempfile.mkdtemp(prefix="orkestr-bench-load-"))
        try:
            if by_hand:
                shutil.copyfile(self.rdb, mp / "dump.rdb")
                args = ["--entrypoint", "redis-server", "-u", "0", IMAGES["redis"],
                        "--port", "0", "--unixsocket", "/data/s", "--unixsocketperm", "700",
                        "--dir", "/data", "--dbfilename", "dump.rdb", "--appendonly", "no",
                        "--save", ""]  # fmt: skip
            else:
                aof = mp / "appendonlydir"
                aof.mkdir()
                shutil.copyfile(self.rdb, aof / "appendonly.aof.1.base.rdb")
                (aof / "appendonly.aof.1.incr.aof").write_bytes(b"")
                (aof / "appendonly.aof.manifest").write_text(
                    "file appendonly.aof.1.base.rdb seq 1 type b\n"
                    "file appendonly.aof.1.incr.aof seq 1 type i\n"
                )
                conf = redis_conf("p" * 32, "a" * 32) + "unixsocket /data/s\nunixsocketperm 777\n"
                (conf_dir / "redis.conf").write_text(conf)
                os.chmod(conf_dir, 0o755)
                os.chmod(conf_dir / "redis.conf", 0o644)
                args = ["-v", f"{conf_dir}:/run/orkestr:ro", IMAGES["redis"],
                        "redis-server", "/run/orkestr/redis.conf"]  # fmt: skip
            os.sync()  # the copy's writeback not in the load, as the agent's staging
            docker_cli(
                "create", "--name", name, "--label", self.label, *LIMITS, "--network", "none",
                "-v", f"{vol}:/data", *args,
            )  # fmt: skip
            t0 = time.monotonic()
            docker_cli("start", name)
            await until_loaded(
                mp / "s", b"" if by_hand else f"AUTH {ADMIN_USER} {'a' * 32}\r\n".encode()
            )
            wall = time.monotonic() - t0
            logs = subprocess_run(["docker", "logs", name])
            got = parse_log(logs[0] + logs[1])
            _keep(logs[0] + logs[1])
            got.pop("ready_at", None)
            return {"wall": round(wall, 3), **got}
        finally:
            docker_cli("rm", "-f", name, check=False)
            docker_cli("volume", "rm", "-f", vol, check=False)
            shutil.rmtree(conf_dir, ignore_errors=True)


def subprocess_run(cmd: list[str]) -> tuple[str, str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    return out.stdout, out.stderr


def make_rdb(mb: int, label: str, where: Path) -> Path:
    name = f"orkestr-bench-load-fill-{uuid.uuid4().hex[:8]}"
    docker_cli(
        "run", "-d", "--name", name, "--label", label, "--network", "none", "-u", "0",
        "-v", f"{where}:/data", "--entrypoint", "redis-server", IMAGES["redis"],
        "--port", "0", "--unixsocket", "/data/s", "--save", "", "--appendonly", "no",
        "--dir", "/data",
    )  # fmt: skip
    try:
        time.sleep(0.5)
        docker_cli("exec", name, "redis-cli", "-s", "/data/s", "EVAL", FILL, "0", str(mb * 1024),
                   timeout=900)  # fmt: skip
        docker_cli("exec", name, "redis-cli", "-s", "/data/s", "SAVE", timeout=900)
    finally:
        docker_cli("rm", "-f", name, check=False)
    (where / "s").unlink(missing_ok=True)
    return where / "dump.rdb"


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rdb", type=Path)
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ways", default="floor,floor_log,by_hand,addon")
    args = parser.parse_args()
    label = f"orkestr.test=restore-load-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="orkestr-bench-load-"))
    try:
        if args.rdb is None:
            rdb = make_rdb(args.mb, label, tmp)
        else:
            rdb = tmp / "dump.rdb"
            shutil.copyfile(args.rdb, rdb)
        log(f"rdb {rdb.stat().st_size / 1e6:.0f} MB")
        way = Way(rdb, label)
        ways = args.ways.split(",")
        runs: dict[str, list[dict[str, float]]] = {w: [] for w in ways}
        for r in range(args.rounds):
            order = ways if r % 2 == 0 else ways[::-1]
            for w in order:
                l0 = os.getloadavg()[0]
                if w == "floor":
                    got = way.in_container(FLOOR)
                elif w == "floor_log":
                    got = way.in_container(FLOOR_LOG)
                else:
                    got = await way.started(by_hand=w == "by_hand")
                got["load1"] = round(l0, 2)
                runs[w].append(got)
                log(f"round {r + 1} {w}: {got}")
        for w, rs in runs.items():
            med = {k: round(statistics.median(x[k] for x in rs), 3) for k in rs[0] if k != "load1"}
            print(json.dumps({"way": w, "median": med, "runs": rs}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
