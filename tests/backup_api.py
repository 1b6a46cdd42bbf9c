"""The backup and restore calls of the API, as the backup tests make them: a manual backup
taken and awaited until it is finished and verified, a restore awaited until it ends, and a
statement run through a job on the project network."""

from __future__ import annotations

from typing import Any

from tests.agent_fixtures import API_POLL_S, run_job, wait_for
from tests.services import ControllerProcess


def base(project_id: str, addon_id: str) -> str:
    return f"/v1/projects/{project_id}/addons/{addon_id}"


async def backup_now(c: ControllerProcess, p: str, a: str, wait: bool = True) -> dict[str, Any]:
    status, body = await c.api("POST", f"{base(p, a)}/backups")
    assert status == 202, body
    assert body["state"] == "pending" and body["kind"] == "manual"
    return await wait_backup(c, p, a, body["id"]) if wait else body


async def wait_backup(
    c: ControllerProcess, p: str, a: str, backup_id: str, timeout: float = 180
) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        status, body = await c.api("GET", f"{base(p, a)}/backups/{backup_id}")
        assert status == 200, body
        return body if body["state"] != "pending" and not body["verifying"] else None

    return await wait_for(done, timeout, f"backup {backup_id}", API_POLL_S)  # type: ignore[no-any-return]


async def restore(
    c: ControllerProcess, p: str, a: str, backup_id: str, timeout: float = 60
) -> dict[str, Any]:
    status, body = await c.api("POST", f"{base(p, a)}/backups/{backup_id}/restore")
    assert status == 202, body
    return await wait_restore(c, p, a, body["id"], timeout)


async def wait_restore(
    c: ControllerProcess, p: str, a: str, restore_id: str, timeout: float = 60
) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        s, r = await c.api("GET", f"{base(p, a)}/restores/{restore_id}")
        assert s == 200, r
        return r if r["state"] != "pending" else None

    return await wait_for(done, timeout, f"restore {restore_id}", API_POLL_S)  # type: ignore[no-any-return]


async def sql(c: ControllerProcess, p: str, statement: str) -> str:
    job = await run_job(c, p, f'psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -qtAc "{statement}"')
    assert job["state"] == "succeeded", job
    return str(job["output"]).strip()
