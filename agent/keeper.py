"""The wake-socket keeper: holds the wake sockets and the relayed connections.

A sleeping add-on's port is redirected to a listening socket that the agent created in the
holder's network namespace. If only the agent held that socket, a restart of the agent
(an upgrade, a crash, `kill -9`) would close it and clients would be refused until the
new agent is up. The keeper is a tiny, rarely restarted process that holds a duplicate of
every listener: while the agent is down the kernel keeps completing handshakes into the
socket's backlog, and the new agent takes the sockets back and serves those clients. It
is our own `FDSTORE=` (systemd's store is flushed on `systemctl restart` before v254).

It holds each deep-sleep SYN queue's netlink socket the same way (agent/synqueue.py): the
SYNs stay queued in the kernel while the agent is away. On the relay path (no NFQUEUE, or
`agent.deep_wake = "relay"`) it also carries the connections accepted during a deep
sleep (issue 12): the agent accepts a client and hands it over at once (HOLD: kept
unread, so an agent that dies during the wake loses it not), wakes the database, connects
to it and hands that socket over too (ATTACH); the keeper moves the bytes with splice(2)
until either side closes.
A relayed connection (often a pool's, open for hours) therefore outlives agent restarts
and upgrades, and costs no copy through user space. Bytes go through one shared scratch
pipe (socket -> pipe -> socket in the same turn); only a direction whose receiver is
full keeps a pipe of its own until it drains, so a relay holds two descriptors.

Protocol: SOCK_SEQPACKET on a root-only Unix socket, one request per message:
  PUT <name>   + one fd  -> store (replacing an older fd of that name)   answer: OK
  DEL <name>             -> close and forget                              answer: OK
  GET                    -> one message per stored fd: "<name>" + the fd, then "END"
  RELAY <addon> <per_addon_cap> <total_cap> <source>  + two fds (client, database)
                         -> relay them      answer: "OK <addon's relays> <all relays>"
                            or, past a cap: "ERR cap addon_cap|host_cap" (fds closed)
  HOLD <addon> <per_addon_cap> <total_cap> <source>  + one fd (a client accepted while
                            its database starts) -> keep it unread   answer: as RELAY
  ATTACH <addon> <source> + one fd (the database) -> relay it with the held client
                                                    answer: "OK ..." or "ERR gone"
  ACCEPT <name> <addon> <per_addon_cap> <total_cap>
                         -> accept the clients waiting at the stored listener <name> and
                            hold each, as HOLD: "OK <addon's relays> <all relays>" then
                            one line per client, "H <source>" (held) or
                            "X <reason> <source>" (refused past a cap, closed);
                            "ERR unknown listener" if <name> is not stored
  DROP <addon> <source>  -> reset a held client (its wake failed)      answer: OK
  LIST [<addon>]         -> "R|H <addon> <source> <since>" lines (relayed or held), in
                            messages, then "END"
It accepts connections on a listener it holds only when asked (ACCEPT), so that a
client is never the agent's alone, not even between the agent's accept() and its HOLD:
an agent killed at any moment of a wake leaves every client in the kernel's backlog or
here. It has no other logic, so it has no reason to be restarted (a restart would cut
the relays; the listeners are put back).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

MAX_MESSAGE = 4096
CHUNK = 1 << 16  # a pipe's default capacity: one splice moves at most this much
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "SPLICE_F_MOVE") else 0
# Reading interest includes the peer's FIN; a paused reader drops both, or a FIN waiting
# behind a full receiver would be reported again on every turn.
IN, OUT = select.EPOLLIN | select.EPOLLRDHUP, select.EPOLLOUT
HUP = select.EPOLLHUP | select.EPOLLERR
CONTROL_TIMEOUT_S = 5.0
SPARE_PIPES = 4
# A held client waits for its add-on's wake (the agent's own limit is 120 s); past this
# nobody will attach it (the add-on was removed, the agent is gone for good): reset.
HOLD_MAX_S = 180.0
SWEEP_S = 5.0
# Clients taken per ACCEPT: the answer (one line each, up to ~50 bytes) fits one message;
# the agent asks again while the listener stays readable.
ACCEPT_BATCH = 64


class Pipes:
    """The scratch pipe every transfer goes through, and a few spares for stalled halves."""

    def __init__(self) -> None:
        self.scratch = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.spare: list[tuple[int, int]] = []

    def take_scratch(self) -> tuple[int, int]:
        """Hand the scratch pipe (holding bytes a full receiver refused) to its half."""
        held = self.scratch
        self.scratch = self.spare.pop() if self.spare else os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        return held

    def give_back(self, pipe: tuple[int, int]) -> None:
        if len(self.spare) < SPARE_PIPES:
            self.spare.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])


class Half:
    """One direction of a relay: src -> dst, with bytes pending when dst was full."""

    __slots__ = ("done", "dst", "eof", "pending", "pipe", "src")

    def __init__(self, src: int, dst: int) -> None:
        self.src = src
        self.dst = dst
        self.pipe: tuple[int, int] | None = None  # own pipe while bytes are pending
        self.pending = 0
        self.eof = False  # src said FIN: pass it on once pending bytes are out
        self.done = False


class Relay:
    __slots__ = ("addon", "client", "halves", "masks", "source", "started", "upstream")

    def __init__(
        self, addon: str, source: str, client: socket.socket, upstream: socket.socket
    ) -> None:
        self.addon = addon
        self.source = source
        self.started = time.time()
        self.client = client
        self.upstream = upstream
        c, u = client.fileno(), upstream.fileno()
        self.halves = (Half(c, u), Half(u, c))
        self.masks: dict[int, int] = {c: 0, u: 0}


class Keeper:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.store: dict[str, int] = {}
        self.held: dict[tuple[str, str], tuple[socket.socket, float]] = {}
        self.relays: dict[int, Relay] = {}  # by each of its two fds
        self.per_addon: dict[str, int] = {}
        self.total = 0
        self.pipes = Pipes()
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.controls: dict[int, socket.socket] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old_umask = os.umask(0o077)
        try:
            self.server.bind(str(path))
        finally:
            os.umask(old_umask)
        self.server.listen(8)
        self.server.setblocking(False)
        self._watch(self.server.fileno(), IN, lambda _ev: self._accept_control())

    def _watch(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        self.epoll.register(fd, mask)
        self.handlers[fd] = handler

    def _unwatch(self, fd: int) -> None:
        self.handlers.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(fd)

    def run(self) -> None:
        poll, handlers = self.epoll.poll, self.handlers
        swept = time.monotonic()
        while True:
            for fd, ev in poll(SWEEP_S if self.held else -1):
                handler = handlers.get(fd)
                if handler is not None:
                    handler(ev)
            if self.held and time.monotonic() - swept >= SWEEP_S:
                swept = time.monotonic()
                self.sweep(time.time())

    # --- control ------------------------------------------------------------------------
    def _accept_control(self) -> None:
        try:
            conn, _ = self.server.accept()
        except BlockingIOError:
            return
        # Requests are read only when the socket is readable; answers may wait for a slow
        # reader, but never longer than this (the relays pause meanwhile).
        conn.settimeout(CONTROL_TIMEOUT_S)
        fd = conn.fileno()
        self.controls[fd] = conn
        self._watch(fd, IN, lambda _ev: self._control(fd))

    def _control(self, fd: int) -> None:
        conn = self.controls[fd]
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 2)
            if data:
                self._request(conn, data, fds)
                return
            for got in fds:
                os.close(got)
        except OSError:
            pass  # the agent went away mid-request: keep what we hold
        self._unwatch(fd)
        del self.controls[fd]
        conn.close()

    def _request(self, conn: socket.socket, data: bytes, fds: list[int]) -> None:
        verb, _, rest = data.decode(errors="replace").partition(" ")
        if verb == "PUT" and rest and len(fds) == 1:
            old = self.store.pop(rest, None)
            if old is not None:
                os.close(old)
            self.store[rest] = fds[0]
            conn.send(b"OK")
            return
        if verb == "RELAY" and len(fds) == 2:
            conn.send(self._relay(rest, fds[0], fds[1]).encode())
            return
        if verb == "HOLD" and len(fds) == 1:
            conn.send(self._hold(rest, fds[0]).encode())
            return
        if verb == "ATTACH" and len(fds) == 1:
            conn.send(self._attach(rest, fds[0]).encode())
            return
        for fd in fds:
            os.close(fd)
        if verb == "ACCEPT":
            conn.send(self._accept_waiting(rest).encode())
        elif verb == "DEL" and rest:
            old = self.store.pop(rest, None)
            if old is not None:
                os.close(old)
            conn.send(b"OK")
        elif verb == "GET":
            for stored_name, fd in list(self.store.items()):
                socket.send_fds(conn, [stored_name.encode()], [fd])
            conn.send(b"END")
        elif verb == "DROP":
            self._drop(rest)
            conn.send(b"OK")
        elif verb == "LIST":
            lines = [
                f"R {r.addon} {r.source} {r.started:.3f}"
                for fd, r in self.relays.items()
                if fd == r.client.fileno() and rest in ("", r.addon)
            ] + [
                f"H {addon} {source} {since:.3f}"
                for (addon, source), (_c, since) in self.held.items()
                if rest in ("", addon)
            ]
            while lines:
                chunk: list[str] = []
                size = 0
                while lines and size + len(lines[-1]) + 1 < MAX_MESSAGE:
                    size += len(lines[-1]) + 1
                    chunk.append(lines.pop())
                conn.send("\n".join(chunk).encode())
            conn.send(b"END")
        else:
            conn.send(b"ERR unknown request")

    # --- relays -------------------------------------------------------------------------
    def _admit(self, addon: str, per_addon: str, total: str) -> str | None:
        """Why a new connection of this add-on is refused (held ones count), or None."""
        if self.per_addon.get(addon, 0) >= int(per_addon):
            return "addon_cap"
        if self.total >= int(total):
            return "host_cap"
        return None

    def _count(self, addon: str, step: int) -> str:
        left = self.per_addon.get(addon, 0) + step
        if left:
            self.per_addon[addon] = left
        else:
            self.per_addon.pop(addon, None)
        self.total += step
        return f"OK {left} {self.total}"

    def _admitted(self, args: str, *socks: socket.socket) -> tuple[str, str] | str:
        """RELAY's and HOLD's arguments: (addon, source) if admitted, else the error answer
        (the sockets closed)."""
        try:
            addon, per_addon, total, source = args.split(" ", 3)
            refusal = self._admit(addon, per_addon, total)
        except ValueError:
            refusal = "bad request"
        if refusal is None:
            return addon, source
        for sock in socks:
            sock.close()
        return f"ERR cap {refusal}" if refusal.endswith("cap") else f"ERR {refusal}"

    def _relay(self, args: str, client_fd: int, upstream_fd: int) -> str:
        client = socket.socket(fileno=client_fd)
        upstream = socket.socket(fileno=upstream_fd)
        admitted = self._admitted(args, client, upstream)
        if isinstance(admitted, str):
            return admitted
        addon, source = admitted
        answer = self._count(addon, +1)
        self._start(addon, source, client, upstream, time.time())
        return answer

    def _hold(self, args: str, client_fd: int) -> str:
        """A client accepted while its database starts: kept (unread) until ATTACH, so an
        agent that dies during the wake loses it not."""
        client = socket.socket(fileno=client_fd)
        admitted = self._admitted(args, client)
        if isinstance(admitted, str):
            return admitted
        addon, source = admitted
        old = self.held.pop((addon, source), None)
        if old is not None:
            old[0].close()
            self._count(addon, -1)
        self.held[(addon, source)] = (client, time.time())
        return self._count(addon, +1)

    def _accept_waiting(self, args: str) -> str:
        """ACCEPT: take what waits at a stored wake listener and hold each client."""
        try:
            name, addon, per_addon, total = args.split(" ")
            int(per_addon), int(total)
        except ValueError:
            return "ERR bad request"
        fd = self.store.get(name)
        if fd is None:
            return "ERR unknown listener"
        listener = socket.socket(fileno=fd)  # borrowed: detached below, never closed here
        lines: list[str] = []
        try:
            listener.setblocking(False)  # shared with the agent's copy, which is already
            for _ in range(ACCEPT_BATCH):
                try:
                    client, address = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # EMFILE, ECONNABORTED: the agent retries later
                    lines.append(f"E {exc.errno}")
                    break
                _tune(client)
                source = f"{address[0]}:{address[1]}"
                answer = self._hold(f"{addon} {per_addon} {total} {source}", client.detach())
                reason = answer.rpartition(" ")[2]
                lines.append(f"H {source}" if answer.startswith("OK") else f"X {reason} {source}")
        finally:
            listener.detach()
        return "\n".join([f"OK {self.per_addon.get(addon, 0)} {self.total}", *lines])

    def _attach(self, args: str, upstream_fd: int) -> str:
        upstream = socket.socket(fileno=upstream_fd)
        addon, _, source = args.partition(" ")
        entry = self.held.pop((addon, source), None)
        if entry is None:
            upstream.close()
            return "ERR gone"
        self._start(addon, source, entry[0], upstream, entry[1])
        return f"OK {self.per_addon.get(addon, 0)} {self.total}"

    def _drop(self, args: str) -> None:
        addon, _, source = args.partition(" ")
        entry = self.held.pop((addon, source), None)
        if entry is not None:
            _reset(entry[0])
            self._count(addon, -1)

    def sweep(self, now: float) -> None:
        """Held clients whose wake never came (the add-on was removed meanwhile): reset."""
        for (addon, source), (_client, since) in list(self.held.items()):
            if now - since > HOLD_MAX_S:
                self._drop(f"{addon} {source}")

    def _start(
        self, addon: str, source: str, client: socket.socket, upstream: socket.socket,
        started: float,
    ) -> None:  # fmt: skip
        client.setblocking(False)
        upstream.setblocking(False)
        relay = Relay(addon, source, client, upstream)
        relay.started = started
        for fd in relay.masks:
            self.relays[fd] = relay
            self._watch(fd, IN, functools.partial(self._relay_event, fd))
            relay.masks[fd] = IN
        # Bytes the client sent while the database started wait in its socket: move them.
        for half in relay.halves:
            self._pump(relay, half)

    def _relay_event(self, fd: int, ev: int) -> None:
        relay = self.relays.get(fd)
        if relay is None:
            return
        for half in relay.halves:
            if half.src == fd and ev & (IN | HUP) and half.pipe is None:
                self._pump(relay, half)
            elif half.dst == fd and ev & (OUT | HUP) and half.pipe is not None:
                self._flush(relay, half)
            if fd not in self.relays:
                return  # closed
        if ev & HUP:
            # Reset, or shut both ways: what could be moved was moved above; nothing more
            # will be (epoll would report this on every turn).
            self._close(relay)

    def _pump(self, relay: Relay, half: Half) -> None:
        """src -> scratch pipe -> dst, in one turn; a full dst keeps the pipe."""
        if half.done or half.eof:
            return
        write_end = self.pipes.scratch[1]
        try:
            n = os.splice(half.src, write_end, CHUNK, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError:
            self._close(relay)
            return
        if n == 0:
            half.eof = True
            self._finish(relay, half)
            return
        half.pending = n
        half.pipe = self.pipes.scratch
        if self._drain(relay, half):
            self.pipes.scratch = half.pipe  # empty again: it stays the scratch pipe
            half.pipe = None
            return
        if half.src not in self.relays:
            return  # closed on a write error
        # dst is full: this half keeps the bytes until dst takes them; src is not read.
        self.pipes.take_scratch()
        self._want(relay, half.src, IN, on=False)
        self._want(relay, half.dst, OUT, on=True)

    def _drain(self, relay: Relay, half: Half) -> bool:
        """Move the half's pending bytes to dst; True when all are out."""
        assert half.pipe is not None
        while half.pending:
            try:
                n = os.splice(half.pipe[0], half.dst, half.pending, flags=SPLICE_FLAGS)
            except BlockingIOError:
                return False
            except OSError:
                self._close(relay)
                return False
            half.pending -= n
        return True

    def _flush(self, relay: Relay, half: Half) -> None:
        if not self._drain(relay, half):
            return
        assert half.pipe is not None
        self.pipes.give_back(half.pipe)
        half.pipe = None
        self._want(relay, half.dst, OUT, on=False)
        if half.eof:
            self._finish(relay, half)
        else:
            self._want(relay, half.src, IN, on=True)

    def _finish(self, relay: Relay, half: Half) -> None:
        """src closed its side: pass the FIN on; the relay ends when both sides did."""
        if half.pipe is not None:
            return  # after the pending bytes (_flush calls again)
        half.done = True
        self._want(relay, half.src, IN, on=False)
        try:
            os_shutdown(half.dst)
        except OSError:
            self._close(relay)
            return
        if all(h.done for h in relay.halves):
            self._close(relay)

    def _want(self, relay: Relay, fd: int, bit: int, on: bool) -> None:
        mask = relay.masks[fd]
        new = (mask | bit) if on else (mask & ~bit)
        if new != mask:
            relay.masks[fd] = new
            self.epoll.modify(fd, new)

    def _close(self, relay: Relay) -> None:
        if relay.client.fileno() not in self.relays:
            return
        for fd in list(relay.masks):
            self._unwatch(fd)
            self.relays.pop(fd, None)
        for half in relay.halves:
            if half.pipe is not None:
                if half.pipe == self.pipes.scratch:  # bytes left in it: it can't serve again
                    self.pipes.scratch = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                os.close(half.pipe[0])
                os.close(half.pipe[1])
                half.pipe = None
        relay.client.close()
        relay.upstream.close()
        self._count(relay.addon, -1)


def _tune(sock: socket.socket) -> None:
    """As the agent does for a client it accepts: no delay (a relay forwards what it gets
    at once), and keepalive (a client gone without a FIN must not keep its add-on up)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def os_shutdown(fd: int) -> None:
    """shutdown(fd, SHUT_WR) on a raw descriptor, without taking ownership of it."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
    finally:
        sock.detach()


def serve(path: Path) -> None:
    Keeper(path).run()


def main() -> None:
    parser = argparse.ArgumentParser(prog="orkestr-wake-keeper")
    parser.add_argument("--socket", required=True, help="path of the keeper's Unix socket")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(Path(args.socket))


if __name__ == "__main__":
    main()
