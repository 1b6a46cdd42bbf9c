"""Egress policy for project networks, as iptables rulesets computed here (pure).

Two fences, both level-triggered: the ruleset is computed from what is observed and
replaced whole (`iptables-restore --noflush` on chains of our own), so a pass that finds
it unchanged does nothing.

- On the host, per agent, for every project network's bridge: nothing from a project
  network reaches the host itself (INPUT), whatever address it dials, except replies to
  the agent's own probes and relays; forwarded traffic stays on its own bridge, or goes
  to the internet, never to private, link-local (cloud metadata), shared or loopback
  ranges, nor to another project's subnet. The operator may deny jobs the internet too.
- On a project group's bridge (an `internal` Docker network: no route out), only new
  connections to the shared add-ons' address and port pass, and their replies: members'
  apps and jobs reach the shared add-ons, never one another, and a shared add-on opens
  nothing towards them.
- Inside each add-on's holder namespace (shared by its database): no egress beyond the
  project network. The tenant cannot lift it: the database has no CAP_NET_ADMIN.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Literal

from msgspec import Struct

JobEgress = Literal["internet", "none"]

# Never reachable from a project network: RFC 1918, CGNAT, link-local (the metadata
# address 169.254.169.254 among them), loopback, "this network", multicast and reserved.
DENIED_RANGES = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
)  # fmt: skip


class Policy(Struct, frozen=True, forbid_unknown_fields=True):
    """The operator's choices (agent.toml `[network]`)."""

    job_egress: JobEgress = "internet"
    # Extra destinations jobs may reach although a denied range holds them, e.g. the
    # resolver Docker forwards DNS to, or an internal package mirror.
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = DENIED_RANGES


class Bridge(Struct, frozen=True):
    interface: str  # the bridge's name on the host: br-<id> unless set at creation
    subnet: str
    # A group bridge: (address, port) of each shared add-on, the only destinations on it.
    # None: a project bridge.
    shared: tuple[tuple[str, int], ...] | None = None


def chains(host: str) -> tuple[str, str, str]:
    """This agent's host-level chains: two agents on one machine (tests) keep apart.

    In that order: input, forward, and the policy every project bridge's new forwarded
    traffic goes through (listed once, so the ruleset grows with the bridges, not their
    square: 100 bridges made 11,100 rules when each bridge carried every other subnet).
    """
    tag = hashlib.sha256(host.encode()).hexdigest()[:8]
    return f"ORKESTR-IN-{tag}", f"ORKESTR-FWD-{tag}", f"ORKESTR-POL-{tag}"


def host_ruleset(host: str, bridges: Iterable[Bridge], policy: Policy) -> str:
    """`iptables-restore --noflush` input that replaces this agent's three chains."""
    chain_in, chain_fwd, chain_pol = chains(host)
    bridges = sorted(set(bridges), key=lambda b: b.interface)
    lines = ["*filter", f":{chain_in} - [0:0]", f":{chain_fwd} - [0:0]", f":{chain_pol} - [0:0]"]
    for b in bridges:
        i = b.interface
        if b.shared is not None:
            lines += _group_rules(chain_in, chain_fwd, b)
            continue
        lines += [
            f"-A {chain_in} -i {i} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
            f"-A {chain_in} -i {i} -j DROP",
            f"-A {chain_fwd} -i {i} -o {i} -j RETURN",
            f"-A {chain_fwd} -i {i} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
            f"-A {chain_fwd} -i {i} -j {chain_pol}",
        ]
    # Reached only by traffic leaving a project bridge for somewhere else: the operator's
    # exceptions first, then the denied ranges and every project's subnet (its own bridge's
    # traffic returned above).
    lines += [f"-A {chain_pol} -d {dest} -j RETURN" for dest in policy.allow]
    subnets = sorted({b.subnet for b in bridges if b.subnet})
    lines += [f"-A {chain_pol} -d {dest} -j DROP" for dest in (*policy.deny, *subnets)]
    if policy.job_egress == "none":
        lines.append(f"-A {chain_pol} -j DROP")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _group_rules(chain_in: str, chain_fwd: str, b: Bridge) -> list[str]:
    i = b.interface
    assert b.shared is not None
    return [
        f"-A {chain_in} -i {i} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
        f"-A {chain_in} -i {i} -j DROP",
        f"-A {chain_fwd} -i {i} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
        *(
            f"-A {chain_fwd} -i {i} -o {i} -d {ip}/32 -p tcp --dport {port} "
            "-m conntrack --ctstate NEW -j RETURN"
            for ip, port in sorted(set(b.shared))
        ),
        f"-A {chain_fwd} -i {i} -j DROP",
    ]


def count_rule(listing: str, chain: str, spec: tuple[str, ...]) -> int:
    """How many times `-A <chain> <spec>` appears in `iptables -S <chain>` output."""
    want = ["-A", chain, *spec]
    return sum(1 for line in listing.splitlines() if line.split() == want)


def host_jumps(host: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The rules that send traffic into this agent's chains (kept at exactly one copy each)."""
    chain_in, chain_fwd, _ = chains(host)
    # DOCKER-USER comes first in FORWARD, before Docker's own accept rules.
    return ("INPUT", "-j", chain_in), ("DOCKER-USER", "-j", chain_fwd)


EGRESS_CHAIN = "ORKESTR-EGRESS"


def holder_ruleset(subnet: str) -> str:
    """The add-on's namespace: talk to its own project network and loopback, nothing else.

    `iptables-restore --noflush` input that replaces the chain and the namespace's OUTPUT
    chain (ours alone: the wake path's rules are in INPUT and nat) with exactly one jump
    into it, in one process and one transaction, however often it is applied.
    """
    return "\n".join(
        [
            "*filter",
            f":{EGRESS_CHAIN} - [0:0]",
            f"-A {EGRESS_CHAIN} -o lo -j RETURN",
            f"-A {EGRESS_CHAIN} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
            f"-A {EGRESS_CHAIN} -d {subnet} -j RETURN",
            f"-A {EGRESS_CHAIN} -j DROP",
            "-F OUTPUT",
            f"-A OUTPUT -j {EGRESS_CHAIN}",
            "COMMIT",
            "",
        ]
    )
