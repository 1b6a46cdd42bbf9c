"""What a loop of GETs from one project token does to everyone else's requests.

A real controller (its own database, a mosquitto, a fake agent so projects can be placed),
once with the read budget off (`project_reads_per_s = 0`) and once with the defaults.
`--clients` connections of one project token GET its `/env` as fast as they can for
`--seconds`; meanwhile the operator GETs `/v1/hosts` one request after another (standing
in for everyone else: other tenants, agents' fetches). Prints the tenant's answered
requests by status and the operator's latency percentiles.

    flock /tmp/orkestr-bench.lock .venv/bin/python bench/read_budget.py
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from collections import Counter
from pathlib import Path

from _harness import percentile, table

from tests.conftest import TEST_PLANS
from tests.services import (
    ControllerProcess,
    FakeAgent,
    Mosquitto,
    create_database,
    drop_database,
)


async def run(
    budget: bool, clients: int, seconds: float, plans: Path, broker: Mosquitto
) -> list[str]:
    dsn = await create_database("orkestr_bench")
    c = ControllerProcess(database_url=dsn, broker=broker, plans_file=plans)
    c.client_connections = clients + 2
    if not budget:
        c.http_extra = "project_reads_per_s = 0\n"
    try:
        await c.start()
        async with FakeAgent(f"readbench-{secrets.token_hex(4)}", broker) as host:
            await c.wait_host_online(host.host)
            status, project = await c.api("POST", "/v1/projects", {"name": "busy", "plan": "team"})
            assert status == 201, project
            token = await c.new_project_token(project["id"])
            env = f"/v1/projects/{project['id']}/env"
            statuses: Counter[int] = Counter()
            latencies: list[float] = []
            end = time.monotonic() + seconds

            async def tenant() -> None:
                while time.monotonic() < end:
                    statuses[(await c.api("GET", env, token=token))[0]] += 1

            async def operator() -> None:
                while time.monotonic() < end:
                    started = time.monotonic()
                    assert (await c.api("GET", "/v1/hosts"))[0] == 200
                    latencies.append((time.monotonic() - started) * 1000)
                    await asyncio.sleep(0.05)

            await asyncio.gather(operator(), *(tenant() for _ in range(clients)))
            return [
                "on (defaults)" if budget else "off",
                f"{sum(statuses.values()) / seconds:.0f}",
                " ".join(f"{k}:{v}" for k, v in sorted(statuses.items())),
                f"{percentile(latencies, 50):.1f}",
                f"{percentile(latencies, 95):.1f}",
                f"{max(latencies):.1f}",
                str(len(latencies)),
            ]
    finally:
        await c.close()
        await drop_database(dsn)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plans = Path(tmp) / "plans.toml"
        plans.write_text(TEST_PLANS)
        broker = Mosquitto()
        await broker.start()
        try:
            rows = [
                await run(budget, args.clients, args.seconds, plans, broker)
                for budget in (False, True)
            ]
        finally:
            await broker.close()
    print(
        table(
            ["read budget", "tenant req/s", "tenant statuses", "op p50 ms", "op p95 ms",
             "op max ms", "op requests"],
            rows,
            f"{args.clients} clients of one project token, {args.seconds:g} s each",
        )
    )  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
