"""Plans that hold, against real add-ons: plan changes in place, storage quotas that refuse
writes without losing data, password rotation with a grace period, project deletion and
deletion protection.

Real controller, agent, dockerd, Postgres and Redis. The plans here have tiny storage
quotas so a job fills them in seconds.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, OutOfMemoryError, RedisError

from agent.secrets import SecretStore
from agent.specs import ADMIN_USER
from tests.agent_fixtures import (
    TOOLBOX,
    AgentProcess,
    Stack,
    addon,
    create_addon,
    create_project,
    docker,
    has_capability,
    more_passes,
    run_job,
    wait_for,
    wait_phase,
)
from tests.services import ControllerProcess

pytest_plugins = ["tests.agent_fixtures"]
# One agent for the module (no test stops or reconfigures it); each test's projects are
# deleted, and gone from Docker, at its end (tests/agent_fixtures.py).
pytestmark = pytest.mark.shared_agent

GRACE_S = 8.0
MIB = 1024 * 1024
# An empty Postgres 15 database takes about 7.5 MB: `small` leaves a few MB to fill.
PLANS = """
[small]
max_addons = 1
cpus = 0.5
memory_mb = 256
storage_mb = 12
sleep = { enabled = false }

[big]
max_addons = 2
cpus = 1.0
memory_mb = 512
storage_mb = 64
sleep = { enabled = false }

# Its storage quota is big's, but a Redis holds its data in memory: 48 MB (75 % of 64).
[lean]
max_addons = 1
cpus = 0.5
memory_mb = 64
storage_mb = 64
sleep = { enabled = false }
"""


class GraceController(ControllerProcess):
    """The operator's rotation grace period, short enough to wait for."""

    def config_text(self) -> str:
        return (
            super()
            .config_text()
            .replace("[secrets]\n", f"[secrets]\nrotation_grace_s = {GRACE_S}\n", 1)
        )


class GraceStack(Stack):
    controller_class = GraceController


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[Stack]:
    s = GraceStack(PLANS)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


def inspect(name: str) -> dict[str, Any]:
    return json.loads(docker("inspect", name))[0]  # type: ignore[no-any-return]


def holder_ip(addon_id: str) -> str:
    networks = inspect(f"orkestr-{addon_id}-net")["NetworkSettings"]["Networks"]
    return str(next(iter(networks.values()))["IPAddress"])


async def env(c: ControllerProcess, project_id: str) -> dict[str, str]:
    status, body = await c.api("GET", f"/v1/projects/{project_id}/env")
    assert status == 200, body
    return body["env"]  # type: ignore[no-any-return]


def condition(view: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in view["conditions"] if c["type"] == type_), None)


