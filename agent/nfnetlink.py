"""nfnetlink messages, encoded and parsed without I/O, and a socket bound inside a namespace.

The SYN watch (NFLOG, `agent/synwatch.py`) and the SYN queue (NFQUEUE, `agent/synqueue.py`)
talk to the kernel over a raw NETLINK_NETFILTER socket opened in the holder's network
namespace. Both send config requests (a netlink header, a `struct nfgenmsg` naming the
group or queue, attributes) and read packet messages whose payload names the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct

NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
HEADER = 16  # struct nlmsghdr
NFGENMSG = 4  # struct nfgenmsg: family, version, res_id (big-endian)
UNKNOWN = "unknown"  # a source lost to an overflowing queue, or not copied


def attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


def request(subsys: int, msg: int, res_id: int, seq: int, *attrs: bytes, ack: bool = True) -> bytes:
    """One nfnetlink request for group/queue `res_id`."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(res_id)) + b"".join(attrs)
    flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    return struct.pack("=IHHII", HEADER + len(body), (subsys << 8) | msg, flags, seq, 0) + body


def messages(data: bytes) -> list[tuple[int, bytes]]:
    """(type, body) of each whole netlink message in one datagram."""
    out: list[tuple[int, bytes]] = []
    offset = 0
    while offset + HEADER <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < HEADER or offset + length > len(data):
            break
        out.append((kind, data[offset + HEADER : offset + length]))
        offset += (length + 3) & ~3
    return out


def attrs(body: bytes) -> dict[int, bytes]:
    """The attributes of an nfnetlink message body (after its nfgenmsg), by type."""
    out: dict[int, bytes] = {}
    offset = NFGENMSG
    while offset + 4 <= len(body):
        length, kind = struct.unpack_from("=HH", body, offset)
        if length < 4 or offset + length > len(body):
            break
        out[kind & 0x3FFF] = body[offset + 4 : offset + length]  # without NESTED/BYTEORDER
        offset += (length + 3) & ~3
    return out


def ack_error(data: bytes) -> int:
    """The errno of the first netlink error message in `data` (0: an ack)."""
    for kind, body in messages(data):
        if kind == NLMSG_ERROR and len(body) >= 4:
            code: int = struct.unpack_from("=i", body)[0]
            return -code
    return 0


def source(payload: bytes) -> str:
    """The client ("ip:port") of a copied IPv4 packet that starts with its IP header."""
    if len(payload) < 20 or payload[0] >> 4 != 4:
        return UNKNOWN
    header = (payload[0] & 0x0F) * 4
    ip = socket.inet_ntop(socket.AF_INET, payload[12:16])
    if len(payload) < header + 2:
        return ip
    return f"{ip}:{struct.unpack_from('>H', payload, header)[0]}"


def bound_socket(requests: list[bytes], what: str) -> socket.socket:
    """A NETLINK_NETFILTER socket that sent each request and got an ack for it.

    Run inside the holder's namespace (`netns.in_namespace`): NFLOG groups and NFQUEUE
    queues belong to the namespace the socket was created in.
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        sock.settimeout(5)
        for req in requests:
            sock.send(req)
            code = ack_error(sock.recv(4096))
            if code:
                raise OSError(code, f"{what}: {errno.errorcode.get(code, code)}")
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class LoopReader:
    """A netlink socket read from the running event loop (SynWatch, SynQueue)."""

    sock: socket.socket

    def close(self) -> None:
        with contextlib.suppress(ValueError, RuntimeError):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0
