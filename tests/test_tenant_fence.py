"""A hostile tenant, fenced in: what it runs (SQL, Redis commands, a job) stays inside.

Real controller, agent, dockerd and add-ons. Each test here failed on the main before
the fences: the tenant's role was a superuser, Redis's default user could CONFIG SET,
and no container had a pids limit, dropped capabilities or `no-new-privileges`.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from typing import Any

import asyncpg
import pytest

from agent import pg_passwords
from tests.agent_fixtures import (
    AgentProcess,
    Stack,
    create_addon,
    create_project,
    docker,
    more_passes,
    run_job,
    wait_for,
    wait_phase,
)

pytest_plugins = ["tests.agent_fixtures"]
# One agent for the module; a fresh one for a test marked `own_agent` (tests/agent_fixtures.py).
pytestmark = pytest.mark.shared_agent


def inspect(name: str) -> dict[str, Any]:
    return json.loads(docker("inspect", name))[0]  # type: ignore[no-any-return]


def attempt(label: str, command: str) -> str:
    """A shell step that prints `label=ok` or `label=refused: <error>`, and never fails."""
    return (
        f'if out=$({command} 2>&1) && ! printf %s "$out" | grep -qE "ERROR|ERR |NOPERM|denied"; '
        f'then echo "{label}=ok"; else printf "%s\\n" "{label}=refused: $(printf %s "$out" | tr "\\n" " ")"; fi; '
    )


def outcomes(output: str) -> dict[str, str]:
    found = {}
    for line in output.splitlines():
        label, sep, rest = line.partition("=")
        if sep and label.isidentifier():
            found[label] = rest
    return found


async def test_tenant_sql_and_redis_commands_stay_inside_their_database(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    pg = await create_addon(c, project["id"], "main-db", "postgres")
    rd = await create_addon(c, project["id"], "cache", "redis")
    await wait_phase(c, project["id"], pg["id"], "ready")
    await wait_phase(c, project["id"], rd["id"], "ready")

    psql = 'psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -tAc'
    rcli = 'redis-cli --no-auth-warning -u "$REDIS_URL"'
    script = "".join(
        [
            attempt(
                "sql", f'{psql} "create table t(x int); insert into t values (7); select x from t"'
            ),
            attempt(
                "superuser",
                f'{psql} "select rolsuper from pg_roles where rolname = current_user" | grep -qx f && echo no',
            ),
            attempt("copy_program", f"{psql} \"COPY (SELECT 1) TO PROGRAM 'id'\""),
            attempt("create_role", f'{psql} "CREATE ROLE intruder LOGIN"'),
            attempt("read_file", f"{psql} \"SELECT pg_read_file('/etc/passwd')\""),
            attempt("alter_self", f'{psql} "ALTER ROLE CURRENT_USER SUPERUSER"'),
            attempt("redis_set", f"{rcli} set k v"),
            attempt("redis_get", f"{rcli} get k"),
            attempt("redis_flushdb", f"{rcli} flushdb"),
            attempt("config_set", f"{rcli} config set dir /tmp"),
            attempt("shutdown", f"{rcli} shutdown nosave"),
            attempt("debug", f"{rcli} debug sleep 0"),
            attempt("module", f"{rcli} module list"),
            attempt("acl", f"{rcli} acl list"),
        ]
    )
    job = await run_job(c, project["id"], script)
    seen = outcomes(job["output"])
    for allowed in ("sql", "superuser", "redis_set", "redis_get", "redis_flushdb"):
        assert seen.get(allowed) == "ok", (allowed, job["output"])
    for refused in (
        "copy_program",
        "create_role",
        "read_file",
        "alter_self",
        "config_set",
        "shutdown",
        "debug",
        "module",
        "acl",
    ):
        assert seen.get(refused, "").startswith("refused"), (refused, job["output"])
    # The refused SHUTDOWN left Redis up, and the add-ons still answer.
    await wait_phase(c, project["id"], rd["id"], "ready")
    assert inspect(f"orkestr-{rd['id']}-db")["State"]["Running"]


def denied(label: str, command: str) -> str:
    """A shell step that prints `label=refused` when the server refused it by permission,
    else `label=allowed: <output>` (any other error, e.g. a timeout, is not a refusal)."""
    return (
        f"out=$({command} 2>&1); "
        f'if printf %s "$out" | grep -qiE "NOPERM|permission denied|must be superuser|must have admin option|no permissions|not allowed|only superusers"; '
        f'then echo "{label}=refused"; else printf "%s\\n" "{label}=allowed: $(printf %s "$out" | tr "\\n" " ")"; fi; '
    )


# What the security probe tried beyond the first fences; every one refused by permission.
_SQL_PROBES = {
    "lo_import": "SELECT lo_import('/etc/passwd')",
    "read_binary": "SELECT pg_read_binary_file('/etc/passwd')",
    "ls_dir": "SELECT pg_ls_dir('.')",
    "copy_from_file": "CREATE TEMP TABLE x(l text); COPY x FROM '/etc/passwd'",
    "copy_to_file": "COPY (SELECT 1) TO '/tmp/x'",
    "dblink": "CREATE EXTENSION dblink",
    "file_fdw": "CREATE EXTENSION file_fdw",
    "untrusted_language": "CREATE FUNCTION f() RETURNS int LANGUAGE c AS 'libc', 'getpid'",
    "alter_system": "ALTER SYSTEM SET log_statement = 'all'",
    "event_trigger": "CREATE FUNCTION et() RETURNS event_trigger LANGUAGE plpgsql AS 'BEGIN END'; CREATE EVENT TRIGGER et ON ddl_command_start EXECUTE FUNCTION et()",
    "session_authorization": "SET SESSION AUTHORIZATION orkestr_admin",
    "set_role_admin": "SET ROLE orkestr_admin",
    "grant_admin": "GRANT orkestr_admin TO CURRENT_USER",
    "other_database": "GRANT CONNECT ON DATABASE postgres TO CURRENT_USER",
    "server_program_role": "GRANT pg_execute_server_program TO CURRENT_USER",
    "replication": "ALTER ROLE CURRENT_USER REPLICATION",
    "createdb": "CREATE DATABASE other",
}
_REDIS_PROBES = {
    "replicaof": "replicaof no one",
    "migrate": "migrate 127.0.0.1 6380 k 0 100",
    "monitor": "monitor",
    "client_list": "client list",
    "client_kill": "client kill 127.0.0.1:1",
    "bgsave": "bgsave",
    "save": "save",
    "bgrewriteaof": "bgrewriteaof",
    "failover": "failover",
    "restore": "restore k2 0 x",
    "slowlog": "slowlog get",
    "latency": "latency latest",
    "acl_setuser": "acl setuser default +@all",
    "auth_admin": "acl getuser orkestr_admin",
    "eval_config": "eval \"return redis.call('config','set','dir','/tmp')\" 0",
    "eval_shutdown": "eval \"return redis.call('shutdown','nosave')\" 0",
}


async def test_the_wider_admin_paths_stay_closed_to_the_tenant(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    pg = await create_addon(c, project["id"], "wide-db", "postgres")
    rd = await create_addon(c, project["id"], "wide-cache", "redis")
    await wait_phase(c, project["id"], pg["id"], "ready")
    await wait_phase(c, project["id"], rd["id"], "ready")
    psql = 'psql "$DATABASE_URL" -X -tA'
    # MONITOR, if it were allowed, would stream until the timeout: the output then shows OK.
    rcli = 'timeout 5 redis-cli --no-auth-warning -u "$REDIS_URL"'
    steps = [denied(k, f'{psql} -c "{v}"') for k, v in _SQL_PROBES.items()]
    steps += [denied(k, f"{rcli} {v}") for k, v in _REDIS_PROBES.items()]
    seen: dict[str, str] = {}
    output = ""
    # A job's command is at most 4 KiB: the steps go as several jobs, submitted at once (the
    # project runs two at a time, the rest wait their turn) rather than one after another.
    jobs = await asyncio.gather(
        *(run_job(c, project["id"], "".join(steps[i : i + 8])) for i in range(0, len(steps), 8))
    )
    for job in jobs:
        seen |= outcomes(job["output"])
        output += job["output"]
    allowed = {k: seen.get(k) for k in [*_SQL_PROBES, *_REDIS_PROBES] if seen.get(k) != "refused"}
    assert not allowed, (allowed, output)
    await wait_phase(c, project["id"], rd["id"], "ready")


# Run by the tenant: its database's settings turned against the platform's own sessions.
# `public` ahead of pg_catalog makes its `pg_database_size(name)` the one the upkeep's
# superuser session calls each round; the function makes the tenant a superuser when a
# superuser calls it, and records who did.
_SEARCH_PATH_TRAP = r"""
CREATE TABLE public.trap_calls (by_user name, is_super boolean);
DO $d$ BEGIN
  EXECUTE format('ALTER DATABASE %I SET search_path = public, pg_catalog', current_database());
  EXECUTE format($f$
    CREATE FUNCTION public.pg_database_size(name) RETURNS bigint LANGUAGE plpgsql AS $b$
    DECLARE su boolean := (SELECT rolsuper FROM pg_catalog.pg_roles
                           WHERE rolname = current_user);
    BEGIN
      INSERT INTO public.trap_calls VALUES (current_user, su);
      IF su THEN EXECUTE 'ALTER ROLE %I SUPERUSER'; END IF;
      RETURN 1;
    END $b$ $f$, current_user);
  GRANT INSERT ON public.trap_calls TO PUBLIC;
