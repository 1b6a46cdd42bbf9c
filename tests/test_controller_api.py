"""The controller as a user and an agent see it: a real controller process, PostgreSQL
and mosquitto; hosts are FakeAgents speaking the real MQTT protocol."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import tomllib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import topics
from schemas.codec import MessageRejected, decode, encode
from schemas.messages import (
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    AddonStatus,
    Capacity,
    ClientConnection,
    DesiredState,
    HostStatus,
    JobResult,
    Presence,
)
from tests.services import (
    ControllerProcess,
    DesiredWatcher,
    FakeAgent,
    Mosquitto,
    condition,
    now,
    wait_blocked_by,
)

HYPOTHESIS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def unique(prefix: str = "p") -> str:
    return f"{prefix}-{secrets.token_hex(5)}"


def assert_error(status: int, body: Any, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    assert isinstance(body, dict) and set(body) == {"error", "message"}, body
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"], body


def assert_error_shape(status: int, body: Any) -> None:
    assert 400 <= status < 500, (status, body)
    assert isinstance(body, dict) and set(body) == {"error", "message"}, body
    assert re.fullmatch(r"[a-z]+(_[a-z]+)*", body["error"]), body
    assert isinstance(body["message"], str) and body["message"], body


async def eventually(check: Callable[[], Awaitable[Any]], what: str, wait_s: float = 10.0) -> Any:
    """Poll `check` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {wait_s}s waiting for {what}")
        await asyncio.sleep(0.05)


async def metric(controller: ControllerProcess, series: str) -> float:
    """One sample of the controller's /metrics, e.g. 'name{label="v"}' (0 if absent)."""
    status, text = await controller.api("GET", "/metrics")
    assert status == 200, text
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return 0.0


async def new_project(controller: ControllerProcess, plan: str = "team") -> dict[str, Any]:
    status, body = await controller.api("POST", "/v1/projects", {"name": unique(), "plan": plan})
    assert status == 201, body
    return body  # type: ignore[no-any-return]


async def new_addon(
    controller: ControllerProcess, project: dict[str, Any], name: str, kind: str = "postgres"
) -> dict[str, Any]:
    status, body = await controller.api(
        "POST", f"/v1/projects/{project['id']}/addons", {"name": name, "kind": kind}
    )
    assert status == 201, body
    return body  # type: ignore[no-any-return]


async def online_hosts(controller: ControllerProcess) -> set[str]:
    status, body = await controller.api("GET", "/v1/hosts")
    assert status == 200, body
    return {h["name"] for h in body["hosts"] if h["online"]}


def addon_status(addon: dict[str, Any], generation: int = 1, **fields: Any) -> AddonStatus:
    return AddonStatus(
        id=addon["id"], project_id=addon["project_id"], observed_generation=generation, **fields
    )


# --- projects -------------------------------------------------------------------------


async def test_projects_on_every_plan(controller: ControllerProcess, fake_agent: FakeAgent) -> None:
    for plan in ("starter", "pro", "team"):
        name = unique()
        status, project = await controller.api("POST", "/v1/projects", {"name": name, "plan": plan})
        assert status == 201, project
        assert set(project) == {"id", "name", "plan", "host", "created_at", "deleted_at"}
        assert re.fullmatch(r"[0-9a-f]{32}", project["id"])
        assert (project["name"], project["plan"]) == (name, plan)
        status, shown = await controller.api("GET", f"/v1/projects/{project['id']}")
        assert (status, shown) == (200, project)
        status, listed = await controller.api("GET", "/v1/projects")
        assert status == 200 and project in listed["projects"]

    status, body = await controller.api("POST", "/v1/projects", {"name": name, "plan": "team"})
    assert_error(status, body, 409, "conflict")
    status, body = await controller.api("POST", "/v1/projects", {"name": unique(), "plan": "gold"})
    assert_error(status, body, 422, "invalid_body")
    assert "plan" in body["message"] and "gold" in body["message"]
    for path in ("/v1/projects/" + "0" * 32, "/v1/projects/not-an-id"):
        status, body = await controller.api("GET", path)
        assert_error(status, body, 404, "not_found")


async def test_placement_prefers_fewest_projects_then_most_memory(
    controller: ControllerProcess, mosquitto: Mosquitto
) -> None:
    small = FakeAgent(unique("small"), mosquitto, memory_mb=4096)
    big = FakeAgent(unique("big"), mosquitto, memory_mb=65536)
    async with small, big:
        await eventually(
            lambda: _only_online(controller, {small.host, big.host}), "only our hosts online"
        )
        first, second, third = [await new_project(controller) for _ in range(3)]
        assert first["host"] == big.host  # tie on projects: most memory
        assert second["host"] == small.host  # fewest projects
        assert third["host"] == big.host
        status, body = await controller.api("GET", "/v1/hosts")
        hosts = {h["name"]: h for h in body["hosts"]}
        assert hosts[big.host]["projects"] == 2 and hosts[big.host]["online"]
        assert hosts[big.host]["capacity"] == {"cpus": 8.0, "memory_mb": 65536}
        assert set(hosts[big.host]) == {
            "name",
            "online",
            "capacity",
            "applied_generation",
            "last_seen",
            "projects",
            "reported_capacity",
            "ceiling",
        }
        assert hosts[big.host]["reported_capacity"] == hosts[big.host]["capacity"]
        assert hosts[big.host]["ceiling"] is None
    # Both agents said goodbye: no host is left to place a project on.
    await eventually(lambda: _only_online(controller, set()), "hosts offline")
    status, body = await controller.api("POST", "/v1/projects", {"name": unique(), "plan": "pro"})
    assert_error(status, body, 503, "no_host_available")


