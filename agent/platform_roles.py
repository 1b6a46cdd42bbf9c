"""The least roles the backup containers and the readiness probe log in as, made and kept
on each add-on's server.

A backup container runs pg_dump or `redis-cli --rdb` against the tenant's data on the
tenant's project network; a Postgres restore runs pg_restore of the tenant's dump there.
Were one compromised, the credential it holds is all it has: not the platform's superuser
(`specs.ADMIN_USER`, which stays with the agent on the host), only

- Postgres `BACKUP_USER`: LOGIN, `pg_read_all_data` (every table, sequence and schema, as
  SELECT and USAGE), BYPASSRLS (pg_dump sets `row_security = off` and fails on a table
  whose policies apply to it: a tenant enabling RLS, even FORCE, keeps its backups), and
  CONNECT on the tenant's database. Large objects are outside `pg_read_all_data`: each is
  granted SELECT right before a dump (`LARGE_OBJECT_GRANTS`).
- Postgres `RESTORE_USER`: LOGIN, CREATEDB (the copy beside the live database, and its
  rename), a member of the tenant's role (the copy is the tenant's: `OWNER`, `--role`,
  ALTER and DROP of the tenant's databases), `pg_signal_backend` (the swap ends the
  tenant's sessions; DROP ... WITH (FORCE) the autovacuum workers), CONNECT on `postgres`.
- Redis `BACKUP_USER`: PING, INFO, SYNC and REPLCONF (what `redis-cli --rdb` and the
  script's key counts send), no key, no channel, no other command.
- Postgres `PROBE_USER` (the agent's readiness probe, agent/probe.py): LOGIN and CONNECT
  on the tenant's database, the one a client's connection must reach; no attribute, no
  membership, no table right: `SELECT 1` reads nothing. It has what PUBLIC has there (TEMP,
  and whatever the tenant, the database's owner, grants PUBLIC), like any login role.
- Redis `PROBE_USER`: PING, INFO (the upkeep's `used_memory`, `maxmemory`, `run_id` ride
  with the probe's PING) and CLIENT SETNAME (the connection's name), no key, no channel.
  INFO whole: a first-argument rule (`+info|memory`) would not hold, `INFO memory all`
  passes it. INFO shows counts and settings, no key's name or value.

None is a superuser, none has CREATEROLE, REPLICATION, pg_write_*, pg_execute_server_program
or pg_read_server_files. Each round the agent compares what the server has with this
(`pg_fixes`, pure) and changes only the difference, so an add-on made before these roles
gets them on its live server, its data untouched, and a tenant's own grants or revokes
are undone. Their passwords are made per add-on by agent/secrets.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg
import msgspec
from msgspec import Struct

from agent import pg_passwords, resp
from agent.specs import BACKUP_USER, PROBE_USER, RESTORE_USER

PG_USERS = (BACKUP_USER, RESTORE_USER, PROBE_USER)
REDIS_USERS = (BACKUP_USER, PROBE_USER)
# What `redis-cli --rdb` sends (REPLCONF capa eof, REPLCONF rdb-only 1, SYNC), and PING
# and INFO keyspace / INFO memory for the backup script's counts.
REDIS_BACKUP_COMMANDS = ("+ping", "+info", "+sync", "+replconf")
# What the probe's connection sends (agent/resp.py: AUTH, CLIENT SETNAME; agent/probe.py:
# PING, INFO memory or INFO server memory). AUTH needs no right.
REDIS_PROBE_COMMANDS = ("+ping", "+info", "+client|setname")
REDIS_COMMANDS = {BACKUP_USER: REDIS_BACKUP_COMMANDS, PROBE_USER: REDIS_PROBE_COMMANDS}


def redis_rules(user: str, password: str) -> tuple[str, ...]:
    """The ACL rules of one of the Redis least users: `reset` drops any key, channel,
    command and password it had (made by anyone), then only what its client needs."""
    return ("reset", "on", f">{password}", *REDIS_COMMANDS[user])


def redis_backup_rules(password: str) -> tuple[str, ...]:
    return redis_rules(BACKUP_USER, password)


def redis_acl_line(password: str, user: str = BACKUP_USER) -> str:
    """The redis.conf line for one of the least users (agent/secrets.py)."""
    return f"user {user} {' '.join(redis_rules(user, password))}\n"


class Wanted(Struct, frozen=True):
    createdb: bool
    bypassrls: bool
    member_of: frozenset[str]
    connect_to: str  # "" for the tenant's database


def wanted(tenant: str) -> dict[str, Wanted]:
    return {
        BACKUP_USER: Wanted(False, True, frozenset({"pg_read_all_data"}), ""),
        RESTORE_USER: Wanted(True, False, frozenset({tenant, "pg_signal_backend"}), "postgres"),
        PROBE_USER: Wanted(False, False, frozenset(), ""),
    }


class Found(Struct, frozen=True):
    """One of the roles as the server has it (`PG_ROLES_SQL`)."""

    name: str
    verifier: str | None
    superuser: bool
    createrole: bool
    createdb: bool
    login: bool
    replication: bool
    bypassrls: bool
    inherit: bool
    member_of: tuple[str, ...]
    members: tuple[str, ...]
    connect_here: bool
    connect_postgres: bool


PG_ROLES_SQL = """
SELECT a.rolname AS name, a.rolpassword AS verifier, a.rolsuper AS superuser,
       a.rolcreaterole AS createrole, a.rolcreatedb AS createdb, a.rolcanlogin AS login,
       a.rolreplication AS replication, a.rolbypassrls AS bypassrls, a.rolinherit AS inherit,
       ARRAY(SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
             WHERE m.member = a.oid ORDER BY 1) AS member_of,
       ARRAY(SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.member
             WHERE m.roleid = a.oid ORDER BY 1) AS members,
       -- The tenant's database by name: the connection may be to `postgres`, and the
       -- tenant's may be renamed away mid-restore (then nothing to grant on it now).
       CASE WHEN EXISTS (SELECT 1 FROM pg_database WHERE datname = $2::text)
            THEN has_database_privilege(a.oid, $2::text, 'CONNECT') ELSE true END AS connect_here,
       has_database_privilege(a.oid, 'postgres', 'CONNECT') AS connect_postgres
