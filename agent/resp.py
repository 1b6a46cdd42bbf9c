"""A minimal Redis client for the agent's own few commands (RESP2 over asyncio streams).

The agent talks to each awake Redis add-on once per resync interval (a readiness probe and
the upkeep round: AUTH, PING, CONFIG, INFO, ACL SETUSER); a kept connection's round is one
round trip, PING and INFO pipelined. redis-py builds a connection
pool, a retry policy and a parser per client and costs ~6 MiB of resident memory to
import; at a hundred add-ons per host that was most of the agent's idle CPU. This is the
protocol subset those commands need: commands are sent pipelined in one write, and the
replies are read in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Self


class RespError(Exception):
    """An error reply from the server (`-ERR ...`, `-WRONGPASS ...`), or a broken reply."""


# An error reply is a value too: in a pipeline, the replies after it still have to be read.
Reply = str | bytes | int | list["Reply"] | RespError | None


# INFO and CONFIG replies are kilobytes: a reply near this is not from Redis.
MAX_BULK = 64 * 1024 * 1024


def encode(*args: str | bytes | int) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    """One reply; an error reply is returned as a `RespError`, not raised (see `call`)."""
    line = await reader.readuntil(b"\r\n")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        return RespError(body.decode(errors="replace"))
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        if size > MAX_BULK:
            raise RespError(f"bulk reply of {size} bytes")
        data = await reader.readexactly(size + 2)
        return data[:-2]
    if kind == b"*":
        count = int(body)
        if count < 0:
            return None
        return [await read_reply(reader) for _ in range(count)]
    raise RespError(f"unexpected reply {line[:40]!r}")


_serials = itertools.count(1)


class Connection:
    """One connection, opened with AUTH and CLIENT SETNAME sent ahead of the first command.

    `serial` tells connections apart for good (one server process per connection);
    `broken` is set by any failed call: its replies may be out of step, never reuse it.
    `server`: the server's `run_id`, once a reply to `INFO server` told it (agent/upkeep.py).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: list[bytes] = []
        self.timeout_s = 5.0
        self.serial = next(_serials)
        self.broken = False
        self.server: str | None = None

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        username: str,
        password: str,
        timeout_s: float,
        client_name: str,
    ) -> Self:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
        conn = cls(reader, writer)
        conn.timeout_s = timeout_s
        # Sent with the first command: one round trip for the whole handshake.
        conn._pending = [
            encode("AUTH", username, password),
            encode("CLIENT", "SETNAME", client_name),
        ]
        return conn

    async def call(self, *args: str | bytes | int) -> Reply:
        """Send a command (after any queued handshake) and return its reply.

        An error reply to any of them raises `RespError`, the handshake's first.
        """
        reply = (await self.pipeline(args))[0]
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def pipeline(self, *commands: tuple[str | bytes | int, ...]) -> list[Reply]:
        """Send commands in one write (after any queued handshake); their replies in order.

        An error reply to the handshake raises `RespError`; one to a command is its value
        in the list (and, as for `call`, the connection is not used again).
        """
        if self.broken:
            raise RespError("connection broken by an earlier call")
        queued, self._pending = self._pending, []
        count = len(queued) + len(commands)
        try:
            self._writer.write(b"".join([*queued, *(encode(*c) for c in commands)]))
            async with asyncio.timeout(self.timeout_s):
                await self._writer.drain()
                replies = [await read_reply(self._reader) for _ in range(count)]
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.broken = True
            raise RespError(f"broken reply: {exc!r}") from None
        except BaseException:  # a timeout or a cancel mid-reply: the stream is out of step
            self.broken = True
            raise
        for reply in replies:
            if isinstance(reply, RespError):
                self.broken = True
        for reply in replies[: len(queued)]:
            if isinstance(reply, RespError):
                raise reply
        return replies[len(queued) :]

    @property
    def closed(self) -> bool:
        return self.broken or self._writer.is_closing() or self._reader.at_eof()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


def info_field(text: bytes, name: str) -> str | None:
    """One field of `INFO` output, without parsing the rest."""
    key = b"\n" + name.encode() + b":"
    at = (b"\n" + text).find(key)
    if at < 0:
        return None
    start = at + len(key) - 1
    end = text.find(b"\n", start)
    return text[start : end if end >= 0 else len(text)].decode(errors="replace").strip()


def info_fields(text: bytes) -> dict[str, str]:
    """`INFO` output as name -> value (section headers and blank lines skipped)."""
    fields: dict[str, str] = {}
    for line in text.decode(errors="replace").splitlines():
        if line and not line.startswith("#") and ":" in line:
            name, value = line.split(":", 1)
            fields[name] = value.strip()
    return fields


def pairs(reply: Reply) -> dict[str, str]:
    """A flat [name, value, ...] reply (CONFIG GET) as a dict of text."""
    if not isinstance(reply, list):
        raise RespError(f"expected an array, got {reply!r}")
    items = [x.decode() if isinstance(x, bytes) else str(x) for x in reply]
    return dict(zip(items[::2], items[1::2], strict=False))
