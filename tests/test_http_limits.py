"""The API bounds what one client holds: connections per address, and idle time.

A real controller, raw sockets (a client library would pool and retry)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.services import LOOPBACK, ControllerProcess, Mosquitto, create_database, drop_database

CAP, IDLE_S = 6, 1.5


async def _request(port: int) -> int:
    """One GET on a fresh connection; its status, or 0 when the server closed it unanswered."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        answer = b""
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]) if answer else 0


async def _closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), within_s) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def test_one_client_cannot_hold_every_connection(
    mosquitto: Mosquitto, plans_file: Path
) -> None:
    dsn = await create_database("orkestr_test")
    process = ControllerProcess(database_url=dsn, broker=mosquitto, plans_file=plans_file)
    process.http_extra = f"max_connections_per_client = {CAP}\nidle_timeout_s = {IDLE_S}\n"
    held: list[asyncio.StreamWriter] = []
    try:
        await process.start()
        await process.close_session()  # its pooled connection would count against the cap
        assert await _request(process.port) == 200
        idle = [await asyncio.open_connection(LOOPBACK, process.port) for _ in range(CAP)]
        held += [w for _, w in idle]
        # One past the cap is answered 503 and closed at once, and said in the log.
        reader, writer = await asyncio.open_connection(LOOPBACK, process.port)
        held.append(writer)
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 503 ") and b'"too_many_connections"' in answer
        assert await _request(process.port) in (0, 503)  # 0: its request raced the close
        assert "http_connection_refused" in process.log_text()
        # One closed by the client makes room for one more.
        idle[0][1].close()
        deadline = time.monotonic() + 5
        while await _request(process.port) != 200:
            assert time.monotonic() < deadline, "the freed connection was never counted"
            await asyncio.sleep(0.05)
        # The idle ones are closed by the server after idle_timeout_s, not held for an hour.
        started = time.monotonic()
        for reader, _ in idle[1:]:
            assert await _closed_by_server(reader, IDLE_S + 5)
        assert time.monotonic() - started < IDLE_S + 5
        # And each of them was given back: the whole cap is free again.
        again = [await asyncio.open_connection(LOOPBACK, process.port) for _ in range(CAP - 1)]
        held += [w for _, w in again]
        assert await _request(process.port) == 200
    finally:
        for w in held:
            w.close()
        await process.close()
        await drop_database(dsn)


async def test_the_cap_can_be_switched_off_for_a_proxy(
    mosquitto: Mosquitto, plans_file: Path
) -> None:
    """Behind a proxy every client has the proxy's address: 0 lifts the cap."""
    dsn = await create_database("orkestr_test")
    process = ControllerProcess(database_url=dsn, broker=mosquitto, plans_file=plans_file)
    process.http_extra = "max_connections_per_client = 0\n"
    held: list[asyncio.StreamWriter] = []
    try:
        await process.start()
        for _ in range(140):  # past the default cap of 128
            held.append((await asyncio.open_connection(LOOPBACK, process.port))[1])
        assert await _request(process.port) == 200
        assert "http_connection_refused" not in process.log_text()
    finally:
        for w in held:
            w.close()
        await process.close()
        await drop_database(dsn)
