"""The Postgres readiness probe's query step against a real PostgreSQL server whose backend
ends between the probe's login and its SELECT 1, as when a deletion stops the database
while a re-probe is logging in: the probe answers QueryFailed instead of raising asyncpg's
InternalClientError or InterfaceError (the re-probe round logged `reprobe.crashed`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from agent import probe
from tests.services import create_database, drop_database

pytestmark = pytest.mark.integration


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    dsn = await create_database("orkestr_probe")
    try:
        yield dsn
    finally:
        await drop_database(dsn)


async def test_a_live_connection_answers(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    assert await probe.select_one(conn, "127.0.0.1", 5.0, "someone") == (
        True,
        "ClientConnected",
        "asyncpg connected to 127.0.0.1:5432 as someone and ran SELECT 1",
    )
    assert conn.is_closed()


# 0 s: the query is sent as asyncpg reads the server's FATAL (InternalClientError, "another
# operation is in progress", in the run that found it) or right after; 0.3 s: after the
# server closed the socket (InterfaceError, "connection is closed").
@pytest.mark.parametrize("after_s", [0.0, 0.3])
async def test_a_backend_ended_before_the_query_is_a_failed_query(dsn: str, after_s: float) -> None:
    conn = await asyncpg.connect(dsn)
    admin = await asyncpg.connect(dsn)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        await asyncio.sleep(after_s)
        ok, reason, message = await probe.select_one(conn, "127.0.0.1", 5.0, "someone")
    finally:
        await admin.close()
    assert (ok, reason) == (False, "QueryFailed")
    assert message.startswith("postgres at 127.0.0.1: "), message
    assert conn.is_closed()
