"""Backups end to end: a real controller, agent, dockerd, PostgreSQL and Redis add-ons.

Data written by a job, backed up (pg_dump -Fc / an RDB snapshot) into the agent's store,
test-restored into a scratch server, changed, restored, and read back. Corrupt files are
caught by the checksum and the test restore and never restored.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from agent import backup_scripts, model, specs
from tests.agent_fixtures import (
    TOOLBOX,
    AgentProcess,
    Stack,
    create_addon,
    create_project,
    docker,
    more_passes,
    run_job,
    running_agent,
    wait_for,
    wait_phase,
)
from tests.backup_api import backup_now, base, restore, sql, wait_backup, wait_restore
from tests.services import ControllerProcess
from tests.test_cli import Cli  # the CLI tests' runner: the installed console script

pytest_plugins = ["tests.agent_fixtures"]

PLANS = """
[starter]
max_addons = 1
cpus = 0.5
memory_mb = 256
manual_backups_per_day = 0
backup_retention_days = 0
sleep = { enabled = true, light_after_s = 3, deep_after_s = 8 }

[pro]
max_addons = 2
cpus = 1.0
memory_mb = 512
manual_backups_per_day = 2
backup_retention_days = 7
sleep = { enabled = true, light_after_s = 3, deep_after_s = 6 }

[team]
max_addons = 5
cpus = 1.0
memory_mb = 512
manual_backups_per_day = 10
backup_retention_days = 30
sleep = { enabled = false }

# With a storage quota: a Postgres gets its WAL on a filesystem of its own.
[quota]
max_addons = 1
cpus = 1.0
memory_mb = 512
storage_mb = 256
manual_backups_per_day = 10
backup_retention_days = 30
sleep = { enabled = false }
# The quota plan with little storage: a backup taken under `quota` may not fit it.
[snug]
max_addons = 1
cpus = 1.0
memory_mb = 512
storage_mb = 24
manual_backups_per_day = 10
backup_retention_days = 30
sleep = { enabled = false }
"""


TICKS = 'orkestr_controller_backup_scheduler_runs_total{result="ok"}'


async def scheduler_ticks(c: ControllerProcess, count: int) -> None:
    """Until the controller's backup scheduler has finished `count` more clean ticks
    (retention and owed runs are applied on each) than it had when called."""

    async def ticks() -> float:
        status, text = await c.api("GET", "/metrics")
        assert status == 200, text
        for line in text.splitlines():
            series, _, value = line.rpartition(" ")
            if series == TICKS:
                return float(value)
        return 0.0

    start = await ticks()

    async def done() -> bool:
        return await ticks() >= start + count

    await wait_for(done, 30, f"{count} backup scheduler ticks", interval=0.1)


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[Stack]:
    s = Stack(PLANS)
    original = ControllerProcess.config_text

    def with_fast_scheduler(self: ControllerProcess) -> str:
        return original(self) + "[backups]\nschedule_tick_s = 1\n"

    # A fast scheduler tick for this module's controller only.
    ControllerProcess.config_text = with_fast_scheduler  # type: ignore[method-assign]
    try:
        await s.start()
    finally:
        ControllerProcess.config_text = original  # type: ignore[method-assign]
    s.controller.config_text = with_fast_scheduler.__get__(s.controller)  # type: ignore[union-attr,method-assign]
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(scope="module")
async def agent(stack: Stack) -> AsyncIterator[AgentProcess]:
    """One agent for the module (each test has its own project): starting and removing one
    per test cost about 20 s a test. Tests that kill it start it again."""
    async with running_agent(stack) as proc:
        yield proc


def _c(stack: Stack) -> ControllerProcess:
    assert stack.controller is not None
    return stack.controller


def dump_path(agent: AgentProcess, p: str, a: str, backup_id: str) -> Path:
    return agent.state_dir / "backups" / p / a / f"{backup_id}.dump"


def no_temp_files(agent: AgentProcess) -> bool:
    return not list((agent.state_dir / "backups").glob("*/*/*.tmp"))


async def test_postgres_round_trip_and_corruption(stack: Stack, agent: AgentProcess) -> None:
    c = _c(stack)
    project = await create_project(c, "team")
    p = project["id"]
    a = (await create_addon(c, p, "orders-db", "postgres"))["id"]
    await wait_phase(c, p, a, "ready")
    await sql(
        c,
        p,
        "create table orders(id int primary key, item text); "
        "insert into orders select g, 'item-' || g from generate_series(1, 500) g; "
        "create table notes(body text); insert into notes values ('keep me')",
    )

    first = await backup_now(c, p, a)
    assert first["state"] == "succeeded", first
    assert first["verified"] is True, first
    assert first["counts"] == {"public.orders": 500, "public.notes": 1}
    path = dump_path(agent, p, a, first["id"])
    assert path.read_bytes()[:5] == b"PGDMP"  # pg_dump's custom format
    assert hashlib.sha256(path.read_bytes()).hexdigest() == first["sha256"]
    assert path.stat().st_size == first["size_bytes"]
    assert no_temp_files(agent)
    status, listed = await c.api("GET", f"{base(p, a)}/backups")
    assert status == 200 and [b["id"] for b in listed["backups"]] == [first["id"]]

    # Change everything, then restore: the original comes back, at the same address.
    await sql(
        c,
        p,
        "delete from orders where id > 10; update notes set body = 'changed'; "
        "create table extra(x int)",
    )
    done = await restore(c, p, a, first["id"])
    assert done["state"] == "succeeded", done
    assert await sql(c, p, "select count(*) from orders") == "500"
    assert await sql(c, p, "select body from notes") == "keep me"
    assert await sql(c, p, "select to_regclass('extra') is null") == "t"

    # A flipped bit: the re-verification fails, and a restore is refused.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    status, body = await c.api("POST", f"{base(p, a)}/backups/{first['id']}/verify")
    assert status == 202, body
    checked = await wait_backup(c, p, a, first["id"])
    assert checked["verified"] is False and "checksum mismatch" in checked["verify_error"]
    status, body = await c.api("POST", f"{base(p, a)}/backups/{first['id']}/restore")
    assert status == 409 and "failed its verification" in body["message"], body

    # A truncated file that the controller still believes verified: the agent checks the
    # checksum first and refuses it; the live data is untouched.
    second = await backup_now(c, p, a)
    assert second["verified"] is True
    await sql(c, p, "insert into notes values ('after second')")
    path2 = dump_path(agent, p, a, second["id"])
    path2.write_bytes(path2.read_bytes()[: path2.stat().st_size // 2])
    refused = await restore(c, p, a, second["id"])
    assert refused["state"] == "failed" and "checksum mismatch" in refused["error"], refused
    assert await sql(c, p, "select count(*) from notes") == "2"


# The tenant's code in its dump: an index expression runs as its table's owner, at every
# restore. Harmless as the tenant; as a superuser it runs a program in the restoring
# container and says so.
_DUMP_TRAP = r"""
CREATE FUNCTION public.trap_act() RETURNS void LANGUAGE plpgsql VOLATILE AS $b$
BEGIN
  IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
    COPY (SELECT 1) TO PROGRAM 'id';
    RAISE EXCEPTION 'tenant code ran a program as superuser %', current_user;
  END IF;