END $d$;
"""

# Settings that would run the platform's session as the tenant, or stop its statements.
_SETTINGS_TRAP = r"""
DO $d$ BEGIN
  EXECUTE format('ALTER DATABASE %I SET role = %L', current_database(), current_user);
  EXECUTE format('ALTER DATABASE %I SET statement_timeout = 1', current_database());
  EXECUTE format('ALTER DATABASE %I SET default_transaction_read_only = on',
                 current_database());
END $d$;
"""


async def test_the_tenants_database_settings_do_not_reach_the_platforms_sessions(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    # Each trap in an add-on of its own (a search path that would run the tenant's function
    # as the platform's superuser; settings that would run its session as the tenant or stop
    # its statements), set at once: the same upkeep rounds run against both.
    traps = {"search_path": _SEARCH_PATH_TRAP, "settings": _SETTINGS_TRAP}
    projects = {k: (await create_project(c, "team"))["id"] for k in traps}
    pgs = {k: (await create_addon(c, projects[k], "trap-db", "postgres"))["id"] for k in traps}
    for k in traps:
        await wait_phase(c, projects[k], pgs[k], "ready")
    psql = 'psql "$DATABASE_URL" -X -v ON_ERROR_STOP=1 -tA'

    mark = len(agent.log_path.read_text(errors="replace"))
    jobs = await asyncio.gather(
        *(run_job(c, projects[k], f"{psql} <<'SQL'\n{trap}\nSQL\n") for k, trap in traps.items())
    )
    for job in jobs:
        assert job["state"] == "succeeded", job["output"]
    # Upkeep rounds run with the passes: several of them against each trap.
    await more_passes(agent, 6, timeout=60)

    check = (
        f"{psql} -c \"select 'super=' || rolsuper from pg_roles where rolname = current_user\"; "
        f"{psql} -c \"select 'calls=' || count(*) filter (where is_super) from trap_calls\""
    )
    seen = outcomes((await run_job(c, projects["search_path"], check))["output"])
    assert seen.get("super") == "false", seen
    assert seen.get("calls") == "0", seen  # the platform never called the tenant's function

    pg = pgs["settings"]
    failed = [
        line
        for line in agent.log_path.read_text(errors="replace")[mark:].splitlines()
        if "upkeep.failed" in line and pg in line
    ]
    assert not failed, failed[:3]
    # The platform's session still sees the real size, as its own role.
    view = await wait_phase(c, projects["settings"], pg, "ready")
    assert (view.get("usage_bytes") or 0) > 1_000_000, view


# Run by the tenant, as its database's owner: every setting that shuts it out of its own
# database (the platform's superuser is exempt from each, so the add-on still looks ready).
_LOCKOUT = r"""
DO $d$ BEGIN
  EXECUTE format('ALTER DATABASE %I IS_TEMPLATE true', current_database());
  EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM PUBLIC, %I', current_database(), current_user);
  EXECUTE format('ALTER DATABASE %I CONNECTION LIMIT 0', current_database());
