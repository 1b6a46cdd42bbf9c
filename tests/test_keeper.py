"""The keeper's relay on its own: a real keeper process, real TCP sockets on loopback.

What the deep-wake path relies on: bytes both ways, the bytes a client sent before the
hand-over, a full receiver (the relay keeps the bytes and stops reading the sender until
it drains), half-closes passed on, resets, the caps, the listing, and relays that go on
after the agent's control connection is gone.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.keeper_client import KeeperClient, KeeperUnreachable, RelayRefused

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def keeper(tmp_path: Path) -> Iterator[KeeperClient]:
    path = tmp_path / "keeper.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.keeper", "--socket", str(path)], cwd=ROOT
    )  # fmt: skip
    try:
        for _ in range(100):
            if path.exists():
                break
            time.sleep(0.05)
        yield KeeperClient(str(path))
    finally:
        proc.terminate()
        proc.wait(10)


class Pair:
    """A client connected to a listener, and the accepted end plus a server connection:
    what the agent has in hand when it hands a relay over."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        listener = socket.create_server(("127.0.0.1", 0))
        self.client = socket.create_connection(listener.getsockname())
        self.accepted, addr = listener.accept()
        self.source = f"{addr[0]}:{addr[1]}"
        listener.close()
        self.upstream = socket.create_connection(self.server.getsockname())
        self.db, _ = self.server.accept()
        for s in (self.client, self.db):
            s.settimeout(10)

    async def hand_over(self, keeper: KeeperClient, addon: str = "a1", cap: int = 8) -> None:
        try:
            await keeper.relay(addon, self.source, self.accepted, self.upstream, cap, 100)
        finally:
            self.accepted.close()
            self.upstream.close()

    def close(self) -> None:
        for s in (self.client, self.db, self.server):
            s.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


async def test_bytes_flow_both_ways_including_those_sent_before_the_hand_over(
    keeper: KeeperClient,
) -> None:
    pair = Pair()
    try:
        pair.client.sendall(b"startup packet")  # while the database was starting
        await pair.hand_over(keeper)
        assert recv_exactly(pair.db, 14) == b"startup packet"
        for n in range(200):
            pair.client.sendall(b"q%d" % n)
            assert recv_exactly(pair.db, len(b"q%d" % n)) == b"q%d" % n
            pair.db.sendall(b"r%d" % n)
            assert recv_exactly(pair.client, len(b"r%d" % n)) == b"r%d" % n
    finally:
        pair.close()


async def test_a_full_receiver_loses_nothing_and_a_half_close_is_passed_on(
    keeper: KeeperClient,
) -> None:
    pair = Pair()
    try:
        await pair.hand_over(keeper)
        payload = os.urandom(24 << 20)  # far more than the socket buffers and a pipe hold

        def send() -> None:
            pair.client.sendall(payload)
            pair.client.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        await asyncio.sleep(1.0)  # the database reads nothing yet: the relay must hold
        got = await asyncio.to_thread(recv_exactly, pair.db, len(payload) + 1)
        sender.join()
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        # The client's FIN arrived (recv returned 0 after the payload); the other way
        # still works until the database closes too.
        pair.db.sendall(b"last words")
        pair.db.shutdown(socket.SHUT_WR)
        assert recv_exactly(pair.client, 11) == b"last words"
        assert await _relays(keeper, "a1", 0)
    finally:
        pair.close()


async def test_caps_are_enforced_and_relays_are_listed_and_outlive_the_control_connection(
    keeper: KeeperClient,
) -> None:
    pairs = [Pair() for _ in range(3)]
    try:
        await pairs[0].hand_over(keeper, cap=2)
        await pairs[1].hand_over(keeper, cap=2)
        with pytest.raises(RelayRefused) as refused:
            await pairs[2].hand_over(keeper, cap=2)
        assert refused.value.reason == "addon_cap"
        other = Pair()
        pairs.append(other)
        await other.hand_over(keeper, addon="a2", cap=2)  # another add-on has its own cap
        listed = await keeper.relays("a1")
        assert listed is not None
        assert sorted(r.source for r in listed) == sorted(p.source for p in pairs[:2])
        assert len(await keeper.relays() or []) == 3
        # Each request was its own control connection, long closed: the relays still work.
        pairs[1].client.sendall(b"ping")
        assert recv_exactly(pairs[1].db, 4) == b"ping"
        # A reset on one side ends that relay, and frees its place under the cap.
        pairs[0].db.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        pairs[0].db.close()
        assert await _relays(keeper, "a1", 1)
        assert pairs[0].client.recv(10) == b""
    finally:
        for p in pairs:
            p.close()


