"""A tenant's app named like its add-on must not receive the platform's login.

Apps joined the project network under names their owner picks (an app named like an
add-on is refused now, but one deployed before still runs), and the backup containers
connected to the add-on by its name: Docker's DNS then answered with the app's address as
well as the add-on's, and the platform's backup role logged in to the tenant's own server.
Redis sends AUTH in clear; a Postgres impostor asks for a cleartext password and libpq
sends it. With that password (the platform's admin role: Redis without ACL limits, a
Postgres superuser) the tenant was out of every fence. The containers now connect to the
add-on's address on the network, which only the add-on's holder has; a Redis dump joins
the holder's network namespace and talks to the server on loopback, with no endpoint of
its own on the project network.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from tests.agent_fixtures import (
    TOOLBOX,
    AgentProcess,
    Stack,
    create_addon,
    create_project,
    docker,
    wait_for,
    wait_phase,
)
from tests.backup_api import backup_now
from tests.services import ControllerProcess

pytest_plugins = ["tests.agent_fixtures"]

PLANS = """
[team]
max_addons = 5
cpus = 1.0
memory_mb = 512
manual_backups_per_day = 10
backup_retention_days = 30
sleep = { enabled = false }
"""

# A server that accepts, answers Postgres's SSL request with "no" and asks for a cleartext
# password (Redis: reads the AUTH), and prints what it got.
IMPOSTOR = r"""
$|=1; use IO::Socket::INET; my $p = $ARGV[0];
my $s = IO::Socket::INET->new(LocalPort => $p, Listen => 16, ReuseAddr => 1) or die "$!";
print "LISTENING\n";
while (my $c = $s->accept) {
  sysread($c, my $d, 8192);
  if ($p == 5432) {
    if (length($d) == 8) { print $c "N"; sysread($c, $d, 8192); }
    print $c pack("CNN", 82, 8, 3); sysread($c, my $e, 8192); $d .= $e;
  }
  $d =~ s/[^ -~]+/ /g; print "GOT $d\n"; close $c;
}
"""


@pytest.fixture(scope="module")
def plans_text() -> str:
    return PLANS


def logs(container: str) -> str:
    return docker("logs", container, check=False)


async def test_an_app_named_like_the_addon_never_gets_the_platforms_login(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    p = (await create_project(c, "team"))["id"]
    addons = {
        "cache": await create_addon(c, p, "cache", "redis"),
        "db": await create_addon(c, p, "db", "postgres"),
    }
    for a in addons.values():
        await wait_phase(c, p, a["id"], "ready")
    # The API now refuses an app named like an add-on (tests/test_releases.py), but a
    # release deployed before that still runs such an app: the impostors join the project
    # network under the add-ons' names as that app did.
    impostors = {name: f"orkestr-test-impostor-{uuid.uuid4().hex[:8]}" for name in ("cache", "db")}
    try:
        for alias, port in (("cache", 6379), ("db", 5432)):
            docker(
                "run", "-d", "--name", impostors[alias], "--label",
                f"orkestr.host={agent.host}", "--network", f"orkestr-{p}",
                "--network-alias", alias, "-e", f"IMPOSTOR={IMPOSTOR}", TOOLBOX,
                "sh", "-c", f'exec perl -e "$IMPOSTOR" {port}',
            )  # fmt: skip
        await wait_for(
            lambda: all("LISTENING" in logs(n) for n in impostors.values()),
            60,
            "both impostors listen",
        )
        joined = await endpoints_of_dumps(p, backups_never_reach(c, p, addons, impostors))
        # The Postgres dumps got an endpoint on the project network (the watch sees them);
        # the Redis dumps got none: they were in the holder's namespace.
        assert joined[addons["db"]["id"]], joined
        assert joined[addons["cache"]["id"]] == [False] * 3, joined
    finally:
        for name in impostors.values():
            docker("rm", "-f", name, check=False)


async def endpoints_of_dumps(p: str, backups: Any) -> dict[str, list[bool]]:
    """Run `backups`; per add-on, whether each of its dump containers was connected to
    the project network (Docker's network events)."""

    async def events(*filters: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            "docker", "events", "--format", "{{json .}}", *filters,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip

    created = await events("--filter", "type=container", "--filter", "event=create",
                           "--filter", "label=orkestr.role=backup")  # fmt: skip
    connected = await events("--filter", "type=network", "--filter", "event=connect",
                             "--filter", f"network=orkestr-{p}")  # fmt: skip
    try:
        await asyncio.sleep(0.3)  # the event streams are listening
        await backups
        await asyncio.sleep(1)  # the last events are out
    finally:
        outs = []
        for proc in (created, connected):
            proc.terminate()
            outs.append((await proc.communicate())[0].decode().splitlines())
    on_network = {json.loads(e)["Actor"]["Attributes"]["container"] for e in outs[1]}
    joined: dict[str, list[bool]] = {}
    for line in outs[0]:
        actor = json.loads(line)["Actor"]
        if actor["Attributes"]["name"].endswith("-dump"):
            addon = actor["Attributes"]["orkestr.addon"]
            joined.setdefault(addon, []).append(actor["ID"] in on_network)
    return joined


async def backups_never_reach(
    c: ControllerProcess, p: str, addons: dict[str, Any], impostors: dict[str, str]
) -> None:
    # Each backup resolves the name several times (dump, counts, verify): before the fix
    # one of them at least reached an impostor in nearly every run.
    results = []
    for _ in range(3):
        results += await asyncio.gather(*(backup_now(c, p, a["id"]) for a in addons.values()))
    got = {
        alias: [line for line in logs(name).splitlines() if "GOT" in line]
        for alias, name in impostors.items()
    }
    assert got == {"cache": [], "db": []}, got
    for r in results:
        assert r["state"] == "succeeded" and r["verified"] is True, r
