"""The SYN watch (agent/synwatch.py): NFLOG over netlink, in a real network namespace.

The namespace is a throwaway `unshare -n` process (no Docker needed); the agent code
enters it exactly as it enters a holder's. The Docker-level behaviour (a light-sleeping
add-on woken without a relay) is in tests/test_sleep.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import time
from collections.abc import AsyncIterator

import pytest

from agent import netns, nfnetlink, synwatch
from agent.docker import Docker
from agent.sleep.listener import RelayBudget, Sleeper
from agent.sleep.store import Persisted
from schemas.messages import AddonSpec, Resources, SleepPolicy

# One datagram the kernel sent for a SYN from 127.0.0.1:44600 to :5432 (captured).
CAPTURED = bytes.fromhex(
    "b400000000040000000000000000000002003c48080001000800010005000a00000000000800040000000001"
    "1000080000060000000000000000000006000f000304000006001100000e000012001000000000000000000000"
    "0000000800000014000300000000006b08753b000000000000d214400009004500003c551f40004006e79a7f00"
    "00017f000001ae381538e81b788b00000000a002ffd7fe3000000204ffd70402080a4319e007000000000103030a"
)


def test_a_captured_nflog_datagram_names_the_client() -> None:
    assert synwatch.packet_sources(CAPTURED) == ["127.0.0.1:44600"]


def test_truncated_or_foreign_datagrams_yield_nothing_or_unknown() -> None:
    assert synwatch.packet_sources(CAPTURED[:10]) == []
    assert synwatch.packet_sources(b"") == []
    # A config ack is not a packet.
    ack = struct.pack("=IHHII", 36, nfnetlink.NLMSG_ERROR, 0, 1, 0) + bytes(20)
    assert synwatch.packet_sources(ack) == []
    assert nfnetlink.ack_error(ack) == 0
    # A packet message whose payload is cut short still counts as a knock.
    header = struct.pack("=IHHII", 20, 0x0400, 0, 0, 0) + bytes(4)
    assert synwatch.packet_sources(header) == [nfnetlink.UNKNOWN]


def test_an_error_ack_carries_its_errno() -> None:
    err = struct.pack("=IHHII", 36, nfnetlink.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -16)
    assert nfnetlink.ack_error(err + bytes(16)) == 16


def test_the_rule_is_limited_exempts_the_host_and_matches_only_syns() -> None:
    rule = synwatch.syn_rule(5432, 15432, "172.30.0.1")
    text = " ".join(rule)
    assert "--syn" in rule and "! -s 172.30.0.1" in text and "-m limit" in text
    assert "--nflog-group 15432" in text and "--dport 5432" in text


@pytest.fixture
async def namespace() -> AsyncIterator[int]:
    if shutil.which("unshare") is None or shutil.which("iptables") is None:
        pytest.skip("needs unshare and iptables")
    proc = await asyncio.create_subprocess_exec(
        "unshare", "-n", "sh", "-c", "ip link set lo up; exec sleep 120"
    )
    try:
        for _ in range(100):
            if netns.netns_inode(proc.pid) != os.stat("/proc/self/ns/net").st_ino:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # `ip link set lo up` done
        yield proc.pid
    finally:
        proc.kill()
        await proc.wait()


async def _connect(pid: int, port: int) -> socket.socket:
    sock = await netns.in_namespace(pid, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def test_a_syn_is_seen_without_taking_the_connection_and_a_flood_is_rate_limited(
    namespace: int,
) -> None:
    seen: list[str] = []
    knocked = asyncio.Event()

    def on_syn(source: str) -> None:
        seen.append(source)
        knocked.set()

    listener = await netns.listen_in(namespace, 5432)
    watch = await synwatch.SynWatch.open(namespace, 5432, 15432, "127.0.0.2", on_syn)
    try:
        client = await _connect(namespace, 5432)
        await asyncio.wait_for(knocked.wait(), 2)
        port = client.getsockname()[1]
        assert seen == [f"127.0.0.1:{port}"]
        # The connection went to the listening socket itself, untouched.
        accepted, peer = await asyncio.get_running_loop().sock_accept(listener)
        assert peer == ("127.0.0.1", port)
        accepted.close()
        client.close()

        # A flood: 300 connection attempts within a fraction of a second reach the socket's
        # backlog, but the agent hears only the burst and the rate.
        started = asyncio.get_running_loop().time()
        flood = [await _connect(namespace, 5432) for _ in range(300)]
        elapsed = asyncio.get_running_loop().time() - started
        await asyncio.sleep(0.3)
        bound = 1 + synwatch.BURST + synwatch.RATE_PER_S * (elapsed + 0.3) + 1
        assert synwatch.BURST <= len(seen) <= bound, (len(seen), elapsed)
        for sock in flood:
            sock.close()

        # Installing twice keeps one rule (a restarted agent re-opens the watch).
        watch.close()
        watch = await synwatch.SynWatch.open(namespace, 5432, 15432, "127.0.0.2", on_syn)
        code, out = await netns.iptables(namespace, "-S", "INPUT")
        assert code == 0 and out.count("orkestr-wake-syn") == 1, out
    finally:
        watch.close()
        listener.close()


async def _probe_never(_addon: AddonSpec, _ip: str, _timeout: float) -> tuple[bool, str, str]:
    raise AssertionError("the sleeper may not wake the add-on itself: the worker does")


async def test_a_knock_in_light_sleep_requests_one_wake_from_the_worker_and_starts_none(
    namespace: int,
) -> None:
    """The SYN watch, and the idle tick's fallback after a restart, only ask for the wake.

    The database's socket is a plain listener on a non-loopback address of the namespace
    (the meter ignores loopback and the gateway); the Docker client is never connected,
    so any pause, unpause or start here would fail the test.
    """
    ip = await asyncio.create_subprocess_exec(
        "nsenter", "-t", str(namespace), "-n", "ip", "addr", "add", "10.99.0.1/32", "dev", "lo"
    )
    assert await ip.wait() == 0
    db = await netns.listen_in(namespace, 5432)
    addon = AddonSpec(
        id="a" * 32,
        name="orders-db",
        kind="postgres",
        resources=Resources(cpus=0.5, memory_mb=256),
        sleep=SleepPolicy(enabled=True, light_after_s=10, deep_after_s=60),
    )
    requests: list[str] = []
    docker = Docker("test")

    def sleeper(saved: Persisted) -> Sleeper:
        return Sleeper(
            addon, "db", "h" * 64, namespace, "10.99.0.1", "127.0.0.2", saved, docker,
            _probe_never, lambda: None, RelayBudget(8, 8), requests.append,
        )  # fmt: skip

    async def connect() -> socket.socket:
        sock = await netns.in_namespace(namespace, lambda: socket.socket())
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("10.99.0.1", 5432))
        return sock

    async def requested(count: int) -> None:
        for _ in range(100):
            if len(requests) >= count:
                return
            await asyncio.sleep(0.02)

    saved = Persisted(state="light", last_activity=time.time())
    first = sleeper(saved)
    await first.start()
    clients: list[socket.socket] = []
    try:
        clients.append(await connect())
        await requested(1)
        assert requests == [addon.id] and first.wake_requested
        # A flood of knocks finds the request made: no second one, still no wake of its own.
        clients += [await connect() for _ in range(50)]
        await asyncio.sleep(0.3)
        assert requests == [addon.id]
        assert saved.state == "light" and saved.wakes == 0

        # An agent restart: the new sleeper's SYN watch never saw those SYNs, but the
        # clients sit in the paused database's backlog; the idle tick asks for the wake.
        await first.close()
        second = sleeper(Persisted(state="light", last_activity=time.time()))
        await second.start()
        try:
            await asyncio.sleep(0.2)
            assert requests == [addon.id] and not second.wake_requested
            assert await second.measure_activity(time.time())
            assert second.clients and all(c.via == "direct" for c in second.clients)
            second.wake_if_queued()
            second.wake_if_queued()  # once per wake
            assert requests == [addon.id, addon.id] and second.wake_requested
            assert second.due(time.time())  # the pass plans the wake from the request
        finally:
            await second.close()
    finally:
        for sock in clients:
            sock.close()
        await first.close()
        db.close()


async def test_the_activity_meter_reads_the_tcp_table_only_when_it_can_have_changed(
    namespace: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a namespace's TCP table costs milliseconds (the kernel walks the host-wide
    hash); a client's connection is a passive open, so the meter skips the read while no
    new one came and none was there, and while clients stay connected it skips it as long
    as the namespace's counters say nothing opened or closed. It still sees every client
    arrive and leave, and one held open keeps the add-on active on every tick."""
    ip = await asyncio.create_subprocess_exec(
        "nsenter", "-t", str(namespace), "-n", "ip", "addr", "add", "10.99.0.1/32", "dev", "lo"
    )
    assert await ip.wait() == 0
    db = await netns.listen_in(namespace, 5432)
    reads: list[int] = []
    real = netns.tcp_table

    def counted(pid: int) -> list[netns.TcpSocket]:
        reads.append(pid)
        return real(pid)

    monkeypatch.setattr(netns, "tcp_table", counted)
    addon = AddonSpec(
        id="a" * 32, name="orders-db", kind="postgres",
        resources=Resources(cpus=0.5, memory_mb=256),
        sleep=SleepPolicy(enabled=True, light_after_s=10, deep_after_s=60),
    )  # fmt: skip
    sleeper = Sleeper(
        addon, "db", "h" * 64, namespace, "10.99.0.1", "127.0.0.2",
        Persisted(last_activity=1.0), Docker("test"), _probe_never, lambda: None,
        RelayBudget(8, 8),
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    try:
        # The first measurement reads (connections may predate the sleeper); then nothing
        # changed: no read, no activity.
        assert not await sleeper.measure_activity(2.0)
        assert len(reads) == 1
        assert not await sleeper.measure_activity(3.0)
        assert not await sleeper.measure_activity(4.0)
        assert len(reads) == 1 and sleeper.clients == ()

        sock = await netns.in_namespace(namespace, lambda: socket.socket())
        sock.setblocking(False)
        await loop.sock_connect(sock, ("10.99.0.1", 5432))
        accepted, _peer = await loop.sock_accept(db)
        # A new connection: read, and the client is seen.
        assert await sleeper.measure_activity(5.0)
        assert len(reads) == 2 and len(sleeper.clients) == 1
        assert sleeper.saved.last_activity == 5.0
        # Held open, nothing opened or closed since: no read, still active on every tick.
        assert await sleeper.measure_activity(6.0)
        assert await sleeper.measure_activity(6.5)
        assert len(reads) == 2 and sleeper.saved.last_activity == 6.5
        assert len(sleeper.clients) == 1
        # A second client: a passive open, read; both seen.
        second = await netns.in_namespace(namespace, lambda: socket.socket())
        second.setblocking(False)
        await loop.sock_connect(second, ("10.99.0.1", 5432))
        accepted2, _peer = await loop.sock_accept(db)
        assert await sleeper.measure_activity(6.6)
        assert len(reads) == 3 and len(sleeper.clients) == 2
        assert await sleeper.measure_activity(6.7)
        assert len(reads) == 3
        # One leaves (no new connection, only the established count moves): read, seen gone.
        second.close()
        accepted2.close()
        for _ in range(50):  # the close reaches both ends
            await sleeper.measure_activity(6.8)
            if len(sleeper.clients) == 1:
                break
            await asyncio.sleep(0.02)
        assert len(sleeper.clients) == 1 and len(reads) > 3
        sock.close()
        accepted.close()
        for _ in range(50):
            await sleeper.measure_activity(7.0)
            if not sleeper.clients:
                break
            await asyncio.sleep(0.02)
        assert sleeper.clients == ()
        settled = len(reads)
        # Gone: back to no reads, and idle from the last time it was seen.
        assert not await sleeper.measure_activity(8.0)
        assert len(reads) == settled
        # The last check before a sleep always reads.
        assert not await sleeper.measure_activity(9.0, full=True)
        assert len(reads) == settled + 1
    finally:
        db.close()
