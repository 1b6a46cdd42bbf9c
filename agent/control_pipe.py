"""Two FIFOs between the agent and one of its running backup containers.

A container reports each step it has finished as a line on `up` and waits for the
agent's next command on `ctl`, so the agent can run the steps that are not the
container's (a checksum, stopping the database) in between without starting another
container, and without polling. Both FIFOs live in the add-on's directory of the
backup store (mounted at /backup); their names end in `.tmp`, so a killed agent's are
removed like any temporary file. The agent opens both read-write: no open ever blocks,
and a container that dies leaves nothing hanging, since the agent always waits for the
next line *or* the container's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any


class PipeClosed(Exception):
    """The container exited before sending the line the agent waited for."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"the container exited with {exit_code}")
        self.exit_code = exit_code


class ControlPipe:
    def __init__(self, up: Path, ctl: Path) -> None:
        self.up, self.ctl = up, ctl
        self._lines: asyncio.Queue[str] = asyncio.Queue()
        self._buf = b""
        self._up_fd = self._ctl_fd = -1

    def __enter__(self) -> ControlPipe:
        for path in (self.up, self.ctl):
            path.unlink(missing_ok=True)
            os.mkfifo(path, 0o600)
        self._up_fd = os.open(self.up, os.O_RDWR | os.O_NONBLOCK)
        self._ctl_fd = os.open(self.ctl, os.O_RDWR | os.O_NONBLOCK)
        asyncio.get_running_loop().add_reader(self._up_fd, self._readable)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.get_running_loop().remove_reader(self._up_fd)
        for fd in (self._up_fd, self._ctl_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        for path in (self.up, self.ctl):
            path.unlink(missing_ok=True)

    def _readable(self) -> None:
        try:
            self._buf += os.read(self._up_fd, 4096)
        except BlockingIOError:
            return
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            self._lines.put_nowait(line.decode(errors="replace").strip())

    async def expect(self, want: str, exited: asyncio.Future[int], timeout_s: float) -> None:
        """Wait for the line `want`; PipeClosed if the container exits first."""
        line = asyncio.ensure_future(self._lines.get())
        either: set[asyncio.Future[Any]] = {line, exited}
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise TimeoutError(f"no {want!r} from the container within {timeout_s:g}s") from None
        finally:
            line.cancel()
        if not line.done() or line.cancelled():
            raise PipeClosed(exited.result())
        got = line.result()
        if got != want:
            raise ValueError(f"the container said {got!r}, expected {want!r}")

    def send(self, command: str) -> None:
        os.write(self._ctl_fd, command.encode() + b"\n")
