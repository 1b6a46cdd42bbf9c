"""The serial parts a Redis restore cannot avoid, timed apart on one RDB (no controller).

For a design choice, not a ratio: in one container of the Redis add-on's image and the
bench's limits (2 CPUs, 2 GiB), on a scratch Docker volume (`local` driver, as in
bench/backup.py), per round:

  copy        the RDB copied from a read-only bind mount into the volume (page cache)
  flush       that copy's `sync` (what a durable copy adds)
  load        redis-server loading it (`--appendonly no`): copy + load is the load-only floor
  load_link   redis-server with `appendonly yes` loading a one-file AOF whose base file is a
              symlink to the read-only bind mount (no copy at all)
  rewrite     then BGREWRITEAOF until done: what makes the volume hold the data without
              the backup store (new base written and fsynced, manifest swapped)

and on the host, the agent's sha256 of the same file (hashlib, as agent/backup_store.py).

    .venv/bin/python bench/restore_parts.py --rdb PATH [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from pathlib import Path

from _harness import docker_cli

from agent.backup_store import sha256_of
from tests.agent_fixtures import IMAGES

SCRIPT = r"""
set -euo pipefail
now() { date +%s.%N; }
loaded() { until redis-cli -s /data/s INFO persistence 2>/dev/null | grep -q '^loading:0'; do sleep 0.01; done; }
cd /data
t0=$(now); cp /backup/in.rdb /data/dump.rdb; t1=$(now); sync /data/dump.rdb /data; t2=$(now)
redis-server --port 0 --unixsocket /data/s --dir /data --dbfilename dump.rdb --appendonly no \
  --save '' --daemonize yes --logfile /data/log1
loaded; t3=$(now)
redis-cli -s /data/s SHUTDOWN NOSAVE >/dev/null 2>&1 || true
rm -f /data/dump.rdb /data/s
mkdir appendonlydir
ln -s /backup/in.rdb appendonlydir/appendonly.aof.1.base.rdb
: >appendonlydir/appendonly.aof.1.incr.aof
printf 'file appendonly.aof.1.base.rdb seq 1 type b\nfile appendonly.aof.1.incr.aof seq 1 type i\n' \
  >appendonlydir/appendonly.aof.manifest
sleep 0.5
t4=$(now)
redis-server --port 0 --unixsocket /data/s --dir /data --appendonly yes --save '' \
  --daemonize yes --logfile /data/log2
loaded; t5=$(now)
redis-cli -s /data/s BGREWRITEAOF >/dev/null
while redis-cli -s /data/s INFO persistence | grep -qE '^aof_rewrite_(in_progress|scheduled):1'; do
  sleep 0.01
done
t6=$(now)
ls -l appendonlydir >&2
redis-cli -s /data/s SHUTDOWN NOSAVE >/dev/null 2>&1 || true
echo "$t0 $t1 $t2 $t3 $t4 $t5 $t6"
"""


def one_round(rdb: Path, label: str) -> dict[str, float]:
    volume = f"orkestr-bench-parts-{uuid.uuid4().hex[:8]}"
    docker_cli("volume", "create", "--label", label, volume)
    try:
        out = docker_cli(
            "run", "--rm", "--label", label, "--cpus", "2", "--memory", "2048m",
            "--memory-swap", "2048m", "--network", "none", "-u", "0",
            "-v", f"{volume}:/data", "-v", f"{rdb}:/backup/in.rdb:ro",
            "--entrypoint", "bash", IMAGES["redis"], "-c", SCRIPT,
            timeout=600,
        )  # fmt: skip
    finally:
        docker_cli("volume", "rm", "-f", volume, check=False)
    t = [float(x) for x in out.split()[-7:]]
    h0 = time.monotonic()
    sha256_of(rdb)
    sha = time.monotonic() - h0
    return {
        "copy": round(t[1] - t[0], 3),
        "flush": round(t[2] - t[1], 3),
        "load": round(t[3] - t[2], 3),
        "floor_copy_load": round(t[1] - t[0] + t[3] - t[2], 3),
        "load_link": round(t[5] - t[4], 3),
        "rewrite": round(t[6] - t[5], 3),
        "sha256": round(sha, 3),
        "load1": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rdb", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    label = f"orkestr.test=restore-parts-{os.getpid()}"
    rounds = [one_round(args.rdb.resolve(), label) for _ in range(args.rounds)]
    for r in rounds:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
