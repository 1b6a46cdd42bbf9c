"""The idle agent's cheaper periodic work (agent/smallfiles.py and its users, the pipelined
Redis round of agent/resp.py, the condition flips a re-probe compares): each reads or
decides what the slower way did.

The files are real: this process's own /proc, files written here, a real TCP server.
"""

from __future__ import annotations

import asyncio
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import netns, probe, resp, smallfiles
from agent.conditions import ConditionBook
from agent.secrets import SecretStore

AID = "c" * 32


@given(st.binary(max_size=3 * smallfiles.CHUNK + 7))
def test_read_bytes_reads_a_whole_file_of_any_size(tmp_path_factory: pytest.TempPathFactory,
                                                   data: bytes) -> None:  # fmt: skip
    path = tmp_path_factory.mktemp("f") / "data"
    path.write_bytes(data)
    assert smallfiles.read_bytes(str(path)) == data


def test_reads_fail_as_open_does_and_is_file_is_pathlibs(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("ä\n")
    os.symlink(tmp_path / "file", tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    assert smallfiles.read_text(str(tmp_path / "file")) == "ä\n"
    with pytest.raises(FileNotFoundError):
        smallfiles.read_bytes(str(tmp_path / "missing"))
    with pytest.raises(IsADirectoryError):
        smallfiles.read_bytes(str(tmp_path))
    for name in ("file", "link", "dangling", "missing", "file/below", ""):
        path = tmp_path / name
        assert smallfiles.is_file(str(path)) == path.is_file(), name


def test_proc_files_read_whole() -> None:
    """/proc files are made as they are read: one read of a small one gets all of it."""
    with open(f"/proc/{os.getpid()}/net/snmp", "rb") as f:
        expected = f.read()
    got = smallfiles.read_bytes(f"/proc/{os.getpid()}/net/snmp")
    # Counters may move between the two reads, not the shape.
    assert [line.split(b":")[0] for line in got.splitlines()] == [
        line.split(b":")[0] for line in expected.splitlines()
    ]


def test_a_long_proc_table_is_read_whole_not_one_page() -> None:
    """seq_file gives /proc/net/tcp a page or so per read: a short read is not the end.
    (Read once, the client list of a namespace with ~30 sockets was cut short.)"""
    listeners = []
    try:
        for _ in range(120):  # ~150 bytes a line: ~18 KB, several pages
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listeners.append(sock)
            sock.bind(("127.0.0.1", 0))
            sock.listen(1)
        ports = {sock.getsockname()[1] for sock in listeners}
        got = smallfiles.read_bytes(f"/proc/{os.getpid()}/net/tcp")
        assert len(got) > 4096 * 2
        seen = {s.local_port for s in netns.parse_tcp_table(got.decode(), ipv6=False)}
        assert ports <= seen
        assert ports <= {s.local_port for s in netns.tcp_table(os.getpid())}
    finally:
        for sock in listeners:
            sock.close()


def test_passive_opens_is_the_tcp_counter_the_line_parse_finds() -> None:
    pid = os.getpid()
    with open(f"/proc/{pid}/net/snmp") as f:
        lines = [line.split() for line in f if line.startswith("Tcp:")]
    expected = int(lines[1][lines[0].index("PassiveOpens")])
    # This process's namespace may accept connections meanwhile (other tests): never fewer.
    assert netns.passive_opens(pid) >= expected
    snmp = (
        b"Ip: Forwarding DefaultTTL\nIp: 1 64\n"
        b"Tcp: RtoAlgorithm ActiveOpens PassiveOpens AttemptFails CurrEstab\nTcp: 1 12 345 6 4\n"
        b"Udp: InDatagrams\nUdp: 7\n"
    )
    assert netns.parse_tcp_counters(snmp) == netns.TcpCounters(
        passive_opens=345, active_opens=12, curr_estab=4
    )


def test_secret_reads_match_the_files(tmp_path: Path) -> None:
    store = SecretStore(tmp_path)
    store.ensure_root()
    assert store.versions() == {} and store.version(AID) == 0 and not store.has(AID)
    store.write(AID, "redis", "p\u00e4ss", 3)
    assert store.has(AID) and store.version(AID) == 3
    assert store.password(AID) == "p\u00e4ss"
    assert store.admin_password(AID) == (tmp_path / AID / "admin_password").read_text()
    # Half-written (no version yet), from before platform roles (no admin password), a
    # stray file: none is a version.
    (tmp_path / ("d" * 32)).mkdir()
    (tmp_path / ("e" * 32)).mkdir()
    (tmp_path / ("e" * 32) / "version").write_text("1")
    (tmp_path / "stray").write_text("x")
    (tmp_path / ("f" * 32)).mkdir()
    (tmp_path / ("f" * 32) / "admin_password").write_text("x")
    (tmp_path / ("f" * 32) / "version").write_text("not a number")
    assert store.versions() == {AID: 3}
    with pytest.raises(FileNotFoundError):
        store.password("d" * 32)


async def serve(replies: list[bytes], got: list[bytes]) -> tuple[asyncio.Server, int]:
    """A server that answers each write with the next canned reply (one per write)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in replies:
            data = await reader.read(65536)
            if not data:
                break
            got.append(data)
            writer.write(reply)
            await writer.drain()
        await reader.read()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_ping_and_info_go_in_one_write_and_each_reply_is_its_commands() -> None:
    info = b"# Memory\r\nused_memory:1048576\r\n"
    got: list[bytes] = []
    server, port = await serve(
        [b"+OK\r\n+OK\r\n+PONG\r\n$%d\r\n%s\r\n" % (len(info), info), b"+PONG\r\n"], got
    )
    async with server:
        conn = await resp.Connection.open("127.0.0.1", port, "u", "pw", 2.0, "orkestr-probe")
        result, reply = await probe.redis_ping_info(conn, "127.0.0.1")
        assert result[0] and result[1] == "ClientConnected" and reply == info
        # The handshake, PING and INFO in one write: one round trip.
        assert got == [
            resp.encode("AUTH", "u", "pw")
            + resp.encode("CLIENT", "SETNAME", "orkestr-probe")
            + resp.encode("PING")
            # A connection whose server is not known yet asks for `run_id` too.
            + resp.encode("INFO", "server", "memory")
        ]
        assert await probe.redis_ping(conn, "127.0.0.1") == result
        assert got[1] == resp.encode("PING")
        await conn.close()


async def test_an_error_reply_in_a_pipeline_is_a_value_and_ends_the_connections_use() -> None:
    got: list[bytes] = []
    server, port = await serve([b"+PONG\r\n-ERR unknown section\r\n"], got)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = resp.Connection(reader, writer)
        replies = await conn.pipeline(("PING",), ("INFO", "nonsense"))
        assert replies[0] == "PONG" and isinstance(replies[1], resp.RespError)
        assert conn.broken and conn.closed  # never reused: as after a failed `call`
        await conn.close()


async def test_a_refused_handshake_or_ping_fails_the_probe_without_an_info() -> None:
    got: list[bytes] = []
    server, port = await serve([b"-WRONGPASS invalid\r\n+OK\r\n+PONG\r\n+x\r\n"], got)
    async with server:
        conn = await resp.Connection.open("127.0.0.1", port, "u", "bad", 2.0, "orkestr-probe")
        result, reply = await probe.redis_ping_info(conn, "127.0.0.1")
        # The probe's role refused: mended as the admin (Upkeep.probe_role).
        assert result[:2] == (False, probe.ROLE_REFUSED) and "WRONGPASS" in result[2]
        assert reply is None and conn.broken
        await conn.close()
    got = []
    server, port = await serve([b"-LOADING loading the dataset\r\n$1\r\nx\r\n"], got)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = resp.Connection(reader, writer)
        result, reply = await probe.redis_ping_info(conn, "127.0.0.1")
        assert result == (
            False,
            "Unreachable",
            "redis at 127.0.0.1: RespError: LOADING loading the dataset",
        )
        assert reply is None
        await conn.close()


def test_condition_flips_see_a_status_or_reason_change_not_a_message() -> None:
    book = ConditionBook()
    now = datetime.now(UTC)
    book.set(AID, "StorageQuota", "True", "WithinQuota", "1.0 MB of 48 MB (2 %)", now)
    book.set(AID, "MemoryLimit", "True", "WithinLimit", "no OOM kill", now)
    before = book.flips(AID)
    book.set(AID, "StorageQuota", "True", "WithinQuota", "1.1 MB of 48 MB (2 %)", now)
    assert book.flips(AID) == before
    book.set(AID, "StorageQuota", "True", "NearQuota", "44 MB of 48 MB (92 %)", now)
    assert book.flips(AID) != before
    book.set(AID, "StorageQuota", "True", "WithinQuota", "1.0 MB of 48 MB (2 %)", now)
    book.set(AID, "MemoryLimit", "False", "OOMKilled", "killed", now)
    assert book.flips(AID) != before
    assert book.flips("nobody") == {}


async def test_dropping_kept_connections_leaves_one_a_round_took_meanwhile() -> None:
    """A pass drops kept Redis connections (agent/runtime.py `_drop_kept`) while re-probe
    rounds take theirs (`_take_kept`): each close yields, and a round may take another
    add-on's connection then. The pass must neither fail on it (KeyError, as once in a
    60-add-on delete) nor close it under the round."""
    from types import SimpleNamespace

    from agent.runtime import Agent

    got: list[bytes] = []
    server, port = await serve([], got)
    async with server:
        conns = [resp.Connection(*await asyncio.open_connection("127.0.0.1", port))
                 for _ in range(3)]  # fmt: skip
        agent = SimpleNamespace(sleep=SimpleNamespace(sleepers={}), _kept={
            aid: (f"db-{aid}", "10.0.0.2", conn, 0) for aid, conn in zip("abc", conns, strict=True)
        })  # fmt: skip

        async def round_of_c() -> resp.Connection | None:
            taken, _rounds = await Agent._take_kept(agent, "c", "db-c", "10.0.0.2")  # type: ignore[arg-type]
            return taken

        # No targets: every add-on left, so the pass drops all three.
        _, taken = await asyncio.gather(Agent._drop_kept(agent, ()), round_of_c())  # type: ignore[arg-type]
        assert agent._kept == {}
        assert taken is None or not taken.closed
        for conn in conns:
            await conn.close()
