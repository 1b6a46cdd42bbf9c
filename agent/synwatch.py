"""The SYN watch: see a client's connection attempt at a paused database without taking it.

A paused (light-sleeping) database still owns its listening socket: the kernel completes
handshakes into its backlog and queues the client's bytes while the process is frozen. So
waking needs only to *notice* the attempt, then unpause; the client then talks to the
database's own socket, with no relay in its path for the connection's whole life.

The notice is an NFLOG rule in the holder's namespace,

    iptables -I INPUT -p tcp --dport 5432 --syn ! -s <gateway> -m limit --limit 5/second
             --limit-burst 10 -j NFLOG --nflog-group 15432

read by the agent over a NETLINK_NETFILTER socket opened inside that namespace (NFLOG
groups are per namespace). NFLOG is non-terminating: the SYN goes on to the database's
socket untouched. The rule stays in place while the add-on is awake (the agent ignores the
messages then), so neither falling asleep nor waking runs iptables. The limit match keeps
a SYN flood from becoming a flood of messages: the agent sees at most a few per second per
add-on, and the first one is all a wake needs. In deep sleep the SYN queue's rule
(agent/synqueue.py) holds the SYN, or the relay path's REDIRECT (nat PREROUTING) rewrites
the port before INPUT; a message that still comes then is ignored (the sleeper acts on
it in light sleep only).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections.abc import Callable

from agent import netns, nfnetlink
from agent.errors import AgentError
from agent.metrics import WAKE_SYNS

log = logging.getLogger("orkestr.agent.sleep")

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_QTHRESH = 1, 2, 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD = 9
COPY_BYTES = 48  # the IPv4 and TCP headers' fixed parts: enough to name the client
RATE_PER_S, BURST = 5, 10
READS_PER_WAKEUP = 64  # then yield to the event loop


def syn_rule(port: int, group: int, gateway: str) -> tuple[str, ...]:
    # The host (gateway) is exempt as from the deep-sleep rules: its probes are not clients.
    return (
        "INPUT", "-p", "tcp", "--dport", str(port), "--syn", "!", "-s", gateway,
        "-m", "limit", "--limit", f"{RATE_PER_S}/second", "--limit-burst", str(BURST),
        "-j", "NFLOG", "--nflog-group", str(group),
        "-m", "comment", "--comment", "orkestr-wake-syn",
    )  # fmt: skip


def config_request(group: int, seq: int, *attrs: bytes) -> bytes:
    """An NFULNL_MSG_CONFIG request for `group`, asking for an ack."""
    return nfnetlink.request(NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG, group, seq, *attrs)


def bind_requests(group: int) -> list[bytes]:
    attr = nfnetlink.attr
    return [
        config_request(group, 1, attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))),
        config_request(
            group, 2, attr(NFULA_CFG_MODE, struct.pack(">IBB", COPY_BYTES, NFULNL_COPY_PACKET, 0))
        ),
        # Deliver each packet at once (the default batches them for up to a second).
        config_request(group, 3, attr(NFULA_CFG_QTHRESH, struct.pack(">I", 1))),
    ]


def packet_sources(data: bytes) -> list[str]:
    """The client ("ip:port") of each logged packet in one netlink datagram."""
    return [
        nfnetlink.source(nfnetlink.attrs(body).get(NFULA_PAYLOAD, b""))
        for kind, body in nfnetlink.messages(data)
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
    ]


class SynWatch(nfnetlink.LoopReader):
    """A bound NFLOG group, read from the event loop; `on_syn(source)` for each packet."""

    def __init__(self, sock: socket.socket, on_syn: Callable[[str], None]) -> None:
        self.sock = sock
        self.on_syn = on_syn
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    @classmethod
    async def open(
        cls, pid: int, port: int, group: int, gateway: str, on_syn: Callable[[str], None]
    ) -> SynWatch:
        rule = syn_rule(port, group, gateway)
        if (await netns.iptables(pid, "-C", *rule))[0] != 0:
            code, out = await netns.iptables(pid, "-I", *rule)
            if code != 0:
                raise AgentError(f"iptables (NFLOG) in namespace of pid {pid}: {out}")
        sock = await netns.in_namespace(
            pid, lambda: nfnetlink.bound_socket(bind_requests(group), f"NFLOG group {group}")
        )
        return cls(sock, on_syn)

    def _readable(self) -> None:
        for _ in range(READS_PER_WAKEUP):
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # Messages were dropped: some client knocked, which is all we need.
                    WAKE_SYNS.inc()
                    self.on_syn(nfnetlink.UNKNOWN)
                    continue
                log.warning("synwatch.read_failed error=%s", exc)
                self.close()
                return
            for source in packet_sources(data):
                WAKE_SYNS.inc()
                self.on_syn(source)
