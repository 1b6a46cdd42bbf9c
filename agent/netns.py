"""Working inside a holder container's network namespace from the host agent.

- `listen_in(pid, port)`: a listening socket that lives in the holder's namespace, so it
  is reachable only from the project network. A dedicated thread enters the namespace
  with setns(2) (namespaces are per thread), creates the socket, and leaves: the socket
  stays bound to the namespace it was created in. `in_namespace(pid, make)` does the same
  for any socket (the SYN watch's netlink socket, `agent/synwatch.py`).
- `iptables(pid, ...)`: the redirect that sends a sleeping add-on's port to the listener.
- `tcp_table(pid)` / `passive_opens(pid)`: the namespace's TCP sockets and counters, read
  from /proc/<pid>/net, which show that namespace's view: no exec, no entering needed.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from msgspec import Struct

from agent import smallfiles

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns")
_lock = threading.Lock()
T = TypeVar("T")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _in_namespace_sync(pid: int, make: Callable[[], T]) -> T:
    with _lock:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            _setns(target)
            try:
                return make()
            finally:
                _setns(home)
        finally:
            os.close(target)
            os.close(home)


async def in_namespace(pid: int, make: Callable[[], T]) -> T:
    """Run `make` (which creates sockets) in the network namespace of `pid`."""
    return await asyncio.get_running_loop().run_in_executor(
        _executor, _in_namespace_sync, pid, make
    )


def _listener(port: int, backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def listen_in(pid: int, port: int, backlog: int = 512) -> socket.socket:
    return await in_namespace(pid, lambda: _listener(port, backlog))


async def iptables(pid: int, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "nsenter",
        f"--net=/proc/{pid}/ns/net",
        "iptables",
        "-w",
        "5",  # the xtables lock is host-wide and dockerd takes it too: never wait forever
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(15):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 1, "iptables timed out"
    return proc.returncode or 0, out.decode(errors="replace").strip()


def netns_inode(pid: int) -> int:
    """Identifies a network namespace: a holder restarted in place gets a new one."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def redirect_rule(port: int, to_port: int, gateway: str) -> tuple[str, ...]:
    # The gateway is the host: the agent's probes and relays come from there and must reach
    # the database itself, never the wake listener.
    return (
        "PREROUTING", "-p", "tcp", "--dport", str(port), "!", "-s", gateway,
        "-j", "REDIRECT", "--to-ports", str(to_port),
        "-m", "comment", "--comment", "orkestr-wake",
    )  # fmt: skip


def listener_fence_rule(to_port: int) -> tuple[str, ...]:
    # The wake listener answers only what the redirect sent it: a redirect is a DNAT in
    # conntrack, so a client dialling the listener's port itself (awake or asleep) is dropped.
    return (
        "INPUT", "-p", "tcp", "--dport", str(to_port),
        "-m", "conntrack", "!", "--ctstate", "DNAT", "-j", "DROP",
        "-m", "comment", "--comment", "orkestr-wake-fence",
    )  # fmt: skip


class TcpSocket(Struct, frozen=True):
    local_port: int
    remote_ip: str
    remote_port: int
    state: int  # 1 = ESTABLISHED, 10 = LISTEN (see include/net/tcp_states.h)


ESTABLISHED = 1


def _ip4(hexaddr: str) -> str:
    return socket.inet_ntop(socket.AF_INET, int(hexaddr, 16).to_bytes(4, "little"))


def _ip6(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr)
    # /proc prints the address as four host-order 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def parse_tcp_table(text: str, ipv6: bool) -> list[TcpSocket]:
    out: list[TcpSocket] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        local, remote, state = fields[1], fields[2], int(fields[3], 16)
        lport = int(local.rsplit(":", 1)[1], 16)
        raddr, rport = remote.rsplit(":", 1)
        ip = _ip6(raddr) if ipv6 else _ip4(raddr)
        if ip.startswith("::ffff:"):
            ip = ip[7:]
        out.append(TcpSocket(lport, ip, int(rport, 16), state))
    return out


def tcp_table(pid: int) -> list[TcpSocket]:
    out: list[TcpSocket] = []
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            text = smallfiles.read_bytes(f"/proc/{pid}/net/{name}").decode()
        except OSError:
            continue
        out += parse_tcp_table(text, v6)
    return out


class TcpCounters(Struct, frozen=True):
    """The namespace's TCP counters that tell whether its connections can have changed."""

    passive_opens: int  # connections accepted since the namespace was created
    active_opens: int  # connections made from inside it
    curr_estab: int  # connections now established (or half-closed by the peer)


def passive_opens(pid: int) -> int:
    """Connections accepted in the namespace since it was created (TCP PassiveOpens)."""
    return tcp_counters(pid).passive_opens


def tcp_counters(pid: int) -> TcpCounters:
    """The namespace's TCP counters from /proc/<pid>/net/snmp.

    Read for every sleep-enabled add-on every sleep tick: one read of the file (tens of
    microseconds, against milliseconds for the TCP table), and only its two `Tcp:` lines
    (names, then values) split.
    """
    return parse_tcp_counters(smallfiles.read_bytes(f"/proc/{pid}/net/snmp"))


def parse_tcp_counters(snmp: bytes) -> TcpCounters:
    lines = [line.split() for line in snmp.splitlines() if line.startswith(b"Tcp:")]
    header, values = lines[0], lines[1]
    return TcpCounters(
        passive_opens=int(values[header.index(b"PassiveOpens")]),
        active_opens=int(values[header.index(b"ActiveOpens")]),
        curr_estab=int(values[header.index(b"CurrEstab")]),
    )
