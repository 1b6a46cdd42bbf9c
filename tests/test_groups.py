"""Project groups end to end: a real controller, a real agent, dockerd, PostgreSQL, Redis.

Two projects in a group: the add-on one shares is reachable from the other's jobs under
the variable its owner chose; the sharing project's unshared add-on, its app and its jobs
are not, nor is the other way round; unsharing and leaving cut access; the group network
goes with the group. A shared add-on that sleeps wakes for a member's client.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
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
from tests.services import ControllerProcess

pytest_plugins = ["tests.agent_fixtures"]
# One agent for the module; a fresh one for a test marked `own_agent` (tests/agent_fixtures.py).
pytestmark = pytest.mark.shared_agent

# A TCP service in the sharing project's app: what another member must not reach.
LISTENER = (
    "exec perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalPort=>8080,Listen=>5,"
    'ReuseAddr=>1) or die "$!"; while($c=$s->accept){print $c "hello\\n"; close $c}\''
)
APP = {"image": TOOLBOX, "command": ["sh", "-c", LISTENER]}


def inspect(name: str) -> dict[str, Any]:
    found = json.loads(docker("inspect", name, check=False) or "[]")
    return found[0] if found else {}


def addresses(name: str) -> dict[str, str]:
    """Network name -> the container's address on it."""
    networks = inspect(name).get("NetworkSettings", {}).get("Networks") or {}
    return {n: v["IPAddress"] for n, v in networks.items() if v.get("IPAddress")}


def group_networks(group_id: str) -> list[str]:
    return docker("network", "ls", "-q", "--filter", f"label=orkestr.group={group_id}").split()


def reach(ip: str, port: int) -> str:
    """A job script line: prints `open <ip>:<port>` or `closed <ip>:<port>`."""
    return (
        f"if timeout 3 bash -c 'exec 3<>/dev/tcp/{ip}/{port}'; "
        f"then echo open {ip}:{port}; else echo closed {ip}:{port}; fi"
    )


def at_once(*lines: str) -> str:
    """A job script running each line in the background, done when all are."""
    return " ".join(f"( {line} ) &" for line in lines) + " wait"


async def job_output(c: ControllerProcess, project_id: str, script: str) -> str:
    job = await run_job(c, project_id, script, timeout=60)
    assert job["state"] in ("succeeded", "failed"), job
    return str(job["output"])


async def group_of(c: ControllerProcess, *members: str) -> str:
    status, group = await c.api("POST", "/v1/groups", {"name": f"g-{uuid.uuid4().hex[:8]}"})
    assert status == 201, group
    for m in members:
        status, body = await c.api("PUT", f"/v1/groups/{group['id']}/members/{m}")
        assert status == 200, body
    return str(group["id"])


