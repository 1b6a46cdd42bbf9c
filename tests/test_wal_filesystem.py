"""A full data filesystem while the agent is away: an ERROR for the tenant, never a PANIC.

The quota guard (tests/test_quota_guard.py) keeps 48 MB free while the agent runs. While
it is stopped (an upgrade, a crash) nothing refuses writes, and a tenant fills its
database's filesystem to the last block. With the WAL on that same filesystem, a WAL
write then finds it full, which Postgres answers with a PANIC and a restart of all its
processes (every client cut, crash recovery). With the WAL on a filesystem of its own
(specs.wal_fs_size_mb) the full data filesystem only fails the statement that wanted a
new block ("could not extend file ...: No space left on device"); WAL writes,
checkpoints and reads go on, and the postmaster never restarts. Here the tenant fills
the disk, then keeps writing WAL without needing a new data block (large deletes rolled
back: a full-page image per page after each checkpoint), the way a live application
would keep working on a full disk.
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from tests.agent_fixtures import AgentProcess, Stack, docker, wait_for
from tests.test_quota_guard import (
    CRASH_SIGNS,
    FILL_8MB,
    inspect,
    no_signs_in_logs,
    psql,
    quota_condition,
    seed,
    tiny_postgres,
)

pytest_plugins = ["tests.agent_fixtures"]

PLANS = """
[tiny]
max_addons = 1
cpus = 0.5
memory_mb = 256
storage_mb = 24
sleep = { enabled = false }
"""
# WAL without a new data block: every row's header changes in place, and each page's
# first change after a checkpoint writes its full image to the WAL (8 kB).
CHURN = "BEGIN; DELETE FROM fill WHERE ctid < '(1500,0)'::tid; ROLLBACK"


@pytest.fixture(scope="module")
def plans_text() -> str:
    return PLANS


async def admin_sql(db: str, sql: str) -> str:
    """The platform role over the container's socket (the probe's role, not the tenant)."""
    return docker("exec", db, "psql", "-U", "orkestr_admin", "-d", "app", "-qtAc", sql)


async def test_a_full_data_filesystem_fails_statements_and_never_crashes_postgres(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project, pg, db, user, password = await tiny_postgres(c)

    async def settled() -> bool:
        return (await psql(db, user, password, "show wal_init_zero"))[1] == "off"

    await wait_for(settled, 60, "the agent's WAL settings")
    await seed(db, user, password)
    await admin_sql(db, "CREATE EXTENSION IF NOT EXISTS amcheck")  # no catalog write later
    postmaster = await admin_sql(db, "SELECT pg_postmaster_start_time()")
    before = inspect(db)["State"]
    await agent.stop()

    # The tenant fills the disk: statements until one is refused.
    for _ in range(60):
        code, out = await psql(db, user, password, FILL_8MB)
        if code != 0:
            break
    assert code != 0, "the filesystem never filled"
    assert "ERROR:  could not extend file" in out and "No space left on device" in out, out
    # ... and goes on working on it: more WAL, no new data block, and writes refused.
    for _ in range(8):
        code, out = await psql(db, user, password, CHURN)
        assert code == 0, out
        code, out = await psql(db, user, password, FILL_8MB)
        assert code != 0 and "ERROR:  could not extend file" in out, out
    await asyncio.sleep(2)  # a crash shows in the logs within a restart

    # Reads work, the postmaster and its container are the ones of before, no crash.
    assert await psql(db, user, password, "SELECT count(*) FROM kept") == (0, "1000")
    assert await admin_sql(db, "SELECT pg_postmaster_start_time()") == postmaster
    after = inspect(db)
    assert after["RestartCount"] == 0
    assert (after["State"]["Pid"], after["State"]["StartedAt"]) == (
        before["Pid"],
        before["StartedAt"],
    )
    no_signs_in_logs(db, CRASH_SIGNS)
    check = docker("exec", db, "pg_amcheck", "-U", "orkestr_admin", "-d", "app",
                   "--heapallindexed", check=False)  # fmt: skip
    assert "error" not in check.lower() and "corrupt" not in check.lower(), check

    # The agent back: its guard refuses writes with the plan's message, as before.
    await agent.start()
    await wait_for(
        lambda: quota_condition(c, project["id"], pg["id"], "Exceeded"), 90, "quota exceeded"
    )
    code, out = await psql(db, user, password, "INSERT INTO kept VALUES (5000, 'late')")
    assert code != 0 and "storage quota exceeded" in out, out
    # Freed space brings writes back.
    truncated = await psql(db, user, password, "TRUNCATE fill")
    assert truncated[0] == 0, truncated
    await wait_for(
        lambda: quota_condition(c, project["id"], pg["id"], "WithinQuota"), 90, "within quota"
    )
    code, out = await psql(
        db, user, password, "INSERT INTO kept VALUES (5000, 'late'); SELECT count(*) FROM kept"
    )
    assert code == 0 and out.endswith("1001"), out
    assert inspect(db)["State"]["StartedAt"] == before["StartedAt"]

    # Deleted: both volumes, both images and both loop devices go.
    volumes = docker("volume", "ls", "-q", "--filter", f"name=orkestr-{pg['id']}-").split()
    assert sorted(volumes) == [f"orkestr-{pg['id']}-data", f"orkestr-{pg['id']}-wal"]
    status, body = await c.api("DELETE", f"/v1/projects/{project['id']}/addons/{pg['id']}")
    assert status == 202, body

    def gone() -> bool:
        images = list((agent.state_dir / "volumes").glob(f"orkestr-{pg['id']}-*"))
        return not images and not docker(
            "volume", "ls", "-q", "--filter", f"name=orkestr-{pg['id']}-"
        )

    await wait_for(gone, 90, "the add-on's volumes and images removed")

    async def purged() -> bool:
        status, _ = await c.api("GET", f"/v1/projects/{project['id']}/addons/{pg['id']}")
        return status == 404

    await wait_for(purged, 60, "the add-on reported removed and purged")
    loops = await asyncio.to_thread(
        subprocess.run,
        ["losetup", "--list", "--noheadings", "--output", "BACK-FILE"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert f"orkestr-{pg['id']}-" not in loops.stdout, loops.stdout