async def wait_condition(
    c: ControllerProcess,
    project_id: str,
    addon_id: str,
    type_: str,
    reason: str,
    timeout: float = 90,
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        view = await addon(c, project_id, addon_id)
        found = condition(view, type_)
        last.append((view["usage_bytes"], view["quota_bytes"], found))
        return view if found is not None and found["reason"] == reason else None

    last: list[Any] = []
    try:
        return await wait_for(check, timeout, f"{type_} {reason}")  # type: ignore[no-any-return]
    except AssertionError:
        raise AssertionError(f"{type_} {reason}: last seen {last[-1:]}") from None


PSQL = 'psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -tAc'


# --- plan changes ------------------------------------------------------------------------


async def test_plan_change_resizes_in_place_and_a_downgrade_that_does_not_fit_is_refused(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "small")
    pg = await create_addon(c, project["id"], "main-db", "postgres")
    await wait_phase(c, project["id"], pg["id"], "ready")
    db = f"orkestr-{pg['id']}-db"
    before = inspect(db)
    assert before["HostConfig"]["NanoCpus"] == 500_000_000
    assert before["HostConfig"]["Memory"] == 256 * MIB

    status, body = await c.api("PATCH", f"/v1/projects/{project['id']}", {"plan": "big"})
    assert status == 200 and body["plan"] == "big", body

    def resized() -> dict[str, Any] | None:
        info = inspect(db)
        hc = info["HostConfig"]
        return info if hc["NanoCpus"] == 1_000_000_000 and hc["Memory"] == 512 * MIB else None

    after = await wait_for(resized, 60, "limits updated in place")
    # The same container, never restarted.
    assert after["Id"] == before["Id"]
    assert after["State"]["StartedAt"] == before["State"]["StartedAt"]
    assert after["RestartCount"] == before["RestartCount"]
    view = await addon(c, project["id"], pg["id"])
    assert view["resources"] == {"cpus": 1.0, "memory_mb": 512}

    # Two add-ons and 20 MB of data: the small plan fits neither.
    rd = await create_addon(c, project["id"], "cache", "redis")
    await wait_phase(c, project["id"], rd["id"], "ready")
    if (os.cpu_count() or 1) >= 2:
        # Home cores (agent/placement.py): two 1-CPU add-ons on different cores, set in
        # place by their upkeep rounds; the first one was never restarted for it.
        def homes() -> tuple[str, str] | None:
            a = inspect(db)["HostConfig"].get("CpusetCpus") or ""
            b = inspect(f"orkestr-{rd['id']}-db")["HostConfig"].get("CpusetCpus") or ""
            return (a, b) if a and b and a != b and "-" not in a + b else None

        await wait_for(homes, 60, "the two add-ons on different home cores")
        assert inspect(db)["State"]["StartedAt"] == before["State"]["StartedAt"]
    job = await run_job(
        c,
        project["id"],
        f"{PSQL} \"create table filler as select repeat('x', 1000) as pad "
        f'from generate_series(1, 14000)" && echo filled',
    )
    assert "filled" in job["output"], job

    async def measured() -> bool:
        v = await addon(c, project["id"], pg["id"])
        return bool(v["usage_bytes"] and v["usage_bytes"] > 12 * MIB)

    await wait_for(measured, 60, "usage over the small plan's quota measured")
    status, body = await c.api("PATCH", f"/v1/projects/{project['id']}", {"plan": "small"})
    assert status == 409, body
    assert body["error"] == "plan_change_refused"
    assert "allows 1 add-on(s) and the project has 2" in body["message"], body
    assert "allows 12 MB per add-on and add-on 'main-db' uses" in body["message"], body
    # Nothing changed: the plan, the limits.
    status, shown = await c.api("GET", f"/v1/projects/{project['id']}")
    assert shown["plan"] == "big"
    await more_passes(agent, 2)  # a whole agent pass after the refusal
    assert inspect(db)["HostConfig"]["NanoCpus"] == 1_000_000_000

    status, body = await c.api("PATCH", f"/v1/projects/{project['id']}", {"plan": "nope"})
    assert status == 422 and "unknown plan" in body["message"], body


# --- storage quotas ------------------------------------------------------------------------


async def test_postgres_over_quota_refuses_writes_keeps_reads_and_data_then_reinstates(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "small")
    pg = await create_addon(c, project["id"], "main-db", "postgres")
    await wait_phase(c, project["id"], pg["id"], "ready")
    fill = (
        f'{PSQL} "create table kept(id int primary key, v text); '
        f"insert into kept select g, 'row ' || g from generate_series(1, 1000) g; "
        f"create table filler as select repeat(md5(g::text), 40) as pad "
        f'from generate_series(1, 4000) g" && echo filled'
    )
    job = await run_job(c, project["id"], fill)
    assert "filled" in job["output"], job
    view = await wait_condition(c, project["id"], pg["id"], "StorageQuota", "Exceeded")
    assert view["usage_bytes"] >= view["quota_bytes"] == 12 * MIB, view

    probe = (
        f"{PSQL} \"insert into kept values (5000, 'late')\" 2>&1; "
        f"{PSQL} \"update kept set v = 'x' where id = 1\" 2>&1; "
        f'{PSQL} "create table more(x int)" 2>&1; '
        f'echo "count=$({PSQL} "select count(*) from kept")"'
    )
    job = await run_job(c, project["id"], probe)
    out = job["output"]
    assert out.count("storage quota exceeded: plan 'small' allows 12 MB") == 3, out
    assert "count=1000" in out, out

    # The database itself is intact: amcheck of every relation, heap and B-tree.
    db = f"orkestr-{pg['id']}-db"
    check = docker(
        "exec",
        db,
        "pg_amcheck",
        "-U",
        "orkestr_admin",
        "-d",
        "app",
        "--heapallindexed",
        "--install-missing",
        check=False,
    )
    assert "error" not in check.lower() and "corrupt" not in check.lower(), check
    assert inspect(db)["State"]["Running"] and inspect(db)["RestartCount"] == 0

    # Dropping the filler frees the space: writes come back without anyone's help.
    job = await run_job(c, project["id"], f'{PSQL} "drop table filler" && echo dropped')
    assert "dropped" in job["output"], job
    await wait_condition(c, project["id"], pg["id"], "StorageQuota", "WithinQuota")
    job = await run_job(
        c,
        project["id"],
        f"{PSQL} \"insert into kept values (5000, 'late'); select count(*) from kept\"",
    )
    assert job["exit_code"] == 0 and "1001" in job["output"], job


async def test_postgres_writes_come_back_when_the_plan_grows(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "small")
    pg = await create_addon(c, project["id"], "main-db", "postgres")
    await wait_phase(c, project["id"], pg["id"], "ready")
    job = await run_job(
        c,
        project["id"],
        f'{PSQL} "create table filler as select repeat(md5(g::text), 40) as pad '
        f'from generate_series(1, 4000) g" && echo filled',
    )
    assert "filled" in job["output"], job
    await wait_condition(c, project["id"], pg["id"], "StorageQuota", "Exceeded")
    status, body = await c.api("PATCH", f"/v1/projects/{project['id']}", {"plan": "big"})
    assert status == 200, body
    view = await wait_condition(c, project["id"], pg["id"], "StorageQuota", "WithinQuota")
    assert view["quota_bytes"] == 64 * MIB
    job = await run_job(c, project["id"], f"{PSQL} \"insert into filler values ('z')\"")
    assert job["exit_code"] == 0, job


async def test_redis_over_quota_refuses_writes_keeps_reads_then_reinstates(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "small")
    rd = await create_addon(c, project["id"], "cache", "redis")
    await wait_phase(c, project["id"], rd["id"], "ready")
    await wait_condition(c, project["id"], rd["id"], "StorageQuota", "WithinQuota")
    url = urllib.parse.urlsplit((await env(c, project["id"]))["REDIS_URL"])
    # The writes come from here, not from a job: 150 redis-cli runs of 100 KB each in a
    # job held at the plan's 0.5 CPU took minutes on a loaded 2-core machine.
    client = aioredis.Redis(
        host=holder_ip(rd["id"]),
        port=6379,
        username="default",
        password=urllib.parse.unquote(url.password or ""),
        socket_timeout=30,
    )
    try:
        refused = []
        for i in range(150):
            try:
                await client.set(f"k{i}", b"a" * 100_000)
            except OutOfMemoryError as exc:  # Redis's "OOM command not allowed ..."
                refused.append(str(exc))
        assert refused and all("maxmemory" in e for e in refused), refused[:3]
        size = await client.dbsize()
        assert 50 <= size < 150, size  # some writes landed, the rest were refused
        assert await client.strlen("k0") == 100_000  # reads work
        view = await wait_condition(c, project["id"], rd["id"], "StorageQuota", "Exceeded")
        assert view["quota_bytes"] == 12 * MIB
        assert await client.dbsize() == size  # nothing was evicted
        await client.delete(*(f"k{i}" for i in range(150)))
        assert await client.set("x", "y")
    finally:
        await client.aclose()
    await wait_condition(c, project["id"], rd["id"], "StorageQuota", "WithinQuota")
    # The quota is in redis.conf too, for the next start (a deep wake is one), and it
    # follows a plan change made while the add-on runs.
    secrets = SecretStore(agent.state_dir / "secrets")
    assert secrets.redis_maxmemory(rd["id"]) == 12 * MIB
    status, body = await c.api("PATCH", f"/v1/projects/{project['id']}", {"plan": "big"})
    assert status == 200, body

    async def upgraded() -> bool:
        return bool((await addon(c, project["id"], rd["id"]))["quota_bytes"] == 64 * MIB)

    await wait_for(upgraded, 90, "the upgrade's quota in the status")
    assert secrets.redis_maxmemory(rd["id"]) == 64 * MIB

    # A redis.conf written before `save ""` (the AOF alone persists): a restarted server
    # has Redis's default RDB save points until the upkeep turns them off.
    conf = agent.state_dir / "secrets" / rd["id"] / "redis.conf"
    conf.write_text(conf.read_text().replace('save ""\n', ""))
    docker("restart", "-t", "1", f"orkestr-{rd['id']}-db")
    admin = aioredis.Redis(
        host=holder_ip(rd["id"]),
        username=ADMIN_USER,
        password=secrets.admin_password(rd["id"]),
        socket_timeout=10,
    )

    async def no_save_points() -> bool:
        try:
            return bool(await admin.config_get("save") == {"save": ""})
        except RedisError:
            return False  # still starting

    try:
        await wait_for(no_save_points, 60, "the upkeep's CONFIG SET save")
    finally:
        await admin.aclose()


async def test_a_downgrade_whose_memory_a_redis_would_not_fit_is_refused(
    stack: Stack, agent: AgentProcess
) -> None:
    # A Redis's quota is also 75 % of its memory: moved to a plan whose memory its data
    # does not fit, it would refuse every write at once, or be OOM-killed by the smaller
    # container limit and fail to load its data again. The storage quota alone said yes.
    c = stack.controller
    assert c is not None
    project = await create_project(c, "big")
    rd = await create_addon(c, project["id"], "cache", "redis")
    await wait_phase(c, project["id"], rd["id"], "ready")
    url = urllib.parse.urlsplit((await env(c, project["id"]))["REDIS_URL"])
    client = aioredis.Redis(
        host=holder_ip(rd["id"]),
        port=6379,
        username="default",
        password=urllib.parse.unquote(url.password or ""),
        socket_timeout=30,
    )
    try:
        for i in range(52):
            await client.set(f"k{i}", b"m" * 1_000_000)  # jemalloc: 1 MiB each
        before = await client.dbsize()
    finally:
        await client.aclose()

    async def measured() -> bool:
        v = await addon(c, project["id"], rd["id"])
        return bool(v["usage_bytes"] and v["usage_bytes"] > 50 * MIB)

    await wait_for(measured, 60, "the Redis's usage over 48 MB measured")
    db = f"orkestr-{rd['id']}-db"
    started = inspect(db)["State"]["StartedAt"]
    status, body = await c.api("PATCH", f"/v1/projects/{project['id']}", {"plan": "lean"})
    assert status == 409, body
    assert body["error"] == "plan_change_refused"
    assert "allows 48 MB to Redis add-on 'cache' (75 % of its 64 MB memory)" in body["message"]
    status, shown = await c.api("GET", f"/v1/projects/{project['id']}")
    assert shown["plan"] == "big"
    await more_passes(agent, 2)  # a whole pass after the refusal: nothing resized or restarted
    info = inspect(db)
    assert info["HostConfig"]["Memory"] == 512 * MIB
    assert info["State"]["StartedAt"] == started and info["State"]["Running"]
    job = await run_job(c, project["id"], 'redis-cli -u "$REDIS_URL" --no-auth-warning dbsize')
    assert job["output"].strip() == str(before), job


# --- rotation --------------------------------------------------------------------------------


async def test_rotation_new_password_works_old_one_stops_after_the_grace_open_sessions_stay(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "big")
    pg = await create_addon(c, project["id"], "main-db", "postgres")
    rd = await create_addon(c, project["id"], "cache", "redis")
    await wait_phase(c, project["id"], pg["id"], "ready")
    await wait_phase(c, project["id"], rd["id"], "ready")
    old = await env(c, project["id"])
    pg_ip, rd_ip = holder_ip(pg["id"]), holder_ip(rd["id"])
    old_pg = urllib.parse.urlsplit(old["DATABASE_URL"])
    old_rd = urllib.parse.urlsplit(old["REDIS_URL"])

    async def pg_connect(url: urllib.parse.SplitResult) -> asyncpg.Connection:
        return await asyncpg.connect(
            host=pg_ip,
            port=5432,
            user=urllib.parse.unquote(url.username or ""),
            password=urllib.parse.unquote(url.password or ""),
            database="app",
            ssl=False,
            timeout=5,
        )

    def rd_client(url: urllib.parse.SplitResult) -> aioredis.Redis:
        return aioredis.Redis(
            host=rd_ip,
            port=6379,
            username="default",
            password=urllib.parse.unquote(url.password or ""),
            socket_timeout=5,
        )

    # Sessions opened with the old password, kept across the whole rotation.
    pg_session = await pg_connect(old_pg)
    await pg_session.execute("create table t(x int)")
    rd_session = rd_client(old_rd)
    await rd_session.set("k", "v")
    try:
        for a in (pg, rd):
            status, body = await c.api(
                "POST", f"/v1/projects/{project['id']}/addons/{a['id']}/rotate-credentials"
            )
            assert status == 202 and body["secret_version"] == 2, body
        new = await env(c, project["id"])
        assert new["DATABASE_URL"] != old["DATABASE_URL"]
        assert new["REDIS_URL"] != old["REDIS_URL"]
        new_pg = urllib.parse.urlsplit(new["DATABASE_URL"])
        new_rd = urllib.parse.urlsplit(new["REDIS_URL"])

        async def new_works() -> bool:
            try:
                conn = await pg_connect(new_pg)
            except (asyncpg.PostgresError, OSError):
                return False
            try:
                # The rotation role acts as the tenant's own: it owns what it makes.
                await conn.execute("insert into t values (1); create table u(x int)")
                owner = await conn.fetchval(
                    "select tableowner from pg_tables where tablename = 'u'"
                )
                assert owner == "app", owner
            finally:
                await conn.close()
            client = rd_client(new_rd)
            try:
                return bool(await client.ping())
            except RedisError:
                return False
            finally:
                await client.aclose()

        await wait_for(new_works, 30, "the new passwords work")
        # Within the grace the old ones still open new sessions.
        conn = await pg_connect(old_pg)
        await conn.close()
        client = rd_client(old_rd)
        assert await client.ping()
        await client.aclose()

        async def old_refused() -> bool:
            try:
                conn = await pg_connect(old_pg)
            except asyncpg.InvalidPasswordError:
                pass
            else:
                await conn.close()
                return False
            client = rd_client(old_rd)
            try:
                await client.ping()
            except AuthenticationError:
                return True
            finally:
                await client.aclose()
            return False

        await wait_for(old_refused, GRACE_S + 40, "the old passwords refused after the grace")
        # The sessions opened before the rotation were never cut.
        assert await pg_session.fetchval("select count(*) from t") == 1
        assert await rd_session.get("k") == b"v"
    finally:
        await pg_session.close()
        await rd_session.aclose()


# --- deletion --------------------------------------------------------------------------------


async def test_project_deletion_waits_for_protection_then_removes_everything(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "big")
    pid = project["id"]
    status, pg = await c.api(
        "POST",
        f"/v1/projects/{pid}/addons",
        {"name": "main-db", "kind": "postgres", "deletion_protection": True},
    )
    assert status == 201 and pg["deletion_protection"] is True, pg
    rd = await create_addon(c, pid, "cache", "redis")
    await wait_phase(c, pid, pg["id"], "ready")
    await wait_phase(c, pid, rd["id"], "ready")
    token = await c.new_project_token(pid)
    # An app of the newest release runs on the project network until the project goes.
    app = {"image": TOOLBOX, "command": ["sh", "-c", "exec sleep infinity"]}
    status, body = await c.api("POST", f"/v1/projects/{pid}/releases", {"apps": {"web": app}})
    assert status == 201, body

    def app_running() -> bool:
        found = docker(
            "ps", "-q", "--filter", f"label=orkestr.project={pid}", "--filter", "label=orkestr.app"
        )
        return bool(found.strip())

    await wait_for(app_running, 60, "the release's app running")

    status, body = await c.api("DELETE", f"/v1/projects/{pid}")
    assert status == 409 and body["error"] == "deletion_protected", body
    assert "'main-db'" in body["message"], body
    status, body = await c.api("DELETE", f"/v1/projects/{pid}/addons/{pg['id']}")
    assert status == 409 and body["error"] == "deletion_protected", body
    # Nothing was touched by the refusals.
    assert (await addon(c, pid, rd["id"]))["deleted_at"] is None
    # A project token may not delete its project.
    status, body = await c.api("DELETE", f"/v1/projects/{pid}", token=token)
    assert status == 404, body

    status, body = await c.api(
        "PATCH", f"/v1/projects/{pid}/addons/{pg['id']}", {"deletion_protection": False}
    )
    assert status == 200 and body["deletion_protection"] is False, body
    status, body = await c.api("DELETE", f"/v1/projects/{pid}")
    assert status == 202 and body["deleted_at"], body
    # Nothing new starts in a project being deleted.
    for method, path, req in (
        ("POST", "addons", {"name": "x", "kind": "redis"}),
        ("POST", "releases", {}),
        ("PATCH", "env", {"set": {"A": "1"}}),
        ("POST", f"addons/{rd['id']}/rotate-credentials", None),
    ):
        status, body = await c.api(method, f"/v1/projects/{pid}/{path}", req)
        assert status == 409, (path, body)
    status, body = await c.api("PATCH", f"/v1/projects/{pid}", {"plan": "small"})
    assert status == 409, body

    async def gone() -> bool:
        s, _ = await c.api("GET", f"/v1/projects/{pid}")
        return s == 404

    await wait_for(gone, 90, "project rows gone")

    def leftovers() -> str:
        found = [
            docker("ps", "-aq", "--filter", f"label=orkestr.project={pid}"),
            docker("volume", "ls", "-q", "--filter", f"label=orkestr.project={pid}"),
            docker("network", "ls", "-q", "--filter", f"label=orkestr.project={pid}"),
        ]
        return "".join(found).strip()

    await wait_for(lambda: not leftovers(), 30, "no container, volume or network left")
    for a in (pg, rd):
        assert not (agent.state_dir / "secrets" / a["id"]).exists()
    status, body = await c.api("GET", f"/v1/projects/{pid}", token=token)
    assert status in (401, 404), body


# --- the hard backstop: a filesystem per volume ------------------------------------------


def df_kib(container: str, path: str) -> int:
    """Size of the filesystem at `path` inside the container, in KiB."""
    lines = docker("exec", container, "df", "-Pk", path).splitlines()
    return int(lines[-1].split()[1])


async def test_volume_filesystem_holds_a_filler_postgres_survives_and_grows_online(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "small")
    pg = await create_addon(c, project["id"], "main-db", "postgres")
    await wait_phase(c, project["id"], pg["id"], "ready")
    db = f"orkestr-{pg['id']}-db"
    data = "/var/lib/postgresql/data"
    # quota 12 MB + WAL headroom 2 x 32 MB + 64 MB = a 140 MB filesystem.
    size = df_kib(db, data)
    assert 100 * 1024 < size <= 140 * 1024, size
    image = agent.state_dir / "volumes" / f"orkestr-{pg['id']}-data.img"
    assert image.stat().st_size == 140 * MIB

    async def wal_bounded() -> bool:
        job = await run_job(c, project["id"], f'{PSQL} "show max_wal_size"')
        return "32MB" in job["output"]

    await wait_for(wal_bounded, 60, "max_wal_size bounded by the agent")
    started = inspect(db)["State"]["StartedAt"]
    # One statement that writes far more than the filesystem holds, faster than any
    # quota check: the filesystem stops it, not the host's disk.
    job = await run_job(
        c,
        project["id"],
        f'{PSQL} "create table kept as select g from generate_series(1, 1000) g" && '
        # md5 text does not compress: about 100 bytes a row on disk, 300 MB in all. The
        # series in the select list streams: in FROM it is first stored, as temporary
        # files past work_mem, which the plan's temp_file_limit now stops first.
        f'{PSQL} "create table filler as select md5(g::text) || md5((-g)::text) as pad '
        f'from (select generate_series(1, 3000000) as g) s" 2>&1; echo done',
        timeout=300,
    )
    out = job["output"]
    # Stopped by the agent's filesystem guard (cancelled once the quota is exceeded), or,
    # had the guard been too slow, by the full filesystem: an error for the statement or,
    # when a WAL write found the disk full first, a restart of Postgres's processes.
    stopped = ("canceling statement", "No space left on device", "crash of another server")
    assert any(sign in out for sign in stopped), out
    # The host gave it no more than its image.
    assert image.stat().st_blocks * 512 <= 140 * MIB
    # Postgres may have had to restart its processes (a WAL write that found the disk
    # full: see docs/architecture.md), but it recovers by itself, the container never
    # restarted, nothing is lost and nothing is corrupt.
    await wait_phase(c, project["id"], pg["id"], "ready")
    info = inspect(db)
    assert info["State"]["Running"] and info["State"]["StartedAt"] == started
    assert info["RestartCount"] == 0
    logs = docker("logs", db, check=False)
    crashed = [line for line in logs.splitlines() if "PANIC" in line or "was terminated" in line]
    print(f"backstop: postgres restarts of its processes after the disk filled: {crashed}")

    async def kept() -> bool:
        job = await run_job(c, project["id"], f'{PSQL} "select count(*) from kept"')
        return bool(job["output"].strip() == "1000")

    await wait_for(kept, 60, "the rows written before the filler")
    check = docker("exec", db, "pg_amcheck", "-U", "orkestr_admin", "-d", "app",
                   "--heapallindexed", "--install-missing", check=False)  # fmt: skip
    assert "error" not in check.lower() and "corrupt" not in check.lower(), check

    # A larger plan grows the filesystem under the running database.
    status, body = await c.api("PATCH", f"/v1/projects/{project['id']}", {"plan": "big"})
    assert status == 200, body
    # quota 64 MB + 2 x 32 MB + 64 MB = 192 MB. Growing a mounted ext4 needs
    # CAP_SYS_RESOURCE (the unit grants it); a machine without it gets a condition.
    if has_capability("CAP_SYS_RESOURCE"):
        await wait_for(lambda: df_kib(db, data) > 150 * 1024, 60, "filesystem grown online")
        assert inspect(db)["State"]["StartedAt"] == started
    else:
        view = await wait_condition(c, project["id"], pg["id"], "Filesystem", "GrowFailed")
        message = condition(view, "Filesystem")
        assert message is not None and "Operation not permitted" in message["message"], view
        assert df_kib(db, data) <= 140 * 1024
    job = await run_job(
        c, project["id"], f'{PSQL} "drop table if exists filler; insert into kept values (1)"'
    )
    assert job["exit_code"] == 0, job


@pytest.mark.skipif(
    has_capability("CAP_SYS_RESOURCE"), reason="the filesystem grows here: nothing fails"
)
async def test_a_filesystem_it_cannot_grow_is_logged_once_not_every_round(
    stack: Stack, agent: AgentProcess
) -> None:
    # Without CAP_SYS_RESOURCE every upkeep round (seconds apart) retried the grow and
    # logged upkeep.grow_failed again, for every add-on of a plan upgraded on that host.
    c = stack.controller
    assert c is not None
    project = await create_project(c, "small")
    pg = await create_addon(c, project["id"], "grow-db", "postgres")
    await wait_phase(c, project["id"], pg["id"], "ready")
    status, body = await c.api("PATCH", f"/v1/projects/{project['id']}", {"plan": "big"})
    assert status == 200, body
    await wait_condition(c, project["id"], pg["id"], "Filesystem", "GrowFailed")
    await more_passes(agent, 8)  # rounds that retry the grow
    view = await addon(c, project["id"], pg["id"])
    assert (condition(view, "Filesystem") or {}).get("reason") == "GrowFailed", view
    lines = [
        line
        for line in agent.log_path.read_text().splitlines()
        if "upkeep.grow_failed" in line and pg["id"] in line
    ]
    assert len(lines) == 1, lines
    status, _ = await c.api("DELETE", f"/v1/projects/{project['id']}")
    assert status == 202
