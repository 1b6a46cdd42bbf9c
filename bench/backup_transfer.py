"""A Redis backup's transfer alone, one container setting at a time (issue 9).

No controller, no agent: one Redis of the add-on's image with the add-on's bench limits
(2 CPUs, 2 GiB) on a scratch network, filled the way bench/backup.py fills it (--redis-mb
of incompressible 1 KiB values), then `redis-cli --rdb` from toolbox containers that
differ in one factor at a time from the bench's raw baseline:

  raw      `docker run --rm` on the network, no limits, a bind-mounted directory (the
           baseline of bench/backup.py)
  +mem     the backup container's memory limit (Memory = MemorySwap = --memory-mb)
  +sec     its pids limit, CapDrop ALL + its CapAdd, no-new-privileges
  +follow  the agent's sha256 follower (agent/backup_store.GrowingHash) reading the file
           from the host as it grows, in a thread, as the agent runs it
  +perl    a client of the replica protocol in Perl (the file given by --perl-client,
           run as `perl - HOST USER PASSWORD_FILE OUT`; commit d911708 has one, reverted,
           which lacks `REPLCONF capa eof`: docs/benchmarks.md) instead of `redis-cli --rdb`
  +reuse   the file written over in place: the file of this variant's previous run, still
           in the page cache (redis-cli opens O_WRONLY|O_CREAT, no O_TRUNC), as
           bench/backup.py's raw side does with /out/raw.rdb from its second run on
  ours     all three: what the agent's backup container is (checked against
           BackupRunner._container's create body)

Timed inside the container (redis-cli alone, as the bench's raw side). A variant without
+reuse writes a new file, removed after its run; before each run the server has no child
at work and the page cache's dirty pages are written out. Rounds rotate the order. Per
run: the CPU seconds (cgroup v1 cpuacct) of the toolbox container and of the Redis
container, the follower thread's CPU, the machine's idle share during the transfer
(/proc/stat sampled every 50 ms), and the container's memory cgroup peak and failcnt.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _harness import docker_cli, log, machine_facts, rnd
from backup import REDIS_FILL  # bench/backup.py's fill

from agent import specs
from agent.backup_store import BackupStore, GrowingHash
from agent.config import BackupsSection
from agent.secrets import redis_conf
from tests.agent_fixtures import IMAGES, TOOLBOX

XFER = r"""
set -e
if [ -n "${PERL_CLIENT:-}" ]; then
  s=$(date +%s.%N)
  perl - "$H" orkestr_admin /run/orkestr/admin_password "/out/$F" </tool/rdb.pl
  e=$(date +%s.%N)
else
  export REDISCLI_AUTH="$(cat /run/orkestr/admin_password)"
  s=$(date +%s.%N)
  redis-cli --no-auth-warning -h "$H" --user orkestr_admin --rdb "/out/$F" >/dev/null
  e=$(date +%s.%N)
fi
m=/sys/fs/cgroup/memory
echo "mem $(cat $m/memory.max_usage_in_bytes 2>/dev/null || echo -) $(cat $m/memory.failcnt 2>/dev/null || echo -)"
echo "cpu $(cat /sys/fs/cgroup/cpuacct/cpuacct.usage) $(cat /sys/fs/cgroup/cpuacct/cpuacct.usage_sys)"
echo "$s $e"
"""
QUIET = r"""
export REDISCLI_AUTH="$(cat /run/orkestr/admin_password)"
for _ in $(seq 1200); do
  redis-cli --no-auth-warning -h "$H" --user orkestr_admin INFO persistence | tr -d '\r' | awk -F: '
    /^(aof_rewrite_in_progress|aof_rewrite_scheduled|rdb_bgsave_in_progress):/ {n += $2}
    END {exit n != 0}' && break
  sleep 0.1
done
"""
FACTORS = ("mem", "sec", "follow", "reuse", "perl")
CPUACCT = Path("/sys/fs/cgroup/cpuacct/docker")


class Idle:
    """The machine's idle share between two wall-clock instants, from /proc/stat."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            self.samples.append((time.time(), f[3] + f[4], sum(f[:8])))
            self.stop.wait(0.05)

    def share(self, start: float, end: float) -> float | None:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return None
        (_, i0, t0), (_, i1, t1) = inside[0], inside[-1]
        return (i1 - i0) / (t1 - t0) if t1 > t0 else None


def cpu_ns(container_id: str) -> int:
    return int((CPUACCT / container_id / "cpuacct.usage").read_text())


