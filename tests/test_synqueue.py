"""The SYN queue (agent/synqueue.py): NFQUEUE over netlink, pure and in a real namespace.

The encoding and parsing are checked as tables and properties, without I/O; the kernel
side in a throwaway `unshare -n` namespace (no Docker), entered exactly as a holder's.
The Docker-level behaviour (a pool opened during a deep wake is the database's own) is
in tests/test_wake_queue.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import netns, nfnetlink, synqueue
from agent.config import AgentSection
from agent.docker import Docker
from agent.metrics import WAKE_QUEUE_FALLBACKS
from agent.sleep.listener import RelayBudget, Sleeper
from agent.sleep.store import Persisted
from agent.synqueue import DeepWake
from schemas.messages import AddonSpec, Resources, SleepPolicy
from tests.test_synwatch import namespace

__all__ = ["namespace"]  # the fixture, shared with the SYN watch's tests


def packet_message(packet_id: int, payload: bytes, queue: int = 5432) -> bytes:
    """An NFQNL_MSG_PACKET as the kernel sends it (the attributes the parser needs)."""
    hdr = nfnetlink.attr(synqueue.NFQA_PACKET_HDR, struct.pack(">IHB", packet_id, 0x0800, 1))
    mark = nfnetlink.attr(3, b"\0" * 4)  # NFQA_MARK: an attribute the parser skips
    body = (
        struct.pack("=BBH", socket.AF_INET, 0, socket.htons(queue))
        + hdr
        + mark
        + nfnetlink.attr(synqueue.NFQA_PAYLOAD, payload)
    )
    kind = (synqueue.NFNL_SUBSYS_QUEUE << 8) | synqueue.NFQNL_MSG_PACKET
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def syn(source: str, port: int) -> bytes:
    """The first 40 bytes of a SYN from source:port (IPv4 header, then TCP ports)."""
    ip = bytes([0x45, 0, 0, 60]) + bytes(8) + socket.inet_aton(source) + bytes([10, 0, 0, 2])
    return ip + struct.pack(">HH", port, 5432) + bytes(16)


def test_a_packet_message_gives_its_id_and_client() -> None:
    data = packet_message(7, syn("10.1.2.3", 40001)) + packet_message(8, syn("10.1.2.4", 40002))
    assert synqueue.packets(data) == [(7, "10.1.2.3:40001"), (8, "10.1.2.4:40002")]


def test_foreign_truncated_or_id_less_messages_yield_no_verdictable_packet() -> None:
    assert synqueue.packets(b"") == []
    assert synqueue.packets(packet_message(7, syn("10.1.2.3", 1))[:30]) == []
    ack = struct.pack("=IHHII", 36, nfnetlink.NLMSG_ERROR, 0, 1, 0) + bytes(20)
    assert synqueue.packets(ack) == []
    # A payload that was not copied still has an id: it can be let go.
    assert synqueue.packets(packet_message(9, b"")) == [(9, nfnetlink.UNKNOWN)]


@given(
    st.lists(
        st.tuples(st.integers(1, 2**32 - 1), st.ip_addresses(v=4), st.integers(1, 65535)),
        max_size=20,
    )
)
def test_every_reported_packet_is_parsed_back(items: list[tuple[int, object, int]]) -> None:
    data = b"".join(packet_message(i, syn(str(ip), port)) for i, ip, port in items)
    assert synqueue.packets(data) == [(i, f"{ip}:{port}") for i, ip, port in items]


@given(st.binary(max_size=300))
def test_any_datagram_parses_without_error(data: bytes) -> None:
    for packet in synqueue.packets(data):
        assert 0 <= packet.id < 2**32


def test_bind_asks_for_the_packet_head_a_length_cap_and_no_fail_open() -> None:
    bind, params = synqueue.bind_requests(5432, 64)
    assert nfnetlink.messages(bind)[0][0] == (3 << 8) | 2
    found = nfnetlink.attrs(nfnetlink.messages(params)[0][1])
    assert found[synqueue.NFQA_CFG_PARAMS] == struct.pack(">IB", 40, synqueue.NFQNL_COPY_PACKET)
    assert found[synqueue.NFQA_CFG_QUEUE_MAXLEN] == struct.pack(">I", 64)
    assert found[synqueue.NFQA_CFG_MASK] == struct.pack(">I", synqueue.NFQA_CFG_F_FAIL_OPEN)
    assert found[synqueue.NFQA_CFG_FLAGS] == struct.pack(">I", 0)
    # The queue is named big-endian in the nfgenmsg.
    assert nfnetlink.messages(bind)[0][1][2:4] == struct.pack(">H", 5432)


def test_one_batch_verdict_accepts_up_to_an_id_without_an_ack() -> None:
    ((kind, body),) = nfnetlink.messages(synqueue.verdict_batch(5432, 1234))
    assert kind == (3 << 8) | synqueue.NFQNL_MSG_VERDICT_BATCH
    assert nfnetlink.attrs(body)[synqueue.NFQA_VERDICT_HDR] == struct.pack(">II", 1, 1234)
    flags = struct.unpack_from("=H", synqueue.verdict_batch(5432, 1), 6)[0]
    assert flags == nfnetlink.NLM_F_REQUEST


def test_the_rule_matches_only_syns_to_the_port_and_exempts_the_host() -> None:
    text = " ".join(synqueue.queue_rule(6379, 6379, "172.30.0.1"))
    assert "--syn" in text and "! -s 172.30.0.1" in text and "--dport 6379" in text
    assert "-j NFQUEUE --queue-num 6379" in text and "bypass" not in text


PROC = """\
 5432  12345     3 2    40     0     0       17  1
 6379 -4242     0 2    40     0     0        9  1
