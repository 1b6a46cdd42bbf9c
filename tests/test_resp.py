"""The agent's minimal Redis client (agent/resp.py): the wire format, without I/O.

Against a real Redis it runs in every test that waits for a Redis add-on to be ready (the
readiness probe) and in tests/test_plans_hold.py (the upkeep: CONFIG, INFO, ACL).
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import resp


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert resp.encode("PING") == b"*1\r\n$4\r\nPING\r\n"
    assert resp.encode("CONFIG", "SET", "maxmemory", 1024) == (
        b"*4\r\n$6\r\nCONFIG\r\n$3\r\nSET\r\n$9\r\nmaxmemory\r\n$4\r\n1024\r\n"
    )
    # Binary-safe: a password with CR LF and non-ASCII goes as its exact bytes.
    assert (
        resp.encode("AUTH", "u", "p\r\nä")
        == b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$5\r\np\r\n\xc3\xa4\r\n"
    )


async def read(data: bytes) -> resp.Reply:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await resp.read_reply(reader)


@pytest.mark.parametrize(
    ("wire", "reply"),
    [
        (b"+PONG\r\n", "PONG"),
        (b":42\r\n", 42),
        (b"$5\r\nhello\r\n", b"hello"),
        (b"$0\r\n\r\n", b""),
        (b"$-1\r\n", None),
        (b"*-1\r\n", None),
        (b"*2\r\n$9\r\nmaxmemory\r\n$4\r\n1024\r\n", [b"maxmemory", b"1024"]),
        (b"*2\r\n*1\r\n:1\r\n+OK\r\n", [[1], "OK"]),
    ],
)
async def test_replies(wire: bytes, reply: resp.Reply) -> None:
    assert await read(wire) == reply


async def test_an_error_reply_is_a_value_and_call_raises_it() -> None:
    err = await read(b"-WRONGPASS invalid username-password pair\r\n")
    assert isinstance(err, resp.RespError) and "WRONGPASS" in str(err)


async def test_broken_replies_are_refused() -> None:
    with pytest.raises(resp.RespError):
        await read(b"?what\r\n")
    with pytest.raises(resp.RespError):
        await read(b"$999999999999\r\n")
    with pytest.raises(asyncio.IncompleteReadError):
        await read(b"$5\r\nhel")


@given(st.recursive(
    st.none() | st.integers(-(2**63), 2**63 - 1) | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=20,
))  # fmt: skip
async def test_any_reply_round_trips(value: resp.Reply) -> None:
    def wire(v: resp.Reply) -> bytes:
        if v is None:
            return b"$-1\r\n"
        if isinstance(v, int):
            return b":%d\r\n" % v
        if isinstance(v, bytes):
            return b"$%d\r\n%s\r\n" % (len(v), v)
        assert isinstance(v, list)
        return b"*%d\r\n" % len(v) + b"".join(wire(x) for x in v)

    assert await read(wire(value)) == value


def test_info_and_config_replies() -> None:
    text = b"# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\n\r\n# x\r\nk:v:w\r\n"
    assert resp.info_fields(text) == {
        "used_memory": "1048576",
        "used_memory_human": "1.00M",
        "k": "v:w",
    }
    assert resp.pairs([b"maxmemory", b"0", b"maxmemory-policy", b"noeviction"]) == {
        "maxmemory": "0",
        "maxmemory-policy": "noeviction",
    }
    with pytest.raises(resp.RespError):
        resp.pairs(b"not an array")


@given(
    st.dictionaries(
        st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9.:]{0,10}", fullmatch=True),
        max_size=8,
    ),
    st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
)
def test_one_info_field_is_what_the_whole_parse_finds(fields: dict[str, str], name: str) -> None:
    text = ("# Memory\r\n" + "".join(f"{k}:{v}\r\n" for k, v in fields.items())).encode()
    assert resp.info_field(text, name) == resp.info_fields(text).get(name)
    assert resp.info_field(text.rstrip(b"\r\n"), name) == resp.info_fields(text).get(name)


async def test_a_call_that_failed_leaves_its_connection_unusable() -> None:
    """A timed-out call leaves its reply in flight: the next one would read it as its own."""
    replies = [b"+PONG\r\n", b""]  # the second command is never answered

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in replies:
            await reader.readuntil(b"\r\n")  # each test command is one array header...
            await reader.readuntil(b"PING\r\n")  # ...and its one bulk string
            writer.write(reply)
            await writer.drain()
        await reader.read()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = resp.Connection(reader, writer)
        conn.timeout_s = 0.2
        assert await conn.call("PING") == "PONG"
        assert not conn.broken and not conn.closed
        with pytest.raises(TimeoutError):
            await conn.call("PING")
        assert conn.broken and conn.closed
        with pytest.raises(resp.RespError, match="broken"):
            await conn.call("PING")
        await conn.close()
