"""Parked holders (agent/pool.py) on a real dockerd: parked where they reach nothing,
claimed by a new add-on (on its project network only, fenced before its database
starts), refilled, a claim cut off swept, and nothing left after the add-on goes."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from agent import firewall, model, pool
from tests.agent_fixtures import (
    AgentProcess,
    Stack,
    create_addon,
    create_project,
    docker,
    wait_for,
    wait_phase,
)

pytest_plugins = ["tests.agent_fixtures"]


def parked(host: str) -> list[dict[str, Any]]:
    ids = docker(
        "ps", "-aq", "--filter", f"label=orkestr.host={host}", "--filter", "label=orkestr.role=parked"
    ).split()  # fmt: skip
    # check=False: one may go between the listing and its inspection (the pool sweeps).
    found: list[dict[str, Any]] = (
        json.loads(docker("inspect", *ids, check=False) or "[]") if ids else []
    )
    return [c for c in found if c["Name"].startswith("/orkestr-pool-")]


def networks_of(info: dict[str, Any]) -> set[str]:
    return set(info["NetworkSettings"]["Networks"])


def output_chain(pid: int) -> list[str]:
    return subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "iptables", "-w", "5", "-S", "OUTPUT"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.splitlines()  # fmt: skip


def reaches(pid: int, ip: str, port: int) -> bool:
    """Whether a TCP connection from the namespace of `pid` to ip:port is answered at all
    (accepted or refused): False when its packets are dropped or have no route."""
    done = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "python3", "-c",
         "import socket, sys\n"
         "s = socket.socket(); s.settimeout(1.5)\n"
         "try: s.connect((sys.argv[1], int(sys.argv[2])))\n"
         "except ConnectionRefusedError: pass\n"
         "except OSError: sys.exit(1)\n",
         ip, str(port)],
        capture_output=True, timeout=30,
    )  # fmt: skip
    return done.returncode == 0


async def test_a_new_addon_claims_a_parked_holder_that_reached_nothing(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    parking = model.parking_network_name(agent.host)

    def full() -> bool:
        return len([p for p in parked(agent.host) if p["State"]["Running"]]) == 4

    await wait_for(full, 60, "two parked holders per kind")
    net = json.loads(docker("network", "inspect", parking))[0]
    assert net["Internal"] is True
    assert net["Options"].get("com.docker.network.bridge.enable_icc") == "false"
    holders = parked(agent.host)
    assert all(networks_of(p) == {parking} for p in holders)
    assert {p["Config"]["User"] for p in holders} == {"65534:65534"}
    # Parked, a holder does not reach its neighbour (no inter-container traffic: with it,
    # the neighbour's kernel would answer with a reset).
    first, second = holders[0], holders[1]
    neighbour = second["NetworkSettings"]["Networks"][parking]["IPAddress"]
    assert not reaches(first["State"]["Pid"], neighbour, 6379)

    project = await create_project(c, "team")
    rd = await create_addon(c, project["id"], "pooled-cache", "redis")
    await wait_phase(c, project["id"], rd["id"], "ready")
    holder = model.holder_name(rd["id"])
    info = json.loads(docker("inspect", holder))[0]
    log = agent.log_path.read_text(errors="replace")
    assert "pool.claimed parked=orkestr-pool-" in log and f"holder={holder}" in log, log[-3000:]
    # Claimed: a parked holder's labels, on the project network only, under the add-on's
    # name, and fenced (its database started only after the fence, apply.stages).
    assert info["Config"]["Labels"]["orkestr.role"] == "parked"
    assert networks_of(info) == {model.network_name(project["id"])}
    aliases = info["NetworkSettings"]["Networks"][model.network_name(project["id"])]["Aliases"]
    assert "pooled-cache" in aliases
    assert f"egress.holder_fenced holder={holder} " in log
    pid = info["State"]["Pid"]
    assert output_chain(pid) == ["-P OUTPUT ACCEPT", f"-A OUTPUT -j {firewall.EGRESS_CHAIN}"]
    db = json.loads(docker("inspect", model.db_name(rd["id"])))[0]
    assert db["HostConfig"]["NetworkMode"] == f"container:{info['Id']}"
    # The add-on answers on its address, and no parked holder reaches it.
    address = info["NetworkSettings"]["Networks"][model.network_name(project["id"])]["IPAddress"]
    assert reaches(pid, address, 6379)
    for other in parked(agent.host):
        assert not reaches(other["State"]["Pid"], address, 6379), other["Name"]

    await wait_for(full, 60, "the pool refilled")

    # Restarted behind the agent's back: a new namespace, on the project network (the
    # parking network, its NetworkMode, was left), fenced again; its database follows.
    docker("restart", "-t", "0", holder)

    async def fenced_again() -> bool:
        await wait_phase(c, project["id"], rd["id"], "ready")
        now = json.loads(docker("inspect", holder))[0]
        text = agent.log_path.read_text(errors="replace")
        return (
            now["State"]["Running"]
            and f"holder={holder} id={now['Id'][:12]} started={now['State']['StartedAt']}" in text
        )

    await wait_for(fenced_again, 90, "the restarted claimed holder fenced again")
    info = json.loads(docker("inspect", holder))[0]
    assert networks_of(info) == {model.network_name(project["id"])}
    assert output_chain(info["State"]["Pid"]) == [
        "-P OUTPUT ACCEPT",
        f"-A OUTPUT -j {firewall.EGRESS_CHAIN}",
    ]

    # A claim cut off after its connect (a parked name on a project network): swept.
    stray = parked(agent.host)[0]["Name"].lstrip("/")
    docker("network", "connect", model.network_name(project["id"]), stray)
    await wait_for(
        lambda: stray not in {p["Name"].lstrip("/") for p in parked(agent.host)},
        60,
        "the half-claimed holder removed",
    )
    await wait_for(full, 60, "the pool refilled again")

    status, _ = await c.api("DELETE", f"/v1/projects/{project['id']}/addons/{rd['id']}")
    assert status == 202
    await wait_for(
        lambda: docker("ps", "-aq", "--filter", f"name=^{holder}$", check=False) == "",
        60,
        "the claimed holder removed with its add-on",
    )


async def test_a_pool_turned_off_leaves_nothing_behind(stack: Stack, agent: AgentProcess) -> None:
    """holder_pool = 0 after a pool ran: its parked holders and network are removed."""
    parking = model.parking_network_name(agent.host)
    await wait_for(lambda: len(parked(agent.host)) == 4, 60, "two parked holders per kind")
    await agent.stop()
    text = agent.config_path.read_text()
    agent.config_path.write_text(text.replace("[agent]\n", "[agent]\nholder_pool = 0\n", 1))
    await agent.start()

    def gone() -> bool:
        left = docker("network", "ls", "-q", "--filter", f"name=^{parking}$", check=False)
        return not parked(agent.host) and left == ""

    await wait_for(gone, 60, "the parked holders and the parking network removed")


def test_the_refill_waits_for_a_burst_not_for_one_addon() -> None:
    # Chains run: wait, as before.
    assert pool.refill_waits(chains_in_flight=1, starting=0)
    # One add-on starting alone (a client creating one at a time): refill, so its next
    # create finds a parked holder (bench/provision.py).
    assert not pool.refill_waits(chains_in_flight=0, starting=1)
    assert not pool.refill_waits(chains_in_flight=0, starting=0)
    # A burst still starting (the Postgres initdb of converge.py): wait.
    assert pool.refill_waits(chains_in_flight=0, starting=pool.BURST_STARTING)
    assert pool.refill_waits(chains_in_flight=0, starting=10)
