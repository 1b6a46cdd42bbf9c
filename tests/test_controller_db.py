"""The migrations runner against a real PostgreSQL: ordered, recorded, race-free."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from controller import db
from controller.errors import DatabaseUnavailable
from tests.services import create_database, drop_database


@pytest.fixture
async def empty_db() -> AsyncIterator[str]:
    dsn = await create_database("orkestr_test_mig")
    try:
        yield dsn
    finally:
        await drop_database(dsn)


async def test_two_controllers_migrating_at_once_apply_each_migration_once(empty_db: str) -> None:
    async with (
        db.open_pool(empty_db, 1, 2) as first,
        db.open_pool(empty_db, 1, 2) as second,
    ):
        applied = await asyncio.gather(db.migrate(first), db.migrate(second))
        versions = [m.version for m in db.discover()]
        # One runner applied everything, the other found nothing left to do.
        assert sorted(applied, key=len) == [[], versions]
        assert await db.migrate(first) == []
        async with first.acquire() as conn:
            rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
            tables = {
                r["tablename"]
                for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                )
            }
    assert [r["version"] for r in rows] == versions
    assert {"hosts", "projects", "addons", "jobs", "schema_migrations"} <= tables


async def test_a_newer_schema_is_refused(empty_db: str) -> None:
    async with db.open_pool(empty_db, 1, 2) as pool:
        await db.migrate(pool)
        async with pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (999, 'future')"
            )
        with pytest.raises(RuntimeError, match="999"):
            await db.migrate(pool)


def test_packaged_migrations_are_numbered_from_one_without_gaps() -> None:
    migrations = db.discover()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert all(m.sql.strip() and m.name for m in migrations)


def test_discovery_orders_by_number_and_ignores_other_files(tmp_path: Path) -> None:
    for name in ("010_later.sql", "002_second.sql", "001_first.sql", "README.md", "x.sql.orig"):
        (tmp_path / name).write_text(f"-- {name}\n")
    found = db.discover(tmp_path)
    assert [(m.version, m.name) for m in found] == [(1, "first"), (2, "second"), (10, "later")]
    assert found[1].sql == "-- 002_second.sql\n"


@pytest.mark.parametrize(
    ("files", "error"),
    [
        (["001_a.sql", "001_b.sql"], "two migrations have version 1"),
        (["1_short.sql"], "does not match NNN_name.sql"),
        (["001_Upper.sql"], "does not match NNN_name.sql"),
    ],
)
def test_discovery_refuses_misnamed_or_duplicate_files(
    tmp_path: Path, files: list[str], error: str
) -> None:
    for name in files:
        (tmp_path / name).write_text("SELECT 1;\n")
    with pytest.raises(RuntimeError, match=error):
        db.discover(tmp_path)


async def test_unreachable_database_is_a_transient_error() -> None:
    with pytest.raises(DatabaseUnavailable):
        async with db.open_pool("postgresql://nobody:x@127.0.0.1:1/none", 1, 1):
            pass


async def test_live_addon_names_are_unique_per_project(empty_db: str) -> None:
    async with db.open_pool(empty_db, 1, 2) as pool:
        await db.migrate(pool)
        async with pool.acquire() as conn:
            await conn.execute("INSERT INTO hosts (name) VALUES ('h')")
            pid = await conn.fetchval(
                "INSERT INTO projects (id, name, plan, host) "
                "VALUES (gen_random_uuid(), 'p', 'team', 'h') RETURNING id"
            )
            insert = (
                'INSERT INTO addons (id, project_id, name, kind, database, "user", password, '
                "deleted_at) VALUES (gen_random_uuid(), $1, 'db', 'redis', 'app', 'app', 'x', $2)"
            )
            await conn.execute(insert, pid, None)
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute(insert, pid, None)
            # A tombstone does not hold the name.
            await conn.execute("UPDATE addons SET deleted_at = now()")
            await conn.execute(insert, pid, None)


async def test_shares_named_outside_url_are_dropped_by_the_migration(empty_db: str) -> None:
    """Migration 011: a share stored as PATH before names had to end in _URL would have
    kept changing how the other members' programs run; it goes, ORDERS_URL stays, and no
    later path can store one again."""
    async with db.open_pool(empty_db, 1, 2) as pool:
        async with pool.acquire() as conn:
            await conn.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for m in db.discover():
                if m.version < 11:
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        m.version,
                        m.name,
                    )
            await conn.execute("INSERT INTO hosts (name) VALUES ('node-a')")
            group, owner = uuid.uuid4(), uuid.uuid4()
            await conn.execute(
                "INSERT INTO projects (id, name, plan, host) VALUES ($1, 'p', 'pro', 'node-a')",
                owner,
            )
            await conn.execute("INSERT INTO project_groups (id, name) VALUES ($1, 'g')", group)
            await conn.execute(
                "INSERT INTO group_members (group_id, project_id) VALUES ($1, $2)", group, owner
            )
            for name, env_name in (("a", "PATH"), ("b", "ORDERS_URL")):
                addon = uuid.uuid4()
                await conn.execute(
                    """INSERT INTO addons (id, project_id, name, kind, database, "user",
                    password) VALUES ($1, $2, $3, 'postgres', 'd', 'u', 'x')""",
                    addon,
                    owner,
                    name,
                )
                await conn.execute(
                    """INSERT INTO group_shares (group_id, project_id, addon_id, env_name)
                    VALUES ($1, $2, $3, $4)""",
                    group,
                    owner,
                    addon,
                    env_name,
                )
        assert await db.migrate(pool) == [m.version for m in db.discover() if m.version >= 11]
        async with pool.acquire() as conn:
            names = [r[0] for r in await conn.fetch("SELECT env_name FROM group_shares")]
            assert names == ["ORDERS_URL"]
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute("UPDATE group_shares SET env_name = 'LD_PRELOAD'")
