"""Readiness: an add-on is ready only when a real client connects and gets an answer.

Probes run from the host to the holder's address on the project network. Their source
is the network's gateway address, which the activity tracker ignores, so probes never
keep an add-on awake.
"""

from __future__ import annotations

import asyncio

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agent.specs import PORTS


async def postgres(
    ip: str, user: str, database: str, password: str, timeout_s: float
) -> tuple[bool, str, str]:
    try:
        conn = await asyncpg.connect(
            host=ip,
            port=PORTS["postgres"],
            user=user,
            database=database,
            password=password,
            timeout=timeout_s,
            ssl=False,
            server_settings={"application_name": "orkestr-probe"},
        )
    except (TimeoutError, OSError) as exc:
        return False, "Unreachable", f"postgres at {ip}: {exc.__class__.__name__}: {exc}"
    except asyncpg.PostgresError as exc:
        return False, "NotAccepting", f"postgres at {ip}: {exc}"
    except Exception as exc:  # asyncpg raises a few non-Postgres errors mid-startup
        return False, "NotAccepting", f"postgres at {ip}: {exc.__class__.__name__}: {exc}"
    try:
        value = await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout_s)
    except (TimeoutError, asyncpg.PostgresError, OSError) as exc:
        return False, "QueryFailed", f"postgres at {ip}: {exc}"
    finally:
        await conn.close(timeout=timeout_s)
    if value != 1:
        return False, "QueryFailed", f"postgres at {ip} answered {value!r} to SELECT 1"
    return (
        True,
        "ClientConnected",
        f"asyncpg connected to {ip}:{PORTS['postgres']} and ran SELECT 1",
    )


async def redis(ip: str, password: str, timeout_s: float) -> tuple[bool, str, str]:
    client = aioredis.Redis(
        host=ip,
        port=PORTS["redis"],
        password=password,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        client_name="orkestr-probe",
    )
    try:
        pong = await client.ping()
    except (TimeoutError, RedisError, OSError) as exc:
        return False, "Unreachable", f"redis at {ip}: {exc.__class__.__name__}: {exc}"
    finally:
        await client.aclose()
    if pong is not True:
        return False, "QueryFailed", f"redis at {ip} answered {pong!r} to PING"
    return True, "ClientConnected", f"redis-py connected to {ip}:{PORTS['redis']} and got PONG"
