"""The agent's side of the wake-socket keeper (see keeper.py).

Calls are short blocking exchanges on a local socket, run in a worker thread. A keeper
that is not configured or not running only costs the restart guarantee: the agent works
without it and logs once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger("orkestr.agent.keeper")


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