async def test_a_shared_addon_is_reachable_from_the_other_member_and_nothing_else(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    a = (await create_project(c, "team"))["id"]
    b = (await create_project(c, "team"))["id"]
    orders = await create_addon(c, a, "orders", "postgres")
    cache = await create_addon(c, a, "cache", "redis")  # never shared
    status, body = await c.api("POST", f"/v1/projects/{a}/releases", {"apps": {"web": APP}})
    assert status == 201, body
    await wait_phase(c, a, orders["id"], "ready")
    await wait_phase(c, a, cache["id"], "ready")
    web = f"orkestr-app-{app_id(a, 'web')}"
    await wait_for(lambda: inspect(web).get("State", {}).get("Running"), 60, "a's app running")

    group_id = await group_of(c, a, b)
    # The owner's token shares its add-on; another project's token cannot.
    status, a_token = await c.api("POST", f"/v1/projects/{a}/tokens", {})
    assert status == 201, a_token
    status, b_token = await c.api("POST", f"/v1/projects/{b}/tokens", {})
    assert status == 201, b_token
    share = f"/v1/projects/{a}/groups/{group_id}/shares/{orders['id']}"
    status, body = await c.api("PUT", share, {"env_name": "ORDERS_URL"}, token=b_token["token"])
    assert status == 404, body
    status, body = await c.api("PUT", share, {"env_name": "ORDERS_URL"}, token=a_token["token"])
    assert status == 200, body
    assert [s["env_name"] for s in body["shares"]] == ["ORDERS_URL"]
    # Only the operator groups projects.
    status, body = await c.api(
        "DELETE", f"/v1/groups/{group_id}/members/{b}", token=b_token["token"]
    )
    assert status == 404, body

    status, env = await c.api("GET", f"/v1/projects/{b}/env", token=b_token["token"])
    assert status == 200, env
    orders_url = env["env"]["ORDERS_URL"]
    assert f"@addon-{orders['id']}:5432/" in orders_url
    assert "CACHE_URL" not in env["env"] and "DATABASE_URL" not in env["env"]

    net = f"orkestr-g-{group_id}"
    await wait_for(lambda: net in addresses(web), 60, "a's app on the group network")
    holder = f"orkestr-{orders['id']}-net"
    await wait_for(lambda: net in addresses(holder), 60, "the shared holder on the group network")
    info = docker("network", "inspect", net, "--format", "{{.Internal}} {{json .Labels}}")
    assert info.startswith("true ") and group_id in info

    a_net = f"orkestr-{a}"
    cache_ip = addresses(f"orkestr-{cache['id']}-net")[a_net]
    web_ips = addresses(web)
    # At once: a closed address costs its 3 s timeout (the lines are short, so they
    # reach the output whole).
    script = at_once(
        'psql "$ORDERS_URL" -tAc "select 40 + 2"',
        reach(addresses(holder)[net], 5432),
        reach(addresses(holder)[net], 22),
        reach(cache_ip, 6379),
        reach(web_ips[net], 8080),
        reach(web_ips[a_net], 8080),
    )
    out = await job_output(c, b, script)
    assert "42" in out.split(), out
    assert f"open {addresses(holder)[net]}:5432" in out, out
    assert "closed" in out and out.count("open ") == 1, out

    # b's app, deployed after the share, has the variable and reaches the add-on too.
    uses_orders = {
        "image": TOOLBOX,
        "command": ["sh", "-c", 'psql "$ORDERS_URL" -tAc "select 40 + 2"; ' + LISTENER],
    }
    status, body = await c.api(
        "POST", f"/v1/projects/{b}/releases", {"apps": {"api": uses_orders}}, token=b_token["token"]
    )
    assert status == 201, body
    assert "ORDERS_URL" in body["variables"]
    b_web = f"orkestr-app-{app_id(b, 'api')}"
    await wait_for(lambda: net in addresses(b_web), 60, "b's app on the group network")
    await wait_for(
        lambda: "42" in docker("logs", b_web, check=False).split(), 60, "b's app reaching orders"
    )

    # The other way round: a's jobs reach nothing of b's on the group network.
    out = await job_output(c, a, reach(addresses(b_web)[net], 8080))
    assert "closed" in out, out

    # Unsharing cuts access at once; the next release drops the variable.
    status, _ = await c.api("DELETE", share, token=a_token["token"])
    assert status == 204
    status, env = await c.api("GET", f"/v1/projects/{b}/env")
    assert "ORDERS_URL" not in env["env"]
    await wait_for(lambda: net not in addresses(holder), 60, "the holder leaving the network")
    # Cut, the add-on's name is unknown on b's networks: Docker's DNS asks outside for it,
    # which a project network cannot reach, and glibc waited two tries of 5 s for that.
    # One try of 3 s, the bound the probes above give a closed address.
    refused = (
        f'RES_OPTIONS="timeout:3 attempts:1" psql "{orders_url}" -tAc "select 40 + 2" '
        "|| echo refused"
    )
    out = await job_output(c, b, refused)
    assert "refused" in out and "42" not in out.split(), out

    # Shared again, then b leaves the group: cut again.
    status, body = await c.api("PUT", share, {"env_name": "ORDERS_URL"})
    assert status == 200, body
    out = await job_output(c, b, 'psql "$ORDERS_URL" -tAc "select 40 + 2"')
    assert "42" in out.split(), out
    status, body = await c.api("DELETE", f"/v1/groups/{group_id}/members/{b}")
    assert status == 200, body
    await wait_for(lambda: net not in addresses(b_web), 60, "b's app leaving the network")
    out = await job_output(c, b, refused)
    assert "refused" in out and "42" not in out.split(), out

    # The group goes: so does its network, and the holder stays on its project network.
    assert group_networks(group_id)
    status, _ = await c.api("DELETE", f"/v1/groups/{group_id}")
    assert status == 204
    await wait_for(lambda: not group_networks(group_id), 60, "the group network removed")
    assert a_net in addresses(holder) and net not in addresses(holder)
    await wait_phase(c, a, orders["id"], "ready")


# It moves a project off its host, and its add-ons are still starting at its end.
@pytest.mark.own_agent
async def test_members_must_share_a_host_and_names_must_not_clash(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    a = (await create_project(c, "team"))["id"]
    b = (await create_project(c, "team"))["id"]
    orders = await create_addon(c, a, "orders", "postgres")
    await create_addon(c, b, "billing", "postgres")
    group_id = await group_of(c, a, b)
    share = f"/v1/projects/{a}/groups/{group_id}/shares/{orders['id']}"
    # BILLING_URL is b's own add-on's variable: refused, not silently shadowed.
    status, body = await c.api("PUT", share, {"env_name": "BILLING_URL"})
    assert status == 409 and "BILLING_URL" in body["message"], body
    status, body = await c.api("PUT", share, {"env_name": "DATABASE_URL"})
    assert status == 422, body
    status, body = await c.api("PUT", share, {"env_name": "lower"})
    assert status == 422, body
    # A project that is not a member cannot share in the group.
    outsider = (await create_project(c, "team"))["id"]
    other = await create_addon(c, outsider, "x", "redis")
    status, body = await c.api(
        "PUT",
        f"/v1/projects/{outsider}/groups/{group_id}/shares/{other['id']}",
        {"env_name": "X_URL"},
    )
    assert status == 404, body
    # A project placed on another host cannot join: refused with a clear error.
    conn = await asyncpg.connect(stack.dsn)
    try:
        await conn.execute("INSERT INTO hosts (name) VALUES ('elsewhere') ON CONFLICT DO NOTHING")
        await conn.execute(
            "UPDATE projects SET host = 'elsewhere' WHERE id = $1", uuid.UUID(outsider)
        )
    finally:
        await conn.close()
    status, body = await c.api("PUT", f"/v1/groups/{group_id}/members/{outsider}")
    assert status == 409 and "one host" in body["message"], body
    status, body = await c.api("POST", "/v1/groups", {"name": f"g-{uuid.uuid4().hex[:8]}"})
    assert status == 201
    status, dup = await c.api("POST", "/v1/groups", {"name": body["name"]})
    assert status == 409, dup
    status, _ = await c.api("DELETE", f"/v1/groups/{group_id}")
    assert status == 204
    status, _ = await c.api("DELETE", f"/v1/groups/{body['id']}")
    assert status == 204


async def test_a_shared_addon_asleep_wakes_for_another_members_job(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    a = (await create_project(c, "pro"))["id"]  # sleeps after 3 s, deeply after 8 s
    b = (await create_project(c, "team"))["id"]
    orders = await create_addon(c, a, "orders", "postgres")
    await wait_phase(c, a, orders["id"], "ready")
    group_id = await group_of(c, a, b)
    share = f"/v1/projects/{a}/groups/{group_id}/shares/{orders['id']}"
    status, body = await c.api("PUT", share, {"env_name": "ORDERS_URL"})
    assert status == 200, body

    db = f"orkestr-{orders['id']}-db"
    await wait_for(lambda: inspect(db).get("State", {}).get("Status") == "exited", 90, "deep sleep")
    wakes = (await c.api("GET", f"/v1/projects/{a}/addons/{orders['id']}"))[1]["wakes"]
    out = await job_output(c, b, 'psql "$ORDERS_URL" -v ON_ERROR_STOP=1 -tAc "select 40 + 2"')
    assert out.strip() == "42", out

    async def woke() -> bool:
        view = (await c.api("GET", f"/v1/projects/{a}/addons/{orders['id']}"))[1]
        return bool(view["wakes"] > wakes)

    await wait_for(woke, 30, "the wake counted")
    status, _ = await c.api("DELETE", f"/v1/groups/{group_id}")
    assert status == 204


# Its add-on is still starting at its end: deleting it through the agent waits for its
# start (35-40 s), removing a test agent's containers does not.
@pytest.mark.own_agent
async def test_a_share_cannot_name_a_variable_that_changes_how_the_other_members_run(
    stack: Stack, agent: AgentProcess
) -> None:
    """A share's variable is set in the other members' apps and jobs. Named PATH, it made
    every job and app of the other tenant fail to start ("sh": executable file not found in
    $PATH); LD_PRELOAD, NODE_OPTIONS or HTTP_PROXY would change how its programs run."""
    c = stack.controller
    assert c is not None
    a = (await create_project(c, "team"))["id"]
    b = (await create_project(c, "team"))["id"]
    orders = await create_addon(c, a, "orders", "postgres")
    group_id = await group_of(c, a, b)
    share = f"/v1/projects/{a}/groups/{group_id}/shares/{orders['id']}"
    for name in ("PATH", "LD_PRELOAD", "NODE_OPTIONS", "HTTP_PROXY", "HOME"):
        status, body = await c.api("PUT", share, {"env_name": name})
        assert status == 422 and "_URL" in body["message"], (name, body)
    job = await run_job(c, b, 'echo "path=$PATH"', timeout=60)
    assert job["state"] == "succeeded" and "path=/" in job["output"], job
    status, body = await c.api("PUT", share, {"env_name": "ORDERS_URL"})
    assert status == 200, body


async def test_a_shared_addon_rotated_by_its_owner_still_lets_the_other_member_in(
    stack: Stack, agent: AgentProcess
) -> None:
    # After a rotation a Postgres add-on's password belongs to `app_rot`; the share's URL
    # kept the user `app` with the new password, so the other member's logins failed.
    c = stack.controller
    assert c is not None
    a, b = [(await create_project(c, "team"))["id"] for _ in range(2)]
    orders = await create_addon(c, a, "orders", "postgres")
    await wait_phase(c, a, orders["id"], "ready")
    group_id = await group_of(c, a, b)
    share = f"/v1/projects/{a}/groups/{group_id}/shares/{orders['id']}"
    status, body = await c.api("PUT", share, {"env_name": "ORDERS_URL"})
    assert status == 200, body
    status, body = await c.api("POST", f"/v1/projects/{a}/addons/{orders['id']}/rotate-credentials")
    assert status == 202, body
    own = (await c.api("GET", f"/v1/projects/{a}/env"))[1]["env"]["ORDERS_URL"]
    shared = (await c.api("GET", f"/v1/projects/{b}/env"))[1]["env"]["ORDERS_URL"]
    # The same user and password; only the host name differs (the group network's).
    assert shared.split("@")[0] == own.split("@")[0], (own, shared)
    check = 'psql "$ORDERS_URL" -v ON_ERROR_STOP=1 -tAc "select 40 + 2"'

    async def owner_in() -> bool:  # the host has applied the new password
        return (await job_output(c, a, check)).strip() == "42"

    await wait_for(owner_in, 60, "the owner's new credentials work", interval=1)
    assert (await job_output(c, b, check)).strip() == "42"
    status, _ = await c.api("DELETE", f"/v1/groups/{group_id}")
    assert status == 204
