"""Readiness: an add-on is ready only when a real client connects and gets an answer.

Probes run from the host to the holder's address on the project network, as the
platform's own role (`specs.ADMIN_USER`). Their source is the network's gateway address,
which the activity tracker ignores, so probes never keep an add-on awake.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from agent import resp
from agent.specs import ADMIN_USER, PLATFORM_PG_SETTINGS
from schemas.messages import PORTS

log = logging.getLogger("orkestr.agent.probe")

# A volume initialised before platform roles existed: the tenant is its superuser and the
# platform role is missing. The first probe moves it to the current layout.
_ADOPT_SQL = """
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{admin}') THEN
    CREATE ROLE {admin} LOGIN SUPERUSER;
  END IF;
END $$;
ALTER ROLE {admin} PASSWORD {password};
ALTER ROLE {tenant} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
"""


async def postgres(
    ip: str,
    database: str,
    admin_password: str,
    timeout_s: float,
    tenant: tuple[str, str] | None = None,
) -> tuple[bool, str, str]:
    try:
        conn = await _login(ip, database, admin_password, timeout_s, tenant)
    except (TimeoutError, OSError) as exc:
        return False, "Unreachable", f"postgres at {ip}: {exc.__class__.__name__}: {exc}"
    except asyncpg.PostgresError as exc:
        return False, "NotAccepting", f"postgres at {ip}: {exc}"
    except Exception as exc:  # asyncpg raises a few non-Postgres errors mid-startup
        return False, "NotAccepting", f"postgres at {ip}: {exc.__class__.__name__}: {exc}"
    return await select_one(conn, ip, timeout_s)


# A connection the server ends between login and query (a deletion stopping the database
# as a re-probe logs in) raises one of asyncpg's client-side errors, not a PostgresError:
# InternalClientError ("another operation is in progress") while it reads the server's
# FATAL, InterfaceError ("connection is closed") after.
QUERY_ERRORS = (
    TimeoutError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


async def select_one(conn: asyncpg.Connection, ip: str, timeout_s: float) -> tuple[bool, str, str]:
    """SELECT 1 on a logged-in connection, then close it; a failure is QueryFailed."""
    try:
        value = await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout_s)
    except QUERY_ERRORS as exc:
        conn.terminate()
        return False, "QueryFailed", f"postgres at {ip}: {exc.__class__.__name__}: {exc}"
    try:
        await conn.close(timeout=timeout_s)
    except QUERY_ERRORS:
        conn.terminate()  # it answered: a close the server cut short changes nothing
    if value != 1:
        return False, "QueryFailed", f"postgres at {ip} answered {value!r} to SELECT 1"
    return (
        True,
        "ClientConnected",
        f"asyncpg connected to {ip}:{PORTS['postgres']} and ran SELECT 1",
    )


async def _login(
    ip: str, database: str, admin_password: str, timeout_s: float, tenant: tuple[str, str] | None
) -> asyncpg.Connection:
    try:
        return await _connect(ip, ADMIN_USER, database, admin_password, timeout_s)
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
        if tenant is None:
            raise
    return await _adopt(ip, database, admin_password, timeout_s, tenant)


async def _connect(
    ip: str, user: str, database: str, password: str, timeout_s: float
) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=ip,
        port=PORTS["postgres"],
        user=user,
        database=database,
        password=password,
        timeout=timeout_s,
        ssl=False,
        server_settings={**dict(PLATFORM_PG_SETTINGS), "application_name": "orkestr-probe"},
    )


async def _adopt(
    ip: str, database: str, admin_password: str, timeout_s: float, tenant: tuple[str, str]
) -> asyncpg.Connection:
    """Create the platform role with the tenant's superuser login, then demote the tenant."""
    user, password = tenant
    conn = await _connect(ip, user, database, password, timeout_s)
    try:
        if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            raise asyncpg.InvalidPasswordError("the platform role's password is refused")
        literal = "'" + admin_password.replace("'", "''") + "'"
        ident = '"' + user.replace('"', '""') + '"'
        await conn.execute(_ADOPT_SQL.format(admin=ADMIN_USER, password=literal, tenant=ident))
        log.info("probe.adopted_roles database=%s tenant=%s", database, user)
    finally:
        await conn.close(timeout=timeout_s)
    return await _connect(ip, ADMIN_USER, database, admin_password, timeout_s)


async def redis(ip: str, admin_password: str, timeout_s: float) -> tuple[bool, str, str]:
    conn, result = await redis_connect(ip, admin_password, timeout_s)
    if conn is None:
        return result
    async with conn:
        return await redis_ping(conn, ip)


async def redis_connect(
    ip: str, admin_password: str, timeout_s: float
) -> tuple[resp.Connection | None, tuple[bool, str, str]]:
    """A connection for `redis_ping` (and the upkeep after it), or why there is none."""
    try:
        conn = await resp.Connection.open(
            ip, PORTS["redis"], ADMIN_USER, admin_password, timeout_s, "orkestr-probe"
        )
    except (TimeoutError, OSError) as exc:
        return None, (False, "Unreachable", f"redis at {ip}: {exc.__class__.__name__}: {exc}")
    return conn, (False, "Unreachable", "not probed yet")


async def redis_ping(conn: resp.Connection, ip: str) -> tuple[bool, str, str]:
    """PING, sent with the connection's AUTH and CLIENT SETNAME: one round trip."""
    return (await redis_ping_info(conn, ip, info=False))[0]


async def redis_ping_info(
    conn: resp.Connection, ip: str, info: bool = True
) -> tuple[tuple[bool, str, str], resp.Reply]:
    """`redis_ping`, with `INFO memory` in the same write for the upkeep round after it
    (None without `info`, or when PING failed): a round is then one round trip."""
    commands: list[tuple[str, ...]] = [("PING",), ("INFO", "memory")] if info else [("PING",)]
    try:
        replies = await conn.pipeline(*commands)
    except (TimeoutError, resp.RespError, OSError) as exc:
        return (False, "Unreachable", f"redis at {ip}: {exc.__class__.__name__}: {exc}"), None
    pong = replies[0]
    if isinstance(pong, resp.RespError):
        return (False, "Unreachable", f"redis at {ip}: RespError: {pong}"), None
    if pong != "PONG":
        return (False, "QueryFailed", f"redis at {ip} answered {pong!r} to PING"), None
    ok = f"the agent connected to {ip}:{PORTS['redis']} and got PONG"
    return (True, "ClientConnected", ok), replies[1] if info else None
