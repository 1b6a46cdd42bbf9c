"""What no tenant or forged report can do to the controller: crash it with a huge number,
freeze a host with a job flood, or find a password or token in its database. A real
controller process, PostgreSQL, pg_dump and mosquitto; hosts are FakeAgents."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest

from controller import request_bodies
from controller.db import discover
from schemas import topics
from schemas.codec import encode
from schemas.messages import (
    MAX_GENERATION,
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    BackupResult,
    Capacity,
)
from tests.services import (
    ControllerProcess,
    DesiredWatcher,
    FakeAgent,
    Mosquitto,
    create_database,
    drop_database,
)
from tests.test_controller_api import addon_status, assert_error, eventually, new_addon, new_project

TOOLBOX = "orkestr-local/toolbox:bookworm"


@pytest.fixture
async def big_host(mosquitto: Mosquitto, controller: ControllerProcess) -> AsyncIterator[FakeAgent]:
    """An online host with more memory than any other test's, so new projects land on it."""
    async with FakeAgent(f"big-{secrets.token_hex(4)}", mosquitto, memory_mb=2**30) as a:
        await controller.wait_host_online(a.host)
        yield a


async def project_on(controller: ControllerProcess, host: str) -> dict[str, Any]:
    project = await new_project(controller)
    assert project["host"] == host, "another host took the project; is a test leaking hosts?"
    return project


# --- hostile reports ------------------------------------------------------------------


async def test_a_status_with_huge_numbers_leaves_the_controller_up(
    controller: ControllerProcess, big_host: FakeAgent
) -> None:
    async with DesiredWatcher(big_host.host, big_host.broker) as watcher:
        good = big_host.status()
        hostile = [
            # Near 2^63: once stored in the sequence, every later snapshot failed.
            msgspec.structs.replace(good, applied_generation=2**63 - 2),
            msgspec.structs.replace(good, applied_generation=2**64 - 1),
            msgspec.structs.replace(good, applied_generation=MAX_GENERATION + 1),
            msgspec.structs.replace(good, capacity=Capacity(cpus=1e300, memory_mb=2**40)),
            msgspec.structs.replace(good, capacity=Capacity(cpus=-1.0, memory_mb=-5)),
            # Within the schema, but no restored database is that far behind.
            msgspec.structs.replace(good, applied_generation=MAX_GENERATION),
        ]
        for report in hostile:
            await big_host.publish(topics.status(big_host.host), encode(report), retain=True)
        project = await project_on(controller, big_host.host)
        ids = [f"{i:032x}" for i in range(3)]
        counters = addon_status({"id": ids[0], "project_id": project["id"]}, sleeps=2**64 - 1)
        generations = addon_status({"id": ids[1], "project_id": project["id"]}, generation=2**63)
        for addon in (counters, generations):
            crafted = msgspec.structs.replace(good, addons=(addon,))
            await big_host.publish(topics.status(big_host.host), encode(crafted))
        # A sentinel: once it is applied, everything published before it was handled.
        big_host.capacity = Capacity(cpus=2.0, memory_mb=12345)
        await big_host.report()

        async def sentinel() -> bool:
            _, body = await controller.api("GET", "/v1/hosts")
            return any(h["capacity"]["memory_mb"] == 12345 for h in body["hosts"])

        await eventually(sentinel, "the sentinel status")
        # Several snapshots later the controller still publishes sane generations.
        mark = watcher.mark()
        for name in ("one", "two"):
            await new_addon(controller, project, name)

        def both_addons(state: Any) -> bool:
            return any(p.id == project["id"] and len(p.addons) == 2 for p in state.projects)

        state = await watcher.wait_for(both_addons, since=mark)
        assert state.generation < 2**40
        assert controller.running
        status, _ = await controller.api("GET", "/v1/hosts")
        assert status == 200
        log = controller.log_text()
        assert log.count(f"mqtt_message_rejected topic=orkestr/v1/hosts/{big_host.host}") >= 7