"""


def test_the_kernels_count_names_what_waits() -> None:
    assert synqueue.parse_stats(PROC, 5432) == (3, 17)
    assert synqueue.parse_stats(PROC, 6379) == (0, 9)
    assert synqueue.parse_stats(PROC, 1) is None
    assert synqueue.parse_stats("", 5432) is None


@given(st.sets(st.integers(1, 10_000), max_size=10), st.integers(0, 5), st.integers(0, 10_000))
def test_the_verdict_names_the_latest_waiting_id(held: set[int], waiting: int, last: int) -> None:
    stats = synqueue.QueueStats(waiting, max(last, *held) if held else last)
    top = synqueue.last_to_accept(held, stats)
    assert top >= max(held, default=0)
    if waiting:
        assert top == stats.last_id
    elif not held:
        assert top == 0
    # Without the kernel's count (not readable), the reported ids decide alone.
    assert synqueue.last_to_accept(held, None) == max(held, default=0)


def test_ids_across_a_wrap_still_pick_the_later_one() -> None:
    assert synqueue.last_to_accept({2**32 - 2}, synqueue.QueueStats(2, 3)) == 3


# --- the kernel ----------------------------------------------------------------------------
async def _connect_later(pid: int, port: int) -> tuple[socket.socket, asyncio.Task[None]]:
    sock = await netns.in_namespace(pid, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    sock.setblocking(False)
    task = asyncio.create_task(asyncio.get_running_loop().sock_connect(sock, ("10.99.0.1", port)))
    return sock, task


async def test_a_held_syn_reaches_the_listener_started_after_it_directly(namespace: int) -> None:
    """No listener yet (the stopped database): the SYN waits in the kernel, the client's
    connect is pending, not refused; once the listener exists, one verdict lets it go
    and the connection is the listener's own, from the client's own address. A socket
    handed over (a dup, as the keeper holds it) keeps the queue and its reports."""
    ip = await asyncio.create_subprocess_exec(
        "nsenter", "-t", str(namespace), "-n", "ip", "addr", "add", "10.99.0.1/32", "dev", "lo"
    )
    assert await ip.wait() == 0
    seen: list[synqueue.Queued] = []
    sock = await synqueue.SynQueue.bind(namespace, 5432, 8)
    queue = synqueue.SynQueue(sock, namespace, 5432, "10.99.0.254", seen.append)
    clients: list[socket.socket] = []
    listener: socket.socket | None = None
    try:
        await queue.hold()
        await queue.hold()  # idempotent: one rule
        code, rules = await netns.iptables(namespace, "-S", "INPUT")
        assert code == 0 and rules.count(synqueue.COMMENT) == 1, rules
        client, connecting = await _connect_later(namespace, 5432)
        clients.append(client)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert [p.source for p in seen] == [f"10.99.0.1:{client.getsockname()[1]}"]
        assert queue.waiting() and synqueue.read_stats(namespace, 5432) == (1, seen[0].id)

        # The agent dies: only the keeper's copy is left; the next one reads the reports.
        kept = socket.socket(fileno=os.dup(sock.fileno()))
        queue.close()
        second, connecting2 = await _connect_later(namespace, 5432)
        clients.append(second)
        for _ in range(100):
            stats = synqueue.read_stats(namespace, 5432)
            if stats is not None and stats.waiting == 2:
                break
            await asyncio.sleep(0.01)
        kept.setblocking(False)
        later: list[synqueue.Queued] = []
        queue = synqueue.SynQueue(kept, namespace, 5432, "10.99.0.254", later.append)
        assert queue.waiting()  # both: one reported to the dead agent, one to us
        assert [p.source for p in later] == [f"10.99.0.1:{second.getsockname()[1]}"]
        assert synqueue.read_stats(namespace, 5432) == (2, later[0].id)
        await asyncio.sleep(0.3)
        assert not connecting.done() and not connecting2.done()  # held: not refused

        listener = await netns.listen_in(namespace, 5432)
        await queue.release()
        await asyncio.wait_for(asyncio.gather(connecting, connecting2), 2)
        loop = asyncio.get_running_loop()
        peers = {(await loop.sock_accept(listener))[1] for _ in clients}
        assert peers == {c.getsockname() for c in clients}
        code, rules = await netns.iptables(namespace, "-S", "INPUT")
        assert synqueue.COMMENT not in rules
        assert synqueue.read_stats(namespace, 5432) == (0, later[0].id)
        assert not queue.waiting()
    finally:
        for c in clients:
            c.close()
        queue.close()
        if listener is not None:
            listener.close()


# --- the sleeper's deep path, without Docker -------------------------------------------------
async def _probe_ok(_addon: AddonSpec, _ip: str, _timeout: float) -> tuple[bool, str, str]:
    return True, "ready", ""


async def test_a_deep_sleeper_holds_syns_across_an_agent_restart_and_lets_them_go_when_up(
    namespace: int,
) -> None:
    """Deep sleep without Docker: the database is a plain listener made later. The queue
    rule replaces the redirect; a knock asks the worker for a wake; a new sleeper given
    the keeper's copy of the queue asks again for what waits (its message was read by the
    first); once "the reconciler started the database" the SYN goes on when it answers,
    and then a relay-mode agent converges the rules back to the redirect."""
    ip = await asyncio.create_subprocess_exec(
        "nsenter", "-t", str(namespace), "-n", "ip", "addr", "add", "10.99.0.1/32", "dev", "lo"
    )
    assert await ip.wait() == 0
    addon = AddonSpec(
        id="a" * 32, name="orders-db", kind="postgres",
        resources=Resources(cpus=0.5, memory_mb=256),
        sleep=SleepPolicy(enabled=True, light_after_s=10, deep_after_s=60),
    )  # fmt: skip
    requests: list[str] = []

    def sleeper(deep_wake: DeepWake = "queue") -> Sleeper:
        return Sleeper(
            addon, "db", "h" * 64, namespace, "10.99.0.1", "127.0.0.2",
            Persisted(state="deep", last_activity=time.time()), Docker("test"), _probe_ok,
            lambda: None, RelayBudget(8, 8), requests.append, None, deep_wake,
        )  # fmt: skip

    async def rules() -> str:
        _code, filt = await netns.iptables(namespace, "-S", "INPUT")
        _code, nat = await netns.iptables(namespace, "-t", "nat", "-S", "PREROUTING")
        return filt + nat

    async def until(check: Callable[[], bool]) -> None:
        for _ in range(200):
            if check():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("not within 2 s")

    first = sleeper()
    await first.start()
    assert first.synq is not None
    text = await rules()
    assert synqueue.COMMENT in text and "REDIRECT" not in text, text
    client, connecting = await _connect_later(namespace, 5432)
    db: socket.socket | None = None
    second: Sleeper | None = None
    try:
        await until(lambda: requests == [addon.id])
        assert first.wake_requested
        kept = socket.socket(fileno=os.dup(first.synq.sock.fileno()))
        await first.close()
        await asyncio.sleep(0.2)
        assert not connecting.done()

        second = sleeper()
        await second.start(queue=kept)
        assert requests == [addon.id, addon.id] and second.wake_requested
        db = await netns.listen_in(namespace, 5432)
        await second.mark_awake()
        await asyncio.wait_for(connecting, 2)
        accepted, peer = await asyncio.get_running_loop().sock_accept(db)
        accepted.close()
        assert peer == client.getsockname()
        assert second.opening is not None
        await second.opening  # the verdict came first; the rule goes right after
        assert synqueue.COMMENT not in await rules()

        # A relay-mode agent on the same add-on asleep: the redirect, no queue rule.
        await second.close()
        second = None
        await netns.iptables(namespace, "-I", *synqueue.queue_rule(5432, 5432, "127.0.0.2"))
        third = sleeper("relay")
        await third.start()
        try:
            text = await rules()
            assert synqueue.COMMENT not in text and "REDIRECT" in text, text
            assert third.synq is None
        finally:
            await third.close()
    finally:
        client.close()
        if second is not None:
            await second.close()
        if db is not None:
            db.close()


def test_deep_wake_is_queue_by_default_and_a_wrong_mode_is_named() -> None:
    assert AgentSection(host="h").deep_wake == "queue"
    assert msgspec.convert({"host": "h", "deep_wake": "relay"}, AgentSection).deep_wake == "relay"
    with pytest.raises(msgspec.ValidationError, match="deep_wake"):
        msgspec.convert({"host": "h", "deep_wake": "proxy"}, AgentSection)


async def test_the_queue_holds_at_most_its_length_and_drops_the_rest(namespace: int) -> None:
    """A flood of SYNs costs the agent at most the queue's length of reports: the kernel
    drops the others (their clients send them again), none is let through or refused."""
    ip = await asyncio.create_subprocess_exec(
        "nsenter", "-t", str(namespace), "-n", "ip", "addr", "add", "10.99.0.1/32", "dev", "lo"
    )
    assert await ip.wait() == 0
    seen: list[synqueue.Queued] = []
    queue = synqueue.SynQueue(
        await synqueue.SynQueue.bind(namespace, 5432, 2), namespace, 5432, "10.99.0.254",
        seen.append,
    )  # fmt: skip
    pending: list[tuple[socket.socket, asyncio.Task[None]]] = []
    try:
        await queue.hold()
        pending += [await _connect_later(namespace, 5432) for _ in range(6)]
        await asyncio.sleep(0.5)
        stats = synqueue.read_stats(namespace, 5432)
        assert stats is not None and stats.waiting == 2, stats
        assert len(seen) == 2
        assert not any(task.done() for _sock, task in pending)  # dropped, not refused
    finally:
        for sock, task in pending:
            task.cancel()
            sock.close()
        queue.close()


async def test_a_queue_that_cannot_be_bound_falls_back_to_the_redirect(namespace: int) -> None:
    """NFQUEUE refused (here: the queue is bound by another socket, EBUSY): the sleeper
    logs and counts it, and deep sleep redirects to the wake listener instead."""
    other = await synqueue.SynQueue.bind(namespace, 5432, 8)
    addon = AddonSpec(
        id="b" * 32, name="orders-db", kind="postgres",
        resources=Resources(cpus=0.5, memory_mb=256),
        sleep=SleepPolicy(enabled=True, light_after_s=10, deep_after_s=60),
    )  # fmt: skip
    fallbacks = WAKE_QUEUE_FALLBACKS._value.get()
    sleeper = Sleeper(
        addon, "db", "h" * 64, namespace, "10.99.0.1", "127.0.0.2",
        Persisted(state="deep", last_activity=time.time()), Docker("test"), _probe_ok,
        lambda: None, RelayBudget(8, 8),
    )  # fmt: skip
    try:
        await sleeper.start()
        assert sleeper.synq is None and sleeper.alive()
        assert WAKE_QUEUE_FALLBACKS._value.get() == fallbacks + 1
        _code, nat = await netns.iptables(namespace, "-t", "nat", "-S", "PREROUTING")
        _code, filt = await netns.iptables(namespace, "-S", "INPUT")
        assert "REDIRECT" in nat and synqueue.COMMENT not in filt, (nat, filt)
    finally:
        await sleeper.close()
        other.close()
