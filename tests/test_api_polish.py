"""HTTP niceties of the API against the real controller: `Location` on 201, `Allow` on
405, and `limit`/`offset` pagination of every list.
"""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import asyncpg
import pytest
from multidict import CIMultiDictProxy

from tests.services import ControllerProcess, FakeAgent


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def call(
    c: ControllerProcess, method: str, path: str, json: Any = None, data: bytes | None = None
) -> tuple[int, CIMultiDictProxy[str], Any]:
    """The API's answer with its headers (ControllerProcess.api drops them)."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            c.url + path,
            json=json,
            data=data,
            headers={"Authorization": f"Bearer {c.operator_token}"},
        ) as response,
    ):
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, response.headers, body


async def test_created_resources_say_where_they_live(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    status, headers, project = await call(
        controller, "POST", "/v1/projects", {"name": unique("loc"), "plan": "team"}
    )
    assert status == 201, project
    pid = project["id"]
    assert headers["Location"] == f"/v1/projects/{pid}"
    readable = [
        (f"/v1/projects/{pid}/addons", {"name": "orders-db", "kind": "postgres"}),
        (f"/v1/projects/{pid}/jobs", {"image": "debian:12", "command": ["true"]}),
    ]
    for path, body in readable:
        status, headers, made = await call(controller, "POST", path, body)
        assert status == 201, made
        assert headers["Location"] == f"{path}/{made['id']}"
        status, shown = await controller.api("GET", headers["Location"])
        assert status == 200 and shown["id"] == made["id"]
    # Tokens: the body is optional (an empty one means the defaults).
    for path in (f"/v1/projects/{pid}/tokens", f"/v1/hosts/{fake_agent.host}/agent-tokens"):
        status, headers, made = await call(controller, "POST", path, data=b"")
        assert status == 201, made
        assert made["name"] == "default" and headers["Location"] == f"{path}/{made['id']}"
        status, _, _ = await call(controller, "DELETE", headers["Location"])
        assert status == 204


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/projects", "GET, HEAD, POST"),
        ("TRACE", "/healthz", "GET, HEAD"),
        ("PATCH", "/v1/projects/{p}/jobs/{p}", "DELETE, GET, HEAD"),
        ("GET", "/v1/projects/{p}/jobs/{p}/cancel", "POST"),
    ],
)
async def test_405_names_the_allowed_methods(
    controller: ControllerProcess, method: str, path: str, allowed: str
) -> None:
    status, headers, body = await call(controller, method, path.replace("{p}", "0" * 32))
    assert status == 405 and body["error"] == "method_not_allowed", body
    assert headers["Allow"] == allowed


async def test_lists_are_paginated_by_limit_and_offset(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    status, project = await controller.api(
        "POST", "/v1/projects", {"name": unique("pages"), "plan": "team"}
    )
    assert status == 201
    pid = project["id"]
    for name in ("a", "b", "c", "d", "e"):
        status, _ = await controller.api(
            "POST", f"/v1/projects/{pid}/addons", {"name": name, "kind": "redis"}
        )
        assert status == 201
    jobs = []
    for i in range(5):
        status, job = await controller.api(
            "POST", f"/v1/projects/{pid}/jobs", {"image": "debian:12", "command": [str(i)]}
        )
        assert status == 201, job
        jobs.append(job["id"])
        await controller.api("POST", f"/v1/projects/{pid}/jobs/{job['id']}/cancel")

    async def walk(path: str, key: str, limit: int) -> list[str]:
        seen: list[str] = []
        offset: int | None = 0
        while offset is not None:
            status, page = await controller.api("GET", f"{path}?limit={limit}&offset={offset}")
            assert status == 200, page
            assert len(page[key]) <= limit
            seen += [item.get("id", item.get("name")) for item in page[key]]
            offset = page["next_offset"]
        return seen

    addons = await walk(f"/v1/projects/{pid}/addons", "addons", 2)
    status, everything = await controller.api("GET", f"/v1/projects/{pid}/addons")
    assert addons == [a["id"] for a in everything["addons"]] and len(addons) == 5
    assert everything["next_offset"] is None
    assert await walk(f"/v1/projects/{pid}/jobs", "jobs", 2) == jobs[::-1]  # newest first
    assert await walk(f"/v1/projects/{pid}/jobs", "jobs", 5) == jobs[::-1]
    status, page = await controller.api("GET", f"/v1/projects/{pid}/jobs?limit=5")
    assert page["next_offset"] is None
    status, page = await controller.api("GET", f"/v1/projects/{pid}/addons?offset=99")
    assert status == 200 and page == {"addons": [], "next_offset": None}
    projects = await walk("/v1/projects", "projects", 3)
    assert pid in projects and len(projects) == len(set(projects))
    hosts = await walk("/v1/hosts", "hosts", 1)
    assert fake_agent.host in hosts
    # An add-on's backups too (they took no limit and answered no next_offset).
    # These plans take no backups: three failed ones, as a host would have reported them.
    addon_id = everything["addons"][0]["id"]
    conn = await asyncpg.connect(controller.database_url)
    try:
        for _ in range(3):
            await conn.execute(
                """INSERT INTO backups (id, addon_id, project_id, kind, state, error)
                VALUES ($1, $2, $3, 'manual', 'failed', 'test')""",
                uuid.uuid4(),
                uuid.UUID(addon_id),
                uuid.UUID(pid),
            )
    finally:
        await conn.close()
    backups = f"/v1/projects/{pid}/addons/{addon_id}/backups"
    status, whole = await controller.api("GET", backups)
    assert status == 200 and len(whole["backups"]) == 3 and whole["next_offset"] is None, whole
    assert await walk(backups, "backups", 2) == [b["id"] for b in whole["backups"]]
    status, page = await controller.api("GET", f"{backups}?offset=3")
    assert status == 200 and page["backups"] == [] and page["next_offset"] is None, page

    for query in ("limit=0", "limit=501", "limit=x", "offset=-1", "limit=1&limit=2", "limit=1.5"):
        for path in (f"/v1/projects/{pid}/addons", backups):
            status, body = await controller.api("GET", f"{path}?{query}")
            assert status == 400 and body["error"] == "bad_request", (path, query, body)
            assert ("limit" in body["message"]) or ("offset" in body["message"])


async def test_a_body_sent_to_a_route_without_one_is_refused_not_ignored(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    """`POST .../backups {"kind": "automatic"}` took a manual backup (one of the day's),
    and `DELETE .../addons/{id} {"dry_run": true}` deleted it: the body was never read."""
    _, _, project = await call(
        controller, "POST", "/v1/projects", {"name": unique("nobody"), "plan": "team"}
    )
    pid = project["id"]
    status, _, addon = await call(
        controller, "POST", f"/v1/projects/{pid}/addons", {"name": "db", "kind": "postgres"}
    )
    assert status == 201, addon
    base = f"/v1/projects/{pid}/addons/{addon['id']}"
    for method, path, body in (
        ("POST", f"{base}/backups", {"kind": "automatic"}),
        ("POST", f"{base}/rotate-credentials", {"grace_s": 0}),
        ("POST", f"{base}/promote", [1]),
        ("DELETE", base, {"dry_run": True}),
    ):
        status, _, answer = await call(controller, method, path, body)
        assert status == 422 and answer["error"] == "invalid_body", (path, answer)
    status, _, answer = await call(controller, "POST", f"{base}/promote", data=b"not json")
    assert status == 400 and answer["error"] == "invalid_json", answer
    status, shown = await controller.api("GET", base)
    assert status == 200 and shown["deleted_at"] is None and shown["secret_version"] == 1
    # Nothing, or `{}`, is what these routes take.
    status, _, made = await call(controller, "POST", f"{base}/rotate-credentials", {})
    assert status == 202, made
    status, _, answer = await call(controller, "DELETE", base, data=b"")
    assert status == 202, answer


async def test_a_body_to_a_method_the_route_lacks_is_still_a_405(
    controller: ControllerProcess,
) -> None:
    status, _, body = await call(controller, "DELETE", "/v1/projects", {"name": "x"})
    assert status == 405 and body["error"] == "method_not_allowed", body