async def test_a_backup_result_with_huge_numbers_is_refused_and_a_sane_one_applied(
    controller: ControllerProcess, big_host: FakeAgent
) -> None:
    """A host's backup result is stored and served to the tenant as it came: its numbers
    are bounded like a status's (before, 10^40 rows and a negative duration were kept)."""
    project = await project_on(controller, big_host.host)
    addon = await new_addon(controller, project, "dumped")
    base = f"/v1/projects/{project['id']}/addons/{addon['id']}/backups"
    # A pending backup, as the scheduler makes them (the test plans have no manual ones).
    backup = {"id": uuid.uuid4().hex}
    conn = await asyncpg.connect(controller.database_url)
    try:
        await conn.execute(
            "INSERT INTO backups (id, addon_id, project_id, kind) VALUES ($1, $2, $3, 'manual')",
            uuid.UUID(backup["id"]),
            uuid.UUID(addon["id"]),
            uuid.UUID(project["id"]),
        )
    finally:
        await conn.close()
    good = BackupResult(
        version=SCHEMA_VERSION,
        host=big_host.host,
        id=backup["id"],
        op="backup",
        project_id=project["id"],
        addon_id=addon["id"],
        backup_id=backup["id"],
        ok=True,
        started_at=datetime.now(UTC),
        finished_at=datetime.now(UTC),
        size_bytes=1234,
        sha256="0" * 64,
        verified=True,
        counts={"public.t": 3},
        verify_seconds=0.5,
    )
    topic = topics.backup_result(big_host.host, f"backup-{backup['id']}")
    hostile = [
        msgspec.structs.replace(good, counts={"public.t": 10**40}),
        msgspec.structs.replace(good, counts={"public.t": -1}),
        msgspec.structs.replace(good, counts={"x" * 10_000: 1}),
        msgspec.structs.replace(good, verify_seconds=-5.0),
        msgspec.structs.replace(good, size_bytes=-1),
        msgspec.structs.replace(good, size_bytes=2**63),
    ]
    for report in hostile:
        await big_host.publish(topic, msgspec.json.encode(report))
    await big_host.publish(topic, encode(good))  # the sentinel

    async def finished() -> dict[str, Any] | None:
        _, body = await controller.api("GET", f"{base}/{backup['id']}")
        return body if body["state"] != "pending" else None

    body = await eventually(finished, "the sane backup result")
    assert body["counts"] == {"public.t": 3} and body["size_bytes"] == 1234, body
    assert body["verify_seconds"] == 0.5, body
    log = controller.log_text()
    assert log.count(f"mqtt_message_rejected topic={topic}") == len(hostile), log[-3000:]


# --- jobs -----------------------------------------------------------------------------


def flood_job(chars: int, args: int = 2) -> dict[str, Any]:
    # Control characters: 1 byte each in the request, 6 (\u0001) in the desired state.
    return {"image": TOOLBOX, "command": ["\x01" * chars] * args, "timeout_s": 60}


