"""Applies the rulesets of `firewall.py`: on the host, and in each holder's namespace.

The host's chains are replaced whole whenever the set of project bridges changes; a
holder is fenced once per namespace (a holder restarted by dockerd is a new namespace:
its start event, or a reconnect of the event stream, makes it fenced again).
"""

from __future__ import annotations

import asyncio
import logging

from agent import firewall
from agent.docker import Docker
from agent.errors import AgentError, NotFound
from agent.model import Observed, ObservedNetwork

log = logging.getLogger("orkestr.agent.egress")


async def _run(argv: list[str], stdin: str | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(15):
            out, _ = await proc.communicate(stdin.encode() if stdin is not None else None)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 1, f"{argv[0]} timed out"
    return proc.returncode or 0, out.decode(errors="replace").strip()


def _in(pid: int | None, argv: list[str]) -> list[str]:
    return ["nsenter", f"--net=/proc/{pid}/ns/net", *argv] if pid else argv


async def _restore(pid: int | None, rules: str) -> None:
    # -w: the xtables lock is host-wide and dockerd takes it too; never wait forever.
    code, out = await _run(_in(pid, ["iptables-restore", "-w", "5", "--noflush"]), rules)
    if code != 0:
        raise AgentError(f"iptables-restore: {out}")


async def _ensure_jump(pid: int | None, rule: tuple[str, ...]) -> None:
    """Exactly one copy of `rule` (chain, "-j", target) in its chain.

    Counted from a listing, not checked with -C: a -C that failed for another reason (the
    xtables lock, a timeout under load) inserted a duplicate on every pass, and each copy
    makes every forwarded packet walk the target chain once more.
    """
    chain, *spec = rule
    code, out = await _run(_in(pid, ["iptables", "-w", "5", "-S", chain]))
    if code != 0:
        raise AgentError(f"iptables -S {chain}: {out}")
    copies = firewall.count_rule(out, chain, tuple(spec))
    if copies == 0:
        code, out = await _run(_in(pid, ["iptables", "-w", "5", "-I", *rule]))
        if code != 0:
            raise AgentError(f"iptables -I {' '.join(rule)}: {out}")
    for _ in range(copies - 1):
        code, out = await _run(_in(pid, ["iptables", "-w", "5", "-D", *rule]))
        if code != 0:
            raise AgentError(f"iptables -D {' '.join(rule)}: {out}")


class Firewall:
    def __init__(self, host: str, policy: firewall.Policy, docker: Docker) -> None:
        self.host = host
        self.policy = policy
        self.docker = docker
        self._applied = ""
        self._fenced: set[str] = set()  # holder container ids whose namespace is fenced
        # One host-chain update at a time: a pass and an EnsureNetwork may both sync.
        self._host_lock = asyncio.Lock()
        # Group network -> {holder name: port}: the shared add-ons (plan.shared_ports).
        self.shared: dict[str, dict[str, int]] = {}

    def forget(self, holder_id: str | None = None) -> None:
        """A holder (or, with None, every holder and the host) must be fenced again."""
        if holder_id is None:
            self._fenced.clear()
            self._applied = ""
        else:
            self._fenced.discard(holder_id)

    async def sync(self, observed: Observed) -> None:
        """Host chains for the observed bridges, and every running holder fenced."""
        bridges = [self._bridge(n, observed) for n in observed.networks if n.bridge]
        rules = firewall.host_ruleset(self.host, bridges, self.policy)
        async with self._host_lock:
            if rules != self._applied:
                await _restore(None, rules)
                for jump in firewall.host_jumps(self.host):
                    await _ensure_jump(None, jump)
                self._applied = rules
                log.info("egress.host_applied bridges=%d", len(bridges))
        subnets = {n.name: n.subnet for n in observed.networks}
        due = [
            (c.name, subnets[f"orkestr-{c.project_id}"])
            for c in observed.containers
            if c.role == "holder"
            and c.state == "running"
            and c.id not in self._fenced
            and subnets.get(f"orkestr-{c.project_id}")
        ]
        # Namespaces are independent: fenced together, a restarted agent's first pass (which
        # fences every holder again) waits for the slowest, not for the sum.
        results = await asyncio.gather(
            *(self.fence_holder(name, subnet) for name, subnet in due), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _bridge(self, n: ObservedNetwork, observed: Observed) -> firewall.Bridge:
        if not n.group_id:
            return firewall.Bridge(n.bridge, n.subnet)
        # Addresses as observed: a holder's address on the group network is only known
        # once it is attached, and a holder that left it is allowed nothing.
        ports = self.shared.get(n.name, {})
        shared = tuple(
            (ip, ports[c.name])
            for c in observed.containers
            if c.name in ports
            for net, ip in c.groups
            if net == n.name and ip
        )
        return firewall.Bridge(n.bridge, n.subnet, shared=shared)

    async def sync_networks(self) -> None:
        """After a network was created: its bridge is fenced before anything runs on it."""
        await self.sync(await self.docker.snapshot())

    async def fence_holder(self, name: str, subnet: str) -> None:
        info = await self.docker.inspect(name)
        pid = int(info["State"].get("Pid") or 0)
        if not pid:
            raise NotFound(f"holder {name} is not running")
        await _restore(pid, firewall.holder_ruleset(subnet))
        await _ensure_jump(pid, ("OUTPUT", "-j", firewall.EGRESS_CHAIN))
        self._fenced.add(str(info["Id"]))
        log.info("egress.holder_fenced holder=%s subnet=%s", name, subnet)
