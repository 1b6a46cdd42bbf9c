"""A benchmark client that runs inside a project network's namespace.

Started by bench/_harness.py as

    nsenter --net=/proc/<pid of a toolbox container>/ns/net <venv python> bench/_client.py

so the whole Python process sits on the project network (the host's own traffic, from
the gateway address, is exempt from the wake redirect, so a host client would not do).
It is long-lived: the harness writes one JSON command per line on stdin and reads JSON
lines back, so interpreter start-up and imports never fall inside a measurement.

All timestamps are time.monotonic() values. CLOCK_MONOTONIC is shared by every process
on the machine (nsenter only enters the network namespace), so they compare directly
with the harness's own.

Commands (all take kind, host, port, password; postgres also user and database):

  {"op": "once", ...}     one fresh connection: t0 before connecting, t1 when the first
                          query (SELECT 1 / PING) is answered. No retry.
  {"op": "poll", ..., "interval_ms": 5, "attempt_timeout_s": 1, "deadline_s": 120}
                          answers {"event": "armed", "t": ...} at once, then tries a fresh
                          connection + first query every interval_ms until one succeeds;
                          answers t_first_ok. `host` may be a name: it is then resolved on
                          each attempt through Docker's embedded DNS (127.0.0.11), as an
                          app in a container would resolve it.
  {"op": "load", ..., "clients": 4, "seconds": 10, "mode": "select"|"get"|"set"}
                          forks `clients` processes that each open ONE connection at the
                          same instant (so against a deep-sleeping add-on every one of
                          them is opened during the wake, as an app's pool is) and then
                          run a closed loop on it: pgbench -S's query (postgres, asyncpg,
                          prepared) or GET/SET of one key (redis, raw RESP on a blocking
                          socket). Answers queries/s over the loop (connection time
                          excluded), p50/p99 per query, and each connection's errors.
  {"op": "resolve", "name": ...}
  {"op": "quit"}
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import socket
import struct
import sys
import time
from typing import Any

import asyncpg
import redis.asyncio as aioredis

DOCKER_DNS = ("127.0.0.11", 53)


# --- a minimal A-record resolver for Docker's embedded DNS -----------------------------


def _dns_query(name: str) -> tuple[int, bytes]:
    qid = random.randrange(65536)
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # recursion desired
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    return qid, header + qname + struct.pack("!HH", 1, 1)  # A, IN


def _skip_name(data: bytes, i: int) -> int:
    while True:
        n = data[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:
            return i + 2
        i += n + 1


def _parse_a(data: bytes, qid: int) -> str | None:
    rid, flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", data[:12])
    if rid != qid or flags & 0x000F != 0:
        return None  # wrong id or an error (NXDOMAIN while the container is not there yet)
    i = 12
    for _ in range(qd):
        i = _skip_name(data, i) + 4
    for _ in range(an):
        i = _skip_name(data, i)
        rtype, _rclass, _ttl, rdlen = struct.unpack("!HHIH", data[i : i + 10])
        i += 10
        if rtype == 1 and rdlen == 4:
            return socket.inet_ntoa(data[i : i + 4])
        i += rdlen
    return None


class _DnsProtocol(asyncio.DatagramProtocol):
    """Collects answers to our queries; the first A record (for any of them) wins."""

    def __init__(self, done: asyncio.Future[str]) -> None:
        self.done = done
        self.ids: set[int] = set()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.done.done() or len(data) < 12:
            return
        qid = struct.unpack("!H", data[:2])[0]
        if qid in self.ids and (ip := _parse_a(data, qid)) is not None:
            self.done.set_result(ip)

    def error_received(self, exc: Exception) -> None:
        pass


async def resolve(name: str, timeout_s: float = 1.0, every_s: float = 0.005) -> str | None:
    """Resolve through Docker's embedded DNS, sending a fresh query every `every_s`.

    Docker forwards names it does not know (yet) to the host's resolvers, which may never
    answer here; a query for a container that just appeared answers at once. So instead
    of waiting out one query, keep asking and take the first A record.
    """
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _DnsProtocol(done), remote_addr=DOCKER_DNS
    )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            qid, query = _dns_query(name)
            proto.ids.add(qid)
            transport.sendto(query)
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(asyncio.shield(done), every_s)
        return None
    finally:
        transport.close()


# --- one connection and its first query ------------------------------------------------


async def first_query(cmd: dict[str, Any], ip: str, timeout_s: float) -> None:
    """Connect afresh and get the first answer; raises on any failure."""
    if cmd["kind"] == "postgres":
        conn = await asyncpg.connect(
            host=ip,
            port=cmd["port"],
            user=cmd["user"],
            password=cmd["password"],
            database=cmd["database"],
            timeout=timeout_s,
            ssl=False,
            command_timeout=timeout_s,
        )
        try:
            value = await conn.fetchval("SELECT 1")
        finally:
            conn.terminate()
        if value != 1:
            raise RuntimeError(f"SELECT 1 answered {value!r}")
    else:
        client = aioredis.Redis(
            host=ip,
            port=cmd["port"],
            password=cmd["password"],
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            driver_info=None,
        )
        try:
            pong = await client.ping()
        finally:
            await client.aclose()
        if pong is not True:
            raise RuntimeError(f"PING answered {pong!r}")


def _error(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}"[:300]


async def op_once(cmd: dict[str, Any]) -> dict[str, Any]:
    ip = await resolve(cmd["host"])
    if ip is None:
        return {"ok": False, "error": f"cannot resolve {cmd['host']}"}
    t0 = time.monotonic()
    try:
        await first_query(cmd, ip, cmd.get("timeout_s", 60.0))
    except Exception as exc:
        return {"ok": False, "t0": t0, "t1": time.monotonic(), "error": _error(exc)}
    t1 = time.monotonic()
    return {"ok": True, "t0": t0, "t1": t1, "ms": (t1 - t0) * 1000}


async def op_poll(cmd: dict[str, Any], emit: Any) -> dict[str, Any]:
    """Poll until a fresh connection gets its first answer.

    A new attempt starts every interval_ms whether or not earlier ones have finished
    (at most `max_outstanding` at a time), so one attempt stuck on a dropped SYN cannot
    hide the moment the server becomes reachable. The first success wins.
    """
    interval = cmd.get("interval_ms", 5) / 1000
    attempt_timeout = cmd.get("attempt_timeout_s", 1.0)
    max_outstanding = cmd.get("max_outstanding", 250)
    deadline = time.monotonic() + cmd.get("deadline_s", 120.0)
    emit({"event": "armed", "t": time.monotonic()})
    ip = await resolve(cmd["host"], cmd.get("deadline_s", 120.0), interval)
    if ip is None:
        return {"ok": False, "error": f"cannot resolve {cmd['host']}"}
    t_resolved = time.monotonic()
    loop = asyncio.get_running_loop()
    winner: asyncio.Future[tuple[float, float]] = loop.create_future()
    active: set[asyncio.Task[None]] = set()
    errors: list[str] = []
    attempts = 0

    async def attempt() -> None:
        started = time.monotonic()
        try:
            await asyncio.wait_for(first_query(cmd, ip, attempt_timeout), attempt_timeout)
        except Exception as exc:
            errors.append(_error(exc))
            return
        if not winner.done():
            winner.set_result((time.monotonic(), started))

    try:
        while not winner.done() and time.monotonic() < deadline:
            if len(active) < max_outstanding:
                attempts += 1
                task = asyncio.create_task(attempt())
                active.add(task)
                task.add_done_callback(active.discard)
            await asyncio.wait([winner], timeout=interval)
    finally:
        for task in list(active):
            task.cancel()
        await asyncio.gather(*active, return_exceptions=True)
    if not winner.done():
        return {"ok": False, "attempts": attempts, "error": errors[-1] if errors else "timeout"}
    t1, started = winner.result()
    return {
        "ok": True,
        "t1": t1,
        "t_attempt": started,
        "t_resolved": t_resolved,
        "attempts": attempts,
        "ip": ip,
    }


# --- a pool of connections opened at one instant, then a closed loop on each ------------


def _load_child(cmd: dict[str, Any], ip: str, go: float, out_fd: int) -> None:
    """One pool member (a forked process): connect at `go`, loop until go + seconds."""
    result: dict[str, Any] = {"queries": 0, "lat_us": [], "error": None}
    try:
        result.update(asyncio.run(_load_loop(cmd, ip, go)))
    except Exception as exc:
        result["error"] = _error(exc)
    with os.fdopen(out_fd, "w") as f:
        json.dump(result, f)


async def _load_loop(cmd: dict[str, Any], ip: str, go: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, go - time.monotonic()))
    seconds, mode = cmd["seconds"], cmd["mode"]
    lat: list[float] = []
    if cmd["kind"] == "postgres":
        conn = await asyncpg.connect(
            host=ip, port=cmd["port"], user=cmd["user"], password=cmd["password"],
            database=cmd["database"], timeout=120, ssl=False,
        )  # fmt: skip
        try:
            rows = await conn.fetchval("SELECT count(*) FROM pgbench_accounts")
            stmt = await conn.prepare("SELECT abalance FROM pgbench_accounts WHERE aid = $1")
            start = time.monotonic()
            end = start + seconds
            while (t := time.monotonic()) < end:
                await stmt.fetchval(random.randint(1, rows))
                lat.append(time.monotonic() - t)
        finally:
            conn.terminate()
    else:
        sock = socket.create_connection((ip, cmd["port"]), timeout=120)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:

            def call(payload: bytes) -> bytes:
                sock.sendall(payload)
                reply = sock.recv(65536)
                while not reply.endswith(b"\r\n"):
                    reply += sock.recv(65536)
                if reply.startswith(b"-"):
                    raise RuntimeError(reply.decode(errors="replace").strip())
                return reply

            def resp(*args: bytes) -> bytes:
                return b"*%d\r\n" % len(args) + b"".join(
                    b"$%d\r\n%s\r\n" % (len(a), a) for a in args
                )

            call(resp(b"AUTH", cmd["password"].encode()))
            key = b"bench:%d" % os.getpid()
            call(resp(b"SET", key, b"x" * 3))
            request = resp(b"GET", key) if mode == "get" else resp(b"SET", key, b"x" * 3)
            start = time.monotonic()
            end = start + seconds
            while (t := time.monotonic()) < end:
                call(request)
                lat.append(time.monotonic() - t)
        finally:
            sock.close()
    return {"queries": len(lat), "elapsed": time.monotonic() - start,
            "lat_us": [round(x * 1e6) for x in lat[:: max(1, len(lat) // 2000)]]}  # fmt: skip


async def op_load(cmd: dict[str, Any]) -> dict[str, Any]:
    ip = await resolve(cmd["host"])
    if ip is None:
        return {"ok": False, "error": f"cannot resolve {cmd['host']}"}
    go = time.monotonic() + 0.2  # every child forked and waiting: they connect at once
    children: list[tuple[int, int]] = []
    for _ in range(cmd["clients"]):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(r)
            try:
                _load_child(cmd, ip, go, w)
            finally:
                os._exit(0)
        os.close(w)
        children.append((pid, r))
    results: list[dict[str, Any]] = []
    for pid, r in children:
        with os.fdopen(r) as f:
            data = await asyncio.to_thread(f.read)
        await asyncio.to_thread(os.waitpid, pid, 0)
        results.append(json.loads(data) if data else {"error": "no result", "queries": 0})
    errors = [x["error"] for x in results if x.get("error")]
    lat = sorted(v for x in results for v in x.get("lat_us", []))
    qps = sum(x["queries"] / x["elapsed"] for x in results if x.get("elapsed"))
    return {
        "ok": not errors, "errors": errors, "qps": qps,
        "p50_us": lat[len(lat) // 2] if lat else None,
        "p99_us": lat[int(len(lat) * 0.99)] if lat else None,
    }  # fmt: skip


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = os.fdopen(sys.stdout.fileno(), "w", buffering=1, closefd=False)

    def emit(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    emit({"event": "hello", "pid": os.getpid(), "t": time.monotonic()})
    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd.get("op")
        try:
            if op == "once":
                emit(await op_once(cmd))
            elif op == "poll":
                emit(await op_poll(cmd, emit))
            elif op == "load":
                emit(await op_load(cmd))
            elif op == "resolve":
                emit({"ok": True, "ip": await resolve(cmd["name"])})
            elif op == "quit":
                emit({"ok": True})
                return
            else:
                emit({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as exc:  # keep serving: the harness reports the error
            emit({"ok": False, "error": _error(exc)})


if __name__ == "__main__":
    asyncio.run(main())
