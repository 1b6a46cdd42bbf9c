"""The SYN queue: hold a client's SYN in the kernel while a stopped database starts.

A stopped (deep-sleeping) database has no socket, so a client's SYN cannot wait at it the
way it waits at a paused one (`agent/synwatch.py`). Instead of accepting the connection
and relaying it for its whole life, the agent has the kernel hold the SYN itself:

    iptables -I INPUT -p tcp --dport 5432 --syn ! -s <gateway> -j NFQUEUE --queue-num 5432

Each queued SYN is reported over a NETLINK_NETFILTER socket bound to that queue (opened in
the holder's namespace: queues are per namespace), which asks for the wake and remembers
the packet's id. Once the database answers, one NF_ACCEPT verdict for the highest id
(NFQNL_MSG_VERDICT_BATCH) lets every held SYN go on, up to the database's own listening
socket: the connections are the database's, never touched by the agent or the keeper.
The queue has no bypass: with nobody bound, or past its length (the per-add-on cap), a
SYN is dropped and the client's TCP sends it again 1 s, 3 s, 7 s later; none is refused.
The bound socket is deposited with the keeper like the wake listener, so SYNs stay queued
while the agent restarts, and the kernel's own count (/proc/<pid>/net/netfilter/
nfnetlink_queue: waiting packets, last id) tells the next agent what waits, even the
packets whose messages the previous one had already read.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections.abc import Callable
from typing import Literal, NamedTuple

from agent import netns, nfnetlink
from agent.errors import AgentError

log = logging.getLogger("orkestr.agent.sleep")

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_PAYLOAD = 1, 2, 10
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN = 1
NF_DROP, NF_ACCEPT = 0, 1
COPY_BYTES = 40  # an IPv4 header and the TCP ports: enough to name the client
READS_PER_WAKEUP = 64  # then yield to the event loop
COMMENT = "orkestr-wake-queue"
DeepWake = Literal["queue", "relay"]


def queue_rule(port: int, queue: int, gateway: str) -> tuple[str, ...]:
    # The host (gateway) is exempt: the agent's readiness probes reach the database.
    return (
        "INPUT", "-p", "tcp", "--dport", str(port), "--syn", "!", "-s", gateway,
        "-j", "NFQUEUE", "--queue-num", str(queue),
        "-m", "comment", "--comment", COMMENT,
    )  # fmt: skip


def config_request(queue: int, seq: int, *attrs: bytes) -> bytes:
    return nfnetlink.request(NFNL_SUBSYS_QUEUE, NFQNL_MSG_CONFIG, queue, seq, *attrs)


def bind_requests(queue: int, maxlen: int) -> list[bytes]:
    attr = nfnetlink.attr
    return [
        config_request(
            queue, 1, attr(NFQA_CFG_CMD, struct.pack(">BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET))
        ),
        config_request(
            queue,
            2,
            attr(NFQA_CFG_PARAMS, struct.pack(">IB", COPY_BYTES, NFQNL_COPY_PACKET)),
            attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", maxlen)),
            # Never fail open: a SYN let through to a stopped database would be refused.
            attr(NFQA_CFG_MASK, struct.pack(">I", NFQA_CFG_F_FAIL_OPEN)),
            attr(NFQA_CFG_FLAGS, struct.pack(">I", 0)),
        ),
    ]


def verdict_batch(queue: int, last_id: int, verdict: int = NF_ACCEPT) -> bytes:
    """One verdict for every packet of `queue` up to `last_id` (ids count up from 1)."""
    hdr = nfnetlink.attr(NFQA_VERDICT_HDR, struct.pack(">II", verdict, last_id))
    return nfnetlink.request(NFNL_SUBSYS_QUEUE, NFQNL_MSG_VERDICT_BATCH, queue, 0, hdr, ack=False)


async def remove_rule(pid: int, port: int, gateway: str) -> None:
    """Drop a queue rule an earlier agent left (this one relays instead)."""
    rule = queue_rule(port, port, gateway)
    if (await netns.iptables(pid, "-C", *rule))[0] == 0:
        code, out = await netns.iptables(pid, "-D", *rule)
        if code != 0:
            raise AgentError(f"iptables (NFQUEUE) in namespace of pid {pid}: {out}")


class Queued(NamedTuple):
    id: int
    source: str


def packets(data: bytes) -> list[Queued]:
    """The id and client of each queued packet reported in one netlink datagram."""
    out: list[Queued] = []
    for kind, body in nfnetlink.messages(data):
        if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            continue
        found = nfnetlink.attrs(body)
        hdr = found.get(NFQA_PACKET_HDR, b"")
        if len(hdr) < 4:
            continue  # no id: no verdict could name it
        packet_id: int = struct.unpack_from(">I", hdr)[0]
        out.append(Queued(packet_id, nfnetlink.source(found.get(NFQA_PAYLOAD, b""))))
    return out


class QueueStats(NamedTuple):
    waiting: int  # packets held now
    last_id: int  # the id given to the latest one


def parse_stats(text: str, queue: int) -> QueueStats | None:
    """A queue's line in /proc/net/netfilter/nfnetlink_queue: number, peer portid, waiting,
    copy mode, copy range, dropped, user dropped, last id, 1. None: not bound."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[0].isdigit() and int(fields[0]) == queue:
            return QueueStats(int(fields[2]), int(fields[7]))
    return None


