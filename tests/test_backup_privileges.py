"""What a backup container can do with the credential it gets: read, and nothing more.

A real controller, agent, dockerd and add-ons. The dump container's mounts and environment
are read from Docker as the agent made them (its create event, then an inspect), and a
toolbox container with exactly those, on the add-on's project network, tries what a
superuser can do: each is refused. The backups still round-trip, a Postgres table with
forced row-level security and a large object included. An add-on whose server lacks the
roles (made before them) gets them on its live server at its next backup.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from agent import model, specs
from tests.agent_fixtures import (
    TOOLBOX,
    AgentProcess,
    Stack,
    create_addon,
    create_project,
    docker,
    running_agent,
    wait_for,
    wait_phase,
)
from tests.backup_api import backup_now, restore, sql, wait_backup
from tests.services import ControllerProcess

pytest_plugins = ["tests.agent_fixtures"]

PLANS = """
[team]
max_addons = 5
cpus = 1.0
memory_mb = 512
manual_backups_per_day = 20
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


class DumpContainer:
    """The secret mount, environment and network of the agent's dump container for one
    backup."""

    def __init__(self, secret_source: str, env: dict[str, str], network_mode: str) -> None:
        self.secret_source, self.env, self.network_mode = secret_source, env, network_mode


async def backup_seen(c: ControllerProcess, p: str, a: str) -> tuple[dict[str, Any], DumpContainer]:
    """Take a backup; return it and its dump container as Docker had it."""
    events = await asyncio.create_subprocess_exec(
        "docker", "events", "--format", "{{.ID}}",
        "--filter", "event=create", "--filter", f"label={model.LABEL_ADDON}={a}",
        "--filter", f"label={model.LABEL_ROLE}=backup",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.sleep(0.3)  # the event stream is listening
        status, body = await c.api("POST", f"/v1/projects/{p}/addons/{a}/backups")
        assert status == 202, body
        seen: DumpContainer | None = None
        assert events.stdout is not None
        while seen is None:
            line = await asyncio.wait_for(events.stdout.readline(), 120)
            info = json.loads(docker("inspect", line.decode().strip()))[0]
            if not info["Name"].endswith("-dump"):
                continue
            mounts = {m["Destination"]: m for m in info["Mounts"]}
            env = dict(e.split("=", 1) for e in info["Config"]["Env"])
            network_mode = info["HostConfig"]["NetworkMode"]
            seen = DumpContainer(mounts[specs.SECRET_MOUNT]["Source"], env, network_mode)
    finally:
        events.terminate()
        await events.wait()
    return await wait_backup(c, p, a, body["id"]), seen


def as_dump_container(agent: AgentProcess, seen: DumpContainer, script: str) -> str:
    """Run `script` in a toolbox container with the dump container's credential, on its
    network (a Redis dump's: the holder's namespace)."""
    env = [x for k in ("ADDON_HOST", "ADDON_DB", "ADDON_USER", "BACKUP_USER", "PASSWORD_FILE")
           if k in seen.env for x in ("-e", f"{k}={seen.env[k]}")]  # fmt: skip
    return docker(
        "run", "--rm", "--name", f"orkestr-test-{uuid.uuid4().hex[:12]}",
        "--label", f"orkestr.host={agent.host}", "--network", seen.network_mode,
        "-v", f"{seen.secret_source}:{specs.SECRET_MOUNT}:ro", *env,
        "--entrypoint", "bash", TOOLBOX, "-c", script,
    )  # fmt: skip


def no_admin_password(agent: AgentProcess, a: str, seen: DumpContainer) -> None:
    source = Path(seen.secret_source)
    admin = (agent.state_dir / "secrets" / a / "admin_password").read_text()
    assert seen.env["BACKUP_USER"] != specs.ADMIN_USER
    assert sorted(p.name for p in source.iterdir()) == [seen.env["PASSWORD_FILE"]]
    assert (source / seen.env["PASSWORD_FILE"]).read_text() != admin


# Each attempt prints `name|refused` or `name|ALLOWED`: the server's refusal is the check.
PG_ATTEMPTS = {
    "create role": "CREATE ROLE orkestr_intruder SUPERUSER LOGIN",
    "alter system": "ALTER SYSTEM SET log_statement = 'all'",
    "copy to program": "COPY (SELECT 1) TO PROGRAM 'true'",
    "read a server file": "SELECT pg_read_file('PG_VERSION')",
    "write a tenant table": "INSERT INTO orders VALUES (999, 'forged', true)",
    "change a tenant table": "UPDATE orders SET item = 'forged'",
    "drop a tenant table": "DROP TABLE orders",
    "create a table": "CREATE TABLE public.intruder (x int)",
    "act as the tenant": "SET ROLE $ADDON_USER",
    "create a database": "CREATE DATABASE intruder",
}
_PG_TRY = r"""
export PGPASSWORD="$(cat /run/orkestr/$PASSWORD_FILE)" PGHOST="$ADDON_HOST" PGUSER="$BACKUP_USER"
try() {
  if psql -X -q -v ON_ERROR_STOP=1 -d "$ADDON_DB" -c "$2" >/dev/null 2>&1
  then echo "$1|ALLOWED"; else echo "$1|refused"; fi
}
psql -X -At -d "$ADDON_DB" -c "SELECT 'can read|' || count(*) FROM orders"
"""

REDIS_ATTEMPTS = {
    "config set": "CONFIG SET maxmemory-policy allkeys-random",
    "acl setuser": "ACL SETUSER intruder on >x +@all ~*",
    "set": "SET forged 1",
    "get": "GET k1",
    "flushall": "FLUSHALL",
    "module load": "MODULE LOAD /tmp/x.so",
    "replicaof": "REPLICAOF 127.0.0.1 1",
    "shutdown": "SHUTDOWN NOSAVE",
}
# In the holder's namespace, on loopback, as the dump: loopback earns no trust either.
_REDIS_TRY = r"""
export REDISCLI_AUTH="$(cat /run/orkestr/$PASSWORD_FILE)"
try() {
  out=$(redis-cli --no-auth-warning -h 127.0.0.1 --user "$BACKUP_USER" $2 2>&1)
  if [[ $out == *NOPERM* || $out == *"not allowed"* ]]; then echo "$1|refused"
  else echo "$1|ALLOWED: $out"; fi
}
echo "can read|$(redis-cli --no-auth-warning -h 127.0.0.1 --user "$BACKUP_USER" PING)"
echo "no password|$(env -u REDISCLI_AUTH redis-cli -h 127.0.0.1 PING 2>&1)"
echo "none as admin|$(REDISCLI_AUTH= redis-cli -h 127.0.0.1 --user orkestr_admin PING 2>&1)"
"""


def attempts(script: str, tries: dict[str, str]) -> str:
    body = "".join(f"try {json.dumps(name)} {json.dumps(cmd)}\n" for name, cmd in tries.items())
    return script + body


def outcomes(output: str) -> dict[str, str]:
    return dict(line.split("|", 1) for line in output.splitlines() if "|" in line)


_RLS = """
CREATE TABLE orders(id int primary key, item text, visible bool);
INSERT INTO orders SELECT g, 'item-' || g, g <= 10 FROM generate_series(1, 300) g;
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
ALTER TABLE orders FORCE ROW LEVEL SECURITY;
CREATE POLICY only_visible ON orders USING (visible);
SELECT lo_from_bytea(4242, 'a large object');
"""


async def test_a_postgres_backup_container_can_read_and_nothing_more(
    stack: Stack, agent: AgentProcess
) -> None:
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    a = (await create_addon(c, p, "orders-db", "postgres"))["id"]
    await wait_phase(c, p, a, "ready")
    await sql(c, p, _RLS.replace("\n", " "))
    assert await sql(c, p, "select count(*) from orders") == "10"  # as the tenant: the policy

    backup, seen = await backup_seen(c, p, a)
    assert backup["state"] == "succeeded", backup
    assert backup["verified"] is True, backup["verify_error"]
    # Every row, past the forced policy the tenant itself is under.
    assert backup["counts"] == {"public.orders": 300}, backup["counts"]
    # On the project network, not in the holder's namespace, where the postgres image
    # trusts loopback for every role without a password (agent/backups.py, _dump_step).
    assert seen.network_mode == model.network_name(p), seen.network_mode
    got = outcomes(as_dump_container(agent, seen, attempts(_PG_TRY, PG_ATTEMPTS)))
    assert got.pop("can read") == "300"
    assert got == dict.fromkeys(PG_ATTEMPTS, "refused"), got
    no_admin_password(agent, a, seen)

    # The round trip: rows, policy and large object back after a change.
    await sql(c, p, "delete from orders where visible; select lo_unlink(4242)")
    done = await restore(c, p, a, backup["id"])
    assert done["state"] == "succeeded", done
    assert await sql(c, p, "select count(*) from orders") == "10"
    assert await sql(c, p, "select convert_from(lo_get(4242), 'UTF8')") == "a large object"
    admin = await asyncpg.connect(
        host=holder_ip(p, a), user=specs.ADMIN_USER, database="app",
        password=(agent.state_dir / "secrets" / a / "admin_password").read_text(),
    )  # fmt: skip
    try:
        assert await admin.fetchval("SELECT count(*) FROM orders") == 300
        assert await admin.fetchval(
            "SELECT relrowsecurity AND relforcerowsecurity FROM pg_class WHERE relname = 'orders'"
        )
    finally:
        await admin.close()


async def test_a_redis_backup_container_can_read_and_nothing_more(
    stack: Stack, agent: AgentProcess
) -> None:
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    a = (await create_addon(c, p, "cache", "redis"))["id"]
    await wait_phase(c, p, a, "ready")
    admin = (agent.state_dir / "secrets" / a / "admin_password").read_text()
    r = aioredis.Redis(host=holder_ip(p, a), username=specs.ADMIN_USER, password=admin)
    try:
        for i in range(20):
            await r.set(f"k{i}", f"v{i}")
        backup, seen = await backup_seen(c, p, a)
        assert backup["state"] == "succeeded", backup
        assert backup["verified"] is True, backup["verify_error"]
        holder = json.loads(docker("inspect", model.holder_name(a)))[0]["Id"]
        assert seen.network_mode == f"container:{holder}", seen.network_mode
        assert "ADDON_HOST" not in seen.env  # loopback: no address to be answered for
        got = outcomes(as_dump_container(agent, seen, attempts(_REDIS_TRY, REDIS_ATTEMPTS)))
        assert got.pop("can read") == "PONG"
        assert "NOAUTH" in got.pop("no password"), got
        assert "WRONGPASS" in got.pop("none as admin"), got
        assert got == dict.fromkeys(REDIS_ATTEMPTS, "refused"), got
        # Refused by the user's ACL itself, not only by the server's settings (MODULE and
        # DEBUG are off for everyone): Redis 7 says what the ACL would do with each.
        for command in REDIS_ATTEMPTS.values():
            verdict = await r.execute_command(
                "ACL", "DRYRUN", seen.env["BACKUP_USER"], *command.split()
            )
            assert b"no permissions" in verdict, (command, verdict)
        no_admin_password(agent, a, seen)
        assert await r.get("k1") == b"v1" and await r.get("forged") is None
        await r.flushall()
        done = await restore(c, p, a, backup["id"])
        assert done["state"] == "succeeded", done

        async def back() -> bool:
            try:
                return bool(await r.dbsize() == 20)
            except Exception:
                return False

        await wait_for(back, 60, "the restored keys")
    finally:
        await r.aclose()


async def test_an_addon_from_before_the_roles_gets_them_at_its_next_backup(
    stack: Stack, agent: AgentProcess
) -> None:
    """Its server without the roles and its host without their passwords, as an upgrade
    finds it: the backup asked for at once works, on the same database container."""
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    pg = (await create_addon(c, p, "old-db", "postgres"))["id"]
    rd = (await create_addon(c, p, "old-cache", "redis"))["id"]
    await wait_phase(c, p, pg, "ready")
    await wait_phase(c, p, rd, "ready")
    await sql(c, p, "create table t(x int); insert into t select generate_series(1, 42)")
    secrets = agent.state_dir / "secrets"
    before = {x: json.loads(docker("inspect", model.db_name(x)))[0]["Id"] for x in (pg, rd)}

    admin = await asyncpg.connect(
        host=holder_ip(p, pg), user=specs.ADMIN_USER, database="app",
        password=(secrets / pg / "admin_password").read_text(),
    )  # fmt: skip
    try:
        await admin.execute(
            "DROP OWNED BY orkestr_backup, orkestr_restore;"
            " DROP ROLE orkestr_backup; DROP ROLE orkestr_restore"
        )
    finally:
        await admin.close()
    r = aioredis.Redis(
        host=holder_ip(p, rd), username=specs.ADMIN_USER,
        password=(secrets / rd / "admin_password").read_text(),
    )  # fmt: skip
    try:
        await r.execute_command("ACL", "DELUSER", specs.BACKUP_USER)
    finally:
        await r.aclose()
    conf = secrets / rd / "redis.conf"
    conf.write_text(
        "".join(x for x in conf.read_text().splitlines(True) if "orkestr_backup" not in x)
    )
    for addon_id, users in ((pg, ("orkestr_backup", "orkestr_restore")), (rd, ("orkestr_backup",))):
        for user in users:
            (secrets / addon_id / user / "password").unlink()
            (secrets / addon_id / user).rmdir()

    for addon_id, counts in ((pg, {"public.t": 42}), (rd, None)):
        backup = await backup_now(c, p, addon_id)
        assert backup["state"] == "succeeded", backup
        assert backup["verified"] is True, backup["verify_error"]
        if counts is not None:
            assert backup["counts"] == counts
        assert json.loads(docker("inspect", model.db_name(addon_id)))[0]["Id"] == before[addon_id]
    assert "user orkestr_backup " in conf.read_text()  # for the next start too


async def test_a_restore_after_one_killed_mid_swap_runs_with_the_database_closed(
    stack: Stack, agent: AgentProcess
) -> None:
    """An agent killed between closing the live database and the swap leaves it closed;
    the restore's script opens it again first. The roles' step before the script must not
    need it open (it connects to `postgres`): it did, and the restore failed ('database
    "app" is not currently accepting connections')."""
    c = _c(stack)
    p = (await create_project(c, "team"))["id"]
    a = (await create_addon(c, p, "closed-db", "postgres"))["id"]
    await wait_phase(c, p, a, "ready")
    await sql(c, p, "create table t(x int); insert into t select generate_series(1, 7)")
    backup = await backup_now(c, p, a)
    assert backup["verified"] is True, backup
    await sql(c, p, "insert into t values (8)")
    docker("exec", model.db_name(a), "psql", "-U", specs.ADMIN_USER, "-d", "postgres", "-XAtc",
           "ALTER DATABASE app WITH ALLOW_CONNECTIONS false")  # fmt: skip
    done = await restore(c, p, a, backup["id"])
    assert done["state"] == "succeeded", done
    assert await sql(c, p, "select count(*) from t") == "7"