END $b$;
CREATE FUNCTION public.trap(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $b$
BEGIN
  PERFORM public.trap_act();
  RETURN x;
END $b$;
CREATE TABLE public.trapped (x int);
INSERT INTO public.trapped SELECT generate_series(1, 3);
CREATE INDEX trapped_idx ON public.trapped (public.trap(x));
"""
# Names the tenant may choose that a line-per-table count must survive.
_ODD_NAMES = """
CREATE TABLE public."odd
name|x" (x int);
INSERT INTO public."odd
name|x" VALUES (1), (2);
CREATE SCHEMA "hex:61";
CREATE TABLE "hex:61".t (x int);
"""


async def test_a_dumps_code_runs_as_the_tenant_when_verified_and_restored(
    stack: Stack, agent: AgentProcess
) -> None:
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    a = (await create_addon(c, p, "trap-db", "postgres"))["id"]
    await wait_phase(c, p, a, "ready")
    sql_text = _DUMP_TRAP + _ODD_NAMES
    script = f"psql \"$DATABASE_URL\" -X -v ON_ERROR_STOP=1 <<'SQL'\n{sql_text}\nSQL\n"
    job = await run_job(c, p, script)
    assert job["state"] == "succeeded", job["output"]
    backup = await backup_now(c, p, a)
    assert backup["state"] == "succeeded", backup
    # The test restore ran the index as a role like the tenant's, not as the superuser.
    assert "as superuser" not in (backup["verify_error"] or ""), backup["verify_error"]
    assert backup["verified"] is True, backup["verify_error"]
    assert backup["counts"] == {"public.trapped": 3, "public.odd\nname|x": 2, "hex:61.t": 0}
    done = await restore(c, p, a, backup["id"])
    assert done["state"] == "succeeded", done
    assert await sql(c, p, "select count(*) from trapped where trap(x) > 0") == "3"
    assert await sql(c, p, 'select count(*) from \\"hex:61\\".t') == "0"


async def test_postgres_restore_with_the_wal_on_its_own_filesystem(
    stack: Stack, agent: AgentProcess
) -> None:
    """A restore (pg_restore beside the live database, then renamed) on an add-on whose
    pg_wal is its own filesystem: the restored data is consistent, its WAL went there, and
    it survives a restart of Postgres (replayed from that filesystem)."""
    c = _c(stack)
    p = (await create_project(c, "quota"))["id"]
    a = (await create_addon(c, p, "wal-db", "postgres"))["id"]
    await wait_phase(c, p, a, "ready")
    db = f"orkestr-{a}-db"
    pgdata = "/var/lib/postgresql/data"
    assert docker("exec", db, "readlink", f"{pgdata}/pg_wal") == "/var/lib/postgresql/wal"
    data_dev = docker("exec", db, "stat", "-c", "%d", f"{pgdata}/base")
    assert docker("exec", db, "stat", "-c", "%d", "/var/lib/postgresql/wal/") != data_dev
    await sql(c, p, "create table orders(id int primary key, item text); "
                    "insert into orders select g, 'item-' || g from generate_series(1, 500) g")  # fmt: skip
    first = await backup_now(c, p, a)
    assert first["verified"] is True, first
    await sql(c, p, "delete from orders where id > 10")
    lsn_before = await sql(c, p, "select pg_current_wal_lsn()")
    done = await restore(c, p, a, first["id"])
    assert done["state"] == "succeeded", done
    assert await sql(c, p, "select count(*) from orders") == "500"
    # The restore's WAL went to the WAL filesystem: its current segment is there.
    segment = await sql(c, p, "select pg_walfile_name(pg_current_wal_lsn())")
    assert await sql(c, p, f"select pg_current_wal_lsn() > '{lsn_before}'::pg_lsn") == "t"
    docker("exec", db, "test", "-f", f"/var/lib/postgresql/wal/{segment}")
    # Killed, not stopped: the restart replays the WAL from its filesystem.
    docker("kill", "-s", "KILL", db)
    docker("start", db)

    async def back() -> bool:
        job = await run_job(c, p, 'psql "$DATABASE_URL" -qtAc "select 1"')
        return bool(job["state"] == "succeeded")

    await wait_for(back, 90, "Postgres back after the kill", 1)
    assert await sql(c, p, "select count(*) from orders") == "500"
    logs = docker("logs", db, check=False)
    check = docker("exec", db, "pg_amcheck", "-U", "orkestr_admin", "-d", "app",
                   "--heapallindexed", "--install-missing", check=False)  # fmt: skip
    assert "error" not in check.lower() and "corrupt" not in check.lower(), (check, logs[-2000:])


@pytest.mark.timeout(600)
async def test_a_restore_that_would_not_fit_the_plan_is_refused(
    stack: Stack, agent: AgentProcess, tmp_path: Path
) -> None:
    """The probe of issue 9: a backup bigger than the plan's storage was accepted for
    restore (and would have filled the add-on's quota'd filesystem). Its data size is
    recorded at dump time, and a restore that would not fit is refused, naming both."""
    c = _c(stack)
    p = (await create_project(c, "quota"))["id"]
    a = (await create_addon(c, p, "big-db", "postgres"))["id"]
    await wait_phase(c, p, a, "ready")
    await sql(c, p, "create table big(id int, body text); insert into big "
                    "select g, repeat(md5(g::text), 8) from generate_series(1, 90000) g")  # fmt: skip
    live = int(tenant_sql(a, "select pg_database_size('app')", "app"))
    assert live > 24 * 2**20, live
    taken = await backup_now(c, p, a)
    assert taken["verified"] is True, taken
    # What the quota counts (pg_database_size at dump time), not the compressed file.
    assert taken["data_bytes"] is not None and taken["data_bytes"] > taken["size_bytes"], taken
    assert abs(taken["data_bytes"] - live) < live * 0.1, (taken["data_bytes"], live)
    status, listed = await c.api("GET", f"{base(p, a)}/backups")
    assert status == 200 and listed["backups"][0]["data_bytes"] == taken["data_bytes"], listed

    # Emptied, the add-on fits the small plan; the backup of its full self does not.
    await sql(c, p, "truncate big")

    async def small() -> bool:
        _, view = await c.api("GET", f"/v1/projects/{p}/addons/{a}")
        return bool(view["usage_bytes"] is not None and view["usage_bytes"] < 20 * 2**20)

    await wait_for(small, 60, "the add-on's usage reported under 20 MB", 0.5)
    status, body = await c.api("PATCH", f"/v1/projects/{p}", {"plan": "snug"})
    assert status == 200, body
    status, body = await c.api("POST", f"{base(p, a)}/backups/{taken['id']}/restore")
    assert status == 409 and body["error"] == "plan_limit_reached", body
    mb = f"{taken['data_bytes'] / 2**20:.1f} MB"
    assert f"backup {taken['id']} holds {mb} of data" in body["message"], body
    assert "plan 'snug' allows 24 MB of storage per add-on" in body["message"], body
    assert await sql(c, p, "select count(*) from big") == "0"  # nothing was touched

    # The CLI says what to do about it.
    _, project = await c.api("GET", f"/v1/projects/{p}")
    cli = Cli(tmp_path)
    await cli.ok("login", "--api", c.url, "--token", c.operator_token)
    code, _, err = await cli(
        "backups", "restore", "big-db", taken["id"], "-p", project["name"], "--yes"
    )
    assert code == 1 and "would not fit" in err and "plan with more storage" in err, err

    # Back on the larger plan it restores.
    status, body = await c.api("PATCH", f"/v1/projects/{p}", {"plan": "quota"})
    assert status == 200, body
    done = await restore(c, p, a, taken["id"])
    assert done["state"] == "succeeded", done
    assert await sql(c, p, "select count(*) from big") == "90000"


async def set_data_bytes(c: ControllerProcess, backup_id: str, value: int) -> None:
    """Record a wrong data size for a backup in the controller's database."""
    conn = await asyncpg.connect(c.database_url)
    try:
        await conn.execute(
            "UPDATE backups SET data_bytes = $2 WHERE id = $1", uuid.UUID(backup_id), value
        )
    finally:
        await conn.close()


@pytest.mark.timeout(900)
async def test_a_restore_that_fits_the_plan_but_not_beside_the_live_database(
    stack: Stack, agent: AgentProcess
) -> None:
    """Issue 9: a Postgres restore is built beside the live database, so for a while both
    copies are on the add-on's filesystem. A backup that fits the plan alone but not with
    the live data is refused up front by the controller (409, what to do), again by the
    agent with the sizes of that moment (the controller's view was wrong), and a copy that
    outgrows the room anyway (its recorded size was wrong) is stopped and dropped before
    the quota guard would refuse the add-on's writes. The live data is never touched, its
    writes keep working, Postgres never PANICs; once the user frees the live database, as
    the refusal says, the same backup restores."""
    c = _c(stack)
    p = (await create_project(c, "quota"))["id"]  # 256 MB
    a = (await create_addon(c, p, "full-db", "postgres"))["id"]
    await wait_phase(c, p, a, "ready")
    rows = 560_000
    await sql(c, p, "create table big(id int primary key, body text); insert into big "
                    f"select g, repeat(md5(g::text), 8) from generate_series(1, {rows}) g")  # fmt: skip
    taken = await backup_now(c, p, a, wait=False)
    taken = await wait_backup(c, p, a, taken["id"], timeout=600)
    assert taken["verified"] is True, taken
    quota = 256 * 2**20
    assert quota / 2 < taken["data_bytes"] < quota * 0.9, taken  # fits the plan alone
    await sql(c, p, "create table notes(body text); insert into notes values ('after')")

    async def measured() -> int | None:
        _, view = await c.api("GET", f"/v1/projects/{p}/addons/{a}")
        used = view["usage_bytes"]
        return used if used is not None and used > quota / 2 else None

    live = await wait_for(measured, 60, "the add-on's usage reported", 0.5)

    # 1. Up front: the controller knows both sizes.
    status, body = await c.api("POST", f"{base(p, a)}/backups/{taken['id']}/restore")
    assert status == 409 and body["error"] == "plan_limit_reached", body
    message = body["message"]
    assert f"restoring backup {taken['id']} needs room for two copies at once" in message
    assert f"{taken['data_bytes'] / 2**20:.1f} MB of data" in message, message
    assert "the 256 MB plan 'quota' allows per add-on" in message, message
    assert "free at least" in message and "or move to a plan with at least" in message
    assert live > 0

    def untouched() -> None:
        assert tenant_sql(a, "select count(*) from big", "app") == str(rows)
        assert tenant_sql(a, "select body from notes", "app") == "after"
        names = tenant_sql(a, "select string_agg(datname, ',') from pg_database")
        assert "orkestr_restore" not in names and "orkestr_previous" not in names, names

    untouched()

    # 2. The controller is told the backup is small: the agent measures and refuses.
    await set_data_bytes(c, taken["id"], 2**20)
    status, body = await c.api("POST", f"{base(p, a)}/backups/{taken['id']}/restore")
    assert status == 202, body
    done = await wait_restore(c, p, a, body["id"], 180)
    assert done["state"] == "failed", done["error"]
    assert f"refused: restoring backup {taken['id']} needs room for two copies" in done["error"]
    untouched()

    # 3. The agent is told so too (the sidecar): the copy grows until the agent stops it.
    side = dump_path(agent, p, a, taken["id"]).with_suffix(".json")
    truth = side.read_bytes()
    side.write_bytes(json.dumps({**json.loads(truth), "data_bytes": 2**20}).encode())
    status, body = await c.api("POST", f"{base(p, a)}/backups/{taken['id']}/restore")
    assert status == 202, body
    done = await wait_restore(c, p, a, body["id"], 180)
    assert done["state"] == "failed", done["error"]
    assert (
        "stopped: the restored copy outgrew the room beside the live database" in done["error"]
    ), done
    untouched()
    # Writes work: the guard never had to refuse them, nothing filled a filesystem.
    await sql(c, p, "insert into notes values ('still writable')")
    logs = docker("logs", f"orkestr-{a}-db", check=False)
    assert "PANIC" not in logs and "No space left" not in logs, logs[-3000:]
    _, view = await c.api("GET", f"/v1/projects/{p}/addons/{a}")
    assert "storage quota exceeded" not in json.dumps(view), view

    # 4. As the refusal says: free the live database, and the backup restores.
    side.write_bytes(truth)
    await set_data_bytes(c, taken["id"], taken["data_bytes"])
    await sql(c, p, "drop table big")

    async def freed() -> bool:
        _, view = await c.api("GET", f"/v1/projects/{p}/addons/{a}")
        return bool(view["usage_bytes"] is not None and view["usage_bytes"] < quota / 4)

    await wait_for(freed, 60, "the freed usage reported", 0.5)
    status, body = await c.api("POST", f"{base(p, a)}/backups/{taken['id']}/restore")
    assert status == 202, body
    done = await wait_restore(c, p, a, body["id"], 180)
    assert done["state"] == "succeeded", done["error"]
    assert await sql(c, p, "select count(*) from big") == str(rows)


def abandon_at(agent: AgentProcess, p: str, a: str, out: Path, host: str) -> bool:
    """Run the agent's PG_RESTORE_ABANDON as the agent does, in a toolbox container on the
    project network with the restore role's password; whether it found the swap committed."""
    room = "room.tmp"
    secret = agent.state_dir / "secrets" / a / specs.RESTORE_USER
    docker("run", "--rm", "--label", f"orkestr.host={agent.host}",
           "--network", model.network_name(p),
           "-v", f"{out}:/backup", "-v", f"{secret}:/run/orkestr:ro",
           "-e", f"ADDON_HOST={host}", "-e", "ADDON_DB=app",
           "-e", f"BACKUP_USER={specs.RESTORE_USER}", "-e", "PASSWORD_FILE=password",
           "-e", f"ROOM={room}",
           "--entrypoint", "bash", TOOLBOX, "-c", backup_scripts.PG_RESTORE_ABANDON)  # fmt: skip
    found = (out / room).exists()
    (out / room).unlink(missing_ok=True)
    return found


async def test_a_restore_stopped_anywhere_is_settled(
    stack: Stack, agent: AgentProcess, tmp_path: Path
) -> None:
    """The room watch kills a restore wherever its script is, the swap included: the
    abandon step opens the live database again, keeps a swap that committed, and drops
    a copy that was not swapped in."""
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    a = (await create_addon(c, p, f"db-{uuid.uuid4().hex[:6]}", "postgres"))["id"]
    await wait_phase(c, p, a, "ready")
    _, view = await c.api("GET", f"/v1/projects/{p}/addons/{a}")
    out = tmp_path / "backup"
    out.mkdir()
    host = view["hostname"]

    def run() -> bool:
        return abandon_at(agent, p, a, out, host)

    # Killed right after the swap committed (as the script makes it).
    owner = tenant_sql(a, "select pg_get_userbyid(datdba) from pg_database where datname = 'app'")
    tenant_sql(a, f'create database app_orkestr_restore owner "{owner}"')
    tenant_sql(a, "alter database app with allow_connections false")

    async def swapped() -> bool:
        docker("exec", f"orkestr-{a}-db", "psql", "-U", "orkestr_admin", "-d", "postgres",
               "-XAtc", "select pg_terminate_backend(pid) from pg_stat_activity "
               "where datname = 'app'")  # fmt: skip
        try:
            tenant_sql(a, "alter database app rename to app_orkestr_previous")
        except RuntimeError:  # a backend still leaving
            return False
        return True

    await wait_for(swapped, 30, "the live database renamed", 0.2)
    tenant_sql(a, "alter database app_orkestr_restore rename to app")
    assert run() is True
    names = tenant_sql(a, "select string_agg(datname, ',') from pg_database")
    assert "app_orkestr_previous" in names, names  # the cleanup's, after a restore
    tenant_sql(a, "drop database app_orkestr_previous")

    # Killed while the copy grew, the live database closed for a swap not yet made, the
    # copy's connection still open.
    await sql(c, p, "create table keep(v text); insert into keep values ('live')")
    # The copy is the tenant's and its session the restore role's, as the restore makes them.
    tenant_sql(a, f'create database app_orkestr_restore owner "{owner}"')
    session = await tenant_session(a, "app_orkestr_restore", specs.RESTORE_USER)
    try:
        tenant_sql(a, "alter database app with allow_connections false")
        assert run() is False
    finally:
        if session.returncode is None:
            session.kill()
        await session.wait()
    names = tenant_sql(a, "select string_agg(datname, ',') from pg_database")
    assert "orkestr_restore" not in names, names
    assert await sql(c, p, "select v from keep") == "live"


async def test_a_restore_resumed_after_the_agent_was_killed_mid_pg_restore(
    stack: Stack, agent: AgentProcess
) -> None:
    """The agent killed while pg_restore fills the copy: the restarted agent runs the
    restore again, and the killed run's backend, still on the copy (a backend notices its
    client is gone only when it next talks to it), does not fail it. It failed ('... is
    being accessed by other users') and left the copy (the database's size again, on the
    add-on's storage)."""
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    a = (await create_addon(c, p, "db", "postgres"))["id"]
    await wait_phase(c, p, a, "ready")
    await sql(c, p, "create table t(x int); insert into t select generate_series(1, 50000)")
    taken = await backup_now(c, p, a)
    await sql(c, p, "insert into t values (0)")
    status, body = await c.api("POST", f"{base(p, a)}/backups/{taken['id']}/restore")
    assert status == 202, body
    copy = "app_orkestr_restore"
    exists = f"select count(*) from pg_database where datname = '{copy}'"
    await wait_for(lambda: tenant_sql(a, exists) == "1", 60, "the restore's copy", 0.05)
    await agent.kill9()
    # The killed run's backend, deterministically: a session of the restore role on the
    # copy that outlives the agent's removal of that run's container.
    lingering = await tenant_session(a, copy, specs.RESTORE_USER)
    try:
        await agent.start()

        async def settled() -> dict[str, Any] | None:
            _, r = await c.api("GET", f"{base(p, a)}/restores/{body['id']}")
            return r if r["state"] != "pending" else None

        done = await wait_for(settled, 180, "the resumed restore")
    finally:
        if lingering.returncode is None:
            lingering.kill()
        await lingering.wait()
    assert done["state"] == "succeeded", done["error"]
    await wait_phase(c, p, a, "ready")
    assert await sql(c, p, "select count(*) from t") == "50000"
    await wait_for(lambda: tenant_sql(a, exists) == "0", 30, "the copy gone")


async def test_redis_round_trip(stack: Stack, agent: AgentProcess) -> None:
    c = _c(stack)
    project = await create_project(c, "team")
    p = project["id"]
    a = (await create_addon(c, p, "cache", "redis"))["id"]
    await wait_phase(c, p, a, "ready")
    job = await run_job(
        c,
        p,
        'for i in $(seq 1 200); do echo "SET key:$i value-$i"; done | redis-cli --no-auth-warning -u "$REDIS_URL" '
        '>/dev/null && redis-cli --no-auth-warning -u "$REDIS_URL" dbsize',
    )
    assert job["state"] == "succeeded" and job["output"].strip() == "200", job

    backup = await backup_now(c, p, a)
    assert backup["state"] == "succeeded" and backup["verified"] is True, backup
    assert backup["counts"] == {"keys": 200}
    dumped = dump_path(agent, p, a, backup["id"]).read_bytes()
    assert dumped[:5] == b"REDIS"
    # Hashed in the transfer's pass (REDIS_BACKUP): the same as the file's.
    assert hashlib.sha256(dumped).hexdigest() == backup["sha256"]
    assert len(dumped) == backup["size_bytes"]
    # The data as the quota counts a Redis's: its used_memory, more than the RDB file.
    assert backup["data_bytes"] is not None and backup["data_bytes"] > backup["size_bytes"]

    job = await run_job(
        c,
        p,
        'redis-cli --no-auth-warning -u "$REDIS_URL" flushall >/dev/null && redis-cli --no-auth-warning -u "$REDIS_URL" set new 1',
    )
    assert job["state"] == "succeeded", job
    done = await restore(c, p, a, backup["id"])
    assert done["state"] == "succeeded", done
    await wait_phase(c, p, a, "ready")
    job = await run_job(
        c,
        p,
        'redis-cli --no-auth-warning -u "$REDIS_URL" dbsize; redis-cli --no-auth-warning -u "$REDIS_URL" get key:7; '
        'redis-cli --no-auth-warning -u "$REDIS_URL" exists new',
    )
    assert job["output"].split() == ["200", "value-7", "0"], job

    # Truncated: re-verification fails (checksum), and redis-check-rdb agrees.
    path = dump_path(agent, p, a, backup["id"])
    path.write_bytes(path.read_bytes()[:-9])
    status, _ = await c.api("POST", f"{base(p, a)}/backups/{backup['id']}/verify")
    assert status == 202
    checked = await wait_backup(c, p, a, backup["id"])
    assert checked["verified"] is False, checked


def redis_cli(*commands: str) -> str:
    return "; ".join(f'redis-cli --no-auth-warning -u "$REDIS_URL" {c}' for c in commands)


async def test_redis_restore_resumed_after_agent_killed_at_the_swap(
    stack: Stack, agent: AgentProcess
) -> None:
    """The agent frozen as it stops Redis for the swap, then killed: the restarted agent
    does not start the old data, finishes the restore, and the restored data is served."""
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    a = (await create_addon(c, p, "cache", "redis"))["id"]
    await wait_phase(c, p, a, "ready")
    job = await run_job(c, p, redis_cli("set kept 1", "set gone 1", "dbsize"))
    assert job["output"].split()[-1] == "2", job
    backup = await backup_now(c, p, a)
    assert backup["verified"] is True, backup["verify_error"]
    job = await run_job(c, p, redis_cli("del gone", "set new 1"))
    assert job["state"] == "succeeded", job

    db = f"orkestr-{a}-db"
    events = await asyncio.create_subprocess_exec(
        *("docker", "events", "--filter", f"container={db}", "--filter", "event=kill"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        status, body = await c.api("POST", f"{base(p, a)}/backups/{backup['id']}/restore")
        assert status == 202, body
        assert events.stdout is not None
        line = await asyncio.wait_for(events.stdout.readline(), 120)
        os.kill(proc_pid(agent), signal.SIGSTOP)  # past the point of no return: Redis stops
        assert b"kill" in line, line
    finally:
        events.terminate()
        await events.wait()
    await agent.kill9()
    await wait_for(lambda: docker("inspect", "-f", "{{.State.Status}}", db) == "exited", 60, "stop")
    swap = model.backup_container_name(f"restore-{body['id']}", "swap")
    events = await asyncio.create_subprocess_exec(
        *("docker", "events", "--format", "{{.Actor.Attributes.name}} {{.Action}}"),
        *("--filter", f"container={db}", "--filter", f"container={swap}"),
        stdout=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(0.5)  # the stream is open before anything can happen
    await agent.start()

    async def restore_done() -> dict[str, Any] | None:
        _, r = await c.api("GET", f"{base(p, a)}/restores/{body['id']}")
        return r if r["state"] != "pending" else None

    done = await wait_for(restore_done, 120, "the resumed restore")
    assert done["state"] == "succeeded", done
    events.terminate()
    seen = [line.split(" ", 1) for line in (await events.communicate())[0].decode().splitlines()]
    # The database was not started on the old data: first the swap, then the start.
    order = [f"{n} {e}" for n, e in seen if (n, e) in ((db, "start"), (swap, "die"))]
    assert order[:2] == [f"{swap} die", f"{db} start"], seen
    assert f"backup.restore_resumed op=restore-{body['id']}" in agent.log_path.read_text()
    await wait_phase(c, p, a, "ready")
    job = await run_job(c, p, redis_cli("get kept", "exists gone", "exists new"))
    assert job["output"].split() == ["1", "1", "0"], job
    # Nothing of the swap is left in the volume; the agent's marker is gone.
    listing = docker(
        "run", "--rm", "--name", f"orkestr-test-{uuid.uuid4().hex[:12]}",
        "--label", f"orkestr.host={agent.host}", "--network", "none",
        "-v", f"{model.volume_name(a)}:/data", TOOLBOX, "ls", "-A", "/data",
    )  # fmt: skip
    assert not [n for n in listing.split() if n.startswith(".orkestr")], listing
    assert not list((agent.state_dir / "backup-inflight").iterdir())


async def kill_agent_at_the_stop(
    c: ControllerProcess, agent: AgentProcess, p: str, a: str, backup_id: str
) -> str:
    """Ask for a restore; freeze the agent as it stops Redis for the swap (past the point
    of no return), then kill it. The restore's id."""
    db = f"orkestr-{a}-db"
    events = await asyncio.create_subprocess_exec(
        *("docker", "events", "--filter", f"container={db}", "--filter", "event=kill"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        status, body = await c.api("POST", f"{base(p, a)}/backups/{backup_id}/restore")
        assert status == 202, body
        assert events.stdout is not None
        line = await asyncio.wait_for(events.stdout.readline(), 120)
        os.kill(proc_pid(agent), signal.SIGSTOP)
        assert b"kill" in line, line
    finally:
        events.terminate()
        await events.wait()
    await agent.kill9()
    await wait_for(lambda: docker("inspect", "-f", "{{.State.Status}}", db) == "exited", 60, "stop")
    return str(body["id"])


def in_volume(agent: AgentProcess, a: str, script: str) -> str:
    """A shell script in a throwaway toolbox container with the add-on's volume at /data."""
    return docker(
        "run", "--rm", "--name", f"orkestr-test-{uuid.uuid4().hex[:12]}",
        "--label", f"orkestr.host={agent.host}", "--network", "none",
        "-v", f"{model.volume_name(a)}:/data", "--entrypoint", "bash", TOOLBOX, "-c", script,
    )  # fmt: skip


async def test_resumed_restore_retries_docker_errors_and_never_starts_a_half_swapped_volume(
    stack: Stack,
) -> None:
    """An agent killed in the middle of a Redis swap (the previous files moved aside, the
    restored ones not yet in place), restarted while Docker cannot run the swap (the
    backup image is gone): the restore keeps trying and Redis stays stopped, instead of
    starting on an empty volume; once Docker can again, the swap finishes."""
    c = _c(stack)
    image = f"orkestr-test-toolbox-{uuid.uuid4().hex[:12]}:latest"
    docker("tag", TOOLBOX, image)  # a tag of this test's own, removed below
    try:
        config = f'[backups]\nimage = "{image}"\n'
        async with running_agent(stack, extra_config=config) as agent:
            p = (await create_project(c, "team"))["id"]
            a = (await create_addon(c, p, "cache", "redis"))["id"]
            await wait_phase(c, p, a, "ready")
            job = await run_job(c, p, redis_cli("set kept 1", "set gone 1", "dbsize"))
            assert job["output"].split()[-1] == "2", job
            backup = await backup_now(c, p, a)
            assert backup["verified"] is True, backup["verify_error"]
            job = await run_job(c, p, redis_cli("del gone", "set new 1"))
            assert job["state"] == "succeeded", job

            restore_id = await kill_agent_at_the_stop(c, agent, p, a, backup["id"])
            # What the swap script leaves when killed right after moving the live files.
            in_volume(
                agent, a,
                "cd /data && test -f .orkestr-restore/.complete && mkdir .orkestr-previous"
                " && touch .orkestr-swapping && mv appendonlydir .orkestr-previous/",
            )  # fmt: skip
            docker("rmi", image)  # only this tag: the image itself stays
            await agent.start()
            await more_passes(agent, 5, timeout=60)  # the first resumes the restore
            db = f"orkestr-{a}-db"
            _, pending = await c.api("GET", f"{base(p, a)}/restores/{restore_id}")
            assert pending["state"] == "pending", pending  # not given up
            assert docker("inspect", "-f", "{{.State.Status}}", db) == "exited"
            assert "backup.restore_retry" in agent.log_path.read_text()

            docker("tag", TOOLBOX, image)

            async def restore_done() -> dict[str, Any] | None:
                _, r = await c.api("GET", f"{base(p, a)}/restores/{restore_id}")
                return r if r["state"] != "pending" else None

            done = await wait_for(restore_done, 120, "the resumed restore")
            assert done["state"] == "succeeded", done
            await wait_phase(c, p, a, "ready")
            job = await run_job(c, p, redis_cli("get kept", "exists gone", "exists new"))
            assert job["output"].split() == ["1", "1", "0"], job
            listing = in_volume(agent, a, "ls -A /data")
            assert not [n for n in listing.split() if n.startswith(".orkestr")], listing
            assert not list((agent.state_dir / "backup-inflight").iterdir())
    finally:
        docker("rmi", image, check=False)


async def test_backups_of_deleted_addons_and_projects(stack: Stack, agent: AgentProcess) -> None:
    """A deleted add-on's backups stay for the operator's window (7 days by default), then
    its directory goes and nothing else; a deleted project's go at once."""
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    a = (await create_addon(c, p, "gone", "redis"))["id"]
    b = (await create_addon(c, p, "kept", "redis"))["id"]
    await wait_phase(c, p, a, "ready")
    await wait_phase(c, p, b, "ready")
    gone, kept = await backup_now(c, p, a), await backup_now(c, p, b)
    assert gone["state"] == kept["state"] == "succeeded"
    gone_dir = dump_path(agent, p, a, gone["id"]).parent
    kept_dump = dump_path(agent, p, b, kept["id"])

    status, _ = await c.api("DELETE", f"/v1/projects/{p}/addons/{a}")
    assert status == 202

    async def addon_gone() -> bool:
        return (await c.api("GET", f"/v1/projects/{p}/addons/{a}"))[0] == 404

    await wait_for(addon_gone, 60, "the add-on deleted")
    tomb = gone_dir / ".deleted.json"
    assert tomb.exists()  # written the pass the tombstone arrived
    await more_passes(agent, 2)
    assert dump_path(agent, p, a, gone["id"]).exists()  # kept within the window

    # Eight days later (the clock is the marker's): removed, and only that directory.
    seen = json.loads(tomb.read_text())
    tomb.write_text(json.dumps({**seen, "seen_at": seen["seen_at"] - 8 * 86400}))
    await wait_for(lambda: not gone_dir.exists(), 30, "the deleted add-on's backups removed")
    assert kept_dump.exists() and kept_dump.with_suffix(".json").exists()

    status, _ = await c.api("DELETE", f"/v1/projects/{p}")
    assert status == 202
    project_dir = kept_dump.parent.parent
    await wait_for(lambda: not project_dir.exists(), 60, "the deleted project's backups removed")


def proc_pid(agent: AgentProcess) -> int:
    assert agent.proc is not None
    return agent.proc.pid


async def test_limits_and_sleeping_addon(stack: Stack, agent: AgentProcess) -> None:
    c = _c(stack)
    starter = await create_project(c, "starter")
    sa = (await create_addon(c, starter["id"], "db", "postgres"))["id"]
    status, body = await c.api("POST", f"{base(starter['id'], sa)}/backups")
    assert status == 409 and body["error"] == "plan_limit_reached", body
    assert "'starter'" in body["message"] and "manual_backups_per_day = 0" in body["message"]
    status, body = await c.api(
        "PUT",
        f"{base(starter['id'], sa)}/backup-schedule",
        {"enabled": True, "time_of_day": "03:00"},
    )
    assert status == 409 and "'starter'" in body["message"], body

    pro = await create_project(c, "pro")
    p = pro["id"]
    a = (await create_addon(c, p, "db", "postgres"))["id"]
    await wait_phase(c, p, a, "ready")
    await sql(c, p, "create table t(x int); insert into t values (1), (2), (3)")
    # Idle: it falls asleep; the backup wakes it, and it falls asleep again afterwards.
    await wait_phase(c, p, a, "sleeping", timeout=60)
    db = f"orkestr-{a}-db"
    first = await backup_now(c, p, a)
    assert first["verified"] is True and first["counts"] == {"public.t": 3}, first
    # The backup's hold had the add-on's own worker wake it (the planner's WakeAddon).
    assert any(
        f"addon.wake addon={a} " in line and "reason=held by a platform operation" in line
        for line in agent.log_tail(2000).splitlines()
    ), agent.log_tail(40)
    assert f"action.done action=WakeAddon key={a}" in agent.log_tail(2000)
    await wait_phase(c, p, a, "sleeping", timeout=30)

    second = await backup_now(c, p, a, wait=False)
    # One operation per add-on at a time: a restore is refused while the backup runs.
    status, body = await c.api("POST", f"{base(p, a)}/backups/{first['id']}/restore")
    assert status == 409 and "in progress" in body["message"], body
    second = await wait_backup(c, p, a, second["id"])
    assert second["verified"] is True
    status, body = await c.api("POST", f"{base(p, a)}/backups")
    assert status == 409 and body["error"] == "plan_limit_reached", body
    assert "'pro'" in body["message"] and "2 manual backup(s)" in body["message"]
    await wait_phase(c, p, a, "sleeping", timeout=30)
    assert docker("inspect", "-f", "{{.State.Status}}", db) in ("paused", "exited")


async def test_a_downgrade_to_a_plan_without_automatic_backups_needs_them_off(
    stack: Stack, agent: AgentProcess
) -> None:
    # Starter makes no automatic backups: moved there with them on, the schedule would
    # still say "daily at 03:00" and none would ever be made.
    c = _c(stack)
    project = await create_project(c, "pro")
    p = project["id"]
    a = (await create_addon(c, p, "db", "postgres"))["id"]
    schedule = f"{base(p, a)}/backup-schedule"
    status, body = await c.api("PUT", schedule, {"enabled": True, "time_of_day": "03:00"})
    assert status == 200, body
    status, body = await c.api("PATCH", f"/v1/projects/{p}", {"plan": "starter"})
    assert status == 409 and body["error"] == "plan_change_refused", body
    assert (
        "plan 'starter' makes no automatic backups and add-on 'db' has them on" in body["message"]
    )
    status, body = await c.api("GET", f"/v1/projects/{p}")
    assert body["plan"] == "pro"
    status, body = await c.api("PATCH", schedule, {"enabled": False})
    assert status == 200, body
    status, body = await c.api("PATCH", f"/v1/projects/{p}", {"plan": "starter"})
    assert status == 200 and body["plan"] == "starter", body
    status, body = await c.api("GET", schedule)
    assert body["enabled"] is False


async def age_backup(c: ControllerProcess, backup_id: str, days: float) -> None:
    """Date a backup `days` back in the controller's database: retention's clock is the
    database's `now()`, and a test cannot wait a week."""
    conn = await asyncpg.connect(c.database_url)
    try:
        await conn.execute(
            "UPDATE backups SET created_at = now() - make_interval(secs => $2) WHERE id = $1",
            uuid.UUID(backup_id),
            days * 86400,
        )
    finally:
        await conn.close()


async def test_a_move_to_starter_keeps_the_backups_for_the_window_they_were_taken_under(
    stack: Stack, agent: AgentProcess
) -> None:
    """The probe of issue 9: a move to Starter (no backups) pruned the add-on's backups at
    the next tick, silently. Each is now kept for the window of the plan it was taken
    under, listed and restorable; then it goes, as it would have on that plan."""
    c = _c(stack)
    p = (await create_project(c, "pro"))["id"]
    a = (await create_addon(c, p, "cache", "redis"))["id"]
    await wait_phase(c, p, a, "ready")
    await run_job(c, p, redis_cli("set k older"))
    older = await backup_now(c, p, a)
    await run_job(c, p, redis_cli("set k newer"))
    newer = await backup_now(c, p, a)
    assert older["verified"] is True and newer["verified"] is True, (older, newer)
    await age_backup(c, older["id"], 3)
    await age_backup(c, newer["id"], 1)

    status, body = await c.api("PATCH", f"/v1/projects/{p}", {"plan": "starter"})
    assert status == 200 and body["plan"] == "starter", body
    await scheduler_ticks(c, 2)  # a whole tick since the PATCH: retention ran since
    status, listed = await c.api("GET", f"{base(p, a)}/backups")
    assert status == 200, listed
    assert [b["id"] for b in listed["backups"]] == [newer["id"], older["id"]], listed
    kept = listed["backups"][1]
    expires = dt.datetime.fromisoformat(kept["expires_at"])
    assert expires - dt.datetime.fromisoformat(kept["created_at"]) == dt.timedelta(days=7)

    # Restorable on Starter, though Starter takes none.
    done = await restore(c, p, a, older["id"])
    assert done["state"] == "succeeded", done

    # Starter sleeps an idle add-on within seconds here: the client's connection wakes it.
    async def serving() -> bool:
        _, view = await c.api("GET", f"/v1/projects/{p}/addons/{a}")
        return view["phase"] in ("ready", "sleeping")

    await wait_for(serving, 90, "the add-on serving after the restore", 0.5)
    job = await run_job(c, p, redis_cli("get k"))
    assert job["output"].strip() == "older", job

    # Past the window it was taken under (Pro's 7 days) it goes; the newest verified stays.
    await age_backup(c, older["id"], 8)

    async def pruned() -> bool:
        _, found = await c.api("GET", f"{base(p, a)}/backups")
        return [b["id"] for b in found["backups"]] == [newer["id"]]

    await wait_for(pruned, 30, "the older backup pruned past Pro's window", 0.5)
    await wait_for(
        lambda: not dump_path(agent, p, a, older["id"]).exists(), 30, "its file removed", 0.5
    )


def tenant_sql(addon_id: str, statement: str, database: str = "postgres") -> str:
    """A look at the add-on's server from the test, as its superuser (the agent never execs)."""
    db = f"orkestr-{addon_id}-db"
    return docker("exec", db, "psql", "-U", "orkestr_admin", "-d", database, "-XAtc", statement)


async def tenant_session(
    addon_id: str, database: str, user: str = specs.ADMIN_USER
) -> asyncio.subprocess.Process:
    """A psql session into the add-on's server, fed on stdin (`user`: over the server's
    own socket, which trusts it)."""
    return await asyncio.create_subprocess_exec(
        *("docker", "exec", "-i", f"orkestr-{addon_id}-db", "psql", "-U", user),
        *("-d", database, "-XAtq"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


# Killed mid-dump, deterministically whatever the machine's speed: the test holds a lock
# that pg_dump waits for after it has opened its file and exported its snapshot. The
# restore's server is killed from inside as soon as the restored copy exists beside the
# live database, before any swap. The data need not be big for either.
@pytest.mark.timeout(600)
async def test_agent_killed_mid_backup(stack: Stack, agent: AgentProcess) -> None:
    c = _c(stack)
    project = await create_project(c, "team")
    p = project["id"]
    a = (await create_addon(c, p, "big", "postgres"))["id"]
    await wait_phase(c, p, a, "ready")
    await sql(
        c,
        p,
        "create table big(id int, pad text); "
        "insert into big select g, md5(g::text) || md5((g+1)::text) from generate_series(1, 20000) g; "
        "create index big_pad on big(pad)",
    )
    user_db = tenant_sql(
        a, "select datname from pg_database where datname <> 'postgres' and not datistemplate"
    )
    gate = await tenant_session(a, user_db)
    assert gate.stdin is not None and gate.stdout is not None
    gate.stdin.write(b"BEGIN; LOCK TABLE big IN ACCESS EXCLUSIVE MODE; SELECT 'locked';\n")
    assert (await asyncio.wait_for(gate.stdout.readline(), 60)).strip() == b"locked"
    try:
        pending = await backup_now(c, p, a, wait=False)
        label = f"label=orkestr.backup-op=backup-{pending['id']}"
        tmp = dump_path(agent, p, a, pending["id"]).with_suffix(".dump.tmp")
        # pg_dump's session (the counts' waits there too: they run beside pg_dump).
        waiting = (
            "select count(*) from pg_locks l join pg_stat_activity s using (pid) where "
            "l.relation = 'big'::regclass and not l.granted and s.application_name = 'pg_dump'"
        )
        await wait_for(lambda: tenant_sql(a, waiting, user_db) == "1", 120, "pg_dump at the lock")
        assert tmp.exists() and docker("ps", "-q", "--filter", label)  # the dump is under way
        await agent.kill9()
        _, body = await c.api("GET", f"{base(p, a)}/backups/{pending['id']}")
        assert body["state"] == "pending" and body["verified"] is None  # nothing marked good
        assert not dump_path(agent, p, a, pending["id"]).exists()
    finally:
        gate.stdin.write(b"COMMIT;\n")
        gate.stdin.close()
        await gate.wait()

    await agent.start()
    done = await wait_backup(c, p, a, pending["id"], timeout=300)
    assert done["state"] == "succeeded" and done["verified"] is True, done
    assert done["counts"]["public.big"] == 20_000
    assert no_temp_files(agent)
    assert docker("ps", "-aq", "--filter", label) == ""

    # A restore whose server dies halfway: it fails, and the current data stays.
    await sql(c, p, "create table marker(x int); insert into marker values (7)")
    killer = await tenant_session(a, "postgres")
    assert killer.stdin is not None
    # Immediate shutdown of the server (the container's first process) once the restored
    # copy exists; polled every 10 ms inside the server, so it lands before the swap.
    killer.stdin.write(
        b"DO $$ BEGIN LOOP EXIT WHEN EXISTS (SELECT FROM pg_database "
        b"WHERE datname LIKE '%\\_orkestr\\_restore'); PERFORM pg_sleep(0.01); END LOOP; END $$;\n"
        b"COPY (SELECT 1) TO PROGRAM 'kill -QUIT 1';\n"
    )
    killer.stdin.close()
    status, body = await c.api("POST", f"{base(p, a)}/backups/{done['id']}/restore")
    assert status == 202, body

    async def restore_done() -> dict[str, Any] | None:
        _, r = await c.api("GET", f"{base(p, a)}/restores/{body['id']}")
        return r if r["state"] != "pending" else None

    failed = await wait_for(restore_done, 120, "the interrupted restore")
    assert await asyncio.wait_for(killer.wait(), 30) is not None  # it did kill the server
    assert failed["state"] == "failed", failed
    await wait_phase(c, p, a, "ready")
    assert await sql(c, p, "select x from marker") == "7"
    assert await sql(c, p, "select count(*) from big") == "20000"


async def test_controller_restart_around_scheduled_time(stack: Stack, agent: AgentProcess) -> None:
    c = _c(stack)
    project = await create_project(c, "team")
    p = project["id"]
    a = (await create_addon(c, p, "sched", "redis"))["id"]
    await wait_phase(c, p, a, "ready")
    slot = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=6)).replace(microsecond=0)
    status, body = await c.api(
        "PUT",
        f"{base(p, a)}/backup-schedule",
        {"enabled": True, "time_of_day": slot.time().isoformat()},
    )
    assert status == 200 and body["enabled"] is True, body
    await c.stop()  # down across the slot
    await asyncio.sleep(max(0.0, (slot - dt.datetime.now(dt.UTC)).total_seconds()) + 2)
    await c.start()

    async def owed() -> list[dict[str, Any]]:
        s, listed = await c.api("GET", f"{base(p, a)}/backups")
        assert s == 200
        return [b for b in listed["backups"] if b["kind"] == "automatic"]

    await wait_for(owed, 60, "the missed run, owed on return")
    await c.restart()  # a restart right after it: the run is not made again
    await scheduler_ticks(c, 3)  # several ticks of the restarted controller

    async def automatic() -> list[dict[str, Any]] | None:
        runs = await owed()
        return runs if runs and all(b["state"] != "pending" for b in runs) else None

    runs = await wait_for(automatic, 120, "the automatic backup")
    assert len(runs) == 1, runs
    assert runs[0]["scheduled_for"].startswith(slot.date().isoformat())
    assert runs[0]["verified"] is True


async def test_backups_through_the_cli(stack: Stack, agent: AgentProcess, tmp_path: Path) -> None:
    """`orkestr backups list/create/restore/schedule` as a user runs them (API only)."""
    c = _c(stack)
    cli = Cli(tmp_path)
    await cli.ok("login", "--api", c.url, "--token", c.operator_token)
    project = await create_project(c, "team")
    p, name = project["id"], project["name"]
    a = (await create_addon(c, p, "cache", "redis"))["id"]
    await wait_phase(c, p, a, "ready")
    assert "no backups of cache yet" in await cli.ok("backups", "list", "cache", "-p", name)
    await run_job(c, p, redis_cli("set k before"))

    out = await cli.ok("backups", "capture", "cache", "-p", name, "--wait")
    assert "verified (a test restore reproduced its 1 key(s))" in out, out
    listed = (await cli.json("backups", "list", "cache", "-p", name))["backups"]
    assert len(listed) == 1 and listed[0]["verified"] is True, listed
    backup_id = listed[0]["id"]
    table = await cli.ok("backups", "list", "cache", "-p", name)
    assert backup_id in table and "verified" in table and "manual" in table, table

    await run_job(c, p, redis_cli("set k after"))
    code, _, err = await cli("backups", "restore", "cache", backup_id, "-p", name)
    assert code == 1 and "pass --yes" in err, err  # no terminal to ask: refused
    code, _, err = await cli("backups", "restore", "cache", "f" * 32, "-p", name, "--yes")
    assert code == 1 and f"no backup '{'f' * 32}' of cache" in err, err
    # The start of an id, as a narrow terminal's table shows it, names the backup too.
    code, _, err = await cli("backups", "restore", "cache", backup_id[:8], "-p", name)
    assert code == 1 and "pass --yes" in err and "no backup" not in err, err
    out = await cli.ok("backups", "restore", "cache", backup_id, "-p", name, "--yes", "--wait")
    assert f"now serves backup {backup_id}" in out, out
    await wait_phase(c, p, a, "ready")
    job = await run_job(c, p, redis_cli("get k"))
    assert job["output"].strip() == "before", job

    out = await cli.ok("backups", "schedule", "cache", "-p", name)
    assert "Automatic backups of cache: off." in out, out
    out = await cli.ok("backups", "schedule", "cache", "-p", name, "--on", "--at", "03:15")
    assert "daily at 03:15:00 UTC" in out, out
    schedule = await cli.json("backups", "schedule", "cache", "-p", name)
    assert schedule == {"enabled": True, "time_of_day": "03:15:00"}, schedule
    code, _, err = await cli("backups", "schedule", "cache", "-p", name, "--at", "25:00")
    assert code == 1 and "'25:00' is not a time of day" in err and "HTTP 422" in err, err

    # Starter: no manual backups; the refusal names the plan and its limit.
    starter = await create_project(c, "starter")
    await create_addon(c, starter["id"], "db", "redis")
    # The empty list's hint says what Starter allows, not the `capture` it refuses.
    out = await cli.ok("backups", "list", "db", "-p", starter["name"])
    assert "plan 'starter' takes no backups; have the operator move" in out, out
    assert "backups capture" not in out, out
    code, _, err = await cli("backups", "create", "db", "-p", starter["name"])
    assert code == 1 and "'starter'" in err and "manual_backups_per_day = 0" in err, err


def admin_redis_cli(agent: AgentProcess, p: str, addon: dict[str, Any], command: str) -> str:
    """redis-cli as the platform's admin user, from a toolbox container on the project network."""
    secrets = agent.state_dir / "secrets" / addon["id"]
    return docker(
        "run", "--rm", "--name", f"orkestr-test-{uuid.uuid4().hex[:12]}",
        "--label", f"orkestr.host={agent.host}", "--network", model.network_name(p),
        "-v", f"{secrets}:/run/orkestr:ro", "--entrypoint", "bash", TOOLBOX, "-c",
        'REDISCLI_AUTH="$(cat /run/orkestr/admin_password)" redis-cli --no-auth-warning'
        f" -h {addon['name']} --user {specs.ADMIN_USER} {command}",
    ).strip()  # fmt: skip


async def test_a_redis_backup_does_not_wait_for_more_replicas(
    stack: Stack, agent: AgentProcess
) -> None:
    """`redis-cli --rdb` is a replica-style transfer, and Redis 7 holds a diskless one
    `repl-diskless-sync-delay` seconds (5 by default) for more replicas to join: half of a
    500 MB add-on's backup time (docs/benchmarks.md). New add-ons are configured without
    the wait; an add-on configured before gets it switched off by the agent before the
    dump (the backup user may not: agent/platform_roles.py)."""
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    addon = await create_addon(c, p, "cache", "redis")
    a = addon["id"]
    await wait_phase(c, p, a, "ready")
    got = admin_redis_cli(agent, p, addon, "CONFIG GET repl-diskless-sync-delay")
    assert got.split() == ["repl-diskless-sync-delay", "0"], got
    # As an add-on whose redis.conf was written before would run, with a wait long enough
    # (60 s) that no load can hide it in the dump step's time (7 s at load 45).
    assert admin_redis_cli(agent, p, addon, "CONFIG SET repl-diskless-sync-delay 60") == "OK"
    backup = await backup_now(c, p, a)
    assert backup["verified"] is True, backup
    dump = [
        float(line.rsplit("seconds=", 1)[1])
        for line in agent.log_path.read_text().splitlines()
        if " backup.step " in line and backup["id"] in line and " step=dump " in line
    ]
    # The dump step includes its container's start; the wait alone would be 60 s.
    assert dump and dump[-1] < 30.0, dump
    # Where the backup's time went (bench/backup.py reports it): every phase in order,
    # and the transfer's first and last byte as the hash follower saw them.
    (phases,) = [
        line.split(" backup.backup_phases ", 1)[1]
        for line in agent.log_path.read_text().splitlines()
        if " backup.backup_phases " in line and backup["id"] in line
    ]
    fields = dict(f.split("=", 1) for f in phases.split()[2:])
    names = "prep hold address create start run remove hash fsync publish first_byte last_byte"
    assert list(fields) == names.split(), phases
    # The first byte can precede the start call's return, never the start call itself.
    first, last = float(fields["first_byte"]), float(fields["last_byte"])
    assert -float(fields["start"]) <= first <= last <= float(fields["run"]), phases
    got = admin_redis_cli(agent, p, addon, "CONFIG GET repl-diskless-sync-delay")
    assert got.split() == ["repl-diskless-sync-delay", "0"], got


async def test_a_holder_restarted_mid_dump_fails_the_backup_at_once(
    stack: Stack, agent: AgentProcess
) -> None:
    """A Redis dump runs in the add-on's holder's network namespace. A holder restarted
    meanwhile leaves the dump's container (and the database, which the agent then
    recreates) in a namespace that is no longer the add-on's: the dump is stopped at once
    with a clear error, nothing is listed as good, no file is left, and the next backup
    works. The server's first answer is held back (`CLIENT PAUSE`) so the restart lands
    while the dump waits for it."""
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    a = (await create_addon(c, p, "cache", "redis"))["id"]
    await wait_phase(c, p, a, "ready")
    holder, db = model.holder_name(a), model.db_name(a)
    ip = json.loads(docker("inspect", holder))[0]["NetworkSettings"]["Networks"][
        model.network_name(p)
    ]["IPAddress"]
    admin = aioredis.Redis(
        host=ip, username=specs.ADMIN_USER,
        password=(agent.state_dir / "secrets" / a / "admin_password").read_text(),
    )  # fmt: skip
    events = await asyncio.create_subprocess_exec(
        "docker", "events", "--format", "{{.Actor.Attributes.name}}",
        "--filter", "event=create", "--filter", f"label={model.LABEL_ADDON}={a}",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await admin.set("kept", "1")
        await asyncio.sleep(0.3)  # the event stream is listening
        pending = await backup_now(c, p, a, wait=False)
        assert events.stdout is not None
        created = b""
        while not created.endswith(b"-dump"):
            created = (await asyncio.wait_for(events.stdout.readline(), 120)).strip()
        # Created: its script's first command waits, whatever it is (the container's
        # start alone takes longer than this call).
        await admin.execute_command("CLIENT", "PAUSE", "60000", "ALL")
        dump = model.backup_container_name(f"backup-{pending['id']}", "dump")
        await wait_for(
            lambda: docker("inspect", "-f", "{{.State.Running}}", dump, check=False) == "true",
            60,
            "the dump container running",
            0.05,
        )
        db_before = json.loads(docker("inspect", db))[0]["Id"]
        docker("restart", "-t", "0", holder)
        failed = await wait_backup(c, p, a, pending["id"], timeout=60)
    finally:
        events.terminate()
        await events.wait()
        await admin.aclose()
    assert failed["state"] == "failed", failed
    assert "holder was restarted or removed during the step" in failed["error"], failed
    assert failed["verified"] is None and failed["sha256"] is None, failed
    assert not dump_path(agent, p, a, pending["id"]).exists()
    assert no_temp_files(agent)
    assert docker("ps", "-aq", "--filter", f"name={dump}") == ""

    # The agent puts the database back into the holder's new namespace; then a backup works.
    def db_id() -> str:
        return docker("inspect", "-f", "{{.Id}}", db, check=False)

    await wait_for(lambda: db_id() not in ("", db_before), 120, "the database recreated")
    await wait_phase(c, p, a, "ready")
    again = await backup_now(c, p, a)
    assert again["state"] == "succeeded" and again["verified"] is True, again
    assert again["counts"] == {"keys": 1}, again


async def test_a_sleeping_redis_is_backed_up_from_light_and_deep_sleep(
    stack: Stack, agent: AgentProcess
) -> None:
    """The dump joins the holder's namespace: the hold wakes the add-on first (a paused
    server's socket is there but answers nothing; a stopped one has none), and the dump
    reaches it on loopback there. Asleep again after each."""
    c = _c(stack)
    p = (await create_project(c, "pro"))["id"]
    a = (await create_addon(c, p, "cache", "redis"))["id"]
    await wait_phase(c, p, a, "ready")
    job = await run_job(c, p, redis_cli("set a 1", "set b 2", "set c 3"))
    assert job["state"] == "succeeded", job
    db = model.db_name(a)

    def state() -> str:
        return docker("inspect", "-f", "{{.State.Status}}", db, check=False)

    for stage, docker_state in (("light", "paused"), ("deep", "exited")):
        await wait_for(lambda s=docker_state: state() == s, 60, f"{stage} sleep", 0.05)
        backup = await backup_now(c, p, a)
        assert backup["state"] == "succeeded" and backup["verified"] is True, backup
        assert backup["counts"] == {"keys": 3}, backup
        woken = [
            line
            for line in agent.log_tail(3000).splitlines()
            if f"addon.wake addon={a} " in line and "reason=held by a platform operation" in line
        ]
        assert woken and f"stage={stage} " in woken[-1], woken
    await wait_for(lambda: state() in ("paused", "exited"), 60, "asleep again")