def read_stats(pid: int, queue: int) -> QueueStats | None:
    try:
        with open(f"/proc/{pid}/net/netfilter/nfnetlink_queue") as f:
            return parse_stats(f.read(), queue)
    except OSError:
        return None


def last_to_accept(held: set[int], stats: QueueStats | None) -> int:
    """The id one batch verdict must name to let every waiting packet go (0: none waits).

    The kernel's count also covers packets whose messages an earlier agent read and died
    with; ids only grow (a 32-bit wrap aside, which the kernel's comparison handles)."""
    top = max(held, default=0)
    if stats is not None and stats.waiting:
        top = stats.last_id if not top else _later(top, stats.last_id)
    return top


def _later(a: int, b: int) -> int:
    return b if ((b - a) & 0xFFFFFFFF) < 0x80000000 else a


class SynQueue(nfnetlink.LoopReader):
    """One add-on's bound queue: the rule that fills it and the verdict that empties it."""

    def __init__(
        self,
        sock: socket.socket,
        pid: int,
        port: int,
        gateway: str,
        on_packet: Callable[[Queued], None],
    ) -> None:
        self.sock = sock
        self.pid = pid
        self.queue = port  # queues are per namespace: the port is a fine number
        self.rule = queue_rule(port, self.queue, gateway)
        self.on_packet = on_packet
        self.held: set[int] = set()  # ids reported and not yet let go
        self.rule_on: bool | None = None  # unknown until looked at
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    @staticmethod
    async def bind(pid: int, port: int, maxlen: int) -> socket.socket:
        """A socket bound to the add-on's queue in the namespace of `pid`."""
        return await netns.in_namespace(
            pid,
            lambda: nfnetlink.bound_socket(bind_requests(port, maxlen), f"NFQUEUE {port}"),
        )

    # --- the rule -------------------------------------------------------------------------
    async def rule_present(self) -> bool:
        if self.rule_on is None:
            self.rule_on = (await netns.iptables(self.pid, "-C", *self.rule))[0] == 0
        return self.rule_on

    async def hold(self) -> None:
        """New SYNs wait in the queue (raises AgentError if the rule cannot be set)."""
        if await self.rule_present():
            return
        code, out = await netns.iptables(self.pid, "-I", *self.rule)
        if code != 0:
            raise AgentError(f"iptables (NFQUEUE) in namespace of pid {self.pid}: {out}")
        self.rule_on = True

    async def release(self) -> None:
        """Let every held SYN go on, then stop queueing new ones.

        The verdict comes first (the waiting clients go on at once, not after an iptables
        run); what the rule queued until it was gone is let go right after."""
        self.accept_waiting()
        if await self.rule_present():
            code, out = await netns.iptables(self.pid, "-D", *self.rule)
            if code != 0:
                raise AgentError(f"iptables (NFQUEUE) in namespace of pid {self.pid}: {out}")
            self.rule_on = False
        self.accept_waiting()

    def waiting(self) -> bool:
        """Whether a SYN waits: reported to us, or counted by the kernel (an earlier
        agent may have read its message and died)."""
        self._drain()
        stats = read_stats(self.pid, self.queue)
        return bool(self.held) or (stats is not None and stats.waiting > 0)

    def accept_waiting(self) -> int:
        """NF_ACCEPT for every packet waiting now; how many ids were known to us."""
        self._drain()
        last = last_to_accept(self.held, read_stats(self.pid, self.queue))
        count = len(self.held)
        self.held.clear()
        if last:
            try:
                self.sock.send(verdict_batch(self.queue, last))
            except OSError as exc:
                log.warning("synqueue.verdict_failed queue=%d error=%s", self.queue, exc)
        return count

    # --- reading ------------------------------------------------------------------------
    def _drain(self) -> None:
        while self._read_some():
            pass

    def _readable(self) -> None:
        self._read_some()

    def _read_some(self) -> bool:
        """Up to READS_PER_WAKEUP datagrams; True if more may wait."""
        for _ in range(READS_PER_WAKEUP):
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # Reports were lost (their SYNs dropped: the clients send them again).
                    self.on_packet(Queued(0, nfnetlink.UNKNOWN))
                    continue
                log.warning("synqueue.read_failed queue=%d error=%s", self.queue, exc)
                self.close()
                return False
            for packet in packets(data):
                self.held.add(packet.id)
                self.on_packet(packet)
        return True
