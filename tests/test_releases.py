"""Releases and apps end to end: a real controller, a real agent, dockerd and PostgreSQL.

An app deployed before an add-on existed lacks its variables until a redeploy, and the
API says so; after the redeploy it has them and reaches the add-on; a rollback restores
the old environment.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from controller.releases import app_id
from tests.agent_fixtures import (
    TOOLBOX,
    AgentProcess,
    Stack,
    create_addon,
    create_project,
    docker,
    run_job,
    wait_for,
    wait_phase,
)

pytest_plugins = ["tests.agent_fixtures"]
# One agent for the module; a fresh one for a test marked `own_agent` (tests/agent_fixtures.py).
pytestmark = pytest.mark.shared_agent

APP = {"image": TOOLBOX, "command": ["sh", "-c", "exec sleep infinity"]}
APPS = {"web": APP}


def inspect(name: str) -> dict[str, Any] | None:
    found = json.loads(docker("inspect", name, check=False) or "[]")
    return found[0] if found else None


def env_of(info: dict[str, Any]) -> dict[str, str]:
    return dict(e.split("=", 1) for e in info["Config"]["Env"])


async def running_release(name: str, release: int) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        info = inspect(name)
        if (
            info
            and info["State"]["Running"]
            and info["Config"]["Labels"].get("orkestr.release") == str(release)
        ):
            return info
        return None

    return await wait_for(check, 120, f"{name} running release {release}")  # type: ignore[no-any-return]


async def test_variables_reach_an_app_on_the_next_deploy(stack: Stack, agent: AgentProcess) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    pid = project["id"]
    container = f"orkestr-app-{app_id(pid, 'web')}"

    status, v1 = await c.api("POST", f"/v1/projects/{pid}/releases", {"apps": APPS})
    assert status == 201, v1
    assert v1["number"] == 1 and v1["apps"] == [{"name": "web", **APP}] and v1["variables"] == []
    info = await running_release(container, 1)
    # Hardened like a job: nobody, no capabilities, no new privileges, restarted on failure.
    host_config = info["HostConfig"]
    assert info["Config"]["User"] == "65534:65534" and host_config["CapDrop"] == ["ALL"]
    assert host_config["RestartPolicy"]["Name"] == "on-failure"
    assert any("no-new-privileges" in o for o in host_config["SecurityOpt"])
    assert host_config["PidsLimit"] and host_config["Memory"] > 0
    assert "DATABASE_URL" not in env_of(info)

    # An add-on after the deploy: the app lacks it, and the API says so.
    db = await create_addon(c, pid, "orders-db", "postgres")
    await wait_phase(c, pid, db["id"], "ready")
    status, apps = await c.api("GET", f"/v1/projects/{pid}/apps")
    assert status == 200
    [web] = apps["apps"]
    assert web["release"] == 1 and web["name"] == "web"
    assert web["pending_variables"] == ["DATABASE_URL", "ORDERS_DB_URL"]
    assert web["message"].startswith("pending variables: redeploy")
    assert "DATABASE_URL" not in env_of(inspect(container) or {"Config": {"Env": []}})

    # Redeploy (no body: the same apps, fresh variables): the app has them and reaches it.
    status, v2 = await c.api("POST", f"/v1/projects/{pid}/releases", {})
    assert status == 201 and v2["number"] == 2 and v2["apps"] == [{"name": "web", **APP}]
    assert v2["variables"] == ["DATABASE_URL", "ORDERS_DB_URL"]
    info = await running_release(container, 2)
    assert "@orders-db:5432/" in env_of(info)["DATABASE_URL"]
    out = docker("exec", container, "sh", "-c", 'psql "$DATABASE_URL" -tAc "select 40 + 2"')
    assert out.strip() == "42"
    status, apps = await c.api("GET", f"/v1/projects/{pid}/apps")
    assert apps["apps"][0]["pending_variables"] == [] and apps["apps"][0]["message"] is None

    # Jobs run with the newest release's variables: a variable set since is not there yet.
    status, _ = await c.api("PATCH", f"/v1/projects/{pid}/env", {"set": {"LATER": "1"}})
    assert status == 200
    job = await run_job(c, pid, 'test -n "$DATABASE_URL" && test -z "$LATER" && echo ok')
    assert job["state"] == "succeeded" and job["output"].strip() == "ok", job

    # Rollback to v1: a new release with v1's variables (no add-on) and apps.
    status, v3 = await c.api("POST", f"/v1/projects/{pid}/releases/1/rollback")
    assert status == 201 and v3["number"] == 3 and v3["description"] == "rollback to v1"
    info = await running_release(container, 3)
    assert "DATABASE_URL" not in env_of(info)
    status, listed = await c.api("GET", f"/v1/projects/{pid}/releases")
    assert [r["number"] for r in listed["releases"]] == [3, 2, 1]

    # A release without apps removes the app's container.
    status, _ = await c.api("POST", f"/v1/projects/{pid}/releases", {"apps": {}})
    assert status == 201
    await wait_for(lambda: inspect(container) is None, 60, "the app container removed")


async def test_releases_refuse_what_the_platform_does_not_run(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    pid = (await create_project(c, "team"))["id"]
    url = f"/v1/projects/{pid}/releases"
    for apps in (
        {"web": {"image": "alpine:3"}},
        {"Web": {"image": TOOLBOX}},
        {"web": {"image": TOOLBOX, "command": ["x" * 257]}},
        {f"a{i}": APP for i in range(5)},
        [APP],
    ):
        status, body = await c.api("POST", url, {"apps": apps})
        assert status == 422 and body["error"] == "invalid_body", (apps, body)
    status, body = await c.api("GET", f"{url}/7")
    assert status == 404
    status, body = await c.api("POST", f"{url}/7/rollback")
    assert status == 404
    status, body = await c.api("GET", f"{url}/x")
    assert status == 404
    status, body = await c.api("GET", f"/v1/projects/{pid}/apps")
    assert status == 200 and body == {"apps": []}


async def test_an_app_and_an_addon_never_share_a_name_on_the_project_network(
    stack: Stack, agent: AgentProcess
) -> None:
    """Both answer at their name on the project network: an app named like an add-on made
    the name resolve to either, for the project's clients and the platform's backups."""
    c = stack.controller
    assert c is not None
    pid = (await create_project(c, "team"))["id"]
    await create_addon(c, pid, "db", "postgres")
    url = f"/v1/projects/{pid}/releases"
    status, body = await c.api("POST", url, {"apps": {"web": APP, "db": APP}})
    assert status == 409 and "'db'" in body["message"], body
    status, body = await c.api("POST", url, {"apps": {"cache": APP}})
    assert status == 201, body
    status, body = await c.api(
        "POST", f"/v1/projects/{pid}/addons", {"name": "cache", "kind": "redis"}
    )
    assert status == 409 and "'cache'" in body["message"], body
    # A rollback to a release whose app is now an add-on's name is refused the same way.
    status, body = await c.api("POST", url, {"apps": {"web": APP}})
    assert status == 201, body
    await create_addon(c, pid, "cache", "redis")
    status, body = await c.api("POST", f"{url}/1/rollback")
    assert status == 409 and "'cache'" in body["message"], body


async def test_a_plan_change_resizes_a_running_app_in_place(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    pid = project["id"]
    container = f"orkestr-app-{app_id(pid, 'web')}"
    status, v1 = await c.api("POST", f"/v1/projects/{pid}/releases", {"apps": APPS})
    assert status == 201, v1
    before = await running_release(container, 1)
    assert before["HostConfig"]["NanoCpus"] == 1_000_000_000
    assert before["HostConfig"]["Memory"] == 512 * 1024 * 1024

    # Team (1 CPU, 512 MB) to Starter (0.5 CPU, 256 MB): `docker update`, no new container.
    status, body = await c.api("PATCH", f"/v1/projects/{pid}", {"plan": "starter"})
    assert status == 200, body

    def resized() -> dict[str, Any] | None:
        info = inspect(container)
        host_config = (info or {}).get("HostConfig") or {}
        if (
            host_config.get("NanoCpus") == 500_000_000
            and host_config.get("Memory") == 256 * 1024 * 1024
        ):
            return info
        return None

    after = await wait_for(resized, 60, "the app resized in place")
    assert after["Id"] == before["Id"], "the app's container was recreated"
    assert after["State"]["Running"] and after["State"]["StartedAt"] == before["State"]["StartedAt"]
    assert after["RestartCount"] == 0
