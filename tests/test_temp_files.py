"""Postgres's temporary files are bounded by the plan, against a real add-on.

Temporary files (a sort or a hash that spills, an index build) are on the add-on's data
filesystem but not in `pg_database_size`, the quota's measure: before, one tenant query
could write them until its own filesystem was full, past the quota. The agent's upkeep
sets `temp_file_limit` (specs.temp_file_limit_mb) on the tenant's login roles, which the
tenant cannot change, follows a plan change, and a query past it fails with Postgres's
own error while the server and the tenant's other sessions go on.
"""

from __future__ import annotations

import asyncio
import urllib.parse

import pytest

from agent.specs import temp_file_limit_mb
from tests.agent_fixtures import AgentProcess, Stack, wait_for
from tests.test_quota_guard import CRASH_SIGNS, inspect, no_signs_in_logs, psql, tiny_postgres

pytest_plugins = ["tests.agent_fixtures"]

PLANS = """
[tiny]
max_addons = 1
cpus = 0.5
memory_mb = 256
storage_mb = 24
sleep = { enabled = false }

[roomy]
max_addons = 1
cpus = 0.5
memory_mb = 256
storage_mb = 512
sleep = { enabled = false }
"""
# A sort of 3 million integers that spills about 70 MB of temporary files (work_mem 4 MB).
BIG_SORT = "SELECT count(*) FROM (SELECT g FROM generate_series(1, 3000000) g ORDER BY g DESC) s"


@pytest.fixture(scope="module")
def plans_text() -> str:
    return PLANS


async def test_a_tenants_temporary_files_are_bounded_by_the_plan(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project, pg, db, user, password = await tiny_postgres(c)
    assert temp_file_limit_mb(24) == 32 and temp_file_limit_mb(512) == 64

    async def limit_is(want: str, login: str, secret: str) -> bool:
        return (await psql(db, login, secret, "SHOW temp_file_limit")) == (0, want)

    await wait_for(lambda: limit_is("32MB", user, password), 60, "temp_file_limit set")
    code, out = await psql(db, user, password, "CREATE TABLE kept AS SELECT 1 AS one")
    assert code == 0, out
    started = inspect(db)["State"]["StartedAt"]

    # Past the limit: Postgres's own error, for this query only.
    code, out = await psql(db, user, password, BIG_SORT)
    assert code != 0 and "temporary file size exceeds temp_file_limit (32768kB)" in out, out
    assert await psql(db, user, password, "SELECT one FROM kept") == (0, "1")
    info = inspect(db)
    assert info["State"]["Running"] and info["State"]["StartedAt"] == started, info["State"]
    # A sort within the limit still works.
    small = "SELECT count(*) FROM (SELECT g FROM generate_series(1, 500000) g ORDER BY g DESC) s"
    assert await psql(db, user, password, small) == (0, "500000")

    # The tenant cannot lift it: not in its session, not on its roles, not in a function.
    for sql in (
        "SET temp_file_limit = -1",
        f'ALTER ROLE "{user}" RESET temp_file_limit',
        f'ALTER ROLE "{user}" SET temp_file_limit = -1',
        "ALTER DATABASE app SET temp_file_limit = -1",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET temp_file_limit = -1 AS 'SELECT 1'",
    ):
        code, out = await psql(db, user, password, sql)
        assert code != 0 and "permission denied" in out, (sql, out)

    # A plan change reaches the running add-on without a restart.
    status, body = await c.api("PATCH", f"/v1/projects/{project['id']}", {"plan": "roomy"})
    assert status == 200, body
    await wait_for(lambda: limit_is("64MB", user, password), 90, "the new plan's limit")
    assert inspect(db)["State"]["StartedAt"] == started

    # After a rotation the tenant logs in as its other login role: bounded as well.
    base = f"/v1/projects/{project['id']}/addons/{pg['id']}"
    status, body = await c.api("POST", f"{base}/rotate-credentials")
    assert status == 202, body
    status, body = await c.api("GET", f"/v1/projects/{project['id']}/env")
    assert status == 200, body
    url = urllib.parse.urlsplit(body["env"]["MAIN_DB_URL"])
    login = urllib.parse.unquote(url.username or "")
    secret = urllib.parse.unquote(url.password or "")
    assert login == f"{user}_rot", login

    async def rotated_and_bounded() -> bool:
        return await limit_is("64MB", login, secret)

    await wait_for(rotated_and_bounded, 90, "the rotated login role bounded")
    code, out = await psql(db, login, secret, f'ALTER ROLE "{login}" RESET temp_file_limit')
    assert code != 0 and "permission denied" in out, out
    assert inspect(db)["State"]["StartedAt"] == started


# One session's temporary files, about 31 MB (within the tiny plan's 32 MB), held for
# about 12 s: the sorted rows are read slowly.
HELD_SORT = (
    "SELECT count(*) FROM (SELECT g FROM generate_series(1, 1200000) g ORDER BY g DESC) s "
    "WHERE CASE WHEN g % 100000 = 0 THEN pg_sleep(1)::text = '' ELSE true END"
)


async def test_many_sessions_within_the_limit_are_stopped_before_the_filesystem_is_full(
    stack: Stack, agent: AgentProcess
) -> None:
    """`temp_file_limit` is per process: eight sessions each within it (250 MB together,
    the tiny plan's filesystem is 152 MB) filled the filesystem; the guard cancels the
    sessions that hold temporary files once it is short of its reserve."""
    c = stack.controller
    assert c is not None
    _, _, db, user, password = await tiny_postgres(c)

    async def limit_set() -> bool:
        return (await psql(db, user, password, "SHOW temp_file_limit")) == (0, "32MB")

    await wait_for(limit_set, 60, "temp_file_limit set")
    code, out = await psql(db, user, password, "CREATE TABLE kept AS SELECT 1 AS one")
    assert code == 0, out
    started = inspect(db)["State"]["StartedAt"]

    results = await asyncio.gather(*(psql(db, user, password, HELD_SORT) for _ in range(8)))
    await asyncio.sleep(2)  # a crash shows within a restart
    no_signs_in_logs(db, ("No space left on device", *CRASH_SIGNS))
    for code, out in results:
        assert code == 0 or "canceling statement due to user request" in out, results
    assert any(code != 0 for code, _ in results), results
    info = inspect(db)
    assert info["State"]["Running"] and info["State"]["StartedAt"] == started, info["State"]
    assert await psql(db, user, password, "SELECT one FROM kept") == (0, "1")