async def test_a_job_flood_is_refused_and_the_host_keeps_converging(
    controller: ControllerProcess, big_host: FakeAgent
) -> None:
    async with DesiredWatcher(big_host.host, big_host.broker) as watcher:
        # One job past the per-project bound on its own: 413 with the size and the limit.
        flooder = await project_on(controller, big_host.host)
        url = f"/v1/projects/{flooder['id']}/jobs"
        status, body = await controller.api("POST", url, flood_job(4000, args=4))
        assert_error(status, body, 413, "payload_too_large")
        assert f"at most {request_bodies.MAX_PROJECT_JOB_BYTES}" in body["message"]
        assert "bytes once encoded" in body["message"]
        # Jobs of about 12 KB encoded: five fit in a project's budget, the sixth does not.
        accepted: dict[str, list[str]] = {}
        refused: list[dict[str, Any]] = []
        projects = [flooder] + [await project_on(controller, big_host.host) for _ in range(5)]
        for project in projects:
            for _ in range(6):
                status, body = await controller.api(
                    "POST", f"/v1/projects/{project['id']}/jobs", flood_job(1000)
                )
                if status == 201:
                    accepted.setdefault(project["id"], []).append(body["id"])
                else:
                    assert_error(status, body, 409, "too_many_pending_jobs")
                    refused.append(body)
        assert len(accepted[flooder["id"]]) == 5
        project_refusals = [r for r in refused if "per project" in r["message"]]
        host_refusals = [r for r in refused if "per host" in r["message"]]
        assert project_refusals and host_refusals, refused
        assert (
            f"at most {request_bodies.MAX_PROJECT_JOB_BYTES} bytes"
            in project_refusals[0]["message"]
        )
        assert f"at most {request_bodies.MAX_HOST_JOB_BYTES} bytes" in host_refusals[0]["message"]
        # Another tenant on the same host still converges: its add-on is published.
        mark = watcher.mark()
        tenant = await project_on(controller, big_host.host)
        addon = await new_addon(controller, tenant, "tenant-db")

        def has_tenant_addon(state: Any) -> bool:
            return any(a.id == addon["id"] for p in state.projects for a in p.addons)

        state = await watcher.wait_for(has_tenant_addon, since=mark)
        assert len(encode(state)) < MAX_MESSAGE_BYTES
        pending = sum(len(p.jobs) for p in state.projects)
        assert pending == sum(len(v) for v in accepted.values())
        assert "desired_state_too_large" not in controller.log_text()

        # Cancelled jobs leave the desired state and free the budget.
        first, second, *_ = accepted[flooder["id"]]
        mark = watcher.mark()
        status, cancelled = await controller.api("DELETE", f"{url}/{first}")
        assert status == 200 and cancelled["state"] == "cancelled", cancelled
        status, cancelled = await controller.api("POST", f"{url}/{second}/cancel")
        assert status == 200 and cancelled["state"] == "cancelled", cancelled
        status, again = await controller.api("POST", f"{url}/{second}/cancel")
        assert (status, again) == (200, cancelled)

        def without_cancelled(state: Any) -> bool:
            ids = {j.id for p in state.projects for j in p.jobs}
            return first not in ids and second not in ids

        await watcher.wait_for(without_cancelled, since=mark)
        status, listed = await controller.api("GET", url)
        assert status == 200
        states = {j["id"]: j["state"] for j in listed["jobs"]}
        assert states[first] == states[second] == "cancelled"
        assert sum(s == "pending" for s in states.values()) == 3
        status, body = await controller.api("POST", url, flood_job(1000))
        assert status == 201, body
        # A finished job cannot be cancelled.
        done = accepted[flooder["id"]][2]
        await big_host.job_result(done, flooder["id"], 0, "ok")

        async def finished() -> bool:
            _, job = await controller.api("GET", f"{url}/{done}")
            return bool(job["state"] == "succeeded")

        await eventually(finished, "the job finished")
        status, body = await controller.api("DELETE", f"{url}/{done}")
        assert_error(status, body, 409, "conflict")
        status, body = await controller.api("DELETE", f"{url}/{'0' * 32}")
        assert_error(status, body, 404, "not_found")
        for project_id, ids in accepted.items():  # leave nothing pending behind
            for job_id in ids:
                await controller.api("DELETE", f"/v1/projects/{project_id}/jobs/{job_id}")


