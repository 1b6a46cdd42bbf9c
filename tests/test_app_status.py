"""App state reported by the agent and shown by the API and the CLI.

The pure part is a table over Docker inspect payloads (agent/apps.py). End to end, a real
agent runs three apps of one release: one that runs, one that keeps failing (Docker
restarts it: the count rises, the last exit code shows) and one the OOM killer ends;
`GET .../apps` and `orkestr apps` say so.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

import pytest

from agent.apps import app_status
from schemas.messages import AppSpec, AppStatus
from tests.agent_fixtures import TOOLBOX, AgentProcess, Stack, create_project, wait_for

pytest_plugins = ["tests.agent_fixtures"]

PID = "a" * 32
APP = AppSpec(id="b" * 32, name="web", image=TOOLBOX, release=4)
T0 = "2026-01-02T03:04:05.123456789Z"
T1 = "2026-01-02T03:05:00.5Z"


def inspected(
    status: str, *, started: str = T0, finished: str = "0001-01-01T00:00:00Z", **more: Any
) -> dict[str, Any]:
    state = {"Status": status, "StartedAt": started, "FinishedAt": finished, "ExitCode": 0}
    state.update(more.pop("state", {}))
    return {
        "State": state,
        "Config": {"Labels": {"orkestr.release": "3"}},
        "RestartCount": 0,
        **more,
    }


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (None, {"state": "missing", "release": None}),
        (
            inspected("running"),
            {"state": "running", "release": 3, "exit_code": None, "restart_count": 0},
        ),
        (
            inspected(
                "restarting", finished=T1, RestartCount=7, state={"ExitCode": 3, "Error": ""}
            ),
            {"state": "restarting", "restart_count": 7, "exit_code": 3, "oom_killed": False},
        ),
        (
            inspected("exited", finished=T1, state={"ExitCode": 137, "OOMKilled": True}),
            {"state": "exited", "exit_code": 137, "oom_killed": True},
        ),
        # What Docker never says is not trusted: unknown states, absurd numbers.
        (
            inspected("weird", RestartCount=-1, Config={"Labels": {"orkestr.release": "x"}}),
            {"state": "dead", "restart_count": 0, "release": None},
        ),
    ],
)
def test_app_status_from_docker(payload: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    status = app_status(PID, APP, payload)
    assert (status.id, status.project_id, status.name) == (APP.id, PID, "web")
    for key, value in expected.items():
        assert getattr(status, key) == value, (key, status)


def test_times_are_parsed_to_the_microsecond() -> None:
    status = app_status(PID, APP, inspected("exited", finished=T1, state={"ExitCode": 1}))
    assert status.started_at == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert status.finished_at == datetime(2026, 1, 2, 3, 5, 0, 500000, tzinfo=UTC)
    assert isinstance(status, AppStatus)


# A string of 1 GiB in a 512 MB container: the kernel's OOM killer ends it.
HOG = "perl -e '$x = q(a) x (1024 * 1024 * 1024); sleep 60'"
APPS = {
    "web": {"image": TOOLBOX, "command": ["sh", "-c", "exec sleep infinity"]},
    "crashy": {"image": TOOLBOX, "command": ["sh", "-c", "sleep 1; exit 3"]},
    "hog": {"image": TOOLBOX, "command": ["sh", "-c", HOG]},
}


async def test_app_state_reaches_the_api_and_the_cli(
    stack: Stack, agent: AgentProcess, tmp_path: Any
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    pid = project["id"]
    status, release = await c.api("POST", f"/v1/projects/{pid}/releases", {"apps": APPS})
    assert status == 201, release

    async def apps() -> dict[str, dict[str, Any]] | None:
        status, body = await c.api("GET", f"/v1/projects/{pid}/apps")
        assert status == 200, body
        found = {a["name"]: a for a in body["apps"]}
        web, crashy, hog = found["web"], found["crashy"], found["hog"]
        if (
            web["state"] == "running"
            and web["running_release"] == release["number"]
            and crashy["restart_count"] >= 1
            and crashy["last_exit_code"] == 3
            and hog["oom_killed"]
        ):
            return found
        return None

    found = await wait_for(apps, 120, "app states reported")
    web, crashy, hog = found["web"], found["crashy"], found["hog"]
    assert web["restart_count"] == 0 and web["last_exit_code"] is None and web["started_at"]
    assert not web["oom_killed"] and not crashy["oom_killed"]
    assert crashy["state"] in ("running", "restarting") and crashy["finished_at"]
    assert hog["last_exit_code"] == 137, hog

    env = {
        **os.environ,
        "ORKESTR_API": c.url,
        "ORKESTR_TOKEN": c.operator_token,
        "ORKESTR_CONFIG": str(tmp_path / "cli.json"),
        "COLUMNS": "200",
    }

    async def cli(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        return out.decode()

    listed = json.loads(await cli("apps", "--project", project["name"], "--json"))
    by_name = {a["name"]: a for a in listed["apps"]}
    assert by_name["hog"]["oom_killed"] and by_name["crashy"]["restart_count"] >= 1
    table = await cli("apps", "--project", project["name"])
    lines = {line.split()[0]: line for line in table.splitlines() if line.strip()}
    assert "running" in lines["web"], table
    assert "OOM-killed" in lines["hog"], table
    assert "exit 3" in lines["crashy"], table
