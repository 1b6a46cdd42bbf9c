"""One shared variable name reaches a member from one add-on only (a real controller and
agent): two groups giving a member the same name is a 409 at share time and at join
time, naming both add-ons, instead of the older add-on silently keeping the name."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from tests.agent_fixtures import AgentProcess, Stack, create_addon, create_project
from tests.services import wait_blocked_by
from tests.test_groups import group_of

pytest_plugins = ["tests.agent_fixtures"]


async def test_two_groups_cannot_give_one_member_the_same_name(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    a, b, m = [(await create_project(c, "team"))["id"] for _ in range(3)]
    orders = await create_addon(c, a, "orders", "postgres")
    billing = await create_addon(c, b, "billing", "postgres")
    g1 = await group_of(c, a, m)
    g2 = await group_of(c, b, m)
    status, body = await c.api(
        "PUT", f"/v1/projects/{a}/groups/{g1}/shares/{orders['id']}", {"env_name": "SHOP_URL"}
    )
    assert status == 200, body
    # Share time: m already receives SHOP_URL from g1.
    share_b = f"/v1/projects/{b}/groups/{g2}/shares/{billing['id']}"
    status, body = await c.api("PUT", share_b, {"env_name": "SHOP_URL"})
    assert status == 409, body
    assert body["error"] == "conflict", body
    assert "SHOP_URL" in body["message"] and "orders" in body["message"], body
    status, env = await c.api("GET", f"/v1/projects/{m}/env")
    assert status == 200 and "@addon-" + orders["id"] in env["env"]["SHOP_URL"], env
    # Another name is fine.
    status, body = await c.api("PUT", share_b, {"env_name": "LEDGER_URL"})
    assert status == 200, body
    # Join time: a third group already shares SHOP_URL; m may not join it.
    c_proj = (await create_project(c, "team"))["id"]
    stock = await create_addon(c, c_proj, "stock", "redis")
    g3 = await group_of(c, c_proj)
    status, body = await c.api(
        "PUT", f"/v1/projects/{c_proj}/groups/{g3}/shares/{stock['id']}", {"env_name": "SHOP_URL"}
    )
    assert status == 200, body  # nobody in g3 receives it yet
    status, body = await c.api("PUT", f"/v1/groups/{g3}/members/{m}")
    assert status == 409, body
    assert "SHOP_URL" in body["message"] and "stock" in body["message"], body
    status, group = await c.api("GET", f"/v1/groups/{g3}")
    assert status == 200 and [x["project_id"] for x in group["members"]] == [c_proj], group
    # Once g1's share is gone, the name is free: the join and the share go through.
    status, body = await c.api("DELETE", f"/v1/projects/{a}/groups/{g1}/shares/{orders['id']}")
    assert status in (200, 204), body
    status, body = await c.api("PUT", f"/v1/groups/{g3}/members/{m}")
    assert status == 200, body
    status, env = await c.api("GET", f"/v1/projects/{m}/env")
    assert "@addon-" + stock["id"] in env["env"]["SHOP_URL"], env
    for g in (g1, g2, g3):
        status, _ = await c.api("DELETE", f"/v1/groups/{g}")
        assert status == 204


async def test_a_variable_set_while_a_share_of_its_name_commits_is_refused(
    stack: Stack, agent: AgentProcess
) -> None:
    # PATCH .../env checked the group shares before its transaction: a share committing
    # in between got the name too, and the user's 200'd variable was silently shadowed
    # by the shared add-on's URL. The share's transaction is held open here with the
    # lock and the row the controller's share writes.
    c = stack.controller
    assert c is not None
    a, m = [(await create_project(c, "team"))["id"] for _ in range(2)]
    orders = await create_addon(c, a, "orders", "postgres")
    g = await group_of(c, a, m)
    conn = await asyncpg.connect(c.database_url)
    try:
        share = conn.transaction()
        await share.start()
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('orkestr.groups.names'))")
        await conn.execute(
            """INSERT INTO group_shares (group_id, project_id, addon_id, env_name)
            VALUES ($1, $2, $3, 'SHOP_URL')""",
            uuid.UUID(g),
            uuid.UUID(a),
            uuid.UUID(orders["id"]),
        )
        patch = asyncio.create_task(
            c.api("PATCH", f"/v1/projects/{m}/env", {"set": {"SHOP_URL": "mine"}})
        )
        await wait_blocked_by(conn)  # the PATCH is at the lock
        await share.commit()
        status, body = await patch
    finally:
        await conn.close()
    assert status == 409 and body["error"] == "conflict", body
    assert "SHOP_URL is an add-on shared with this project" in body["message"], body
    status, env = await c.api("GET", f"/v1/projects/{m}/env")
    assert status == 200 and "@addon-" + orders["id"] in env["env"]["SHOP_URL"], env
    status, _ = await c.api("DELETE", f"/v1/groups/{g}")
    assert status == 204


async def test_an_addon_may_not_take_a_name_shared_with_the_project(
    stack: Stack, agent: AgentProcess
) -> None:
    # Its own add-ons win a clash, so a custom name (env_name) or a new add-on named `shop`
    # (SHOP_URL) would cut the share off from the member without a word: refused, as a
    # user variable of that name is.
    c = stack.controller
    assert c is not None
    a, m = [(await create_project(c, "team"))["id"] for _ in range(2)]
    orders = await create_addon(c, a, "orders", "postgres")
    mine = await create_addon(c, m, "mine", "redis")
    g = await group_of(c, a, m)
    status, body = await c.api(
        "PUT", f"/v1/projects/{a}/groups/{g}/shares/{orders['id']}", {"env_name": "SHOP_URL"}
    )
    assert status == 200, body
    status, body = await c.api(
        "PATCH", f"/v1/projects/{m}/addons/{mine['id']}", {"env_name": "SHOP_URL"}
    )
    assert status == 409 and body["error"] == "conflict", body
    assert "SHOP_URL is an add-on shared with this project" in body["message"], body
    status, body = await c.api(
        "POST", f"/v1/projects/{m}/addons", {"name": "shop", "kind": "redis"}
    )
    assert status == 409 and body["error"] == "conflict", body
    assert "SHOP_URL is an add-on shared with this project" in body["message"], body
    status, env = await c.api("GET", f"/v1/projects/{m}/env")
    assert status == 200 and "@addon-" + orders["id"] in env["env"]["SHOP_URL"], env
    status, _ = await c.api("DELETE", f"/v1/groups/{g}")
    assert status == 204