async def test_finished_jobs_are_pruned_after_the_retention(
    mosquitto: Mosquitto, plans_file: Path
) -> None:
    dsn = await create_database("orkestr_test")
    process = ControllerProcess(
        database_url=dsn,
        broker=mosquitto,
        plans_file=plans_file,
        jobs_config="retention_s = 1\nprune_interval_s = 0.2\n",
    )
    try:
        await process.start()
        async with FakeAgent(f"prune-{secrets.token_hex(4)}", mosquitto) as host:
            await process.wait_host_online(host.host)
            project = await new_project(process)
            url = f"/v1/projects/{project['id']}/jobs"
            made = [(await process.api("POST", url, {"image": TOOLBOX}))[1] for _ in range(3)]
            done, cancelled, pending = (j["id"] for j in made)
            await host.job_result(done, project["id"], 0, "output to prune")
            await process.api("POST", f"{url}/{cancelled}/cancel")

            async def gone() -> bool:
                a = (await process.api("GET", f"{url}/{done}"))[0]
                b = (await process.api("GET", f"{url}/{cancelled}"))[0]
                return a == b == 404

            await eventually(gone, "finished jobs pruned", wait_s=15)
            status, job = await process.api("GET", f"{url}/{pending}")
            assert status == 200 and job["state"] == "pending"
            assert "jobs_pruned" in process.log_text()
    finally:
        await process.close()
        await drop_database(dsn)


async def test_a_project_keeps_only_its_newest_finished_jobs(
    mosquitto: Mosquitto, plans_file: Path
) -> None:
    """Finished jobs stayed for the whole retention however many there were: one project
    token running short jobs back to back (a job a second, ~100 kB of rows and output
    each) filled the controller's database for a week. Past `keep_per_project` a
    project's oldest go; another project's and pending jobs are untouched."""
    dsn = await create_database("orkestr_test")
    process = ControllerProcess(
        database_url=dsn,
        broker=mosquitto,
        plans_file=plans_file,
        jobs_config="keep_per_project = 3\nprune_interval_s = 0.2\n",
    )
    try:
        await process.start()
        async with FakeAgent(f"keep-{secrets.token_hex(4)}", mosquitto) as host:
            await process.wait_host_online(host.host)
            busy, quiet = await new_project(process), await new_project(process)

            async def finished_job(project: dict[str, Any]) -> str:
                url = f"/v1/projects/{project['id']}/jobs"
                status, job = await process.api("POST", url, {"image": TOOLBOX})
                assert status == 201, job
                await host.job_result(job["id"], project["id"], 0, "x" * 1000)

                async def done() -> bool:
                    _, view = await process.api("GET", f"{url}/{job['id']}")
                    return bool(view["state"] == "succeeded")

                await eventually(done, "the job finished")
                return str(job["id"])

            old = await finished_job(quiet)
            made = [await finished_job(busy) for _ in range(6)]
            url = f"/v1/projects/{busy['id']}/jobs"
            status, pending = await process.api("POST", url, {"image": TOOLBOX})
            assert status == 201, pending

            async def only_newest() -> bool:
                _, listed = await process.api("GET", url)
                return {j["id"] for j in listed["jobs"]} == {*made[-3:], pending["id"]}

            await eventually(only_newest, "the busy project's oldest jobs pruned", wait_s=15)
            status, _ = await process.api("GET", f"/v1/projects/{quiet['id']}/jobs/{old}")
            assert status == 200
            await process.api("DELETE", f"{url}/{pending['id']}")
    finally:
        await process.close()
        await drop_database(dsn)


