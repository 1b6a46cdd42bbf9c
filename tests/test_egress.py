"""Egress policy: what a project network, a job and an add-on can reach, on real bridges.

Only addresses on this machine are dialled: the host's own addresses, Docker bridges,
and a network namespace this test creates to stand in for "the internet" (198.18.0.0/15,
the benchmarking range) and for the cloud metadata address. The metadata route is a
policy rule for the project's subnet alone, so nothing else on the host is diverted,
and no packet can leave the machine whatever the agent does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import firewall
from agent.docker import Docker
from agent.egress import Firewall
from agent.model import Observed, ObservedNetwork
from tests.agent_fixtures import (
    TOOLBOX,
    AgentProcess,
    Stack,
    create_addon,
    create_project,
    docker,
    host_online,
    more_passes,
    remove_host_objects,
    run_job,
    wait_for,
    wait_phase,
)

pytest_plugins = ["tests.agent_fixtures"]

INTERNET_PORT, METADATA = 8080, "169.254.169.254"
SERVER = """
import select, socket, sys
socks = []
for addr, port in ((sys.argv[1], 8080), (sys.argv[2], 80)):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(64); socks.append(s)
print("listening", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        c, _ = s.accept(); c.close()
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


class Internet:
    """A namespace at 198.18.<n>.2 with a listener, also answering as the metadata address."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns = f"orkestr-inet-{tag}"
        self.host_if, self.ns_if = f"oki{tag}h", f"oki{tag}n"
        n = int(tag[:2], 16)
        self.gw, self.ip = f"198.18.{n}.1", f"198.18.{n}.2"
        self.rules: list[list[str]] = []
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        sh("ip", "link", "set", self.ns_if, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.gw}/30", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.ip}/30", "dev", self.ns_if)
        sh("ip", "-n", self.ns, "addr", "add", f"{METADATA}/32", "dev", self.ns_if)
        sh("ip", "-n", self.ns, "link", "set", self.ns_if, "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.ns, "route", "add", "default", "via", self.gw)
        self.table = str(20000 + n)
        sh("ip", "route", "add", f"{METADATA}/32", "via", self.ip, "table", self.table)
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-c", SERVER, self.ip, METADATA],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.server.stdout is not None and "listening" in self.server.stdout.readline()

    def divert_metadata(self, subnet: str) -> None:
        """The project's packets to the metadata address go to this namespace, nowhere else."""
        rule = ["from", subnet, "to", f"{METADATA}/32", "table", self.table]
        sh("ip", "rule", "add", *rule)
        self.rules.append(rule)

    def close(self) -> None:
        self.server.kill()
        for rule in self.rules:
            subprocess.run(["ip", "rule", "del", *rule], capture_output=True)
        subprocess.run(["ip", "route", "flush", "table", self.table], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


@pytest.fixture
def internet() -> Iterator[Internet]:
    net = Internet()
    try:
        yield net
    finally:
        net.close()


@pytest.fixture
def host_listener() -> Iterator[int]:
    """A service on every host address, as a careless host service would be."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 0))
    s.listen(64)
    s.setblocking(False)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    addrs = [line.split()[3].split("/")[0] for line in out.splitlines()]
    return [a for a in addrs if not a.startswith("127.")]


def network(project_id: str) -> dict[str, Any]:
    return json.loads(docker("network", "inspect", f"orkestr-{project_id}"))[0]  # type: ignore[no-any-return]


def probe_script(targets: dict[str, str]) -> str:
    return (
        "".join(
            f'(if timeout 2 bash -c "echo > /dev/tcp/{addr.replace(":", "/")}" 2>/dev/null; '
            f"then echo {label}=REACHED; else echo {label}=BLOCKED; fi) & "
            for label, addr in targets.items()
        )
        + "wait"
    )


def batches(targets: dict[str, str], max_chars: int = 3000) -> Iterator[dict[str, str]]:
    """Split the probes so each job's command stays under the API's argument limit: a
    machine with many bridges has many host addresses."""
    batch: dict[str, str] = {}
    for label, addr in targets.items():
        if batch and len(probe_script({**batch, label: addr})) > max_chars:
            yield batch
            batch = {}
        batch[label] = addr
    if batch:
        yield batch


def results(output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


async def setup(stack: Stack) -> tuple[dict[str, Any], dict[str, Any], str]:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    pg = await create_addon(c, project["id"], "egress-db", "postgres")
    await wait_phase(c, project["id"], pg["id"], "ready")
    return project, pg, network(project["id"])["IPAM"]["Config"][0]["Subnet"]


async def test_jobs_reach_the_internet_but_not_the_host_other_bridges_or_metadata(
    stack: Stack, agent: AgentProcess, internet: Internet, host_listener: int
) -> None:
    c = stack.controller
    assert c is not None
    project, pg, subnet = await setup(stack)
    other, other_pg, _ = await setup(stack)
    internet.divert_metadata(subnet)
    other_ip = network(other["id"])["Containers"]
    holder_ip = next(
        v["IPv4Address"].split("/")[0] for v in other_ip.values() if v["Name"].endswith("-net")
    )
    targets = {
        "own_addon": "egress-db:5432",
        "internet": f"{internet.ip}:{INTERNET_PORT}",
        "metadata": f"{METADATA}:80",
        "other_bridge": f"{holder_ip}:5432",
        **{f"host_{i}": f"{a}:{host_listener}" for i, a in enumerate(host_addresses())},
    }
    seen: dict[str, str] = {}
    for batch in batches(targets):
        seen |= results((await run_job(c, project["id"], probe_script(batch)))["output"])
    assert seen.keys() == targets.keys(), seen
    assert seen.pop("own_addon") == "REACHED", seen
    assert seen.pop("internet") == "REACHED", seen
    assert seen and all(v == "BLOCKED" for v in seen.values()), seen

    # The add-on itself reaches nothing beyond its project network.
    pid = json.loads(docker("inspect", f"orkestr-{pg['id']}-net"))[0]["State"]["Pid"]
    r = subprocess.run(  # noqa: ASYNC221
        ["nsenter", f"--net=/proc/{pid}/ns/net", "bash", "-c",
         f"timeout 2 bash -c 'echo > /dev/tcp/{internet.ip}/{INTERNET_PORT}' && echo REACHED || echo BLOCKED"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.stdout.strip() == "BLOCKED", r
    del other_pg


@pytest.fixture
async def sealed_agent(stack: Stack) -> AsyncIterator[AgentProcess]:
    """An agent whose operator denies jobs the internet."""
    assert stack.controller is not None
    host = f"t{uuid.uuid4().hex[:10]}"
    token = await stack.controller.new_agent_token(host)
    proc = AgentProcess(
        host, stack.mosquitto, stack.controller.url, token,
        extra_config='[network]\njob_egress = "none"\n',
        public_key_file=stack.controller.public_key_file,
    )  # fmt: skip
    try:
        await proc.start()
        await wait_for(lambda: host_online(stack.controller, host), 30, f"host {host} online")
        yield proc
    finally:
        await proc.close()
        remove_host_objects(host)
        if os.environ.get("ORKESTR_TEST_VERBOSE"):
            print(proc.log_tail(200))
        shutil.rmtree(proc.dir, ignore_errors=True)  # it holds the agent's credentials


async def test_operator_can_deny_jobs_the_internet(
    stack: Stack, sealed_agent: AgentProcess, internet: Internet
) -> None:
    c = stack.controller
    assert c is not None
    project, _pg, _subnet = await setup(stack)
    targets = {"own_addon": "egress-db:5432", "internet": f"{internet.ip}:{INTERNET_PORT}"}
    seen = results((await run_job(c, project["id"], probe_script(targets)))["output"])
    assert seen == {"own_addon": "REACHED", "internet": "BLOCKED"}, seen


def fenced_runs(agent: AgentProcess, holder: str) -> list[tuple[str, str]]:
    """(container id, StartedAt) of each fence the agent logged for the holder's name."""
    runs = []
    for line in agent.log_path.read_text(errors="replace").splitlines():
        if f"egress.holder_fenced holder={holder} " in line:
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            runs.append((fields["id"], fields["started"]))
    return runs


def current_run(container: str) -> tuple[str, str] | None:
    found = json.loads(docker("inspect", container, check=False) or "[]")
    if not found or not found[0]["State"]["Running"]:
        return None
    return found[0]["Id"][:12], found[0]["State"]["StartedAt"]


def output_chain(container: str) -> list[str]:
    """The filter OUTPUT chain inside the container's network namespace."""
    pid = json.loads(docker("inspect", container))[0]["State"]["Pid"]
    return subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "iptables", "-w", "5", "-S", "OUTPUT"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.splitlines()  # fmt: skip


async def test_a_holder_is_fenced_once_per_run_and_again_after_a_restart(
    stack: Stack, agent: AgentProcess
) -> None:
    """The fence is the tenant boundary: every run of a holder (a new namespace) is fenced,
    and a run its own chain fenced costs no second fence."""
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    rd = await create_addon(c, project["id"], "fence-cache", "redis")
    await wait_phase(c, project["id"], rd["id"], "ready")
    holder = f"orkestr-{rd['id']}-net"
    await more_passes(agent, 3)  # long after its start event reached the agent
    first = current_run(holder)
    assert fenced_runs(agent, holder) == [first], agent.log_tail(100)
    jump = f"-A OUTPUT -j {firewall.EGRESS_CHAIN}"
    assert output_chain(holder) == ["-P OUTPUT ACCEPT", jump]

    # Behind the agent's back: the same container, a new namespace with no rules in it.
    # (The agent may also see it exited mid-restart and replace it: a new run as well.)
    docker("restart", "-t", "0", holder)
    assert current_run(holder) != first

    async def fenced_again() -> bool:
        await wait_phase(c, project["id"], rd["id"], "ready")
        now = current_run(holder)
        return now is not None and now in fenced_runs(agent, holder)

    await wait_for(fenced_again, 90, "the holder's new run fenced")
    await more_passes(agent, 3)
    runs = fenced_runs(agent, holder)
    assert len(runs) == len(set(runs)), f"a run fenced twice: {runs}"
    assert current_run(holder) in runs and output_chain(holder) == ["-P OUTPUT ACCEPT", jump]


async def test_fence_records_follow_the_holders_runs(caplog: pytest.LogCaptureFixture) -> None:
    """A die event counted before a fence's inspection is an earlier run's; one counted
    after it is checked (an inspection), and only a new run is fenced again. A run's own
    start event is not counted: the fence of a new holder is its only inspection."""
    caplog.set_level(logging.INFO, logger="orkestr.agent.egress")
    host = f"t{uuid.uuid4().hex[:12]}"
    net, name = f"orkestr-fence-{host}", f"orkestr-{host}-net"
    label = f"orkestr.host={host}"
    jump = ["-P OUTPUT ACCEPT", f"-A OUTPUT -j {firewall.EGRESS_CHAIN}"]
    try:
        docker("network", "create", "--label", label, net)
        subnet = network_subnet(net)
        cid = docker("run", "-d", "--name", name, "--label", label, "--network", net,
                     TOOLBOX, "sleep", "infinity")  # fmt: skip
        async with Docker(host) as d:
            wall = Firewall(host, firewall.Policy(), d)
            wall.holder_died(name)  # an earlier run's end, counted before the fence
            await wall.fence_holder(name, net)
            assert wall.fenced(name, cid) and output_chain(name) == jump
            run = wall.run(name)
            wall.holder_died(name)  # counted after the inspection: checked, not fenced
            assert not wall.fenced(name, cid)
            await wall.fence_holder(name, net)
            assert wall.fenced(name, cid) and wall.run(name) == run
            assert not wall.fenced(name, "another-container-of-that-name")
            fenced = [r.getMessage() for r in caplog.records if "holder_fenced" in r.msg]
            assert len(fenced) == 1 and fenced[0].endswith(f" subnet={subnet}"), fenced

            docker("restart", "-t", "0", name)  # a new namespace, no rules in it
            assert output_chain(name) == ["-P OUTPUT ACCEPT"]
            wall.holder_died(name)  # a restart ends the run before the next begins
            assert not wall.fenced(name, cid)
            await wall.fence_holder(name, net)
            assert wall.fenced(name, cid) and wall.run(name) != run
            assert output_chain(name) == jump
            assert sum("holder_fenced" in r.msg for r in caplog.records) == 2
    finally:
        await asyncio.to_thread(remove_host_objects, host)


def network_subnet(name: str) -> str:
    return str(json.loads(docker("network", "inspect", name))[0]["IPAM"]["Config"][0]["Subnet"])


def test_holder_ruleset_replaces_its_chain_and_a_single_jump() -> None:
    rules = firewall.holder_ruleset("10.200.7.0/24").splitlines()
    chain = firewall.EGRESS_CHAIN
    assert rules[0] == "*filter" and rules[-1] == "COMMIT"
    assert f":{chain} - [0:0]" in rules  # declared: flushed and refilled by --noflush
    assert rules[-3:-1] == ["-F OUTPUT", f"-A OUTPUT -j {chain}"]
    own, drop = f"-A {chain} -d 10.200.7.0/24 -j RETURN", f"-A {chain} -j DROP"
    assert rules.index(own) < rules.index(drop)


def test_ruleset_is_per_bridge_and_replaces_only_its_own_chains() -> None:
    bridges = [firewall.Bridge("br-aaa", "10.1.0.0/24"), firewall.Bridge("br-bbb", "10.1.1.0/24")]
    rules = firewall.host_ruleset("h1", bridges, firewall.Policy())
    chain_in, chain_fwd, chain_pol = firewall.chains("h1")
    assert rules.startswith("*filter\n") and rules.endswith("COMMIT\n")
    assert f"-A {chain_in} -i br-aaa -j DROP" in rules
    assert f"-A {chain_fwd} -i br-aaa -o br-aaa -j RETURN" in rules
    assert f"-A {chain_fwd} -i br-bbb -j {chain_pol}" in rules
    assert f"-A {chain_pol} -d 10.1.1.0/24 -j DROP" in rules  # another project's subnet
    assert f"-A {chain_pol} -d 169.254.0.0/16 -j DROP" in rules
    assert f"-A {chain_pol} -j DROP" not in rules
    sealed = firewall.host_ruleset("h1", bridges, firewall.Policy(job_egress="none"))
    assert sealed.endswith(f"-A {chain_pol} -j DROP\nCOMMIT\n")
    allowed = firewall.host_ruleset("h1", bridges, firewall.Policy(allow=("10.9.9.9/32",)))
    pol = [line for line in allowed.splitlines() if line.startswith(f"-A {chain_pol}")]
    assert pol[0] == f"-A {chain_pol} -d 10.9.9.9/32 -j RETURN", "exceptions come first"
    # Same bridges in another order: the same text, so nothing is re-applied.
    assert firewall.host_ruleset("h1", bridges[::-1], firewall.Policy()) == rules
    assert firewall.chains("h1") != firewall.chains("h2")


@given(st.integers(min_value=0, max_value=300))
def test_ruleset_grows_with_the_bridges_not_their_square(n: int) -> None:
    bridges = [
        firewall.Bridge(f"br-{k:04x}", f"10.{200 + k // 256}.{k % 256}.0/24") for k in range(n)
    ]
    policy = firewall.Policy()
    lines = firewall.host_ruleset("h1", bridges, policy).count("\n")
    assert lines == 5 + 5 * n + len(policy.deny) + n


def jump_copies(host: str) -> list[int]:
    out = []
    for chain, *spec in firewall.host_jumps(host):
        listing = subprocess.run(
            ["iptables", "-w", "5", "-S", chain], capture_output=True, text=True, check=True
        ).stdout
        out.append(firewall.count_rule(listing, chain, tuple(spec)))
    return out


async def test_host_jumps_stay_single_under_concurrent_syncs_and_heal_duplicates() -> None:
    """Each copy of a jump makes every forwarded packet walk the chain once more: a leaked
    agent's 46 copies into an 11 000-rule chain cut bridged TCP from 290 MB/s to 40 kB/s."""
    host = f"t{uuid.uuid4().hex[:12]}"
    wall = Firewall(host, firewall.Policy(), Docker(host))
    net = ObservedNetwork(
        id="n", name="orkestr-x", project_id="p", bridge="br-nosuch0", subnet="10.251.0.0/24"
    )
    observed = Observed(networks=(net,))
    try:
        await asyncio.gather(*(wall.sync(observed) for _ in range(4)))
        assert jump_copies(host) == [1, 1]
        for chain, *spec in firewall.host_jumps(host):  # duplicates an older agent left
            for _ in range(3):
                sh("iptables", "-w", "5", "-I", chain, *spec)
        assert jump_copies(host) == [4, 4]
        wall.forget()  # as after a restart: the next pass applies again
        await wall.sync(observed)
        assert jump_copies(host) == [1, 1]
    finally:
        await asyncio.to_thread(remove_host_objects, host)
    assert jump_copies(host) == [0, 0]


def test_count_rule_matches_whole_rules_only() -> None:
    listing = "-N X\n-A X -j ORKESTR-FWD-1\n-A X -j ORKESTR-FWD-12\n-A X -i br-a -j ORKESTR-FWD-1\n"
    assert firewall.count_rule(listing, "X", ("-j", "ORKESTR-FWD-1")) == 1
    assert (
        firewall.count_rule(listing + "-A X -j ORKESTR-FWD-1\n", "X", ("-j", "ORKESTR-FWD-1")) == 2
    )
    assert firewall.count_rule(listing, "Y", ("-j", "ORKESTR-FWD-1")) == 0
