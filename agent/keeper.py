"""The wake-socket keeper: holds the wake listeners' file descriptors while the agent is away.

A sleeping add-on's port is redirected to a listening socket that the agent created in the
holder's network namespace. If only the agent held that socket, a restart of the agent
(an upgrade, a crash, `kill -9`) would close it and clients would be refused until the
new agent is up. The keeper is a tiny, rarely restarted process that holds a duplicate of
every listener: while the agent is down the kernel keeps completing handshakes into the
socket's backlog, and the new agent takes the sockets back and serves those clients. It
is our own `FDSTORE=` (systemd's store is flushed on `systemctl restart` before v254).

Protocol: SOCK_SEQPACKET on a root-only Unix socket, one request per message:
  PUT <name>   + one fd  -> store (replacing an older fd of that name)   answer: OK
  DEL <name>             -> close and forget                              answer: OK
  GET                    -> one message per stored fd: "<name>" + the fd, then "END"
It never accepts connections on the sockets it holds and has no other logic, so it has
no reason to be restarted.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

MAX_MESSAGE = 4096


def serve(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old_umask = os.umask(0o077)
    try:
        server.bind(str(path))
    finally:
        os.umask(old_umask)
    server.listen(8)
    store: dict[str, int] = {}
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                _session(conn, store)
            except OSError:
                continue  # the agent went away mid-request: keep what we hold


def _session(conn: socket.socket, store: dict[str, int]) -> None:
    while True:
        data, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 1)
        if not data:
            for fd in fds:
                os.close(fd)
            return
        verb, _, name = data.decode(errors="replace").partition(" ")
        if verb == "PUT" and name and len(fds) == 1:
            old = store.pop(name, None)
            if old is not None:
                os.close(old)
            store[name] = fds[0]
            conn.send(b"OK")
        elif verb == "DEL" and name:
            for fd in fds:
                os.close(fd)
            old = store.pop(name, None)
            if old is not None:
                os.close(old)
            conn.send(b"OK")
        elif verb == "GET":
            for fd in fds:
                os.close(fd)
            for stored_name, fd in list(store.items()):
                socket.send_fds(conn, [stored_name.encode()], [fd])
            conn.send(b"END")
        else:
            for fd in fds:
                os.close(fd)
            conn.send(b"ERR unknown request")


def main() -> None:
    parser = argparse.ArgumentParser(prog="orkestr-wake-keeper")
    parser.add_argument("--socket", required=True, help="path of the keeper's Unix socket")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(Path(args.socket))


if __name__ == "__main__":
    main()
