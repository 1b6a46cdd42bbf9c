"""A fast filler against a small quota, with real Postgres on its own filesystem.

Two sessions each run one `INSERT ... SELECT` that would write far more than the add-on's
whole filesystem, at the machine's full speed. Statement triggers refuse only statements
that start after them, and a resync interval is seconds: before the agent's filesystem
guard, such a filler reached the filesystem backstop between two upkeep rounds, Postgres
died writing its WAL (PANIC, ENOSPC), and crash recovery, which must write a new 16 MB
WAL segment on a filesystem with 13 MB left, failed on every restart: a crash loop no
tenant could clean up. Here the writes are stopped inside the quota's headroom, Postgres
never restarts, nothing is lost or corrupt, and writes come back once space is freed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.parse
from typing import Any

import pytest

from tests.agent_fixtures import (
    AgentProcess,
    Stack,
    addon,
    create_addon,
    create_project,
    docker,
    wait_for,
    wait_phase,
)
from tests.services import ControllerProcess

pytest_plugins = ["tests.agent_fixtures"]
# One agent for the module; a fresh one for a test marked `own_agent` (tests/agent_fixtures.py).
pytestmark = pytest.mark.shared_agent

MIB = 1024 * 1024
PLANS = """
[tiny]
max_addons = 1
cpus = 0.5
memory_mb = 256
storage_mb = 24
sleep = { enabled = false }
"""
# About 1.9 kB a row that does not compress: 190 MB a statement, the filesystem is 152 MB.
FILL = "INSERT INTO fill SELECT repeat(md5(g::text), 60) FROM generate_series(1, 100000) g"


@pytest.fixture(scope="module")
def plans_text() -> str:
    return PLANS


async def psql(container: str, user: str, password: str, sql: str) -> tuple[int, str]:
    """The tenant's own psql inside its database's container, as a tenant's app would."""
    proc = await asyncio.create_subprocess_exec(
        "docker", "exec", "-e", f"PGPASSWORD={password}", container, "psql", "-h",
        "127.0.0.1", "-U", user, "-d", "app", "-v", "ON_ERROR_STOP=1", "-qtAc", sql,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


def container_logs(name: str) -> str:
    """Postgres logs to stderr, which `docker logs` passes on as its own."""
    out = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


# What Postgres logs when one of its processes dies or the server restarts.
CRASH_SIGNS = ("PANIC", "terminated by signal", "all server processes terminated", "crash of")


def no_signs_in_logs(db: str, signs: tuple[str, ...]) -> None:
    logs = container_logs(db)
    for sign in signs:
        assert sign not in logs, [line for line in logs.splitlines() if sign in line][:8]


def inspect(name: str) -> dict[str, Any]:
    return json.loads(docker("inspect", name))[0]  # type: ignore[no-any-return]


async def quota_condition(c: Any, project_id: str, addon_id: str, reason: str) -> bool:
    view = await addon(c, project_id, addon_id)
    found = next((x for x in view["conditions"] if x["type"] == "StorageQuota"), None)
    return found is not None and found["reason"] == reason


async def tiny_postgres(
    c: ControllerProcess,
) -> tuple[dict[str, Any], dict[str, Any], str, str, str]:
    """A ready Postgres on the tiny plan: its project, add-on, container and tenant login."""
    project = await create_project(c, "tiny")
    pg = await create_addon(c, project["id"], "main-db", "postgres")
    await wait_phase(c, project["id"], pg["id"], "ready")
    status, body = await c.api("GET", f"/v1/projects/{project['id']}/env")
    assert status == 200, body
    url = urllib.parse.urlsplit(body["env"]["MAIN_DB_URL"])
    user = urllib.parse.unquote(url.username or "")
    password = urllib.parse.unquote(url.password or "")
    return project, pg, f"orkestr-{pg['id']}-db", user, password


async def seed(db: str, user: str, password: str) -> None:
    """1,000 rows that must survive, and the table the filler fills."""
    code, out = await psql(
        db, user, password,
        "CREATE TABLE kept (id int PRIMARY KEY, v text); "
        "INSERT INTO kept SELECT g, 'row ' || g FROM generate_series(1, 1000) g; "
        "CREATE TABLE fill (pad text)",
    )  # fmt: skip
    assert code == 0, out


# About 7.6 MB a statement (1.9 kB a row that does not compress): five are up to 40 MB,
# past the tiny plan's 24 MB quota and inside its filesystem (the guard may cancel or
# refuse the last ones).
FILL_8MB = "INSERT INTO fill SELECT repeat(md5(g::text), 60) FROM generate_series(1, 4000) g"


async def fill_past_the_quota(
    c: ControllerProcess, project_id: str, addon_id: str, db: str, user: str, password: str
) -> None:
    """The tenant fills its table `fill` past the quota; the controller then says so."""
    for _ in range(5):
        await psql(db, user, password, FILL_8MB)
    await wait_for(
        lambda: quota_condition(c, project_id, addon_id, "Exceeded"), 60, "quota exceeded"
    )


async def test_a_fast_filler_is_stopped_inside_the_headroom_and_postgres_never_crashes(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project, pg, db, user, password = await tiny_postgres(c)

    async def wal_bounded() -> bool:
        return (await psql(db, user, password, "show max_wal_size"))[1] == "32MB"

    await wait_for(wal_bounded, 60, "max_wal_size bounded by the agent")
    await seed(db, user, password)
    started = inspect(db)["State"]["StartedAt"]

    results = await asyncio.gather(*(psql(db, user, password, FILL) for _ in range(2)))
    # Postgres never crashed: no restart of the container or of its processes, no write
    # that found the disk full.
    await asyncio.sleep(2)  # a crash loop shows within a restart or two
    no_signs_in_logs(db, ("No space left on device", *CRASH_SIGNS))
    info = inspect(db)
    assert info["State"]["Running"] and info["State"]["StartedAt"] == started, info["State"]
    assert info["RestartCount"] == 0
    # Both statements were stopped: cancelled by the agent (the quota's triggers cannot
    # stop a statement already running) or refused by the quota, never by a full disk.
    for code, out in results:
        assert code != 0, results
        assert "canceling statement" in out or "storage quota exceeded" in out, results
    await wait_for(
        lambda: quota_condition(c, project["id"], pg["id"], "Exceeded"), 60, "quota exceeded"
    )

    # Reads work, nothing is lost, writes are refused with the quota's message.
    assert await psql(db, user, password, "SELECT count(*) FROM kept") == (0, "1000")
    code, out = await psql(db, user, password, "INSERT INTO kept VALUES (5000, 'late')")
    assert code != 0 and "storage quota exceeded: plan 'tiny' allows 24 MB" in out, out
    check = docker("exec", db, "pg_amcheck", "-U", "orkestr_admin", "-d", "app",
                   "--heapallindexed", "--install-missing", check=False)  # fmt: skip
    assert "error" not in check.lower() and "corrupt" not in check.lower(), check

    # Freeing the space brings writes back by themselves.
    assert (await psql(db, user, password, "TRUNCATE fill"))[0] == 0
    await wait_for(
        lambda: quota_condition(c, project["id"], pg["id"], "WithinQuota"), 60, "within quota"
    )
    code, out = await psql(
        db, user, password, "INSERT INTO kept VALUES (5000, 'late'); SELECT count(*) FROM kept"
    )
    assert code == 0 and out.endswith("1001"), out


@pytest.mark.own_agent
async def test_a_disk_filled_while_the_agent_is_away_does_not_crash_loop_postgres(
    stack: Stack, agent: AgentProcess
) -> None:
    """Nothing refuses writes while the agent is stopped: the filler fills the filesystem
    to the last block and Postgres crashes (a WAL write finds the disk full, or, here for
    certain, a process killed as the OOM killer would). Crash recovery must still start,
    or the database stays down with nobody able to free space."""
    c = stack.controller
    assert c is not None
    project, pg, db, user, password = await tiny_postgres(c)

    async def settled() -> bool:
        return (await psql(db, user, password, "show wal_init_zero"))[1] == "off"

    await wait_for(settled, 60, "the agent's WAL settings")
    await seed(db, user, password)
    await agent.stop()

    # Small statements until the filesystem refuses one (or Postgres goes down).
    for _ in range(200):
        code, out = await psql(db, user, password, FILL_8MB)
        if code != 0:
            break
    assert code != 0 and ("No space left" in out or "server" in out), out
    # A crash on the full disk, certain this time: the checkpointer killed.
    await asyncio.sleep(1)
    docker("exec", db, "sh", "-c",
           "for p in /proc/[0-9]*; do grep -qa '^postgres: checkpointer' $p/cmdline "
           "2>/dev/null && kill -9 ${p#/proc/}; done; true", check=False)  # fmt: skip

    async def serving() -> bool:
        return await psql(db, user, password, "SELECT count(*) FROM kept") == (0, "1000")

    await wait_for(serving, 90, "Postgres recovered on its full filesystem")
    info = inspect(db)
    assert info["State"]["Running"] and info["RestartCount"] == 0, info["State"]
    recovery_failed = [
        line for line in container_logs(db).splitlines() if "FATAL:  could not write" in line
    ]
    assert not recovery_failed, recovery_failed[:8]

    # The agent back: writes refused with the plan's message, freed space brings them back.
    await agent.start()
    await wait_for(
        lambda: quota_condition(c, project["id"], pg["id"], "Exceeded"), 90, "quota exceeded"
    )
    code, out = await psql(db, user, password, "INSERT INTO kept VALUES (5000, 'late')")
    assert code != 0 and "storage quota exceeded" in out, out
    assert (await psql(db, user, password, "TRUNCATE fill"))[0] == 0
    await wait_for(
        lambda: quota_condition(c, project["id"], pg["id"], "WithinQuota"), 90, "within quota"
    )
    assert (await psql(db, user, password, "INSERT INTO kept VALUES (5000, 'late')"))[0] == 0


async def test_a_schema_the_tenant_made_in_the_platforms_name_does_not_disarm_the_quota(
    stack: Stack, agent: AgentProcess
) -> None:
    """The tenant owns its database and may create a schema `orkestr` before the quota is
    first enforced, with a `quota_refuse` that returns int: the platform's own function
    could then never be created, and writes would never be refused."""
    c = stack.controller
    assert c is not None
    project, pg, db, user, password = await tiny_postgres(c)
    squat = (
        "CREATE SCHEMA orkestr; "
        "CREATE FUNCTION orkestr.quota_refuse() RETURNS int LANGUAGE sql AS 'SELECT 1'; "
        "CREATE TABLE orkestr.mine (v text); INSERT INTO orkestr.mine VALUES ('keep')"
    )
    assert (await psql(db, user, password, squat))[0] == 0
    await seed(db, user, password)
    await fill_past_the_quota(c, project["id"], pg["id"], db, user, password)
    code, out = await psql(db, user, password, "INSERT INTO kept VALUES (5000, 'late')")
    assert code != 0 and "storage quota exceeded" in out, out
    owner = "SELECT nspowner::regrole FROM pg_namespace WHERE nspname = 'orkestr'"
    assert await psql(db, user, password, owner) == (0, "orkestr_admin")
    # The tenant's schema was moved aside, with its data.
    kept = "SELECT string_agg(v, ',') FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, LATERAL (SELECT 'x' AS v) x WHERE c.relname = 'mine' AND n.nspname LIKE 'orkestr_renamed_%'"
    assert await psql(db, user, password, kept) == (0, "x")


async def test_large_objects_are_refused_past_the_quota_and_come_back_with_writes(
    stack: Stack, agent: AgentProcess
) -> None:
    """Large objects live in pg_largeobject, which no trigger watches, and PUBLIC may write
    them by default: past the quota `SELECT lo_from_bytea(0, ...)` went on filling the
    add-on as if it had no quota, up to its filesystem."""
    c = stack.controller
    assert c is not None
    project, pg, db, user, password = await tiny_postgres(c)
    await seed(db, user, password)
    code, out = await psql(db, user, password, "SELECT lo_from_bytea(4242, 'kept')")
    assert code == 0, out
    await fill_past_the_quota(c, project["id"], pg["id"], db, user, password)
    page = "convert_to(repeat(md5(random()::text), 4096), 'UTF8')"
    writes = [
        f"SELECT lo_from_bytea(0, {page})",
        f"SELECT lo_put(4242, 0, {page})",
        "SELECT lo_create(0)",
        "SELECT lowrite(lo_open(4242, 131072), 'x')",
        "SELECT lo_truncate(lo_open(4242, 131072), 1000000)",
    ]
    for sql in writes:
        code, out = await psql(db, user, password, f"BEGIN; {sql}; COMMIT")
        assert code != 0 and "permission denied for function" in out, (sql, out)
    # Reading, and unlinking (which frees), still work.
    assert await psql(db, user, password, "SELECT convert_from(lo_get(4242), 'UTF8')") == (
        0,
        "kept",
    )
    assert (await psql(db, user, password, "TRUNCATE fill"))[0] == 0
    await wait_for(
        lambda: quota_condition(c, project["id"], pg["id"], "WithinQuota"), 60, "writes back"
    )
    code, out = await psql(db, user, password, f"SELECT lo_from_bytea(0, {page}) > 0")
    assert (code, out) == (0, "t"), out


async def test_a_trigger_the_tenant_named_like_the_platforms_does_not_exempt_its_table(
    stack: Stack, agent: AgentProcess
) -> None:
    """The refusal skipped tables that already had a trigger named `orkestr_quota`: a
    tenant's own no-op trigger of that name kept its table writable past the quota."""
    c = stack.controller
    assert c is not None
    project, pg, db, user, password = await tiny_postgres(c)
    await seed(db, user, password)
    squat = (
        "CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'; "
        "CREATE TRIGGER orkestr_quota AFTER INSERT ON fill "
        "FOR EACH STATEMENT EXECUTE FUNCTION noop()"
    )
    code, out = await psql(db, user, password, squat)
    assert code == 0, out
    await fill_past_the_quota(c, project["id"], pg["id"], db, user, password)
    code, out = await psql(db, user, password, "INSERT INTO fill VALUES ('late')")
    assert code != 0 and "storage quota exceeded" in out, out
    # The tenant's trigger was renamed aside, not dropped.
    renamed = "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'orkestr_quota_renamed_%'"
    assert await psql(db, user, password, renamed) == (0, "1")


async def test_the_tenant_cannot_drop_the_platforms_trigger_past_the_quota(
    stack: Stack, agent: AgentProcess
) -> None:
    """The tenant owns its tables, and the event trigger let every DROP through (DROP
    TABLE frees space): `DROP TRIGGER orkestr_quota ON t` in the transaction of its
    INSERT wrote past the quota until the next round put the trigger back."""
    c = stack.controller
    assert c is not None
    project, pg, db, user, password = await tiny_postgres(c)
    await seed(db, user, password)
    await fill_past_the_quota(c, project["id"], pg["id"], db, user, password)
    code, out = await psql(
        db, user, password,
        "BEGIN; DROP TRIGGER orkestr_quota ON kept; "
        "INSERT INTO kept VALUES (5000, 'late'); COMMIT",
    )  # fmt: skip
    assert code != 0 and "storage quota exceeded" in out, out
    assert await psql(db, user, password, "SELECT count(*) FROM kept WHERE id = 5000") == (0, "0")
    # Freeing space stays the tenant's to do: DROP TABLE, TRUNCATE.
    assert (await psql(db, user, password, "DROP TABLE fill"))[0] == 0
    await wait_for(
        lambda: quota_condition(c, project["id"], pg["id"], "WithinQuota"), 60, "writes back"
    )
    assert (await psql(db, user, password, "INSERT INTO kept VALUES (5000, 'late')"))[0] == 0
