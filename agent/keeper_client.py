"""The agent's side of the wake-socket keeper (see keeper.py).

Calls are short blocking exchanges on a local socket, run in a worker thread. A keeper
that is not configured or not running only costs the restart guarantee: the agent works
without it (and relays in its own event loop) and logs once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("orkestr.agent.keeper")


@dataclass(frozen=True)
class KeptRelay:
    """A connection the keeper holds: the add-on, the client's address, since when, and
    whether it still waits for its database (held) or is relayed."""

    addon: str
    source: str
    started: float
    held: bool = False


@dataclass
class Accepted:
    """What one ACCEPT took: sources now held, (reason, source) refused past a cap, and
    the error that stopped accepting early (descriptors exhausted), if any."""

    held: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    error: str = ""


class RelayRefused(Exception):
    """The keeper would not take a relay: `reason` is addon_cap, host_cap or an error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeeperUnreachable(OSError):
    """The keeper's socket could not be connected to: nothing was handed over."""


class KeeperClient:
    def __init__(self, path: str) -> None:
        self.path = Path(path) if path else None
        self._warned = False

    def _exchange(self, request: bytes, fds: list[int]) -> list[tuple[str, int]]:
        assert self.path is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.settimeout(5)
            conn.connect(str(self.path))
            socket.send_fds(conn, [request], fds)
            got: list[tuple[str, int]] = []
            while True:
                data, received, _flags, _addr = socket.recv_fds(conn, 4096, 1)
                if data in (b"OK", b"END", b""):
                    return got
                if data.startswith(b"ERR"):
                    for fd in received:
                        socket.close(fd)
                    raise OSError(data.decode())
                got += [(data.decode(), fd) for fd in received]

    async def _call(self, request: bytes, fds: list[int]) -> list[tuple[str, int]]:
        if self.path is None:
            return []
        try:
            return await asyncio.to_thread(self._exchange, request, fds)
        except OSError as exc:
            if not self._warned:
                log.warning("keeper.unavailable path=%s error=%s", self.path, exc)
                self._warned = True
            return []

    def available(self) -> bool:
        return self.path is not None

    def _ask(self, request: bytes, fds: list[int]) -> str:
        """One request, one answer; KeeperUnreachable if nothing could be handed over."""
        assert self.path is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.settimeout(5)
            try:
                conn.connect(str(self.path))
            except OSError as exc:
                raise KeeperUnreachable(exc.errno, str(exc)) from exc
            socket.send_fds(conn, [request], fds)
            return conn.recv(8192).decode(errors="replace")

    def _relay(self, request: bytes, fds: list[int]) -> tuple[int, int]:
        answer = self._ask(request, fds).split()
        if answer[:1] == ["OK"] and len(answer) == 3:
            return int(answer[1]), int(answer[2])
        if answer[:2] == ["ERR", "cap"] and len(answer) == 3:
            raise RelayRefused(answer[2])
        if answer == ["ERR", "gone"]:
            raise RelayRefused("gone")
        if answer[:3] == ["ERR", "unknown", "request"]:
            # A keeper older than this agent (not restarted since the upgrade): it closed
            # what it got and holds nothing, so the agent relays, as before.
            raise KeeperUnreachable(0, "keeper predates relaying")
        raise OSError(f"keeper: {' '.join(answer) or 'no answer'}")

    async def relay(
        self,
        addon: str,
        source: str,
        client: socket.socket,
        upstream: socket.socket,
        per_addon: int,
        total: int,
    ) -> tuple[int, int]:
        """Hand a client and its database connection to the keeper, which relays them.

        Returns the keeper's relay counts (this add-on's, all) after taking it. The
        keeper holds its own copies: the caller closes its sockets either way. Raises
        RelayRefused past a cap, OSError when the keeper cannot be reached.
        """
        request = f"RELAY {addon} {per_addon} {total} {source}".encode()
        return await asyncio.to_thread(
            self._relay, request, [client.fileno(), upstream.fileno()]
        )  # fmt: skip

    async def hold(
        self, addon: str, source: str, client: socket.socket, per_addon: int, total: int
    ) -> tuple[int, int]:
        """Give the keeper a client accepted while its database starts: it keeps it
        (unread) until `attach`, so it survives an agent that dies during the wake.
        Raises like `relay`; the caller closes its copy either way."""
        request = f"HOLD {addon} {per_addon} {total} {source}".encode()
        return await asyncio.to_thread(self._relay, request, [client.fileno()])

    def _accept(self, request: bytes) -> Accepted:
        head, *lines = self._ask(request, []).split("\n")
        if head in ("ERR unknown request", "ERR unknown listener"):
            # A keeper older than this agent, or one restarted since the listener was put
            # there (it is put back on the next pass): the agent accepts, as before.
            raise KeeperUnreachable(0, f"keeper: {head}")
        if not head.startswith("OK"):
            raise OSError(f"keeper: {head or 'no answer'}")
        got = Accepted()
        for line in lines:
            kind, _, rest = line.partition(" ")
            if kind == "H":
                got.held.append(rest)
            elif kind == "X":
                reason, _, source = rest.partition(" ")
                got.refused.append((reason, source))
            elif kind == "E":
                got.error = f"errno {rest}"
        return got

    async def accept(self, listener: str, addon: str, per_addon: int, total: int) -> Accepted:
        """Have the keeper accept the clients waiting at a listener it holds, and hold
        them as `hold` does: they are never in the agent's hands alone, so an agent that
        dies at any moment of a wake loses none. KeeperUnreachable: nothing was taken."""
        request = f"ACCEPT {listener} {addon} {per_addon} {total}".encode()
        return await asyncio.to_thread(self._accept, request)

    async def attach(self, addon: str, source: str, upstream: socket.socket) -> None:
        """Relay a held client with its database connection. RelayRefused("gone") if the
        keeper no longer holds it (it closed or was dropped)."""
        request = f"ATTACH {addon} {source}".encode()
        await asyncio.to_thread(self._relay, request, [upstream.fileno()])

    async def drop(self, addon: str, source: str) -> None:
        """Reset a held client whose wake failed."""
        await self._call(f"DROP {addon} {source}".encode(), [])

    def _list(self, addon: str) -> list[KeptRelay]:
        assert self.path is not None
        out: list[KeptRelay] = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.settimeout(5)
            conn.connect(str(self.path))
            conn.send(f"LIST {addon}".encode() if addon else b"LIST")
            while (data := conn.recv(4096)) not in (b"END", b""):
                if data.startswith(b"ERR"):  # a keeper that predates relaying
                    raise OSError(f"keeper: {data.decode(errors='replace')}")
                for line in data.decode(errors="replace").splitlines():
                    parts = line.split(" ")
                    if len(parts) == 4 and parts[0] in ("R", "H"):
                        out.append(KeptRelay(parts[1], parts[2], float(parts[3]), parts[0] == "H"))
        return out

    async def relays(self, addon: str = "") -> list[KeptRelay] | None:
        """The connections the keeper relays (for one add-on, or all); None if it cannot
        be asked."""
        if self.path is None:
            return []
        try:
            return await asyncio.to_thread(self._list, addon)
        except OSError as exc:
            if not self._warned:
                log.warning("keeper.unavailable path=%s error=%s", self.path, exc)
                self._warned = True
            return None

    def identity(self) -> tuple[int, int] | None:
        """Which keeper listens now: a restarted keeper binds a new socket file.

        Lets the agent hand its listeners over again only when the keeper changed, not
        with a round trip per listener on every pass.
        """
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    async def put(self, name: str, sock: socket.socket) -> bool:
        """Hand the keeper a listener; False if it could not be reached."""
        if self.path is None:
            return True
        try:
            await asyncio.to_thread(self._exchange, f"PUT {name}".encode(), [sock.fileno()])
        except OSError as exc:
            if not self._warned:
                log.warning("keeper.unavailable path=%s error=%s", self.path, exc)
                self._warned = True
            return False
        return True

    async def delete(self, name: str) -> None:
        await self._call(f"DEL {name}".encode(), [])

    async def take_all(self) -> dict[str, socket.socket]:
        """The listeners the keeper holds, as sockets owned by this process."""
        out: dict[str, socket.socket] = {}
        for name, fd in await self._call(b"GET", []):
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            out[name] = sock
        return out
