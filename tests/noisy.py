"""Noisy neighbours, shared by tests/test_neighbours.py and bench/neighbours.py.

A *neighbour* is a Postgres add-on whose query latency a client times; a *hog* is another
add-on on the same host that burns memory, CPU or disk as hard as its tenant can, through
its own SQL. Clients connect from the host to the holders' addresses (the agent's own
path), so no client container shares the CPU being measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

import asyncpg

Hog = Literal["memory", "cpu", "disk"]
HOGS: tuple[Hog, ...] = ("memory", "cpu", "disk")

NEIGHBOUR_SETUP = """
CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, v int NOT NULL);
INSERT INTO items SELECT g, g % 97 FROM generate_series(1, 100000) g ON CONFLICT DO NOTHING;
ANALYZE items;
"""
NEIGHBOUR_QUERY = "SELECT sum(v) FROM items WHERE id BETWEEN $1 AND $1 + 100"

# Each statement is what a tenant can run with its own role.
HOG_SQL: dict[Hog, str] = {
    # One value far larger than the add-on's memory: the backend is OOM-killed inside
    # the container's limit and Postgres restarts its backends.
    "memory": "SELECT length(repeat('x', 600000000))",
    # Pure CPU (a PL/pgSQL loop: no temp files), from several sessions at once: the
    # container's CPU quota caps them all together.
    "cpu": "DO $$ DECLARE i bigint := 0; BEGIN WHILE i < 4000000000 LOOP i := i + 1; "
    "END LOOP; END $$",
    # Writes until the storage quota refuses them, then keeps trying.
    "disk": "INSERT INTO fill SELECT repeat(md5(g::text), 60) FROM generate_series(1, 20000) g",
}
HOG_SESSIONS: dict[Hog, int] = {"memory": 1, "cpu": 4, "disk": 2}


@dataclass(frozen=True)
class Target:
    host: str
    user: str
    password: str
    database: str = "app"
    port: int = 5432

    async def connect(self, timeout: float = 10) -> asyncpg.Connection:
        return await asyncpg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=self.database,
            ssl=False,
            timeout=timeout,
        )


def percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


async def prepare_neighbour(target: Target) -> None:
    conn = await target.connect()
    try:
        await conn.execute(NEIGHBOUR_SETUP)
    finally:
        await conn.close()


async def time_queries(target: Target, count: int, pause_s: float = 0.002) -> list[float]:
    """Latency (ms) of `count` queries on one open connection, as an app's pool would."""
    conn = await target.connect()
    try:
        for i in range(50):  # warm the plan cache and the buffers
            await conn.fetchval(NEIGHBOUR_QUERY, i * 1000 + 1)
        samples: list[float] = []
        for i in range(count):
            t0 = time.perf_counter()
            await conn.fetchval(NEIGHBOUR_QUERY, (i * 7919) % 99000 + 1)
            samples.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(pause_s)
        return samples
    finally:
        await conn.close()


def _loop_script(sql: str) -> str:
    """A shell loop inside the hog's own container, so even its client is charged to it."""
    return (
        "rm -f /tmp/hog-stop; while [ ! -e /tmp/hog-stop ]; do "
        f'psql -h 127.0.0.1 -U "$HOG_USER" -d app -qtAc {shlex.quote(sql)} >/dev/null 2>&1 '
        "|| { echo HOGFAIL; sleep 0.2; }; done"
    )


async def _docker(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


@contextlib.asynccontextmanager
async def hogging(container: str, target: Target, hog: Hog) -> AsyncIterator[list[int]]:
    """While inside, the add-on in `container` is hogged by its own tenant's SQL, run
    inside that container; afterwards the list holds how many runs failed (OOM, quota)."""
    env = ["-e", f"PGPASSWORD={target.password}", "-e", f"HOG_USER={target.user}"]
    if hog == "disk":
        await _docker("exec", *env, container, "psql", "-h", "127.0.0.1", "-U", target.user,
                      "-d", "app", "-qc", "CREATE TABLE IF NOT EXISTS fill (pad text)")  # fmt: skip
    sessions = [
        asyncio.create_task(
            _docker("exec", *env, container, "sh", "-c", _loop_script(HOG_SQL[hog]))
        )
        for _ in range(HOG_SESSIONS[hog])
    ]
    failures: list[int] = []
    try:
        await asyncio.sleep(1.0)  # let the hog get going
        yield failures
    finally:
        await _docker("exec", container, "touch", "/tmp/hog-stop")
        # A tenant may cancel its own role's queries: the loops then see the stop file.
        cancel = (
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
            "WHERE usename = current_user AND pid <> pg_backend_pid()"
        )
        for _ in range(20):
            await _docker("exec", *env, container, "psql", "-h", "127.0.0.1", "-U", target.user,
                          "-d", "app", "-qtAc", cancel)  # fmt: skip
            done, _pending = await asyncio.wait(sessions, timeout=1.0)
            if len(done) == len(sessions):
                break
        outputs = await asyncio.gather(*sessions)
        failures.append(sum(out.count("HOGFAIL") for _code, out in outputs))