async def _only_online(controller: ControllerProcess, hosts: set[str]) -> bool:
    return await online_hosts(controller) == hosts


@contextlib.asynccontextmanager
async def speaking_for(host: str, fake_agent: FakeAgent) -> AsyncIterator[FakeAgent]:
    """A FakeAgent for `host`: the fixture's own when it is that host (the broker keeps one
    connection per host identity, as for real agents), otherwise a new one."""
    if host == fake_agent.host:
        yield fake_agent
    else:
        async with FakeAgent(host, fake_agent.broker) as agent:
            yield agent


# --- add-ons --------------------------------------------------------------------------


async def test_addon_lifecycle(controller: ControllerProcess, fake_agent: FakeAgent) -> None:
    project = await new_project(controller, "team")
    pid = project["id"]
    orders = await new_addon(controller, project, "orders-db", "postgres")
    cache = await new_addon(controller, project, "cache", "redis")
    assert orders["hostname"] == "orders-db" and orders["port"] == 5432
    assert orders["env_var"] == "ORDERS_DB_URL" and cache["env_var"] == "CACHE_URL"
    assert cache["port"] == 6379 and cache["kind"] == "redis"
    assert orders["resources"] == {"cpus": 2.0, "memory_mb": 2048}
    assert orders["phase"] == "provisioning" and orders["conditions"] == []
    assert orders["project_id"] == pid and orders["deleted_at"] is None
    assert "password" not in json.dumps([orders, cache])

    status, listed = await controller.api("GET", f"/v1/projects/{pid}/addons")
    assert status == 200 and [a["id"] for a in listed["addons"]] == [orders["id"], cache["id"]]
    status, shown = await controller.api("GET", f"/v1/projects/{pid}/addons/{orders['id']}")
    assert (status, shown) == (200, orders)

    status, body = await controller.api("GET", f"/v1/projects/{pid}/env")
    env = body["env"]
    assert status == 200 and set(env) == {"DATABASE_URL", "ORDERS_DB_URL", "REDIS_URL", "CACHE_URL"}
    assert env["DATABASE_URL"] == env["ORDERS_DB_URL"]
    assert re.fullmatch(r"postgresql://app:[\w%-]+@orders-db:5432/app", env["DATABASE_URL"])
    assert re.fullmatch(r"redis://\w*:[\w%-]+@cache:6379/0", env["REDIS_URL"])

    for name, kind, code in [
        ("orders-db", "postgres", 409),
        ("database", "postgres", 422),
        ("redis", "redis", 422),
        ("Bad_Name", "redis", 422),
        ("ok", "mysql", 422),
    ]:
        status, body = await controller.api(
            "POST", f"/v1/projects/{pid}/addons", {"name": name, "kind": kind}
        )
        assert_error(status, body, code, "conflict" if code == 409 else "invalid_body")
    status, body = await controller.api(
        "POST", f"/v1/projects/{'0' * 32}/addons", {"name": "x", "kind": "redis"}
    )
    assert_error(status, body, 404, "not_found")

    status, deleted = await controller.api("DELETE", f"/v1/projects/{pid}/addons/{orders['id']}")
    assert status == 202 and deleted["phase"] == "deleting" and deleted["deleted_at"]
    status, again = await controller.api("DELETE", f"/v1/projects/{pid}/addons/{orders['id']}")
    assert status == 202 and again["deleted_at"] == deleted["deleted_at"]
    status, body = await controller.api("GET", f"/v1/projects/{pid}/env")
    assert set(body["env"]) == {"REDIS_URL", "CACHE_URL"}
    # The name is free again at once; the tombstone stays listed until the host confirms.
    await new_addon(controller, project, "orders-db", "postgres")
    status, listed = await controller.api("GET", f"/v1/projects/{pid}/addons")
    assert [a["phase"] for a in listed["addons"]] == ["deleting", "provisioning", "provisioning"]

    fake_agent.removed = [orders["id"], cache["id"]]  # cache is live: must not be purged
    await fake_agent.report()

    async def purged() -> bool:
        status, _ = await controller.api("GET", f"/v1/projects/{pid}/addons/{orders['id']}")
        return status == 404

    await eventually(purged, "tombstone purged")
    status, _ = await controller.api("GET", f"/v1/projects/{pid}/addons/{cache['id']}")
    assert status == 200
    for path in (f"/v1/projects/{pid}/addons/{'0' * 32}", f"/v1/projects/{pid}/addons/nope"):
        status, body = await controller.api("DELETE", path)
        assert_error(status, body, 404, "not_found")


async def test_agent_reports_drive_the_addon_view(
    controller: ControllerProcess, fake_agent: FakeAgent, mosquitto: Mosquitto
) -> None:
    project = await new_project(controller, "pro")
    addon = await new_addon(controller, project, "db")
    path = f"/v1/projects/{project['id']}/addons/{addon['id']}"
    async with speaking_for(project["host"], fake_agent) as agent:
        await _drive_the_view(controller, mosquitto, addon, path, agent)


