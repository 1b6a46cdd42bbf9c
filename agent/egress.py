"""Applies the rulesets of `firewall.py`: on the host, and in each holder's namespace.

The host's chains are replaced whole whenever the set of project bridges changes. A
holder is fenced once per run (container id, `State.StartedAt`, pid): a holder restarted
by dockerd is a new namespace, fenced again. A new run always follows a die of the one
before, so Docker's die events say when a holder may have a new run; a fence or a check
that inspected the holder after the event was counted accounts for it. A new holder's
start costs its chain's fence only, and a holder that died is inspected and, if it runs
again, fenced (a reconnect of the event stream forgets every fence).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from agent import firewall, model
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


def _run_of(info: dict[str, Any]) -> tuple[str, str, int]:
    """One run of a container: a restart keeps the id, never the start time and pid."""
    state = info.get("State") or {}
    return str(info["Id"]), str(state.get("StartedAt") or ""), int(state.get("Pid") or 0)


def _subnet_of(info: dict[str, Any], network: str) -> str:
    """The subnet the holder is attached to on `network`, from its own inspection."""
    attached = ((info.get("NetworkSettings") or {}).get("Networks") or {}).get(network) or {}
    ip, prefix = attached.get("IPAddress"), attached.get("IPPrefixLen")
    if not ip or not prefix:
        raise AgentError(f"holder {info.get('Name', '?')} has no address on {network}")
    return str(ipaddress.ip_interface(f"{ip}/{prefix}").network)


class Firewall:
    def __init__(self, host: str, policy: firewall.Policy, docker: Docker) -> None:
        self.host = host
        self.policy = policy
        self.docker = docker
        self._applied = ""
        # holder name -> the run (id, StartedAt, pid) whose namespace is fenced
        self._fenced: dict[str, tuple[str, str, int]] = {}
        # Die events are numbered: holder name -> number of its latest die event, and
        # -> the number seen before the inspection its fence (or last check) came from.
        # A new run of a container always follows a die of the one before; a run's own
        # start event arrives after its chain's fence inspected it, and would cost every
        # new holder a second inspection if starts were counted instead.
        self._events = 0
        self._died: dict[str, int] = {}
        self._covered: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # holder name -> one fence at a time
        # One host-chain update at a time: a pass and an EnsureNetwork may both sync.
        self._host_lock = asyncio.Lock()
        # Group network -> {holder name: port}: the shared add-ons (plan.shared_ports).
        self.shared: dict[str, dict[str, int]] = {}

    def forget(self) -> None:
        """Every holder and the host must be fenced again (events may have been missed)."""
        self._fenced.clear()
        self._died.clear()
        self._covered.clear()
        self._applied = ""

    def holder_died(self, name: str) -> None:
        """Docker says the holder's process ended: its next run is a new namespace. The die
        of a run happens after any inspection that saw it running, so one counted before
        an inspection belongs to an earlier run."""
        self._events += 1
        self._died[name] = self._events

    def holder_removed(self, name: str) -> None:
        self._fenced.pop(name, None)
        self._died.pop(name, None)
        self._covered.pop(name, None)
        lock = self._locks.get(name)
        if lock is not None and not lock.locked():
            del self._locks[name]

    def run(self, name: str) -> tuple[str, str, int] | None:
        """The holder's run (id, StartedAt, pid) that was last fenced."""
        return self._fenced.get(name)

    def fenced(self, name: str, container_id: str) -> bool:
        """Whether the holder's current run is known to be fenced (no check needed)."""
        run = self._fenced.get(name)
        return (
            run is not None
            and run[0] == container_id
            and self._died.get(name, 0) <= self._covered.get(name, 0)
        )

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
        networks = {n.name for n in observed.networks}
        due = [
            (c.name, model.network_name(c.project_id), c.id)
            for c in observed.containers
            if c.role == "holder"
            and c.state == "running"
            and not self.fenced(c.name, c.id)
            and model.network_name(c.project_id) in networks
        ]
        # Namespaces are independent: fenced together, a restarted agent's first pass (which
        # fences every holder again) waits for the slowest, not for the sum.
        results = await asyncio.gather(
            *(self.fence_holder(name, net, cid) for name, net, cid in due),
            return_exceptions=True,
        )
        for result in results:
            # A holder removed or stopped since the observation needs no fence now (its
            # next start is an event, and due again).
            if isinstance(result, BaseException) and not isinstance(result, NotFound):
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

    async def fence_holder(self, name: str, network: str, container_id: str | None = None) -> None:
        """Fence the holder's namespace to its project network's subnet, unless this run of
        it is fenced already (the inspection then only confirms it).

        One at a time per holder: a pass that observed a holder its chain is fencing waits
        for that fence and, `container_id` given, finds it done.
        """
        async with self._locks.setdefault(name, asyncio.Lock()):
            if container_id is not None and self.fenced(name, container_id):
                return
            seen = self._events  # die events up to here are accounted for by this inspection
            info = await self.docker.inspect(name)
            run = _run_of(info)
            if not run[2]:
                raise NotFound(f"holder {name} is not running")
            if self._fenced.get(name) != run:
                subnet = _subnet_of(info, network)
                # One process: the chain and its single jump, atomically.
                await _restore(run[2], firewall.holder_ruleset(subnet))
                self._fenced[name] = run
                log.info(
                    "egress.holder_fenced holder=%s id=%s started=%s subnet=%s",
                    name,
                    run[0][:12],
                    run[1],
                    subnet,
                )
            self._covered[name] = max(self._covered.get(name, 0), seen)
