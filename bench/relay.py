"""The deep-wake relay alone, on loopback: what a relayed connection costs per message.

No Docker, no database: a threaded echo server on 127.0.0.1 and three ways to reach it,
measured in the same run, rotated across rounds:

  direct   a plain TCP connection to the echo server.
  keeper   through a real keeper process (agent/keeper.py): the client is accepted here,
           the echo server connected to, both handed over with RELAY, exactly as the
           agent does after a deep wake; the keeper splices them.
  asyncio  through the relay the agent ran before issue 12 (two asyncio streams pumping
           64 KiB reads, in a process of its own, as the agent is).

  rtt    64-byte request / response ping-pong, 2,000 per round (--quick: 500); the mean
         round trip of each round in microseconds; the median and the best round, and
         what the relay adds to direct (the best round shows the relay's own cost, the
         median includes the machine's scheduling delays, which a loaded host inflates).
  bulk   64 MiB (--quick: 16 MiB) one way and back through the echo server; MB/s.
Rounds: 15 (--quick: 4), the three paths rotated. Prints a table and ends with one JSON
line.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _harness import ROOT, machine_facts, percentile, rnd, run_cli, table

from agent.keeper_client import KeeperClient

WHO = ("direct", "keeper", "asyncio")
ASYNCIO_RELAY = r"""
import asyncio, sys
async def pipe(r, w):
    while d := await r.read(65536):
        w.write(d)
        await w.drain()
    w.write_eof()
async def handle(r1, w1):
    r2, w2 = await asyncio.open_connection("127.0.0.1", int(sys.argv[1]))
    await asyncio.gather(pipe(r1, w2), pipe(r2, w1))
async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(s.sockets[0].getsockname()[1], flush=True)
    await s.serve_forever()
asyncio.run(main())
"""


def nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def echo_server() -> int:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            conn, _ = server.accept()

            def echo(c: socket.socket = conn) -> None:
                nodelay(c)
                while data := c.recv(1 << 20):
                    c.sendall(data)
                c.close()

            threading.Thread(target=echo, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return int(server.getsockname()[1])


def rtt_us(sock: socket.socket, n: int) -> float:
    payload = b"x" * 64
    started = time.perf_counter()
    for _ in range(n):
        sock.sendall(payload)
        got = 0
        while got < 64:
            got += len(sock.recv(4096))
    return (time.perf_counter() - started) / n * 1e6


def bulk_mb_s(sock: socket.socket, mib: int) -> float:
    blob = b"y" * (1 << 20)
    total = mib << 20

    def read() -> None:
        got = 0
        while got < total:
            got += len(sock.recv(1 << 20))

    reader = threading.Thread(target=read)
    started = time.perf_counter()
    reader.start()
    for _ in range(mib):
        sock.sendall(blob)
    reader.join()
    return mib / (time.perf_counter() - started)


async def main(quick: bool) -> dict[str, Any]:
    rounds, n, mib = (4, 500, 16) if quick else (15, 2000, 64)
    results: dict[str, Any] = {"bench": "relay", "quick": quick, "rounds": rounds}
    results["machine"] = machine_facts()
    results["loadavg_before"] = round(os.getloadavg()[0], 2)
    echo_port = echo_server()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "keeper.sock"
        keeper_proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.keeper", "--socket", str(path), cwd=ROOT
        )  # fmt: skip
        relay_proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ASYNCIO_RELAY, str(echo_port), stdout=asyncio.subprocess.PIPE
        )  # fmt: skip
        try:
            assert relay_proc.stdout is not None
            relay_port = int(await relay_proc.stdout.readline())
            for _ in range(100):
                if path.exists():
                    break
                await asyncio.sleep(0.05)
            keeper = KeeperClient(str(path))
            listener = socket.create_server(("127.0.0.1", 0))
            via_keeper = nodelay(socket.create_connection(listener.getsockname()))
            accepted, address = listener.accept()
            upstream = nodelay(socket.create_connection(("127.0.0.1", echo_port)))
            await keeper.relay(
                "bench", f"{address[0]}:{address[1]}", nodelay(accepted), upstream, 1, 1
            )
            accepted.close()
            upstream.close()
            conns = {
                "direct": nodelay(socket.create_connection(("127.0.0.1", echo_port))),
                "keeper": via_keeper,
                "asyncio": nodelay(socket.create_connection(("127.0.0.1", relay_port))),
            }
            rtt: dict[str, list[float]] = {w: [] for w in WHO}
            bulk: dict[str, list[float]] = {w: [] for w in WHO}
            for r in range(rounds):
                for who in WHO[r % 3 :] + WHO[: r % 3]:
                    rtt[who].append(await asyncio.to_thread(rtt_us, conns[who], n))
                    bulk[who].append(await asyncio.to_thread(bulk_mb_s, conns[who], mib))
        finally:
            for proc in (keeper_proc, relay_proc):
                proc.terminate()
                await proc.wait()
    results["loadavg_after"] = round(os.getloadavg()[0], 2)
    for who in WHO:
        results[who] = {
            "rtt_us": [rnd(x, 1) for x in rtt[who]],
            "rtt_us_median": rnd(percentile(rtt[who], 50), 1),
            "rtt_us_best": rnd(min(rtt[who]), 1),
            "bulk_mb_s": [rnd(x, 0) for x in bulk[who]],
            "bulk_mb_s_median": rnd(percentile(bulk[who], 50), 0),
        }
    for who in ("keeper", "asyncio"):
        for stat in ("median", "best"):
            results[who][f"added_rtt_us_{stat}"] = rnd(
                results[who][f"rtt_us_{stat}"] - results["direct"][f"rtt_us_{stat}"], 1
            )
    return results


def report(results: dict[str, Any]) -> None:
    rows = [
        [who, results[who]["rtt_us_median"], results[who].get("added_rtt_us_median", ""),
         results[who]["rtt_us_best"], results[who].get("added_rtt_us_best", ""),
         results[who]["bulk_mb_s_median"]]
        for who in WHO
    ]  # fmt: skip
    print()
    print(table(
        ["path", "rtt median us", "added", "rtt best us", "added", "bulk MB/s"], rows,
        "Relay on loopback",
    ))  # fmt: skip
    print(f"load average: before {results['loadavg_before']}, after {results['loadavg_after']}")


if __name__ == "__main__":
    run_cli(__doc__, main, report, quick_help="2 rounds, fewer messages")