async def test_a_project_tokens_writes_are_budgeted_and_nobody_elses_are(
    mosquitto: Mosquitto, plans_file: Path
) -> None:
    """A loop of writes from one project token (rotate-credentials: ~45 a second) made as
    many host generations, each a full signed snapshot of every project on the host and
    a reconcile pass of its agent: past its burst a project's token waits (429 with
    Retry-After); the operator and other projects are not held back."""
    dsn = await create_database("orkestr_test")
    process = ControllerProcess(database_url=dsn, broker=mosquitto, plans_file=plans_file)
    process.http_extra = "project_write_burst = 5\nproject_writes_per_s = 2\n"
    try:
        await process.start()
        async with FakeAgent(f"budget-{secrets.token_hex(4)}", mosquitto) as host:
            await process.wait_host_online(host.host)
            busy, quiet = await new_project(process), await new_project(process)
            busy_token = await new_project_token(process, busy)
            quiet_token = await new_project_token(process, quiet)
            env = f"/v1/projects/{busy['id']}/env"
            statuses = [
                (await process.api("PATCH", env, {"set": {"N": str(n)}}, token=busy_token))[0]
                for n in range(8)
            ]
            assert statuses[:5] == [200] * 5 and 429 in statuses[5:], statuses
            status, body = await process.api("PATCH", env, {"set": {"N": "x"}}, token=busy_token)
            assert_error(status, body, 429, "too_many_writes")
            assert "5 writes at once, then 2 a second" in body["message"], body
            # Reads go on; the operator and another project's token are not held back.
            assert (await process.api("GET", env, token=busy_token))[0] == 200
            assert (await process.api("PATCH", env, {"set": {"N": "op"}}))[0] == 200
            quiet_env = f"/v1/projects/{quiet['id']}/env"
            for n in range(5):
                patch = {"set": {"N": str(n)}}
                assert (await process.api("PATCH", quiet_env, patch, token=quiet_token))[0] == 200
            # A foreign project's route is a 404 and spends nothing.
            assert (await process.api("PATCH", quiet_env, {"set": {}}, token=busy_token))[0] == 404
            await asyncio.sleep(0.6)
            assert (await process.api("PATCH", env, {"set": {"N": "later"}}, token=busy_token))[
                0
            ] == 200
    finally:
        await process.close()
        await drop_database(dsn)


async def test_a_project_tokens_reads_are_budgeted_apart_from_its_writes(
    mosquitto: Mosquitto, plans_file: Path
) -> None:
    """A loop of GETs from one project token kept the controller's one process busy for
    everyone (agents' fetches included): past its read burst it waits (429 too_many_reads
    with Retry-After); its writes have their own budget; the operator and other projects
    are not held back."""
    dsn = await create_database("orkestr_test")
    process = ControllerProcess(database_url=dsn, broker=mosquitto, plans_file=plans_file)
    process.http_extra = "project_read_burst = 5\nproject_reads_per_s = 2\n"
    try:
        await process.start()
        async with FakeAgent(f"reads-{secrets.token_hex(4)}", mosquitto) as host:
            await process.wait_host_online(host.host)
            busy, quiet = await new_project(process), await new_project(process)
            busy_token = await new_project_token(process, busy)
            quiet_token = await new_project_token(process, quiet)
            env = f"/v1/projects/{busy['id']}/env"
            statuses = [(await process.api("GET", env, token=busy_token))[0] for _ in range(8)]
            assert statuses[:5] == [200] * 5 and 429 in statuses[5:], statuses
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    process.url + env, headers={"Authorization": f"Bearer {busy_token}"}
                ) as response,
            ):
                assert response.status == 429
                assert int(response.headers["Retry-After"]) >= 1
                body = await response.json()
            assert_error(response.status, body, 429, "too_many_reads")
            assert "5 reads at once, then 2 a second" in body["message"], body
            # Writes have their own budget; the operator and another project read on.
            assert (await process.api("PATCH", env, {"set": {"N": "1"}}, token=busy_token))[
                0
            ] == 200
            for _ in range(10):
                assert (await process.api("GET", env))[0] == 200
            quiet_env = f"/v1/projects/{quiet['id']}/env"
            for _ in range(5):
                assert (await process.api("GET", quiet_env, token=quiet_token))[0] == 200
            await asyncio.sleep(0.6)
            assert (await process.api("GET", env, token=busy_token))[0] == 200
    finally:
        await process.close()
        await drop_database(dsn)