def factor_args(memory_mb: int) -> dict[str, list[str]]:
    return {
        "mem": ["--memory", f"{memory_mb}m", "--memory-swap", f"{memory_mb}m"],
        "sec": [
            "--pids-limit", "256", "--cap-drop", "ALL",
            *(x for c in specs.DB_CAPABILITIES for x in ("--cap-add", c)),
            "--security-opt", specs.NO_NEW_PRIVILEGES,
        ],
    }  # fmt: skip


def check_against_agent(memory_mb: int, state: Path) -> None:
    """The factors are what the agent's backup container carries (not one left out)."""
    from agent.backups import BackupRunner
    from schemas.messages import AddonSpec, BackupSpec, Resources

    runner = BackupRunner(
        "h", None, BackupStore(state / "store"), state, state, TOOLBOX, memory_mb,  # type: ignore[arg-type]
        60, None, None, lambda: None,  # type: ignore[arg-type]
    )  # fmt: skip
    addon = AddonSpec(
        id="a" * 32, name="cache", kind="redis", resources=Resources(cpus=2.0, memory_mb=2048)
    )
    spec = BackupSpec(id="b" * 32, op="backup", addon_id=addon.id, backup_id="b" * 32)
    hc: Any = specs.create_body(
        runner._container(spec, "dump", "c" * 32, addon, "true", {}, "net", "orkestr_backup"), "h"
    )["HostConfig"]
    assert hc["Memory"] == hc["MemorySwap"] == memory_mb << 20, hc
    assert hc["PidsLimit"] == 256 and hc["CapDrop"] == ["ALL"], hc
    assert hc["CapAdd"] == list(specs.DB_CAPABILITIES), hc
    assert hc["SecurityOpt"] == [specs.NO_NEW_PRIVILEGES], hc
    assert not {"NanoCpus", "CpuQuota", "CpuShares", "BlkioWeight"} & set(hc), hc


def run_one(
    host: str,
    network: str,
    server: tuple[str, str],
    base: Path,
    variant: tuple[str, ...],
    memory_mb: int,
) -> dict[str, Any]:
    redis, redis_id = server
    out, secret = base / "out", ["-v", f"{base / 'secret'}:/run/orkestr:ro"]
    docker_cli(
        "run", "--rm", "--network", network, "--label", f"orkestr.host={host}", *secret,
        "-e", f"H={redis}", "--entrypoint", "bash", TOOLBOX, "-c", QUIET,
    )  # fmt: skip
    os.sync()
    name = (
        f"reuse-{'+'.join(variant)}.rdb" if "reuse" in variant else f"x{secrets.token_hex(6)}.rdb"
    )
    extra = [a for f in variant if f in ("mem", "sec") for a in factor_args(memory_mb)[f]]
    growing = GrowingHash(out / name) if "follow" in variant else None
    follower_cpu: list[float] = []

    def follow() -> None:
        assert growing is not None
        t = time.thread_time()
        growing.follow()
        follower_cpu.append(time.thread_time() - t)

    thread = threading.Thread(target=follow) if growing else None
    if thread:
        thread.start()
    idle = Idle()
    idle.thread.start()
    redis_cpu0 = cpu_ns(redis_id)
    try:
        t0 = time.monotonic()
        got = docker_cli(
            "run", "--rm", "--network", network, "--label", f"orkestr.host={host}", *extra,
            "-v", f"{out}:/out", *secret, "-e", f"H={redis}", "-e", f"F={name}",
            *(["-v", f"{base / 'tool'}:/tool:ro", "-e", "PERL_CLIENT=1"] if "perl" in variant else []),
            "--entrypoint", "bash", TOOLBOX, "-c", XFER, timeout=600,
        )  # fmt: skip
        wall = time.monotonic() - t0
        redis_cpu = (cpu_ns(redis_id) - redis_cpu0) / 1e9
    finally:
        idle.stop.set()
        idle.thread.join()
        if growing is not None and thread is not None:
            growing.stop.set()
            thread.join()
    lines = got.splitlines()
    start, end = (float(x) for x in lines[-1].split())
    _, peak, failcnt = lines[-3].split()
    _, cli_cpu, cli_sys = lines[-2].split()
    row: dict[str, Any] = {
        "variant": "+".join(variant) or "raw",
        "transfer_s": rnd(end - start),
        "wall_s": rnd(wall),
        "idle_share": rnd(x) if (x := idle.share(start, end)) is not None else None,
        "cli_cpu_s": rnd(int(cli_cpu) / 1e9),
        "cli_sys_s": rnd(int(cli_sys) / 1e9),
        "redis_cpu_s": rnd(redis_cpu),
        "memcg_peak_mb": rnd(int(peak) / 2**20, 1) if peak != "-" else None,
        "memcg_failcnt": int(failcnt) if failcnt != "-" else None,
        "size": (out / name).stat().st_size,
    }
    if growing is not None:
        growing.result()
        row["follower_cpu_s"] = rnd(follower_cpu[0])
        if growing.first_byte and growing.last_growth:
            row["follower_first_to_last_s"] = rnd(growing.last_growth - growing.first_byte)
    if "reuse" not in variant:
        (out / name).unlink()
    return row