END $d$;
"""

_DATABASE_STATE = (
    "select 'state=' || datconnlimit || ',' || datallowconn || ',' || datistemplate"
    " || ',' || has_database_privilege(current_user, oid, 'CONNECT')"
    " from pg_database where datname = current_database()"
)


@pytest.mark.own_agent
async def test_a_tenant_that_shuts_itself_out_of_its_database_is_let_back_in(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    pg = await create_addon(c, project["id"], "lock-db", "postgres")
    await wait_phase(c, project["id"], pg["id"], "ready")
    psql = 'psql "$DATABASE_URL" -X -v ON_ERROR_STOP=1 -tA'
    mark = len(agent.log_path.read_text(errors="replace"))
    # ALLOW_CONNECTIONS false is refused from the database itself (the only one it reaches).
    script = (
        f"{psql} -c \"DO \\$d\\$ BEGIN EXECUTE format('ALTER DATABASE %I ALLOW_CONNECTIONS false',"
        f" current_database()); END \\$d\\$\" 2>&1 | head -1 | sed 's/^/allow=/'; "
        f"{psql} <<'SQL'\n{_LOCKOUT}\nSQL\n"
        # Shut out at once: a new session is refused.
        f"{psql} -c 'select 1' >/dev/null 2>&1 && echo after=connected || echo after=refused\n"
    )
    job = await run_job(c, project["id"], script)
    seen = outcomes(job["output"])
    assert "cannot disallow connections" in seen.get("allow", ""), job["output"]
    assert seen.get("after") == "refused", job["output"]

    async def back_in() -> dict[str, str] | None:
        found = outcomes(
            (await run_job(c, project["id"], f'{psql} -c "{_DATABASE_STATE}"'))["output"]
        )
        return found if found.get("state") else None

    # Upkeep rounds run with the passes; the next ones put the platform's settings back.
    await more_passes(agent, 3, timeout=60)
    seen = await wait_for(back_in, 90, "the tenant connects to its database again")
    assert seen["state"] == "-1,true,false,true", seen
    restored = [
        line
        for line in agent.log_path.read_text(errors="replace")[mark:].splitlines()
        if "upkeep.database_setting_restored" in line and pg["id"] in line
    ]
    found = " ".join(restored)
    for what in ("connection_limit=0", "is_template=true", "connect=revoked"):
        assert f"found={what}" in found, restored
    # Level-triggered, not repeated: a round with nothing to undo logs nothing.
    mark = len(agent.log_path.read_text(errors="replace"))
    await more_passes(agent, 2, timeout=60)
    again = agent.log_path.read_text(errors="replace")[mark:]
    assert f"upkeep.database_setting_restored addon={pg['id']}" not in again


def admin_sql(addon_id: str, statement: str) -> str:
    """The add-on's server as the platform's superuser, from the test (the agent never
    execs into a tenant's container)."""
    return docker(
        "exec", f"orkestr-{addon_id}-db", "psql", "-U", "orkestr_admin", "-d", "postgres",
        "-XAtc", statement,
    )  # fmt: skip


async def test_a_password_the_tenant_sets_on_its_role_is_put_back(
    stack: Stack, agent: AgentProcess
) -> None:
    """The security note: a tenant may `ALTER ROLE CURRENT_USER PASSWORD` (no privilege
    needed): the credentials the API shows stopped working, and a retired login role
    could be given a password again. The upkeep round puts the platform's back."""
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    pg = await create_addon(c, project["id"], "pw-db", "postgres")
    await wait_phase(c, project["id"], pg["id"], "ready")
    _, env = await c.api("GET", f"/v1/projects/{project['id']}/env")
    url = urllib.parse.urlsplit(env["env"]["DATABASE_URL"])
    role, shown = url.username, urllib.parse.unquote(url.password or "")
    assert role == "app" and shown
    # The check's arithmetic against the real server's verifier (SCRAM-SHA-256).
    verifier = admin_sql(pg["id"], f"select rolpassword from pg_authid where rolname = '{role}'")
    assert verifier.startswith("SCRAM-SHA-256$"), verifier
    assert pg_passwords.verifier_matches(verifier, shown, role)
    assert not pg_passwords.verifier_matches(verifier, shown + "x", role)
    await more_passes(agent, 2, timeout=60)
    assert f"upkeep.password_restored addon={pg['id']}" not in agent.log_tail(2000)

    mark = len(agent.log_path.read_text(errors="replace"))
    psql = 'psql "$DATABASE_URL" -X -v ON_ERROR_STOP=1 -tA'
    job = await run_job(
        c, project["id"], f"{psql} -c \"ALTER ROLE CURRENT_USER PASSWORD 'tenant-chosen-1'\""
    )
    assert job["state"] == "succeeded", job  # allowed: it is the tenant's own role
    # A retired login role (as one a rotation cleared) given a password by a session
    # kept open past the rotation; made here as the superuser, the tenant's way needs
    # the rotation's grace to run out.
    admin_sql(pg["id"], "CREATE ROLE app_rot LOGIN PASSWORD 'kept-open-2' IN ROLE app")

    tenant_url = env["env"]["DATABASE_URL"].replace(f":{url.password}@", ":tenant-chosen-1@", 1)

    async def put_back() -> dict[str, str] | None:
        job = await run_job(
            c,
            project["id"],
            attempt("shown", f'{psql} -c "select 1"')
            + attempt("chosen", f"psql '{tenant_url}' -X -tA -c 'select 1'"),
        )
        seen = outcomes(job["output"])
        return seen if seen.get("shown") == "ok" else None

    await more_passes(agent, 2, timeout=60)
    seen = await wait_for(put_back, 90, "the shown credentials working again")
    assert seen["chosen"].startswith("refused"), seen
    assert admin_sql(pg["id"], "select rolpassword is null from pg_authid "
                               "where rolname = 'app_rot'") == "t"  # fmt: skip
    log = agent.log_path.read_text(errors="replace")[mark:]
    assert f"upkeep.password_restored addon={pg['id']} role=app" in log, log[-2000:]
    assert f"upkeep.retired_password_cleared addon={pg['id']} role=app_rot" in log
    # Level-triggered, not repeated: a round with nothing to undo logs nothing.
    mark = len(agent.log_path.read_text(errors="replace"))
    await more_passes(agent, 2, timeout=60)
    again = agent.log_path.read_text(errors="replace")[mark:]
    assert f"upkeep.password_restored addon={pg['id']}" not in again, again
    assert f"upkeep.retired_password_cleared addon={pg['id']}" not in again, again


def _audit_common(info: dict[str, Any], what: str) -> None:
    hc = info["HostConfig"]
    assert hc["PidsLimit"] and hc["PidsLimit"] > 0, (what, hc["PidsLimit"])
    assert hc["CapDrop"] == ["ALL"], (what, hc["CapDrop"])
    assert "no-new-privileges:true" in (hc["SecurityOpt"] or []), (what, hc["SecurityOpt"])
    assert hc["LogConfig"]["Config"].get("max-size"), (what, hc["LogConfig"])
    assert hc["LogConfig"]["Config"].get("max-file"), (what, hc["LogConfig"])
    assert hc["PublishAllPorts"] is False and not hc["PortBindings"], what
    assert not hc["Privileged"], what


def _process_uids(name: str) -> dict[str, int]:
    rows = docker("top", name, "-eo", "pid,uid,comm").splitlines()[1:]
    return {comm: int(uid) for _pid, uid, comm in (r.split(None, 2) for r in rows)}


async def test_hardening_audit_of_every_container_kind(stack: Stack, agent: AgentProcess) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    pg = await create_addon(c, project["id"], "audit-db", "postgres")
    rd = await create_addon(c, project["id"], "audit-cache", "redis")
    await wait_phase(c, project["id"], pg["id"], "ready")
    await wait_phase(c, project["id"], rd["id"], "ready")

    for a in (pg, rd):
        holder = inspect(f"orkestr-{a['id']}-net")
        _audit_common(holder, "holder")
        assert holder["Config"]["User"] == "65534:65534"
        assert holder["HostConfig"]["ReadonlyRootfs"] is True
        assert not holder["HostConfig"]["CapAdd"]
        # No anonymous volume from the image's VOLUME declaration.
        assert all(m["Type"] != "volume" for m in holder["Mounts"]), holder["Mounts"]

        db = inspect(f"orkestr-{a['id']}-db")
        _audit_common(db, "db")
        assert db["HostConfig"]["ReadonlyRootfs"] is True
        assert set(db["HostConfig"]["CapAdd"]) <= {
            "CHOWN",
            "DAC_OVERRIDE",
            "FOWNER",
            "SETGID",
            "SETUID",
        }
        server = "postgres" if a is pg else "redis-server"
        uids = _process_uids(db["Name"].lstrip("/"))
        assert uids and server in uids, uids
        assert all(uid != 0 for uid in uids.values()), uids
        # The password is nowhere in the container's configuration.
        env = " ".join(db["Config"]["Env"] or [])
        assert "PASSWORD=" not in env, env

    status, body = await c.api(
        "POST",
        f"/v1/projects/{project['id']}/jobs",
        {"image": "orkestr-local/toolbox:bookworm", "command": ["sleep", "60"], "timeout_s": 60},
    )
    assert status == 201, body
    name = f"orkestr-job-{body['id']}"
    await wait_for(lambda: docker("ps", "-q", "--filter", f"name={name}"), 60, "job running")
    job = inspect(name)
    _audit_common(job, "job")
    assert job["Config"]["User"] == "65534:65534"
    assert job["HostConfig"]["NanoCpus"] == 1_000_000_000  # the team plan's cpus in the tests
    assert job["HostConfig"]["Memory"] == 512 * 1024 * 1024
    assert not job["HostConfig"]["CapAdd"]
    await c.api("DELETE", f"/v1/projects/{project['id']}/jobs/{body['id']}")
    docker("rm", "-f", name, check=False)


async def test_fork_bomb_in_a_job_is_capped_and_a_neighbour_keeps_answering(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    pg = await create_addon(c, project["id"], "calm-db", "postgres")
    await wait_phase(c, project["id"], pg["id"], "ready")
    status, env = await c.api("GET", f"/v1/projects/{project['id']}/env")
    assert status == 200
    url = urllib.parse.urlparse(env["env"]["DATABASE_URL"])
    ip = inspect(f"orkestr-{pg['id']}-net")["NetworkSettings"]["Networks"][
        f"orkestr-{project['id']}"
    ]["IPAddress"]

    status, body = await c.api(
        "POST",
        f"/v1/projects/{project['id']}/jobs",
        {
            "image": "orkestr-local/toolbox:bookworm",
            "command": ["bash", "-c", "bomb() { bomb | bomb & }; bomb; sleep 30"],
            "timeout_s": 20,
        },
    )
    assert status == 201, body
    name = f"orkestr-job-{body['id']}"
    limit = 0
    peak = 0

    async def bombing() -> bool:
        nonlocal limit, peak
        out = docker("inspect", "-f", "{{.Id}} {{.HostConfig.PidsLimit}}", name, check=False)
        if not out:
            return False
        cid, limit_s = out.split()
        limit = int(limit_s)
        try:
            with open(f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/pids.current") as f:
                peak = max(peak, int(f.read()))
        except OSError:
            stats = docker("stats", "--no-stream", "--format", "{{.PIDs}}", name, check=False)
            peak = max(peak, int(stats or 0))
        return peak >= limit - 8

    await wait_for(bombing, 60, "fork bomb at its pids limit")
    assert 0 < peak <= limit, (peak, limit)
    # The neighbour answers real queries while the bomb runs.
    for _ in range(5):
        conn = await asyncpg.connect(
            host=ip,
            port=5432,
            user=url.username,
            password=url.password,
            database=url.path.lstrip("/"),
            ssl=False,
            timeout=5,
        )
        assert await conn.fetchval("select 1") == 1
        await conn.close()
    await c.api("DELETE", f"/v1/projects/{project['id']}/jobs/{body['id']}")
    docker("rm", "-f", name, check=False)


async def test_a_job_cannot_fill_the_hosts_disk(stack: Stack, agent: AgentProcess) -> None:
    """A job's writable root was the host's disk (Docker's overlay layer, beside every
    add-on's filesystem image, the agent's state and the controller's database): `/tmp`
    and `/var/tmp` took writes as far as the disk went. Its root is read-only now, and
    its scratch directories are tmpfs that count against the job's memory."""
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    script = (
        # Directories this job may write to that are not tmpfs (none, now).
        "on_disk=; for d in $(find / -xdev -type d -writable 2>/dev/null); do "
        '[ "$(stat -f -c %T $d)" = tmpfs ] || on_disk="$on_disk $d"; done; '
        'echo "on_disk=$on_disk"; '
        'echo "tmp=$(stat -f -c %T /tmp)"; echo "var_tmp=$(stat -f -c %T /var/tmp)"; '
        # Scratch still works, within the job's memory.
        "dd if=/dev/zero of=/tmp/fill bs=1M count=100 2>/dev/null; "
        'echo "written=$(($(stat -c %s /tmp/fill) / 1048576))"'
    )
    job = await run_job(c, project["id"], script)
    seen = outcomes(job["output"])
    assert seen.get("on_disk") == "", job["output"]
    assert seen.get("tmp") == "tmpfs" and seen.get("var_tmp") == "tmpfs", job["output"]
    assert seen.get("written") == "100", job["output"]


async def test_job_images_come_from_the_allowlist_by_name(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    url = f"/v1/projects/{project['id']}/jobs"
    toolbox_id = docker("image", "inspect", "-f", "{{.Id}}", "orkestr-local/toolbox:bookworm")
    short = toolbox_id.removeprefix("sha256:")[:12]
    for image, why in (
        ("0", "looks like an image id"),
        (short, "looks like an image id"),
        (toolbox_id, "looks like an image id"),
        ("Orkestr-Local/Toolbox:bookworm", "not a valid image reference"),
        ("orkestr-local/base:bookworm", "not allowed on this platform"),
        ("busybox", "not allowed on this platform"),
    ):
        status, body = await c.api("POST", url, {"image": image, "command": ["true"]})
        assert status == 422, (image, body)
        assert why in body["message"], (image, body)
    ok = await run_job(c, project["id"], "echo allowed")
    assert ok["state"] == "succeeded" and "allowed" in ok["output"], ok
