"""PostgreSQL access: the asyncpg pool, the migrations runner and error translation.

Migrations are `controller/migrations/NNN_name.sql`, applied in order, each in its own
transaction and recorded in `schema_migrations`, under a session advisory lock so two
controllers starting together do not race. This is the only module (with store.py,
which uses `transaction`) that touches asyncpg.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import asyncpg
import msgspec

from controller.errors import Conflict, DatabaseUnavailable
from controller.logs import log

logger = logging.getLogger(__name__)

Pool = Any  # asyncpg.Pool; asyncpg ships no type hints
Connection = Any  # asyncpg.Connection

MIGRATION_FILE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
# pg_advisory_lock key: "orkestr" as a number, shared by all controller versions.
MIGRATION_LOCK = 0x6F726B65737472

# Errors that mean "the database is not there right now", as opposed to a bug.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


class Migration(msgspec.Struct, frozen=True):
    version: int
    name: str
    sql: str


@asynccontextmanager
async def open_pool(url: str, min_size: int, max_size: int) -> AsyncIterator[Pool]:
    try:
        pool = await asyncpg.create_pool(
            url, min_size=min_size, max_size=max_size, command_timeout=30
        )
    # PostgresError: a missing database or a refused login; the service may fix it later.
    except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
        raise DatabaseUnavailable(f"cannot connect to the database: {exc}") from None
    try:
        yield pool
    finally:
        await pool.close()


@asynccontextmanager
async def transaction(pool: Pool, isolation: str = "read_committed") -> AsyncIterator[Connection]:
    """A connection in a transaction; asyncpg errors leave as controller errors."""
    try:
        async with pool.acquire() as conn, conn.transaction(isolation=isolation):
            yield conn
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(exc.detail or str(exc)) from None
    except _UNAVAILABLE as exc:
        raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}: {exc}") from None


def discover(root: Traversable | None = None) -> list[Migration]:
    """The packaged migrations (or those in `root`), in order; a misnamed or duplicate file
    is a bug."""
    found: dict[int, Migration] = {}
    for entry in (root or resources.files("controller") / "migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = MIGRATION_FILE.match(entry.name)
        if match is None:
            raise RuntimeError(f"migration file {entry.name} does not match NNN_name.sql")
        version = int(match[1])
        if version in found:
            raise RuntimeError(f"two migrations have version {version}")
        found[version] = Migration(version, match[2], entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def migrate(pool: Pool) -> list[int]:
    """Apply pending migrations; returns the versions applied by this call."""
    migrations = discover()
    applied_now: list[int] = []
    try:
        async with pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {
                    r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")
                }
                unknown = done - {m.version for m in migrations}
                if unknown:
                    raise RuntimeError(
                        f"the database has migrations {sorted(unknown)} this controller does not "
                        "know; refusing to run an older controller on a newer schema"
                    )
                for migration in migrations:
                    if migration.version in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(migration.sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                            migration.version,
                            migration.name,
                        )
                    log(logger, "migration_applied", version=migration.version, name=migration.name)
                    applied_now.append(migration.version)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    except _UNAVAILABLE as exc:
        raise DatabaseUnavailable(f"database unavailable during migration: {exc}") from None
    return applied_now
