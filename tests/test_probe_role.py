"""The readiness probe logs in as its own least role, not as the platform's admin.

A real controller, agent, dockerd and add-ons. The probe's role (`orkestr_probe`) may log
in and ask whether the server answers (SELECT 1; PING, INFO), and the server refuses it
everything else: a tenant's table or key, a write, CREATE, CONFIG, FLUSHALL, ACL. An
add-on from before the role (its role and password removed) gets it back on its live
server at its next probe, and so does one whose tenant revoked what the role needs; the
add-on stays Ready throughout. A Redis add-on's quiet rounds send no admin password.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from agent import model, specs
from tests.agent_fixtures import (
    AgentProcess,
    Stack,
    addon,
    create_addon,
    create_project,
    docker,
    more_passes,
    running_agent,
    wait_for,
    wait_phase,
)
from tests.backup_api import sql
from tests.services import ControllerProcess

pytest_plugins = ["tests.agent_fixtures"]

PLANS = """
[team]
max_addons = 5
cpus = 1.0
memory_mb = 512
manual_backups_per_day = 5
backup_retention_days = 30
sleep = { enabled = false }
"""


@pytest.fixture(scope="module")
def plans_text() -> str:
    return PLANS


@pytest.fixture(scope="module")
async def agent(stack: Stack) -> AsyncIterator[AgentProcess]:
    async with running_agent(stack) as proc:
        yield proc


def _c(stack: Stack) -> ControllerProcess:
    assert stack.controller is not None
    return stack.controller


def holder_ip(project_id: str, addon_id: str) -> str:
    info = json.loads(docker("inspect", model.holder_name(addon_id)))[0]
    return str(info["NetworkSettings"]["Networks"][model.network_name(project_id)]["IPAddress"])


def secret(agent: AgentProcess, addon_id: str, name: str) -> str:
    return (agent.state_dir / "secrets" / addon_id / name).read_text()


def db_id(addon_id: str) -> str:
    return str(json.loads(docker("inspect", model.db_name(addon_id)))[0]["Id"])


async def ready(c: ControllerProcess, p: str, a: str) -> dict[str, Any]:
    view = await addon(c, p, a)
    return next(x for x in view["conditions"] if x["type"] == "Ready")


def mended(agent: AgentProcess, addon_id: str) -> int:
    return agent.log_path.read_text(errors="replace").count(f"probe.role_mended addon={addon_id} ")


def put_back(agent: AgentProcess, addon_id: str) -> int:
    """Mendings, and the upkeep's own repairs of the database's settings: a round already
    past its probe when the tenant changed them puts them back first."""
    return mended(agent, addon_id) + agent.log_path.read_text(errors="replace").count(
        f"upkeep.database_setting_restored addon={addon_id} "
    )


# Each is refused by the server to the probe's role (asyncpg raises its error).
PG_REFUSED = {
    "read a tenant table": "SELECT count(*) FROM orders",
    "write a tenant table": "INSERT INTO orders VALUES (2)",
    "drop a tenant table": "DROP TABLE orders",
    "create a table": "CREATE TABLE public.intruder (x int)",
    "create a schema": "CREATE SCHEMA intruder",
    "create a role": "CREATE ROLE intruder LOGIN SUPERUSER",
    "create a database": "CREATE DATABASE intruder",
    "alter system": "ALTER SYSTEM SET log_statement = 'all'",
    "read a server file": "SELECT pg_read_file('PG_VERSION')",
    "copy to program": "COPY (SELECT 1) TO PROGRAM 'true'",
    "act as the tenant": "SET ROLE {tenant}",
}


async def pg_as(ip: str, user: str, password: str, database: str = "app") -> asyncpg.Connection:
    return await asyncpg.connect(host=ip, user=user, password=password, database=database)


async def test_the_postgres_probe_role_may_only_ask_whether_it_answers(
    stack: Stack, agent: AgentProcess
) -> None:
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    a = (await create_addon(c, p, "probed-db", "postgres"))["id"]
    await wait_phase(c, p, a, "ready")
    cond = await ready(c, p, a)
    assert cond["reason"] == "ClientConnected", cond
    assert f"as {specs.PROBE_USER} and ran SELECT 1" in cond["message"], cond
    assert mended(agent, a) == 0  # made with the volume: the first probe logged in as it
    await sql(c, p, "create table orders(x int); insert into orders values (1)")
    ip = holder_ip(p, a)
    password = secret(agent, a, f"{specs.PROBE_USER}/password")
    assert password not in {secret(agent, a, "admin_password"), secret(agent, a, "password")}

    admin = await pg_as(ip, specs.ADMIN_USER, secret(agent, a, "admin_password"))
    try:
        role = await admin.fetchrow(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls,"
            " rolcanlogin FROM pg_roles WHERE rolname = $1",
            specs.PROBE_USER,
        )
        assert tuple(role) == (False, False, False, False, False, True), role
        assert not await admin.fetchval(
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member"
            " WHERE r.rolname = $1",
            specs.PROBE_USER,
        )
        tenant = await admin.fetchval(
            "SELECT datdba::regrole::text FROM pg_database WHERE datname = 'app'"
        )
    finally:
        await admin.close()

    conn = await pg_as(ip, specs.PROBE_USER, password)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        allowed = []
        for name, statement in PG_REFUSED.items():
            try:
                await conn.execute(statement.format(tenant=tenant))
                allowed.append(name)
            except asyncpg.PostgresError:
                pass
        assert allowed == []
    finally:
        await conn.close()
    # CONNECT on the tenant's database only.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await pg_as(ip, specs.PROBE_USER, password, database="postgres")
    assert await sql(c, p, "select count(*) from orders") == "1"


async def test_a_postgres_addon_from_before_the_probe_role_gets_it_without_a_restart(
    stack: Stack, agent: AgentProcess
) -> None:
    """Its server without the role and its host without the password, as an upgrade finds
    it; then a tenant that revokes the role's CONNECT on its database, then one that sets
    its database's CONNECTION LIMIT 0. Each time the next
    probe's refused login is mended as the admin, said in the log, and the add-on answers
    on the same database container."""
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    a = (await create_addon(c, p, "old-probed-db", "postgres"))["id"]
    await wait_phase(c, p, a, "ready")
    before = db_id(a)
    ip = holder_ip(p, a)
    admin = await pg_as(ip, specs.ADMIN_USER, secret(agent, a, "admin_password"))
    try:
        await admin.execute(f"DROP OWNED BY {specs.PROBE_USER}; DROP ROLE {specs.PROBE_USER}")
    finally:
        await admin.close()
    probe_dir = agent.state_dir / "secrets" / a / specs.PROBE_USER
    (probe_dir / "password").unlink()
    probe_dir.rmdir()

    async def made_again() -> bool:
        return mended(agent, a) >= 1 and (probe_dir / "password").is_file()

    await wait_for(made_again, 30, "the probe's role made again")
    conn = await pg_as(ip, specs.PROBE_USER, (probe_dir / "password").read_text())
    await conn.close()
    assert (await ready(c, p, a))["status"] == "True"

    # The tenant owns its database: it may revoke the role's CONNECT (and PUBLIC's, which
    # every role has too).
    count = put_back(agent, a)
    await sql(c, p, f"revoke connect on database app from public, {specs.PROBE_USER}")

    async def mended_again() -> bool:
        return put_back(agent, a) > count

    await wait_for(mended_again, 30, "the revoked CONNECT mended")
    conn = await pg_as(ip, specs.PROBE_USER, (probe_dir / "password").read_text())
    await conn.close()

    # CONNECTION LIMIT 0 stops every role but a superuser: the probe's too.
    count = put_back(agent, a)
    await sql(c, p, "alter database app connection limit 0")

    async def limit_mended() -> bool:
        return put_back(agent, a) > count

    await wait_for(limit_mended, 30, "the connection limit mended")
    assert await sql(c, p, "select datconnlimit from pg_database where datname = 'app'") == "-1"
    await more_passes(agent, 2)
    assert (await ready(c, p, a))["status"] == "True"
    assert (await addon(c, p, a))["phase"] == "ready"
    assert db_id(a) == before


async def test_a_tenant_holding_every_connection_does_not_stop_the_upkeep(
    stack: Stack, agent: AgentProcess
) -> None:
    """The probe's role takes no superuser slot: once the tenant's clients hold every
    connection it is refused as they would be, and the add-on is not Ready. The upkeep,
    the admin's, goes on through the superusers' reserved slots: a tenant that fills its
    server does not switch off the quota guard or the repair of its settings."""
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    a = (await create_addon(c, p, "full-db", "postgres"))["id"]
    await wait_phase(c, p, a, "ready")
    ip = holder_ip(p, a)
    admin = await pg_as(ip, specs.ADMIN_USER, secret(agent, a, "admin_password"))
    try:
        tenant = await admin.fetchval(
            "SELECT datdba::regrole::text FROM pg_database WHERE datname = 'app'"
        )
    finally:
        await admin.close()
    held: list[asyncpg.Connection] = []
    try:
        # Every slot a role without superuser may take: connected until the server refuses.
        while True:
            try:
                held.append(await pg_as(ip, tenant, secret(agent, a, "password")))
            except asyncpg.TooManyConnectionsError:
                break
            assert len(held) < 200, "no max_connections?"
        mark = len(agent.log_path.read_text(errors="replace"))
        await held[0].execute("ALTER DATABASE app IS_TEMPLATE true")

        async def repaired() -> bool:
            log = agent.log_path.read_text(errors="replace")[mark:]
            return f"upkeep.database_setting_restored addon={a} found=is_template=true" in log

        await wait_for(repaired, 60, "the upkeep's repair while the server is full")
        assert await held[0].fetchval(
            "SELECT datistemplate FROM pg_database WHERE datname = 'app'"
        ) is False  # fmt: skip

        async def refused() -> dict[str, Any] | None:
            cond = await ready(c, p, a)
            return cond if cond["status"] == "False" else None

        cond = await wait_for(refused, 60, "Ready False while the server is full")
        assert cond["reason"] == "NotAccepting" and "connection slots" in cond["message"], cond
        log = agent.log_path.read_text(errors="replace")[mark:]
        assert f"probe.role_mended addon={a} " not in log  # nothing to mend: it is full
    finally:
        for conn in held:
            await conn.close()

    async def answered() -> bool:
        return bool((await ready(c, p, a))["status"] == "True")

    await wait_for(answered, 60, "Ready again once the clients are gone")


REDIS_REFUSED = (
    "GET k1",
    "SET forged 1",
    "DEL k1",
    "KEYS *",
    "SCAN 0",
    "FLUSHALL",
    "CONFIG GET *",
    "CONFIG SET maxmemory-policy allkeys-random",
    "ACL SETUSER intruder on >x +@all ~*",
    "ACL LIST",
    "CLIENT LIST",
    "EVAL return 1 0",
    "SUBSCRIBE c",
    "SELECT 1",
    "SHUTDOWN NOSAVE",
    "REPLICAOF 127.0.0.1 1",
)


async def test_the_redis_probe_user_may_only_ask_whether_it_answers(
    stack: Stack, agent: AgentProcess
) -> None:
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    a = (await create_addon(c, p, "probed-cache", "redis"))["id"]
    await wait_phase(c, p, a, "ready")
    cond = await ready(c, p, a)
    assert f"as {specs.PROBE_USER} and got PONG" in cond["message"], cond
    assert mended(agent, a) == 0  # in redis.conf from the first start
    ip = holder_ip(p, a)
    password = secret(agent, a, f"{specs.PROBE_USER}/password")
    admin = aioredis.Redis(
        host=ip, username=specs.ADMIN_USER, password=secret(agent, a, "admin_password")
    )
    r = aioredis.Redis(host=ip, username=specs.PROBE_USER, password=password)
    try:
        await admin.set("k1", "v1")
        assert await r.ping() is True
        assert "used_memory" in await r.info("memory")
        allowed = []
        for command in REDIS_REFUSED:
            # The user's ACL itself, asked without running anything, then the real thing
            # for those that harm nothing if it were allowed.
            verdict = await admin.execute_command(
                "ACL", "DRYRUN", specs.PROBE_USER, *command.split()
            )
            if b"no permissions" not in verdict:
                allowed.append(command)
        for command in REDIS_REFUSED[:4]:
            try:
                await r.execute_command(*command.split())
                allowed.append(command)
            except redis.exceptions.NoPermissionError:
                pass
        assert allowed == []
        assert await admin.get("k1") == b"v1" and await admin.get("forged") is None
    finally:
        await r.aclose()
        await admin.aclose()


async def test_a_redis_addon_sends_no_admin_password_on_a_quiet_round(
    stack: Stack, agent: AgentProcess
) -> None:
    """With the admin's password changed on the server behind the agent's back, the
    probe and the upkeep's rounds (the quota's INFO) still work: nothing logs in as the
    admin while nothing is to change."""
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    a = (await create_addon(c, p, "quiet-cache", "redis"))["id"]
    await wait_phase(c, p, a, "ready")
    await more_passes(agent, 2)  # the first rounds made the users and checked the settings
    ip = holder_ip(p, a)
    real = secret(agent, a, "admin_password")
    admin = aioredis.Redis(host=ip, username=specs.ADMIN_USER, password=real)
    try:
        await admin.execute_command("ACL", "SETUSER", specs.ADMIN_USER, "resetpass", ">elsewhere")
        # Every connection but this one ends: each round from now on logs in afresh.
        await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        mark = len(agent.log_path.read_text(errors="replace"))
        await more_passes(agent, 4)
        log = agent.log_path.read_text(errors="replace")[mark:]
        assert f"addon={a}" not in log, log[-3000:]
        assert (await ready(c, p, a))["status"] == "True"
    finally:
        await admin.execute_command("ACL", "SETUSER", specs.ADMIN_USER, "resetpass", f">{real}")
        await admin.aclose()


async def test_a_redis_addon_from_before_the_probe_user_gets_it_without_a_restart(
    stack: Stack, agent: AgentProcess
) -> None:
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    a = (await create_addon(c, p, "old-probed-cache", "redis"))["id"]
    await wait_phase(c, p, a, "ready")
    before = db_id(a)
    ip = holder_ip(p, a)
    admin = aioredis.Redis(
        host=ip, username=specs.ADMIN_USER, password=secret(agent, a, "admin_password")
    )
    secrets = agent.state_dir / "secrets" / a
    try:
        # The conf first: the agent rewrites it only to add users it lacks.
        conf = secrets / "redis.conf"
        conf.write_text(
            "".join(x for x in conf.read_text().splitlines(True) if specs.PROBE_USER not in x)
        )
        (secrets / specs.PROBE_USER / "password").unlink()
        (secrets / specs.PROBE_USER).rmdir()
        await admin.execute_command("ACL", "DELUSER", specs.PROBE_USER)  # ends its connections

        async def made_again() -> bool:
            return mended(agent, a) >= 1 and (secrets / specs.PROBE_USER / "password").is_file()

        await wait_for(made_again, 30, "the probe's user made again")
        rules = await admin.execute_command("ACL", "GETUSER", specs.PROBE_USER)
        assert rules is not None
        password = (secrets / specs.PROBE_USER / "password").read_text()
        r = aioredis.Redis(host=ip, username=specs.PROBE_USER, password=password)
        try:
            assert await r.ping() is True
        finally:
            await r.aclose()
        assert f"user {specs.PROBE_USER} " in conf.read_text()  # for the next start too
        await more_passes(agent, 2)
        assert (await ready(c, p, a))["status"] == "True"
        assert db_id(a) == before
    finally:
        await admin.aclose()
