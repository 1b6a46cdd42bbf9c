"""A backup taken while the add-on's writes are refused (over its storage quota) restores.

The refusal is the platform's objects in the tenant's database (agent/upkeep.py: a schema
`orkestr` of the platform's role, its functions, a trigger on every table and an event
trigger), and pg_dump takes them along. Restored as the tenant (never a superuser), the
event trigger failed: every such backup was marked `verified: false` and could not be
restored, just when a user over its quota snapshots before deleting data.
"""

from __future__ import annotations

import asyncio

import pytest

from agent import specs
from tests.agent_fixtures import (
    AgentProcess,
    Stack,
    wait_for,
)
from tests.backup_api import backup_now, restore
from tests.test_quota_guard import fill_past_the_quota, psql, quota_condition, tiny_postgres

pytest_plugins = ["tests.agent_fixtures"]

PLANS = """
[tiny]
max_addons = 1
cpus = 0.5
memory_mb = 256
storage_mb = 24
manual_backups_per_day = 10
backup_retention_days = 7
sleep = { enabled = false }

[roomy]
max_addons = 1
cpus = 0.5
memory_mb = 256
storage_mb = 256
manual_backups_per_day = 10
backup_retention_days = 7
sleep = { enabled = false }
"""


@pytest.fixture(scope="module")
def plans_text() -> str:
    return PLANS


async def data_fs_mb(db: str) -> int:
    """The size of the database's data filesystem, as the database sees it."""
    proc = await asyncio.create_subprocess_exec(
        "docker", "exec", db, "df", "-BM", "--output=size", specs.DATA_DIRS["postgres"],
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    return int(out.decode().split()[-1].rstrip("M"))


async def test_a_backup_taken_while_writes_are_refused_verifies_and_restores(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project, pg, db, user, password = await tiny_postgres(c)
    p = project["id"]
    code, out = await psql(
        db, user, password,
        "CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept SELECT generate_series(1, 100);"
        "CREATE TABLE fill (pad text)",
    )  # fmt: skip
    assert code == 0, out
    await fill_past_the_quota(c, p, pg["id"], db, user, password)
    backup = await backup_now(c, p, pg["id"])
    assert backup["state"] == "succeeded" and backup["verified"] is True, backup
    # Its data is over the tiny plan: restored on a plan it fits (the operator's move).
    status, body = await c.api("PATCH", f"/v1/projects/{p}", {"plan": "roomy"})
    assert status == 200, body
    await wait_for(lambda: quota_condition(c, p, pg["id"], "WithinQuota"), 60, "writes back")
    assert (await psql(db, user, password, "DELETE FROM kept WHERE id > 10"))[0] == 0
    restored = await restore(c, p, pg["id"], backup["id"], timeout=180)
    if await data_fs_mb(db) < specs.fs_size_mb(256) * 0.9:
        # A machine without CAP_SYS_RESOURCE (this container, not a systemd host): the
        # quota grew with the plan, the filesystem could not, and the copy beside the
        # live database would eat into the guard's reserve. It is stopped, the live
        # database untouched.
        assert restored["state"] == "failed", restored
        assert "room beside the live database" in restored["error"], restored["error"]
        assert await psql(db, user, password, "SELECT count(*) FROM kept") == (0, "10")
        return
    assert restored["state"] == "succeeded", restored.get("error")
    assert await psql(db, user, password, "SELECT count(*) FROM kept") == (0, "100")
    # Nothing of the platform's came back as the tenant's.
    mine = (
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'orkestr' "
        "AND nspowner::regrole::text <> 'orkestr_admin'"
    )
    assert await psql(db, user, password, mine) == (0, "0")