FROM pg_authid a WHERE a.rolname = ANY($1::text[])
"""

# SELECT on every large object the backup role cannot read yet, in one statement (large
# objects are outside pg_read_all_data, and PG 15 has no default privileges for them).
LARGE_OBJECT_GRANTS = f"""
DO $g$ DECLARE ids text; BEGIN
  SELECT string_agg(m.oid::text, ',') INTO ids FROM pg_largeobject_metadata m
  WHERE NOT EXISTS (SELECT 1 FROM aclexplode(m.lomacl) a
                    WHERE a.grantee = '{BACKUP_USER}'::regrole AND a.privilege_type = 'SELECT');
  IF ids IS NOT NULL THEN
    EXECUTE 'GRANT SELECT ON LARGE OBJECT ' || ids || ' TO {BACKUP_USER}';
  END IF;
END $g$
"""


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _attributes(want: Wanted) -> str:
    return " ".join(
        (
            "LOGIN NOSUPERUSER NOCREATEROLE NOREPLICATION INHERIT",
            "CREATEDB" if want.createdb else "NOCREATEDB",
            "BYPASSRLS" if want.bypassrls else "NOBYPASSRLS",
        )
    )


def _attributes_differ(have: Found, want: Wanted) -> bool:
    return (
        have.superuser
        or have.createrole
        or have.replication
        or not have.login
        or not have.inherit
        or have.createdb != want.createdb
        or have.bypassrls != want.bypassrls
    )


def pg_fixes(
    found: Mapping[str, Found], tenant: str, database: str, passwords: Mapping[str, str]
) -> list[str]:
    """The statements that make the server's roles what `wanted` says (none: they are).

    A role's password is set only when its verifier does not accept the platform's; a
    membership the role has that is not wanted (granted by a tenant that once was the
    superuser, or by hand) is revoked, and so is any role's membership in it."""
    out: list[str] = []
    for name, want in wanted(tenant).items():
        role = ident(name)
        password = passwords[name]
        have = found.get(name)
        if have is None:
            out.append(f"CREATE ROLE {role} {_attributes(want)} PASSWORD {literal(password)}")
            member_of: tuple[str, ...] = ()
            members: tuple[str, ...] = ()
            connect = False
        else:
            if _attributes_differ(have, want):
                out.append(f"ALTER ROLE {role} {_attributes(want)}")
            if not pg_passwords.verifier_matches(have.verifier, password, name):
                out.append(f"ALTER ROLE {role} PASSWORD {literal(password)}")
            member_of, members = have.member_of, have.members
            connect = have.connect_postgres if want.connect_to else have.connect_here
        out.extend(f"GRANT {ident(g)} TO {role}" for g in sorted(want.member_of - set(member_of)))
        out.extend(
            f"REVOKE {ident(g)} FROM {role}" for g in sorted(set(member_of) - want.member_of)
        )
        out.extend(f"REVOKE {role} FROM {ident(m)}" for m in members)
        if not connect:
            out.append(f"GRANT CONNECT ON DATABASE {ident(want.connect_to or database)} TO {role}")
    return out


async def ensure_postgres(
    conn: asyncpg.Connection,
    tenant: str,
    database: str,
    passwords: Mapping[str, str],
    large_objects: bool = False,
) -> list[str]:
    """Make the roles what they should be, on a superuser's connection (to the tenant's
    database or to `postgres`); `large_objects`: grant the backup role SELECT on each of
    the connected database's (before a dump, connected to the tenant's).
    Returns the statements run, passwords left out (for the log)."""
    rows = await conn.fetch(PG_ROLES_SQL, list(PG_USERS), database)
    found = {r["name"]: msgspec.convert(dict(r.items()), Found) for r in rows}
    fixes = pg_fixes(found, tenant, database, passwords)
    for sql in fixes:
        await conn.execute(sql)
    if large_objects:
        await conn.execute(LARGE_OBJECT_GRANTS)
    return [redact(sql) for sql in fixes]


def redact(sql: str) -> str:
    head, found, _ = sql.partition(" PASSWORD ")
    return head + (" PASSWORD ***" if found else "")


async def ensure_redis(conn: resp.Connection, passwords: Mapping[str, str]) -> None:
    """The least users, as the admin (idempotent: `reset` first). Also the diskless sync
    delay, which a redis.conf made before `repl-diskless-sync-delay 0` lacks and which the
    backup user may not set: every transfer would wait 5 s for more replicas."""
    replies = await conn.pipeline(
        *(("ACL", "SETUSER", user, *redis_rules(user, passwords[user])) for user in REDIS_USERS),
        ("CONFIG", "SET", "repl-diskless-sync-delay", "0"),
    )
    for reply in replies:
        if isinstance(reply, resp.RespError):
            raise reply