def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="orkestr-bench-xfer-") as scratch:
        check_against_agent(args.memory_mb, Path(scratch))
    host = f"bench-xfer-{secrets.token_hex(4)}"
    network, redis = f"{host}-net", f"{host}-redis"
    base = Path(tempfile.mkdtemp(prefix="orkestr-bench-xfer-"))
    for d in ("out", "secret", "tool"):
        (base / d).mkdir()
    # The add-on's own redis.conf (its users, AOF, no save rules, no diskless wait).
    password, admin = secrets.token_hex(16), secrets.token_hex(16)
    (base / "secret" / "redis.conf").write_text(redis_conf(password, admin))
    (base / "secret" / "admin_password").write_text(admin)
    variants: list[tuple[str, ...]] = [
        tuple(v.split("+")) if v != "raw" else () for v in args.variants
    ]
    results: dict[str, Any] = {
        "bench": "backup_transfer",
        "redis_mb": args.redis_mb,
        "memory_mb": args.memory_mb,
        "machine": machine_facts(),
        "load_start": rnd(os.getloadavg()[0], 2),
        "runs": [],
    }
    try:
        if args.perl_client:
            shutil.copyfile(args.perl_client, base / "tool" / "rdb.pl")
        docker_cli("network", "create", "--label", f"orkestr.host={host}", network)
        redis_id = docker_cli(
            "run", "-d", "--name", redis, "--network", network, "--label", f"orkestr.host={host}",
            "--cpus", "2", "--memory", "2048m", "--memory-swap", "2048m",
            "-v", f"{base / 'secret'}:/run/orkestr:ro", IMAGES["redis"],
            "redis-server", "/run/orkestr/redis.conf",
        )  # fmt: skip
        t0 = time.monotonic()
        keys = docker_cli(
            "run", "--rm", "--network", network, "--label", f"orkestr.host={host}",
            "-e", f"REDIS_URL=redis://default:{password}@{redis}:6379", "--entrypoint", "sh", TOOLBOX, "-c",
            "until redis-cli -u \"$REDIS_URL\" PING >/dev/null 2>&1; do sleep 0.1; done; "
            + REDIS_FILL.format(keys=args.redis_mb * 1024), timeout=3600,
        )  # fmt: skip
        log(f"filled {keys.strip()} keys in {time.monotonic() - t0:.0f}s")
        for v in variants:  # the files a +reuse variant writes over, in the page cache
            if "reuse" in v:
                run_one(host, network, (redis, redis_id), base, v, args.memory_mb)
        for r in range(args.rounds):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:
                row = run_one(host, network, (redis, redis_id), base, v, args.memory_mb)
                row["round"] = r + 1
                row["load"] = rnd(os.getloadavg()[0], 2)
                results["runs"].append(row)
                log(json.dumps(row))
    finally:
        docker_cli("rm", "-f", "-v", redis, check=False)  # -v: the image's VOLUME /data
        docker_cli("network", "rm", network, check=False)
        shutil.rmtree(base, ignore_errors=True)
    results["load_end"] = rnd(os.getloadavg()[0], 2)
    results["medians"] = {}
    for key in ("transfer_s", "cli_cpu_s", "redis_cpu_s", "idle_share"):
        by: dict[str, list[float]] = {}
        for row in results["runs"]:
            if row[key] is not None:
                by.setdefault(row["variant"], []).append(row[key])
        results["medians"][key] = {v: rnd(statistics.median(x)) for v, x in by.items()}
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--redis-mb", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--memory-mb", type=int, default=BackupsSection().memory_mb)
    parser.add_argument(
        "--perl-client", help="the +perl factor's client: perl - HOST USER PWFILE OUT"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["raw", "mem", "sec", "follow", "mem+sec+follow"],
        help=f"'raw' or factors joined by '+', of {FACTORS}",
    )
    ns = parser.parse_args()
    res = main(ns)
    for key, by in res["medians"].items():
        print(key, "medians:", "  ".join(f"{v} {m}" for v, m in by.items()))
    print(json.dumps(res, separators=(",", ":")))
