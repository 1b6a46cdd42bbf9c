"""A backup taken while the add-on's writes are refused (over its storage quota) restores.

The refusal is the platform's objects in the tenant's database (agent/upkeep.py: a schema
`orkestr` of the platform's role, its functions, a trigger on every table and an event
trigger), and pg_dump takes them along. Restored as the tenant (never a superuser), the
event trigger failed: every such backup was marked `verified: false` and could not be
restored, just when a user over its quota snapshots before deleting data.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent import specs
from tests.agent_fixtures import (
    AgentProcess,
    Stack,
    create_addon,
    create_project,
    wait_for,
    wait_phase,
)
from tests.services import ControllerProcess
from tests.test_quota_guard import psql, quota_condition

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


async def finished(c: ControllerProcess, path: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        status, body = await c.api("GET", path)
        assert status == 200, body
        return body if body["state"] != "pending" and not body.get("verifying") else None

    return await wait_for(done, 180, path, 0.5)  # type: ignore[no-any-return]


async def test_a_backup_taken_while_writes_are_refused_verifies_and_restores(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    p = (await create_project(c, "tiny"))["id"]
    pg = await create_addon(c, p, "main-db", "postgres")
    await wait_phase(c, p, pg["id"], "ready")
    status, body = await c.api("GET", f"/v1/projects/{p}/env")
    assert status == 200, body
    url = body["env"]["MAIN_DB_URL"]
    user, password = url.split("//", 1)[1].split("@", 1)[0].split(":", 1)
    db = f"orkestr-{pg['id']}-db"
    code, out = await psql(
        db, user, password,
        "CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept SELECT generate_series(1, 100);"
        "CREATE TABLE fill (pad text)",
    )  # fmt: skip
    assert code == 0, out
    fill = "INSERT INTO fill SELECT repeat(md5(g::text), 60) FROM generate_series(1, 4000) g"
    for _ in range(5):
        await psql(db, user, password, fill)
    await wait_for(lambda: quota_condition(c, p, pg["id"], "Exceeded"), 60, "quota exceeded")
    base = f"/v1/projects/{p}/addons/{pg['id']}"
    status, body = await c.api("POST", f"{base}/backups")
    assert status == 202, body
    backup = await finished(c, f"{base}/backups/{body['id']}")
    assert backup["state"] == "succeeded" and backup["verified"] is True, backup
    # Its data is over the tiny plan: restored on a plan it fits (the operator's move).
    status, body = await c.api("PATCH", f"/v1/projects/{p}", {"plan": "roomy"})
    assert status == 200, body
    await wait_for(lambda: quota_condition(c, p, pg["id"], "WithinQuota"), 60, "writes back")
    assert (await psql(db, user, password, "DELETE FROM kept WHERE id > 10"))[0] == 0
    status, body = await c.api("POST", f"{base}/backups/{backup['id']}/restore")
    assert status == 202, body
    restored = await finished(c, f"{base}/restores/{body['id']}")
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
