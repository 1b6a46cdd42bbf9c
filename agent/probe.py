"""Readiness: an add-on is ready only when a real client connects and gets an answer.

Probes run from the host to the holder's address on the project network, as the probe's
least role (`specs.PROBE_USER`, agent/platform_roles.py): a login and SELECT 1 or PING,
no data, no setting. Whatever answers at that address (the add-on's server, or something
impersonating it) learns only that role's password; Redis's AUTH sends it in clear, and a
Postgres impostor can ask for it in clear. Their source is the network's gateway address,
which the activity tracker ignores, so probes never keep an add-on awake.

A login the server refuses to the probe's role (`ROLE_REFUSED`: a server from before the
role, a tenant's REVOKE CONNECT or CONNECTION LIMIT 0, a rotated password) is the caller's
to mend as the admin (`admin_login`, Upkeep.probe_role) and probe again.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from agent import resp
from agent.specs import ADMIN_USER, PLATFORM_PG_SETTINGS, PROBE_USER
from schemas.messages import PORTS

log = logging.getLogger("orkestr.agent.probe")

ROLE_REFUSED = "ProbeRoleRefused"
# What a server says when the probe's role itself is what it refuses: no such role or a
# wrong password (28000, 28P01), no CONNECT on the database (42501), a connection limit of
# the database or the role (53300: the admin, a superuser, is exempt from the first).
_PG_ROLE_ERRORS = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InsufficientPrivilegeError,
    asyncpg.TooManyConnectionsError,
)
_REDIS_ROLE_ERRORS = ("WRONGPASS", "NOPERM")

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


# Postgres's refusals (53300, like a role's or a database's own connection limit) when
# clients hold every connection (max_connections): those a role without superuser may
# take ("remaining connection slots are reserved for ..."; the wording after "for" changed
# in 16), or all of them ("sorry, too many clients already").
FULL = ("remaining connection slots are reserved", "sorry, too many clients")


def server_full(result: tuple[bool, str, str]) -> bool:
    """A Postgres probe refused because the tenant's clients hold every connection. It is
    not ready (its clients are refused too), but its upkeep must go on: the admin logs in
    through the superusers' reserved slots, so a tenant cannot switch off the quota guard
    or the settings' repair by filling the server."""
    return result[1] == "NotAccepting" and any(words in result[2] for words in FULL)


async def postgres(
    ip: str, database: str, probe_password: str, timeout_s: float
) -> tuple[bool, str, str]:
    try:
        conn = await _connect(ip, PROBE_USER, database, probe_password, timeout_s)
    except (TimeoutError, OSError) as exc:
        return False, "Unreachable", f"postgres at {ip}: {exc.__class__.__name__}: {exc}"
    except _PG_ROLE_ERRORS as exc:
        if str(exc).startswith(FULL):
            # The server's max_connections, every client's limit: nothing to mend (the
            # admin, in the superusers' reserved slots, answered here before). Its upkeep
            # still runs (server_full).
            return False, "NotAccepting", f"postgres at {ip}: {exc}"
        return False, ROLE_REFUSED, f"postgres at {ip} refused {PROBE_USER}: {exc}"
    except asyncpg.PostgresError as exc:
        return False, "NotAccepting", f"postgres at {ip}: {exc}"
    except Exception as exc:  # asyncpg raises a few non-Postgres errors mid-startup
        return False, "NotAccepting", f"postgres at {ip}: {exc.__class__.__name__}: {exc}"
    return await select_one(conn, ip, timeout_s, PROBE_USER)


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


async def select_one(
    conn: asyncpg.Connection, ip: str, timeout_s: float, user: str
) -> tuple[bool, str, str]:
    """SELECT 1 on a connection logged in as `user`, then close it; a failure is
    QueryFailed."""
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
        f"asyncpg connected to {ip}:{PORTS['postgres']} as {user} and ran SELECT 1",
    )


async def admin_login(
    ip: str, database: str, admin_password: str, timeout_s: float, tenant: tuple[str, str] | None
) -> asyncpg.Connection:
    """The admin's connection that mends the probe's role (Upkeep.probe_role); a volume
    from before the platform roles is adopted first with the tenant's login."""
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
        command_timeout=timeout_s,  # the admin's mending statements (Upkeep.probe_role)
        ssl=False,
        server_settings={
            **dict(PLATFORM_PG_SETTINGS),
            "application_name": "orkestr-probe" if user == PROBE_USER else "orkestr-admin",
        },
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


async def redis(ip: str, probe_password: str, timeout_s: float) -> tuple[bool, str, str]:
    conn, result = await redis_connect(ip, probe_password, timeout_s)
    if conn is None:
        return result
    async with conn:
        return await redis_ping(conn, ip)


async def redis_connect(
    ip: str, probe_password: str, timeout_s: float
) -> tuple[resp.Connection | None, tuple[bool, str, str]]:
    """A connection for `redis_ping` (and the upkeep after it), or why there is none.
    AUTH is sent with the first command: a refused login is `redis_ping_info`'s answer."""
    try:
        conn = await resp.Connection.open(
            ip, PORTS["redis"], PROBE_USER, probe_password, timeout_s, "orkestr-probe"
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
    (None without `info`, or when PING failed): a round is then one round trip. On a
    connection whose server is not known yet, `INFO server memory`: its `run_id` tells the
    upkeep a restarted server (Upkeep._redis)."""
    sections = ("server", "memory") if conn.server is None else ("memory",)
    commands: list[tuple[str, ...]] = [("PING",), ("INFO", *sections)] if info else [("PING",)]
    try:
        replies = await conn.pipeline(*commands)
    except resp.RespError as exc:
        if str(exc).startswith(_REDIS_ROLE_ERRORS):  # the handshake's AUTH
            return (False, ROLE_REFUSED, f"redis at {ip} refused {PROBE_USER}: {exc}"), None
        return (False, "Unreachable", f"redis at {ip}: RespError: {exc}"), None
    except (TimeoutError, OSError) as exc:
        return (False, "Unreachable", f"redis at {ip}: {exc.__class__.__name__}: {exc}"), None
    pong = replies[0]
    if isinstance(pong, resp.RespError):
        if str(pong).startswith(_REDIS_ROLE_ERRORS):
            return (False, ROLE_REFUSED, f"redis at {ip} refused {PROBE_USER}: {pong}"), None
        return (False, "Unreachable", f"redis at {ip}: RespError: {pong}"), None
    if pong != "PONG":
        return (False, "QueryFailed", f"redis at {ip} answered {pong!r} to PING"), None
    if info and isinstance(replies[1], resp.RespError) and str(replies[1]).startswith("NOPERM"):
        # Answers, but the upkeep could not measure it: the role is mended like a refusal.
        return (False, ROLE_REFUSED, f"redis at {ip} refused {PROBE_USER}: {replies[1]}"), None
    ok = f"the agent connected to {ip}:{PORTS['redis']} as {PROBE_USER} and got PONG"
    return (True, "ClientConnected", ok), replies[1] if info else None