async def test_a_held_client_waits_unread_until_its_database_is_attached(
    keeper: KeeperClient,
) -> None:
    """What survives an agent killed mid-wake: the client is held (counted, listed as
    held), its early bytes wait, and whoever attaches the database later gets them."""
    pair = Pair()
    dropped = Pair()
    try:
        pair.client.sendall(b"startup")
        await keeper.hold("a1", pair.source, pair.accepted, 1, 100)
        pair.accepted.close()
        listed = await keeper.relays("a1")
        assert listed is not None and [(r.source, r.held) for r in listed] == [(pair.source, True)]
        with pytest.raises(RelayRefused):  # held ones count against the cap
            await keeper.hold("a1", dropped.source, dropped.accepted, 1, 100)
        await keeper.attach("a1", pair.source, pair.upstream)
        pair.upstream.close()
        assert recv_exactly(pair.db, 7) == b"startup"
        pair.db.sendall(b"ready")
        assert recv_exactly(pair.client, 5) == b"ready"
        listed = await keeper.relays("a1")
        assert listed is not None and [r.held for r in listed] == [False]
        with pytest.raises(RelayRefused):  # attached once only
            await keeper.attach("a1", pair.source, dropped.upstream)
        # A held client whose wake failed is reset and frees its place.
        await keeper.hold("a2", dropped.source, dropped.accepted, 1, 100)
        dropped.accepted.close()
        await keeper.drop("a2", dropped.source)
        with pytest.raises(ConnectionResetError):
            dropped.client.recv(10)
        assert await _relays(keeper, "a2", 0)
    finally:
        pair.close()
        dropped.close()


async def test_accept_holds_every_waiting_client_so_none_is_ever_the_agents_alone(
    keeper: KeeperClient,
) -> None:
    """ACCEPT: the keeper takes what waits at a listener it holds and holds each client
    (past the cap: closed, and said so), with no agent in between that could die
    holding one. The listener stays the agent's too, and nothing waits there after."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    server = socket.create_server(("127.0.0.1", 0))
    clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    try:
        with pytest.raises(KeeperUnreachable):  # not stored yet: the agent accepts itself
            await keeper.accept("wake-a1-x", "a1", 2, 100)
        assert await keeper.put("wake-a1-x", listener)
        for c in clients:
            c.settimeout(10)
            c.sendall(b"hello")
        got = await keeper.accept("wake-a1-x", "a1", 2, 100)
        mine = {f"127.0.0.1:{c.getsockname()[1]}" for c in clients}
        assert len(got.held) == 2 and set(got.held) < mine, got
        assert [r for r, _ in got.refused] == ["addon_cap"] and got.refused[0][1] in mine
        assert got.error == ""
        with pytest.raises(BlockingIOError):
            listener.accept()  # all taken
        refused = next(c for c in clients if f"127.0.0.1:{c.getsockname()[1]}" not in got.held)
        with pytest.raises(ConnectionResetError):  # closed with its bytes unread: reset
            refused.recv(10)
        listed = await keeper.relays("a1")
        assert listed is not None and sorted(r.source for r in listed if r.held) == sorted(got.held)
        # Nothing waits: an empty answer, not an error.
        assert await keeper.accept("wake-a1-x", "a1", 2, 100) == type(got)()
        # A held one is attached as any other, its early bytes first.
        upstream = socket.create_connection(server.getsockname())
        db, _ = server.accept()
        db.settimeout(10)
        await keeper.attach("a1", got.held[0], upstream)
        upstream.close()
        assert recv_exactly(db, 5) == b"hello"
        db.close()
    finally:
        for s in (listener, server, *clients):
            s.close()


async def test_an_agent_newer_than_its_keeper_falls_back_to_relaying_itself(
    tmp_path: Path,
) -> None:
    """Upgrade order: the agent may run the new protocol before the keeper is restarted.
    The old keeper answers "unknown request" (and closes what it got): the agent must
    read that as "nothing handed over", not as a failed client, and not wait on LIST."""
    path = tmp_path / "old.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(str(path))
    server.listen(4)

    def old_keeper() -> None:  # the keeper's answer before relaying existed
        for _ in range(3):
            conn, _ = server.accept()
            with conn:
                _data, fds, _f, _a = socket.recv_fds(conn, 4096, 2)
                for fd in fds:
                    os.close(fd)
                conn.send(b"ERR unknown request")

    thread = threading.Thread(target=old_keeper)
    thread.start()
    pair = Pair()
    try:
        keeper = KeeperClient(str(path))
        with pytest.raises(KeeperUnreachable):
            await keeper.hold("a1", pair.source, pair.accepted, 8, 100)
        with pytest.raises(KeeperUnreachable):
            await keeper.accept("wake-a1-x", "a1", 8, 100)
        started = time.monotonic()
        assert await keeper.relays("a1") is None
        assert time.monotonic() - started < 2
    finally:
        thread.join(10)
        server.close()
        pair.close()


async def _relays(keeper: KeeperClient, addon: str, want: int) -> bool:
    for _ in range(100):
        listed = await keeper.relays(addon)
        if listed is not None and len(listed) == want:
            return True
        await asyncio.sleep(0.05)
    return False