async def _drive_the_view(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    addon: dict[str, Any],
    path: str,
    agent: FakeAgent,
) -> None:

    async def shown(expected: str) -> dict[str, Any] | None:
        status, body = await controller.api("GET", path)
        assert status == 200
        return body if body["phase"] == expected else None

    agent.addons = [
        addon_status(
            addon,
            7,
            conditions=(condition("True", "Running"),),
            last_activity=now(),
            clients=(ClientConnection(source="10.0.0.5:4242"),),
            sleeps=2,
            wakes=2,
            last_wake_ms=(120.5, 98.0),
        )
    ]
    await agent.report()
    view = await eventually(lambda: shown("ready"), "phase ready")
    assert view["observed_generation"] == 7 and view["sleep_state"] == "awake"
    assert view["conditions"][0]["type"] == "Ready" and view["conditions"][0]["status"] == "True"
    assert view["clients"] == [{"source": "10.0.0.5:4242", "via": "direct"}]
    assert (view["sleeps"], view["wakes"], view["last_wake_ms"]) == (2, 2, [120.5, 98.0])

    agent.addons = [addon_status(addon, 8, conditions=(condition("True"),), sleep_state="light")]
    await agent.report()
    await eventually(lambda: shown("sleeping"), "phase sleeping")
    agent.addons = [addon_status(addon, 9, conditions=(condition("False", "PullFailed"),))]
    await agent.report()
    await eventually(lambda: shown("failed"), "phase failed")

    # Another host cannot speak for this add-on.
    async with FakeAgent(unique("intruder"), mosquitto) as intruder:
        intruder.addons = [addon_status(addon, 99, conditions=(condition("True"),))]
        intruder.removed = [addon["id"]]
        await intruder.report()
        await eventually(lambda: _host_listed(controller, intruder.host), "intruder report stored")
    _, body = await controller.api("GET", path)
    assert body["phase"] == "failed" and body["observed_generation"] == 9