async def test_a_throttled_token_is_refused_before_its_lookup(
    mosquitto: Mosquitto, plans_file: Path
) -> None:
    """A client that ignores Retry-After costs no query per refusal: past its budget a
    token is refused before it is looked up. Seen from outside: revoked meanwhile, it
    answers 429 until the budget refills, then 401 (admission looks it up afresh)."""
    dsn = await create_database("orkestr_test")
    process = ControllerProcess(database_url=dsn, broker=mosquitto, plans_file=plans_file)
    # One read back every 10 s: the revocation below takes far less, even on a busy machine.
    process.http_extra = "project_read_burst = 2\nproject_reads_per_s = 0.1\n"
    try:
        await process.start()
        async with FakeAgent(f"lookup-{secrets.token_hex(4)}", mosquitto) as host:
            await process.wait_host_online(host.host)
            busy = await new_project(process)
            token = await new_project_token(process, busy)
            env = f"/v1/projects/{busy['id']}/env"
            statuses = [(await process.api("GET", env, token=token))[0] for _ in range(3)]
            assert statuses == [200, 200, 429], statuses
            listed = await process.api("GET", f"/v1/projects/{busy['id']}/tokens")
            revoke = f"/v1/projects/{busy['id']}/tokens/{listed[1]['tokens'][0]['id']}"
            assert (await process.api("DELETE", revoke))[0] == 204
            assert (await process.api("GET", env, token=token))[0] == 429
            await asyncio.sleep(10.5)
            status, body = await process.api("GET", env, token=token)
            assert_error(status, body, 401, "unauthorized")
    finally:
        await process.close()
        await drop_database(dsn)


# --- secrets at rest ------------------------------------------------------------------


def pg_dump(dsn: str) -> str:
    done = subprocess.run(
        ["pg_dump", "--no-owner", f"--dbname={dsn}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def clear_forms(secret: str) -> set[str]:
    return {secret, urllib.parse.quote(secret, safe=""), secret.encode().hex()}


async def test_no_password_or_token_in_a_dump_of_the_database(
    controller: ControllerProcess, big_host: FakeAgent
) -> None:
    project = await project_on(controller, big_host.host)
    await new_addon(controller, project, "main-db", "postgres")
    await new_addon(controller, project, "cache", "redis")
    status, env = await controller.api("GET", f"/v1/projects/{project['id']}/env")
    assert status == 200
    passwords = {
        urllib.parse.unquote(urllib.parse.urlsplit(v).password or "") for v in env["env"].values()
    }
    assert len(passwords) == 2 and all(len(p) >= 32 for p in passwords)
    project_token = await controller.new_project_token(project["id"])
    agent_token = await controller.new_agent_token(big_host.host)
    status, _ = await controller.api("GET", "/v1/projects", token=project_token)
    assert status == 200
    dump = pg_dump(controller.database_url)
    assert "main-db" in dump and "password_sealed" in dump  # the dump is the real one
    secrets_ = passwords | {project_token, agent_token, controller.operator_token}
    hits = [s for s in secrets_ for form in clear_forms(s) if form in dump]
    assert hits == []
    log = controller.log_text()
    assert [s for s in secrets_ if s in log] == []


async def test_plaintext_passwords_of_an_older_controller_are_sealed(
    mosquitto: Mosquitto, plans_file: Path
) -> None:
    dsn = await create_database("orkestr_test")
    password = "legacy-" + secrets.token_urlsafe(24)
    project_id, addon_id = uuid.uuid4(), uuid.uuid4()
    conn = await asyncpg.connect(dsn)
    try:
        first = discover()[0]
        await conn.execute(first.sql)
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now());"
            "INSERT INTO schema_migrations (version, name) VALUES (1, 'initial');"
            "INSERT INTO hosts (name) VALUES ('legacy-host')"
        )
        await conn.execute(
            "INSERT INTO projects (id, name, plan, host) VALUES ($1, 'legacy', 'team', "
            "'legacy-host')",
            project_id,
        )
        await conn.execute(
            """INSERT INTO addons (id, project_id, name, kind, database, "user", password)
            VALUES ($1, $2, 'old-db', 'postgres', 'app', 'app', $3)""",
            addon_id,
            project_id,
            password,
        )
    finally:
        await conn.close()
    assert password in pg_dump(dsn)
    process = ControllerProcess(database_url=dsn, broker=mosquitto, plans_file=plans_file)
    try:
        await process.start()
        status, env = await process.api("GET", f"/v1/projects/{project_id.hex}/env")
        assert status == 200 and f":{password}@old-db:" in env["env"]["DATABASE_URL"]
        assert "passwords_sealed addons=1" in process.log_text()
        await process.stop()
        assert password not in pg_dump(dsn)
        # Restarted, nothing is left to seal and the password still opens.
        await process.start()
        status, env = await process.api("GET", f"/v1/projects/{project_id.hex}/env")
        assert status == 200 and f":{password}@old-db:" in env["env"]["DATABASE_URL"]
        assert process.log_text().count("passwords_sealed") == 1
    finally:
        await process.close()
        await drop_database(dsn)


