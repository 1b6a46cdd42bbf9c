"""Plan changes, deletion, protection and rotation through the API, with a fake agent
(the protocol is real, the host is not): what the controller decides on its own."""

from __future__ import annotations

import asyncio
import urllib.parse
import uuid
from pathlib import Path

import pytest

from controller.db import open_pool
from controller.plans import load_plans
from controller.snapshot import desired_state
from tests.services import (
    ControllerProcess,
    FakeAgent,
    Mosquitto,
    create_database,
    drop_database,
)
from tests.test_controller_api import addon_status, assert_error, new_addon, new_project


async def test_plan_change_is_operator_only_and_checks_the_plan(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    project = await new_project(controller, "team")
    path = f"/v1/projects/{project['id']}"
    token = await controller.new_project_token(project["id"])
    status, body = await controller.api("PATCH", path, {"plan": "starter"}, token=token)
    assert_error(status, body, 404, "not_found")
    status, body = await controller.api("PATCH", path, {"plan": "gold"})
    assert_error(status, body, 422, "invalid_body")
    status, body = await controller.api("PATCH", path, {"plan": "pro", "extra": 1})
    assert_error(status, body, 422, "invalid_body")
    await new_addon(controller, project, "one")
    await new_addon(controller, project, "two")
    status, body = await controller.api("PATCH", path, {"plan": "starter"})
    assert_error(status, body, 409, "plan_change_refused")
    assert "allows 1 add-on(s) and the project has 2" in body["message"], body
    status, body = await controller.api("PATCH", path, {"plan": "pro"})
    assert status == 200 and body["plan"] == "pro", body


async def test_a_plan_change_with_an_addon_not_measured_yet_is_checked_not_a_500(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    # A host reports "usage_bytes": null until it has measured an add-on (a new one, or a
    # sleeping one after an agent restart): the plan check read it as the text 'null'.
    project = await new_project(controller, "team")
    a = await new_addon(controller, project, "db")
    fake_agent.addons = [addon_status(a, usage_bytes=None)]
    await fake_agent.report()

    async def reported() -> bool:
        _, view = await controller.api("GET", f"/v1/projects/{project['id']}/addons/{a['id']}")
        return view["observed_generation"] is not None

    for _ in range(100):
        if await reported():
            break
        await asyncio.sleep(0.1)
    status, body = await controller.api("PATCH", f"/v1/projects/{project['id']}", {"plan": "pro"})
    assert status == 200 and body["plan"] == "pro", body


async def test_rotation_raises_the_version_and_alternates_the_postgres_user(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    project = await new_project(controller, "team")
    pg = await new_addon(controller, project, "main-db")
    rd = await new_addon(controller, project, "cache", "redis")
    env_path = f"/v1/projects/{project['id']}/env"
    users, redis_passwords = [], []
    for version in (1, 2, 3):
        status, env = await controller.api("GET", env_path)
        assert status == 200
        users.append(urllib.parse.urlsplit(env["env"]["DATABASE_URL"]).username)
        redis_passwords.append(urllib.parse.urlsplit(env["env"]["REDIS_URL"]).password)
        for a in (pg, rd):
            status, body = await controller.api(
                "POST", f"/v1/projects/{project['id']}/addons/{a['id']}/rotate-credentials"
            )
            assert status == 202 and body["secret_version"] == version + 1, body
            assert body["rotated_at"], body
    assert users == ["app", "app_rot", "app"]
    assert len(set(redis_passwords)) == 3


async def test_deleting_a_project_without_addons_removes_it_at_once_and_protection_blocks(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    empty = await new_project(controller, "team")
    status, body = await controller.api("DELETE", f"/v1/projects/{empty['id']}")
    assert status == 202 and body["deleted_at"], body
    status, body = await controller.api("GET", f"/v1/projects/{empty['id']}")
    assert_error(status, body, 404, "not_found")

    project = await new_project(controller, "team")
    a = await new_addon(controller, project, "kept")
    addon_path = f"/v1/projects/{project['id']}/addons/{a['id']}"
    status, body = await controller.api("PATCH", addon_path, {"deletion_protection": "yes"})
    assert_error(status, body, 422, "invalid_body")
    status, body = await controller.api("PATCH", addon_path, {"deletion_protection": True})
    assert status == 200 and body["deletion_protection"] is True, body
    status, body = await controller.api("DELETE", f"/v1/projects/{project['id']}")
    assert_error(status, body, 409, "deletion_protected")
    assert "'kept'" in body["message"]
    status, body = await controller.api("DELETE", addon_path)
    assert_error(status, body, 409, "deletion_protected")
    status, body = await controller.api("GET", addon_path)
    assert body["deleted_at"] is None and body["phase"] != "deleting", body
    await controller.api("PATCH", addon_path, {"deletion_protection": False})
    status, body = await controller.api("DELETE", f"/v1/projects/{project['id']}")
    assert status == 202, body
    # Being deleted: nothing new, no plan change, no rotation; the add-on is tombstoned.
    status, body = await controller.api(
        "POST", f"/v1/projects/{project['id']}/addons", {"name": "late", "kind": "redis"}
    )
    assert_error(status, body, 409, "conflict")
    status, body = await controller.api("PATCH", f"/v1/projects/{project['id']}", {"plan": "pro"})
    assert_error(status, body, 409, "conflict")
    status, body = await controller.api("POST", addon_path + "/rotate-credentials")
    assert_error(status, body, 409, "conflict")
    status, body = await controller.api("GET", addon_path)
    assert body["phase"] == "deleting", body


async def test_deleting_a_project_stops_its_apps_and_fails_its_backups_not_started(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    project = await new_project(controller, "team")
    pid = project["id"]
    a = await new_addon(controller, project, "main-db")
    app = {"image": "debian:12", "command": ["sleep", "infinity"]}
    status, body = await controller.api(
        "POST", f"/v1/projects/{pid}/releases", {"apps": {"web": app}}
    )
    assert status == 201, body
    plans = load_plans(controller.plans_file)
    backup_id = uuid.uuid4()
    async with open_pool(controller.database_url, 1, 1) as pool:
        # A backup asked for and not started yet (the test plans allow no manual backups).
        await pool.execute(
            "INSERT INTO backups (id, addon_id, project_id, kind) VALUES ($1, $2, $3, 'manual')",
            backup_id,
            uuid.UUID(a["id"]),
            uuid.UUID(pid),
        )
        [spec] = [p for p in (await desired_state(pool, fake_agent.host, plans)).projects
                  if p.id == pid]  # fmt: skip
        assert [x.name for x in spec.apps] == ["web"] and len(spec.backups) == 1

        status, body = await controller.api("DELETE", f"/v1/projects/{pid}")
        assert status == 202, body
        # The host is told to stop the apps and start no backup; the add-on is tombstoned.
        [spec] = [p for p in (await desired_state(pool, fake_agent.host, plans)).projects
                  if p.id == pid]  # fmt: skip
        assert spec.apps == () and spec.backups == (), spec
        assert [x.deleted for x in spec.addons] == [True]
    status, body = await controller.api(
        "GET", f"/v1/projects/{pid}/addons/{a['id']}/backups/{backup_id.hex}"
    )
    assert status == 200 and body["state"] == "failed", body
    assert body["error"] == "project deleted", body
    # Nothing new starts in it: no release, no variable, no renamed add-on, no backup.
    for method, path, req in (
        ("POST", "releases", {}),
        ("PATCH", "env", {"set": {"A": "1"}}),
        ("PATCH", f"addons/{a['id']}", {"env_name": "PG_URL"}),
        ("POST", f"addons/{a['id']}/backups", None),
    ):
        status, body = await controller.api(method, f"/v1/projects/{pid}/{path}", req)
        assert_error(status, body, 409, "conflict")


async def test_an_addon_patch_changes_only_the_fields_it_names(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    project = await new_project(controller, "team")
    a = await new_addon(controller, project, "main-db")
    path = f"/v1/projects/{project['id']}/addons/{a['id']}"
    status, body = await controller.api("PATCH", path, {})
    assert_error(status, body, 422, "invalid_body")
    status, body = await controller.api(
        "PATCH", path, {"env_name": "PG_URL", "deletion_protection": True}
    )
    assert status == 200, body
    assert body["env_name"] == "PG_URL" and body["deletion_protection"] is True, body
    status, body = await controller.api("PATCH", path, {"env_name": None})
    assert status == 200 and body["env_name"] is None and body["deletion_protection"], body
    status, body = await controller.api("PATCH", path, {"deletion_protection": False})
    assert status == 200 and body["deletion_protection"] is False, body


SHRINKABLE = """
[team]
max_addons = 5
cpus = 1.0
memory_mb = 512
backup_retention_days = 7
sleep = { enabled = false }
"""


async def test_a_plans_file_that_shrinks_a_plan_below_its_addons_stops_the_start(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The operator's edit of the plans file is checked as a PATCH to that plan is: a
    Redis holding 100 MB on a plan whose memory became 64 MB (its quota 48 MB) stopped
    nothing, the agent failed to apply the limit every few seconds, and a restart of the
    Redis into 64 MB would crash-loop on its own data."""
    plans = tmp_path / "plans.toml"
    plans.write_text(SHRINKABLE)
    dsn = await create_database()
    c = ControllerProcess(database_url=dsn, broker=mosquitto, plans_file=plans)
    try:
        await c.start()
        async with FakeAgent(f"h-{uuid.uuid4().hex[:10]}", mosquitto) as host:
            await c.wait_host_online(host.host)
            project = await new_project(c, "team")
            cache = await new_addon(c, project, "cache", "redis")
            host.addons = [addon_status(cache, usage_bytes=100 * 1024 * 1024)]
            await host.report()

            async def measured() -> bool:
                path = f"/v1/projects/{project['id']}/addons/{cache['id']}"
                _, view = await c.api("GET", path)
                return view["usage_bytes"] is not None

            for _ in range(100):
                if await measured():
                    break
                await asyncio.sleep(0.1)
            await c.stop()
            plans.write_text(SHRINKABLE.replace("memory_mb = 512", "memory_mb = 64"))
            with pytest.raises(RuntimeError, match="controller exited during start") as refused:
                await c.start()
            message = str(refused.value)
            assert f"project {project['name']!r}" in message, message
            assert "allows 48 MB to Redis add-on 'cache'" in message, message
            assert "uses 100.0 MB" in message, message
            plans.write_text(SHRINKABLE)  # put back: it starts again
            await c.start()
    finally:
        await c.close()
        await drop_database(dsn)