async def test_a_report_that_repeats_an_addon_status_leaves_its_row_alone(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    """The heartbeat resends every add-on's status; an unchanged one is not written again
    (each rewrite was a new row version and its WAL, per add-on, per report)."""
    project = await new_project(controller, "pro")
    addon = await new_addon(controller, project, "db")
    conn = await asyncpg.connect(controller.database_url)
    try:

        async def row() -> tuple[int, int | None, str | None]:
            r = await conn.fetchrow(
                "SELECT xmin::text::bigint AS v, observed_generation, status::text AS s "
                "FROM addons WHERE id = $1",
                uuid.UUID(addon["id"]),
            )
            assert r is not None
            return r["v"], r["observed_generation"], r["s"]

        async def reported(host: str) -> Any:
            return await conn.fetchval("SELECT status_sent_at FROM hosts WHERE name = $1", host)

        async with speaking_for(project["host"], fake_agent) as agent:
            ready = (condition("True", "Running"),)
            agent.addons = [addon_status(addon, 7, conditions=ready)]
            await agent.report()
            first = await eventually(
                lambda: _when(row(), lambda r: r[1] == 7), "the first report stored"
            )
            sent = await reported(agent.host)
            await asyncio.sleep(0.01)  # the next report's sent_at is later
            await agent.report()  # the same status again
            await eventually(
                lambda: _when(reported(agent.host), lambda t: t is not None and t > sent),
                "the second report stored",
            )
            assert await row() == first

            agent.addons = [addon_status(addon, 8, conditions=ready)]
            await agent.report()
            changed = await eventually(
                lambda: _when(row(), lambda r: r[1] == 8), "the changed report stored"
            )
            assert changed[0] != first[0]
    finally:
        await conn.close()


async def _when(value: Awaitable[Any], ok: Callable[[Any], bool]) -> Any:
    got = await value
    return got if ok(got) else None


async def _host_listed(controller: ControllerProcess, host: str) -> Any:
    status, body = await controller.api("GET", "/v1/hosts")
    return (status, body) if any(h["name"] == host for h in body["hosts"]) else None


async def test_starter_tombstone_counts_until_the_host_removes_it(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    project = await new_project(controller, "starter")
    first = await new_addon(controller, project, "db")
    url = f"/v1/projects/{project['id']}/addons"
    status, body = await controller.api("POST", url, {"name": "other", "kind": "redis"})
    assert_error(status, body, 409, "plan_limit_reached")
    status, _ = await controller.api("DELETE", f"{url}/{first['id']}")
    assert status == 202
    status, body = await controller.api("POST", url, {"name": "other", "kind": "redis"})
    assert_error(status, body, 409, "plan_limit_reached")
    assert "being deleted" in body["message"]

    async with speaking_for(project["host"], fake_agent) as agent:
        agent.removed = [first["id"]]
        await agent.report()

        async def created() -> bool:
            status, _ = await controller.api("POST", url, {"name": "other", "kind": "redis"})
            return status == 201

        await eventually(created, "a new add-on once the tombstone is purged")


# --- jobs -----------------------------------------------------------------------------


async def test_jobs(controller: ControllerProcess, fake_agent: FakeAgent) -> None:
    project = await new_project(controller, "team")
    pid = project["id"]
    status, job = await controller.api(
        "POST",
        f"/v1/projects/{pid}/jobs",
        {"image": "debian:12", "command": ["sh", "-c", "echo hi"], "timeout_s": 30},
    )
    assert status == 201, job
    assert job["state"] == "pending" and job["command"] == ["sh", "-c", "echo hi"]
    assert job["timeout_s"] == 30 and job["exit_code"] is None and job["finished_at"] is None
    status, shown = await controller.api("GET", f"/v1/projects/{pid}/jobs/{job['id']}")
    assert (status, shown) == (200, job)
    status, failing = await controller.api(
        "POST", f"/v1/projects/{pid}/jobs", {"image": "debian:12", "command": ["false"]}
    )
    assert status == 201 and failing["timeout_s"] == 600

    async with speaking_for(project["host"], fake_agent) as agent:
        await agent.job_result(job["id"], pid, 0, "hi\n")
        await agent.job_result(failing["id"], pid, 1, "bad\x00byte", error=None)

        async def state(job_id: str, expected: str) -> dict[str, Any] | None:
            _, body = await controller.api("GET", f"/v1/projects/{pid}/jobs/{job_id}")
            return body if body["state"] == expected else None

        done = await eventually(lambda: state(job["id"], "succeeded"), "job succeeded")
        assert done["exit_code"] == 0 and done["output"] == "hi\n" and done["finished_at"]
        failed = await eventually(lambda: state(failing["id"], "failed"), "job failed")
        assert failed["exit_code"] == 1 and failed["output"] == "bad\ufffdbyte"
        # A late duplicate (QoS 1 redelivery) changes nothing: once the controller has
        # handled it (counted as stale), the job is as it was.
        stale = 'orkestr_controller_mqtt_messages_total{kind="job_result",result="stale"}'
        before = await metric(controller, stale)
        await agent.job_result(job["id"], pid, 5, "again")

        async def handled() -> bool:
            return await metric(controller, stale) > before

        await eventually(handled, "the duplicate result handled")
        assert (await state(job["id"], "succeeded")) == done

    status, body = await controller.api("GET", f"/v1/projects/{pid}/jobs/{'0' * 32}")
    assert_error(status, body, 404, "not_found")
    for bad in (
        {"image": "", "command": []},
        {"image": "debian:12", "command": "ls"},
        {"image": "debian:12", "command": ["a\x00b"]},
        {"image": "debian:12", "command": ["x" * 4000] * 5},
        {"image": "debian:12", "timeout_s": 0},
        {"image": "debian:12", "timeout_s": 86401},
        {"image": "bad image"},
    ):
        status, body = await controller.api("POST", f"/v1/projects/{pid}/jobs", bad)
        assert_error(status, body, 422, "invalid_body")


async def test_pending_jobs_are_bounded(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    project = await new_project(controller, "pro")
    url = f"/v1/projects/{project['id']}/jobs"
    statuses = [
        (await controller.api("POST", url, {"image": "debian:12", "command": ["true"]}))[0]
        for _ in range(9)
    ]
    assert statuses == [201] * 8 + [409]
    status, body = await controller.api("POST", url, {"image": "debian:12"})
    assert_error(status, body, 409, "too_many_pending_jobs")


# --- routes (credentials: test_controller_auth.py) -------------------------------------


async def test_metrics_show_process_and_5xx_series(controller: ControllerProcess) -> None:
    status, answer = await controller.api("GET", "/metrics")
    assert status == 200 and "orkestr_controller_http_requests_total" in answer
    # Process metrics of the controller itself, and the 5xx series an alert divides by.
    assert re.search(r"^process_resident_memory_bytes [1-9]", answer, re.M), answer
    assert re.search(r"^process_cpu_seconds_total ", answer, re.M)
    assert (
        'orkestr_controller_http_requests_total{method="POST",route="/v1/projects",status="500"}'
        in answer
    )
    # The dashboard's increase() misses a series' first sample: each plan's refusals exist
    # at zero before the first one (plans come from the plans file, so only a real start shows it).
    assert controller.plans_file
    for plan in tomllib.loads(controller.plans_file.read_text()):
        assert f'orkestr_controller_plan_limit_rejections_total{{plan="{plan}"}}' in answer, plan


MALFORMED = [
    ("bad content-length", b"POST /v1/projects HTTP/1.1\r\nContent-Length: abc\r\n"),
    ("negative content-length", b"POST /v1/projects HTTP/1.1\r\nContent-Length: -5\r\n"),
    (
        "two content-lengths",
        b"POST /v1/projects HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n",
    ),
    (
        "non-latin1 authorization",
        b"GET /v1/projects HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\r\n",
    ),
    ("non-ascii authorization", b"GET /v1/projects HTTP/1.1\r\nAuthorization: Bearer \xc3\xa9\r\n"),
    ("control byte in a header", b"GET /v1/projects HTTP/1.1\r\nAuthorization: \x00x\r\n"),
    ("bad byte in the path", b"GET /v1/pro\xffjects HTTP/1.1\r\n"),
    ("not http", b"HELLO\r\n"),
]


async def raw_request(controller: ControllerProcess, head: bytes) -> tuple[int, bytes, bytes]:
    """Send bytes as they are (no client library would); return (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", controller.port)
    try:
        writer.write(head + b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    headers, _, body = answer.partition(b"\r\n\r\n")
    return int(headers.split(b" ", 2)[1]), headers, body


@pytest.mark.parametrize(("what", "head"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_request_is_a_json_400_without_traceback(
    controller: ControllerProcess, what: str, head: bytes
) -> None:
    logged = len(controller.log_text())
    status, headers, body = await raw_request(controller, head)
    assert status == 400, (what, headers, body)
    assert b"content-type: application/json" in headers.lower()
    answer = json.loads(body)
    assert answer["error"] == "bad_request" and answer["message"], answer
    # The controller still serves, and logged one line, not an error with a traceback.
    status, _ = await controller.api("GET", "/v1/hosts")
    assert status == 200
    log = controller.log_text()[logged:]
    assert "Traceback" not in log and " ERROR " not in log, log
    assert "http_bad_request" in log or "status=400" in log, log


async def test_unknown_routes_and_methods(controller: ControllerProcess) -> None:
    status, body = await controller.api("GET", "/v1/nothing")
    assert_error(status, body, 404, "not_found")
    status, body = await controller.api("PUT", "/v1/projects")
    assert_error(status, body, 405, "method_not_allowed")


# --- the plan limit under concurrency -------------------------------------------------


@pytest.mark.parametrize(("plan", "limit"), [("starter", 1), ("pro", 2)])
async def test_plan_limit_holds_under_concurrent_creates(
    controller: ControllerProcess, fake_agent: FakeAgent, plan: str, limit: int
) -> None:
    project = await new_project(controller, plan)
    url = f"/v1/projects/{project['id']}/addons"
    results = await asyncio.gather(
        *(
            controller.api("POST", url, {"name": f"db-{i}", "kind": ("postgres", "redis")[i % 2]})
            for i in range(20)
        )
    )
    created = [body for status, body in results if status == 201]
    refused = [(status, body) for status, body in results if status != 201]
    assert len(created) == limit
    for status, body in refused:
        assert_error(status, body, 409, "plan_limit_reached")
    status, listed = await controller.api("GET", url)
    assert sorted(a["id"] for a in listed["addons"]) == sorted(a["id"] for a in created)


async def test_concurrent_creates_with_one_name_make_one_addon(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    project = await new_project(controller, "team")
    url = f"/v1/projects/{project['id']}/addons"
    results = await asyncio.gather(
        *(controller.api("POST", url, {"name": "same", "kind": "redis"}) for _ in range(20))
    )
    assert sorted(status for status, _ in results) == [201] + [409] * 19
    for status, body in results:
        if status == 409:
            assert_error(status, body, 409, "conflict")


async def test_a_create_in_a_project_being_deleted_says_so(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    # The refusal must name the deletion, not a name clash that does not exist.
    project = await new_project(controller, "team")
    await new_addon(controller, project, "db")
    status, _ = await controller.api("DELETE", f"/v1/projects/{project['id']}")
    assert status == 202
    status, body = await controller.api(
        "POST", f"/v1/projects/{project['id']}/addons", {"name": "fresh", "kind": "redis"}
    )
    assert_error(status, body, 409, "conflict")
    assert "being deleted" in body["message"] and "already exists" not in body["message"], body


async def test_a_plan_without_manual_backups_names_the_plans_that_have_them(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    # The test plans file (an operator's own) gives no plan manual backups: the refusal
    # must not send the user to a "Pro and Team" that have none either.
    project = await new_project(controller, "pro")
    addon = await new_addon(controller, project, "db")
    status, body = await controller.api(
        "POST", f"/v1/projects/{project['id']}/addons/{addon['id']}/backups"
    )
    assert_error(status, body, 409, "plan_limit_reached")
    assert "plan 'pro' includes no manual backups" in body["message"], body
    assert "Pro and Team" not in body["message"] and "no plan here does" in body["message"], body


@pytest.mark.parametrize("whole_project", [False, True])
async def test_a_delete_racing_the_protection_being_turned_on_is_refused(
    controller: ControllerProcess, fake_agent: FakeAgent, whole_project: bool
) -> None:
    # The PATCH that turns protection on holds the add-on's row until it commits; a
    # DELETE arriving meanwhile must wait for it and then refuse, not read the old
    # "unprotected" and tombstone an add-on its owner was just told is protected. The
    # PATCH's transaction is held open here, with the statement the controller runs.
    project = await new_project(controller, "team")
    addon = await new_addon(controller, project, "db")
    conn = await asyncpg.connect(controller.database_url)
    try:
        patch = conn.transaction()
        await patch.start()
        await conn.execute(
            "UPDATE addons SET deletion_protection = true WHERE id = $1",
            uuid.UUID(addon["id"]),
        )
        path = f"/v1/projects/{project['id']}" + ("" if whole_project else f"/addons/{addon['id']}")
        delete = asyncio.create_task(controller.api("DELETE", path))
        await wait_blocked_by(conn)  # the DELETE is at the row lock
        await patch.commit()
        status, body = await delete
    finally:
        await conn.close()
    assert_error(status, body, 409, "deletion_protected")
    status, shown = await controller.api(
        "GET", f"/v1/projects/{project['id']}/addons/{addon['id']}"
    )
    assert status == 200 and shown["deleted_at"] is None, shown
    assert shown["deletion_protection"] is True, shown


# --- bad request bodies (Hypothesis) --------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
not_strings = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.lists(st.text(), max_size=2)
)


not_string_lists = (
    st.none() | st.booleans() | st.integers() | st.text() | st.lists(st.integers(), min_size=1)
)


def bad_bodies(valid: dict[str, Any], required: set[str]) -> st.SearchStrategy[Any]:
    """Bodies that must be refused: any JSON, wrong types, unknown or missing fields."""
    keys = sorted(valid)
    wrong_type = st.sampled_from(keys).flatmap(
        lambda key: (not_string_lists if isinstance(valid[key], list) else not_strings).map(
            lambda value: {**valid, key: value}
        )
    )
    unknown_field = st.builds(
        lambda key, value: {**valid, key: value},
        st.text(min_size=1, max_size=12).filter(lambda k: k not in valid),
        json_values,
    )
    missing = st.builds(
        lambda drop: {k: v for k, v in valid.items() if k != drop},
        st.sampled_from(sorted(required)),
    )
    any_json = json_values.filter(lambda v: not isinstance(v, dict) or not required <= set(v))
    return st.one_of(any_json, wrong_type, unknown_field, missing)


@pytest.fixture(scope="module")
async def hypothesis_project(
    controller: ControllerProcess, mosquitto: Mosquitto
) -> AsyncIterator[dict[str, Any]]:
    async with FakeAgent(unique("hyp"), mosquitto) as agent:
        await controller.wait_host_online(agent.host)
        project = await new_project(controller, "starter")
    # The host may go: these tests only need the project row.
    yield project


async def _counts(controller: ControllerProcess, project: dict[str, Any]) -> tuple[int, int]:
    _, projects = await controller.api("GET", "/v1/projects")
    _, addons = await controller.api("GET", f"/v1/projects/{project['id']}/addons")
    return len(projects["projects"]), len(addons["addons"])


@HYPOTHESIS
@given(data=st.data())
async def test_bad_bodies_are_refused_with_the_error_shape(
    controller: ControllerProcess, hypothesis_project: dict[str, Any], data: st.DataObject
) -> None:
    pid = hypothesis_project["id"]
    cases: list[tuple[str, dict[str, Any], set[str]]] = [
        ("/v1/projects", {"name": "hyp-valid", "plan": "team"}, {"name", "plan"}),
        (
            f"/v1/projects/{pid}/addons",
            {"name": "valid", "kind": "redis"},
            {"name", "kind"},
        ),
        (
            f"/v1/projects/{pid}/jobs",
            {"image": "debian:12", "command": ["true"]},
            {"image"},
        ),
    ]
    route, valid, required = data.draw(st.sampled_from(cases))
    body = data.draw(bad_bodies(valid, required))
    before = await _counts(controller, hypothesis_project)
    status, answer = await controller.api("POST", route, body)
    assert_error_shape(status, answer)
    assert answer["error"] in {"invalid_json", "invalid_body"}, answer
    assert await _counts(controller, hypothesis_project) == before


@HYPOTHESIS
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
async def test_non_json_bodies_are_refused(
    controller: ControllerProcess, hypothesis_project: dict[str, Any], raw: bytes
) -> None:
    pid = hypothesis_project["id"]
    for route in ("/v1/projects", f"/v1/projects/{pid}/addons", f"/v1/projects/{pid}/jobs"):
        status, answer = await controller.api(
            "POST", route, data=raw, headers={"Content-Type": "application/json"}
        )
        assert_error_shape(status, answer)
        assert answer["error"] in {"invalid_json", "invalid_body"}


async def test_a_key_given_twice_is_refused_naming_it(
    controller: ControllerProcess, hypothesis_project: dict[str, Any]
) -> None:
    """msgspec would keep the last value silently: a body that says two things is a 400."""
    pid = hypothesis_project["id"]
    before = await _counts(controller, hypothesis_project)
    bodies = {
        f"/v1/projects/{pid}/addons": b'{"name": "twice", "kind": "redis", "name": "again"}',
        f"/v1/projects/{pid}/jobs": b'{"image": "debian:12", "timeout_s": 5, "timeout_s": 9}',
    }
    for route, body in bodies.items():
        status, answer = await controller.api(
            "POST", route, data=body, headers={"Content-Type": "application/json"}
        )
        assert_error(status, answer, 400, "invalid_json")
        assert "twice" in answer["message"], answer
    status, answer = await controller.api(
        "PATCH",
        f"/v1/projects/{pid}/env",
        data=b'{"set": {"TWICE": "1", "OTHER": "x", "TWICE": "2"}}',
        headers={"Content-Type": "application/json"},
    )
    assert_error(status, answer, 400, "invalid_json")
    assert answer["message"] == 'request body gives the key "TWICE" twice in one object', answer
    status, env = await controller.api("GET", f"/v1/projects/{pid}/env")
    assert status == 200 and "OTHER" not in env["env"], env
    assert await _counts(controller, hypothesis_project) == before
    # Colons in values (the check's slow path) and no repeat: accepted.
    status, answer = await controller.api(
        "PATCH", f"/v1/projects/{pid}/env", {"set": {"TWICE_OK": "a:b:c"}, "unset": ["TWICE"]}
    )
    assert status == 200 and answer["env"]["TWICE_OK"] == "a:b:c", answer


async def test_huge_and_deep_bodies(
    controller: ControllerProcess, hypothesis_project: dict[str, Any]
) -> None:
    before = await _counts(controller, hypothesis_project)
    huge = json.dumps({"name": "x" * (1024 * 1024), "plan": "team"}).encode()
    status, answer = await controller.api("POST", "/v1/projects", data=huge)
    assert_error(status, answer, 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * (64 * 1024)  # no Content-Length: the limit applies while reading

    status, answer = await controller.api("POST", "/v1/projects", data=chunks())  # type: ignore[arg-type]
    assert_error(status, answer, 413, "payload_too_large")
    deep = b"[" * 100_000 + b"]" * 100_000
    status, answer = await controller.api("POST", "/v1/projects", data=deep)
    assert_error_shape(status, answer)
    long_name = {"name": "a" * 200, "kind": "redis"}
    status, answer = await controller.api(
        "POST", f"/v1/projects/{hypothesis_project['id']}/addons", long_name
    )
    assert_error(status, answer, 422, "invalid_body")
    assert "name" in answer["message"]
    assert await _counts(controller, hypothesis_project) == before


# --- publishing the desired state -----------------------------------------------------


def project_in(state: DesiredState, pid: str) -> Any:
    return next((p for p in state.projects if p.id == pid), None)


def addons_in(state: DesiredState, pid: str) -> tuple[Any, ...]:
    project = project_in(state, pid)
    return project.addons if project is not None else ()


def jobs_in(state: DesiredState, pid: str) -> tuple[Any, ...]:
    project = project_in(state, pid)
    return project.jobs if project is not None else ()


async def test_desired_state_follows_every_change(
    controller: ControllerProcess, mosquitto: Mosquitto, fake_agent: FakeAgent
) -> None:
    project = await new_project(controller, "pro")
    pid, host = project["id"], project["host"]
    async with DesiredWatcher(host, mosquitto) as watcher:
        first = await watcher.wait_for(lambda s: project_in(s, pid) is not None)
        assert first.version == SCHEMA_VERSION and first.host == host
        assert project_in(first, pid).name == project["name"]

        mark = watcher.mark()
        addon = await new_addon(controller, project, "db")
        added = await watcher.wait_for(lambda s: bool(addons_in(s, pid)), since=mark)
        assert added.generation > first.generation
        spec = addons_in(added, pid)[0]
        assert (spec.id, spec.name, spec.kind) == (addon["id"], "db", "postgres")
        assert (spec.database, spec.user, spec.secret_version, spec.deleted) == (
            "app",
            "app",
            1,
            False,
        )
        assert (spec.resources.cpus, spec.resources.memory_mb) == (1.0, 1024)
        assert spec.sleep.enabled and spec.sleep.light_after_s == 3

        mark = watcher.mark()
        await controller.api("DELETE", f"/v1/projects/{pid}/addons/{addon['id']}")
        tomb = await watcher.wait_for(
            lambda s: any(a.deleted for a in addons_in(s, pid)), since=mark
        )
        assert tomb.generation > added.generation

        mark = watcher.mark()
        _, job = await controller.api(
            "POST", f"/v1/projects/{pid}/jobs", {"image": "debian:12", "command": ["true"]}
        )
        with_job = await watcher.wait_for(lambda s: bool(jobs_in(s, pid)), since=mark)
        assert with_job.generation > tomb.generation
        assert project_in(with_job, pid).jobs[0].id == job["id"]

        async with speaking_for(host, fake_agent) as agent:
            agent.removed = [addon["id"]]
            mark = watcher.mark()
            await agent.job_result(job["id"], pid, 0, "done")
            await agent.report()
            final = await watcher.wait_for(
                lambda s: (
                    project_in(s, pid) is not None and not jobs_in(s, pid) and not addons_in(s, pid)
                ),
                since=mark,
            )
        assert final.generation > with_job.generation


async def test_desired_state_is_republished_after_a_controller_restart(
    controller: ControllerProcess, mosquitto: Mosquitto, fake_agent: FakeAgent
) -> None:
    project = await new_project(controller, "team")
    await new_addon(controller, project, "kept")
    async with DesiredWatcher(project["host"], mosquitto) as watcher:
        before = await watcher.wait_for(lambda s: bool(addons_in(s, project["id"])))
        mark = watcher.mark()
        assert await controller.stop() == 0  # SIGTERM: graceful, exit code 0
        # An hour-old report arrives while the controller is away (queued for its session
        # and retained): it must not make that host look online.
        dead = unique("dead")
        old = HostStatus(
            version=SCHEMA_VERSION,
            host=dead,
            sent_at=now() - timedelta(hours=1),
            applied_generation=0,
            capacity=Capacity(cpus=64, memory_mb=999_999),
        )
        await mosquitto.publish_as(dead, topics.status(dead), encode(old), retain=True)
        await controller.start()
        after = await watcher.wait_for(lambda s: s.generation > before.generation, since=mark)
        assert addons_in(after, project["id"]) == addons_in(before, project["id"])
    await eventually(lambda: _host_listed(controller, dead), "the dead host's report is processed")
    assert dead not in await online_hosts(controller)
    await mosquitto.publish_as(dead, topics.status(dead), b"", retain=True)  # clear it


async def test_broker_outage_keeps_the_api_working_and_heals(
    controller: ControllerProcess, mosquitto: Mosquitto, fake_agent: FakeAgent
) -> None:
    project = await new_project(controller, "team")
    pid = project["id"]
    async with DesiredWatcher(project["host"], mosquitto) as watcher:
        before = await watcher.wait_for(lambda s: project_in(s, pid) is not None)
        await mosquitto.stop()
        try:
            addon = await new_addon(controller, project, "made-offline")
            status, _ = await controller.api("GET", f"/v1/projects/{pid}/addons/{addon['id']}")
            assert status == 200
        finally:
            await mosquitto.start()
        healed = await watcher.wait_for(
            lambda s: any(a.id == addon["id"] for a in addons_in(s, pid)), wait_s=20
        )
        assert healed.generation > before.generation
    # The controller is connected again and reports from agents flow in.
    fake_agent.capacity = Capacity(cpus=3.0, memory_mb=3333)
    await fake_agent.report()

    async def capacity_seen() -> bool:
        _, body = await controller.api("GET", "/v1/hosts")
        return any(h["capacity"]["memory_mb"] == 3333 for h in body["hosts"])

    await eventually(capacity_seen, "a report after the outage", wait_s=15)


# --- bad MQTT messages ----------------------------------------------------------------


def bad_payloads(host: str) -> st.SearchStrategy[bytes]:
    valid_status = HostStatus(
        version=SCHEMA_VERSION,
        host=host,
        sent_at=now(),
        applied_generation=1,
        capacity=Capacity(cpus=1, memory_mb=1),
    )
    as_dict = json.loads(encode(valid_status))
    mutated = st.builds(
        lambda key, value: json.dumps({**as_dict, key: value}).encode(),
        st.sampled_from([*as_dict, "extra"]),
        json_values,
    )
    return st.one_of(
        st.binary(min_size=1, max_size=500),
        json_values.map(lambda v: json.dumps(v).encode()),
        mutated,
        st.integers(2, 99).map(lambda v: json.dumps({**as_dict, "version": v}).encode()),
    ).filter(lambda payload: not _decodes(payload))


def _decodes(payload: bytes) -> bool:
    """A mutation may still be a valid message (say, an empty list for a default)."""
    for kind in (HostStatus, Presence, JobResult):
        try:
            decode(payload, kind)
        except MessageRejected:
            continue
        return True
    return False


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
async def test_bad_mqtt_messages_are_logged_and_ignored(
    controller: ControllerProcess, fake_agent: FakeAgent, data: st.DataObject
) -> None:
    ghost = "ghost-" + secrets.token_hex(3)
    payloads = data.draw(st.lists(bad_payloads(ghost), min_size=5, max_size=15))
    for i, payload in enumerate(payloads):
        topic = [
            topics.status(ghost),
            topics.presence(ghost),
            topics.job_result(ghost, "a" * 32),
        ][i % 3]
        await fake_agent.broker.publish_as(ghost, topic, payload)
    # Wrong host in the payload, an oversized message, and a valid message for the ghost
    # on the agent's topic: all refused.
    await fake_agent.publish(
        topics.presence(fake_agent.host),
        encode(Presence(version=SCHEMA_VERSION, host=ghost, online=True, at=now())),
    )
    await fake_agent.broker.publish_as(ghost, topics.status(ghost), b" " * (MAX_MESSAGE_BYTES + 1))
    huge_generation = msgspec.structs.replace(fake_agent.status(), applied_generation=2**64 - 1)
    await fake_agent.publish(topics.status(fake_agent.host), encode(huge_generation))
    # (test_controller_limits.py has more hostile numbers.)
    deep = b'{"version": 1, "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    await fake_agent.broker.publish_as(ghost, topics.status(ghost), deep)
    # A sentinel: once it is applied, everything published before it was handled.
    # New in every example (the fake agent's last capacity stays from the one before).
    memory = 20_000 + secrets.randbelow(2**24)
    fake_agent.capacity = Capacity(cpus=1.0, memory_mb=memory)
    await fake_agent.report()

    async def sentinel_seen() -> bool:
        _, body = await controller.api("GET", "/v1/hosts")
        return any(h["capacity"]["memory_mb"] == memory for h in body["hosts"])

    await eventually(sentinel_seen, "the sentinel status")
    status, body = await controller.api("GET", "/v1/hosts")
    assert status == 200 and ghost not in {h["name"] for h in body["hosts"]}
    assert controller.running
    log = controller.log_text()
    assert "mqtt_message_rejected topic=orkestr/v1/hosts/" + ghost in log
    for reason in ("HostMismatch", "TooLarge", "Malformed"):
        assert f"reason={reason}" in log
    _, metrics = await controller.api("GET", "/metrics")
    # Present from the start at 0 (for increase()), so its value is what counts here.
    rejected = re.search(
        r'^orkestr_controller_mqtt_messages_total\{kind="status",result="rejected"\} (\S+)$',
        metrics,
        re.M,
    )
    assert rejected is not None and float(rejected[1]) >= 4, metrics


# --- the test services themselves -----------------------------------------------------


async def test_mosquitto_keeps_retained_messages_and_sessions_across_restarts() -> None:
    queued, retained = f"{topics.PREFIX}/t/queued", f"{topics.PREFIX}/t/retained"
    async with Mosquitto() as broker:
        port = broker.port
        keeper = await broker.identity("keeper", "peer")
        writer = await broker.identity("writer", "peer")
        async with broker.client(keeper, clean_session=False) as c:
            await c.subscribe(queued, qos=1)
        async with broker.client(writer) as c:
            await c.publish(retained, b"kept", qos=1, retain=True)
            await c.publish(queued, b"waiting", qos=1)
        await broker.stop()
        await broker.start()
        assert broker.port == port
        got: dict[str, bytes] = {}
        async with broker.client(keeper, clean_session=False) as c:
            await c.subscribe(retained, qos=1)
            async with asyncio.timeout(5):
                async for message in c.messages:
                    assert isinstance(message.payload, bytes)
                    got[message.topic.value] = message.payload
                    if len(got) == 2:
                        break
        assert got == {retained: b"kept", queued: b"waiting"}
        # The broker wrote its persistence file (as the user it drops to).
        assert (broker.data_dir / "mosquitto.db").exists()
        assert "Permission denied" not in broker.log_text()


async def test_metrics_show_each_hosts_published_and_applied_generation(
    controller: ControllerProcess, mosquitto: Mosquitto, fake_agent: FakeAgent
) -> None:
    """Per host, from the controller: the fleet-wide maximum could not show one stuck host
    while another was current (the OrkestrDesiredGenerationNotApplied alert reads these)."""
    project = await new_project(controller, "pro")
    host = project["host"]
    async with DesiredWatcher(host, mosquitto) as watcher:
        state = await watcher.wait_for(lambda s: project_in(s, project["id"]) is not None)
    fake_agent.applied_generation = state.generation - 1
    await fake_agent.report()

    async def series() -> tuple[float, float] | None:
        _, text = await controller.api("GET", "/metrics")
        found = {
            name: float(value)
            for name, value in re.findall(
                rf'^orkestr_controller_host_(desired|applied)_generation{{host="{host}"}} (\S+)$',
                text,
                re.M,
            )
        }
        if found.get("applied") != state.generation - 1 or "desired" not in found:
            return None
        return found["desired"], found["applied"]

    desired, applied = await eventually(series, "per-host generations")
    assert desired >= state.generation > applied