async def test_placement_counts_a_hosts_capacity_at_most_its_ceiling(
    controller: ControllerProcess, mosquitto: Mosquitto
) -> None:
    """A compromised host claiming the most memory would attract every new project (the
    tie-break after the project count). With the operator's ceiling, placement counts at
    most that, and the claim is logged."""
    tag = secrets.token_hex(4)
    liar = FakeAgent(f"liar-{tag}", mosquitto, cpus=4096.0, memory_mb=2**31 - 1)
    honest = FakeAgent(f"honest-{tag}", mosquitto, cpus=8.0, memory_mb=2**31 - 2)
    url = f"/v1/hosts/{liar.host}/ceiling"
    # Bad input is refused.
    bad_bodies = ({"memory_mb": -1}, {"cpus": "lots"}, {"memory_mb": 2**31}, {"memory_mb": 1.5})
    for bad in (*bad_bodies, {"disk": 1}):
        status, body = await controller.api("PUT", url, bad)
        assert_error(status, body, 422, "invalid_body")
    # Set before the host ever reported, as when it is given its token.
    status, body = await controller.api("PUT", url, {"cpus": 4, "memory_mb": 8192})
    assert (status, body) == (200, {"cpus": 4.0, "memory_mb": 8192})
    try:
        async with liar, honest:
            await controller.wait_host_online(liar.host)
            await controller.wait_host_online(honest.host)
            first = await new_project(controller)
            assert first["host"] == honest.host, first  # both without projects: more memory
            second = await new_project(controller)
            assert second["host"] == liar.host, second  # fewest projects still comes first
            third = await new_project(controller)
            assert third["host"] == honest.host, third  # one each: the ceiling again
            _, body = await controller.api("GET", "/v1/hosts")
            shown = {h["name"]: h for h in body["hosts"]}[liar.host]
            assert shown["capacity"] == {"cpus": 4.0, "memory_mb": 8192}
            assert shown["reported_capacity"] == {"cpus": 4096.0, "memory_mb": 2**31 - 1}
            assert shown["ceiling"] == {"cpus": 4.0, "memory_mb": 8192}
            log = controller.log_text()
            assert log.count(f"host_capacity_over_ceiling host={liar.host}") == 1  # not per report
            # A project's token does not reach the route.
            token = await new_project_token(controller, first)
            status, body = await controller.api("PUT", url, {"memory_mb": 10**6}, token=token)
            assert status == 404, body
            status, body = await controller.api("DELETE", url, token=token)
            assert status == 404, body

            status, _ = await controller.api("DELETE", url)
            assert status == 204
            _, body = await controller.api("GET", "/v1/hosts")
            shown = {h["name"]: h for h in body["hosts"]}[liar.host]
            assert shown["ceiling"] is None
            assert shown["capacity"] == shown["reported_capacity"]
    finally:
        await controller.api("DELETE", url)


async def new_project_token(controller: ControllerProcess, project: dict[str, Any]) -> str:
    status, body = await controller.api(
        "POST", f"/v1/projects/{project['id']}/tokens", {"name": "ci"}
    )
    assert status == 201, body
    return str(body["token"])
