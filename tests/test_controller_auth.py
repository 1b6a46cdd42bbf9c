"""Who may do what through the controller's HTTP API: operator, project, metrics and
per-host agent tokens, token rotation without a restart, and HTTPS. A real controller
process, PostgreSQL and mosquitto; hosts are FakeAgents speaking the real protocol."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.controller_client import ControllerClient
from agent.errors import NotFound as AgentNotFound
from agent.errors import PermanentError, TransientError
from controller.api import Api
from controller.config import parse_config
from controller.metrics import Metrics
from controller.plans import load_plans
from tests.agent_fixtures import (
    TEST_PLANS,
    AgentProcess,
    create_addon,
    create_project,
    host_online,
    remove_host_objects,
    run_job,
    wait_for,
    wait_phase,
)
from tests.services import (
    ControllerProcess,
    FakeAgent,
    Mosquitto,
    create_database,
    drop_database,
)
from tests.test_controller_api import assert_error, new_addon, new_project, unique

ROOT = Path(__file__).resolve().parent.parent
TOOLBOX = "orkestr-local/toolbox:bookworm"


class _NoHosts:
    def mark(self, *hosts: str) -> None:
        pass


def app_routes() -> list[tuple[str, str]]:
    """(method, canonical path) of every route the controller serves, from its router."""
    key = base64.b64encode(bytes(32)).decode()
    text = """
[http]
operator_token = "operator-token-0123456789"
[secrets]
key_file = "key"
[signing]
key_file = "signing.key"
[database]
url = "postgresql://u:p@127.0.0.1:5432/orkestr"
"""
    with tempfile.TemporaryDirectory() as base:
        (Path(base) / "key").write_text(key)
        (Path(base) / "signing.key").write_bytes(
            Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        config = parse_config(text, Path(base))
    api = Api(config, None, load_plans(None), _NoHosts(), Metrics())
    return [
        (r.method, r.resource.canonical)
        for r in api.app().router.routes()
        if r.method != "HEAD" and r.resource is not None
    ]


def fill(path: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values[m[1]], path)


BODIES: dict[str, Any] = {
    "/v1/projects": {"name": "intruder", "plan": "team"},
    "/v1/projects/{project_id}/addons": {"name": "intruder", "kind": "redis"},
    "/v1/projects/{project_id}/jobs": {"image": TOOLBOX, "command": ["true"]},
    "/v1/projects/{project_id}/tokens": {"name": "intruder"},
    "/v1/hosts/{host}/agent-tokens": {"name": "intruder"},
}


@pytest.fixture
async def big_host(mosquitto: Mosquitto, controller: ControllerProcess) -> AsyncIterator[FakeAgent]:
    """An online host with more memory than any other test's, so new projects land on it."""
    async with FakeAgent(f"big-{secrets.token_hex(4)}", mosquitto, memory_mb=2**30) as a:
        await controller.wait_host_online(a.host)
        yield a


async def test_project_token_sees_its_own_project_alone_on_every_route(
    controller: ControllerProcess, big_host: FakeAgent
) -> None:
    mine, theirs = await new_project(controller), await new_project(controller)
    their_addon = await new_addon(controller, theirs, "their-db")
    status, their_job = await controller.api(
        "POST", f"/v1/projects/{theirs['id']}/jobs", {"image": TOOLBOX, "command": ["true"]}
    )
    assert status == 201, their_job
    their_token = await controller.new_project_token(theirs["id"])
    _, listed = await controller.api("GET", f"/v1/projects/{theirs['id']}/tokens")
    token = await controller.new_project_token(mine["id"])
    values = {
        "project_id": theirs["id"],
        "addon_id": their_addon["id"],
        "job_id": their_job["id"],
        "token_id": listed["tokens"][0]["id"],
        # Backup routes: ids that exist nowhere; a foreign token must not learn even that.
        "backup_id": "b" * 32,
        "restore_id": "a" * 32,
        "host": theirs["host"],
        "number": "1",
        "group_id": "9" * 32,  # group routes: the operator's, or of their project
    }
    routes = app_routes()
    assert len(routes) >= 23, routes
    checked = 0
    for method, path in routes:
        url = fill(path, values)
        status, body = await controller.api(method, url, BODIES.get(path, {}), token=token)
        if path == "/healthz":
            assert status == 200, body
        elif path.startswith("/v1/agent/"):
            assert_error(status, body, 401, "unauthorized")
        elif (method, path) == ("GET", "/v1/projects"):
            assert status == 200 and [p["id"] for p in body["projects"]] == [mine["id"]], body
        else:
            assert_error(status, body, 404, "not_found")
            checked += 1
    assert checked >= 18
    # Nothing of theirs changed: the add-on lives, the job is pending, the token works.
    status, addon = await controller.api(
        "GET", f"/v1/projects/{theirs['id']}/addons/{their_addon['id']}"
    )
    assert status == 200 and addon["deleted_at"] is None
    status, job = await controller.api("GET", f"/v1/projects/{theirs['id']}/jobs/{their_job['id']}")
    assert status == 200 and job["state"] == "pending"
    status, _ = await controller.api("GET", f"/v1/projects/{theirs['id']}", token=their_token)
    assert status == 200
    _, projects = await controller.api("GET", "/v1/projects")
    assert "intruder" not in {p["name"] for p in projects["projects"]}


async def test_project_token_works_on_its_own_project_until_revoked(
    controller: ControllerProcess, big_host: FakeAgent
) -> None:
    project = await new_project(controller, "pro")
    pid = project["id"]
    status, created = await controller.api("POST", f"/v1/projects/{pid}/tokens", {"name": "ci"})
    assert status == 201 and created["name"] == "ci", created
    token = created["token"]
    assert token.startswith("okp_") and len(token) >= 40
    status, listed = await controller.api("GET", f"/v1/projects/{pid}/tokens")
    assert status == 200 and [t["id"] for t in listed["tokens"]] == [created["id"]]
    assert "token" not in listed["tokens"][0]  # shown once, at creation
    status, addon = await controller.api(
        "POST", f"/v1/projects/{pid}/addons", {"name": "db", "kind": "postgres"}, token=token
    )
    assert status == 201, addon
    for path in (f"/v1/projects/{pid}", f"/v1/projects/{pid}/addons", f"/v1/projects/{pid}/env"):
        status, body = await controller.api("GET", path, token=token)
        assert status == 200, (path, body)
    status, job = await controller.api(
        "POST", f"/v1/projects/{pid}/jobs", {"image": TOOLBOX, "command": ["true"]}, token=token
    )
    assert status == 201, job
    status, jobs = await controller.api("GET", f"/v1/projects/{pid}/jobs", token=token)
    assert status == 200 and [j["id"] for j in jobs["jobs"]] == [job["id"]]
    # Not the operator: no tokens for itself, no projects, no hosts, no metrics.
    for method, path in (
        ("POST", f"/v1/projects/{pid}/tokens"),
        ("GET", f"/v1/projects/{pid}/tokens"),
        ("DELETE", f"/v1/projects/{pid}/tokens/{created['id']}"),
        ("POST", "/v1/projects"),
        ("GET", "/v1/hosts"),
        ("GET", "/metrics"),
    ):
        status, body = await controller.api(
            method, path, {"name": "x", "plan": "team"}, token=token
        )
        assert_error(status, body, 404, "not_found")
    status, _ = await controller.api("DELETE", f"/v1/projects/{pid}/tokens/{created['id']}")
    assert status == 204
    status, body = await controller.api("GET", f"/v1/projects/{pid}", token=token)
    assert_error(status, body, 401, "unauthorized")
    status, body = await controller.api("DELETE", f"/v1/projects/{pid}/tokens/{created['id']}")
    assert_error(status, body, 404, "not_found")
    assert token not in controller.log_text()


async def test_metrics_token_reads_metrics_alone(controller: ControllerProcess) -> None:
    status, text = await controller.api("GET", "/metrics", token=controller.metrics_token)
    assert status == 200 and "orkestr_controller_http_requests_total" in text
    status, text = await controller.api("GET", "/metrics")  # the operator may too
    assert status == 200
    for method, path in (("GET", "/v1/projects"), ("GET", "/v1/hosts")):
        status, body = await controller.api(method, path, token=controller.metrics_token)
        assert_error(status, body, 401, "unauthorized")
    status, body = await controller.api(
        "GET", f"/v1/agent/projects/{'0' * 32}/env", token=controller.metrics_token
    )
    assert_error(status, body, 401, "unauthorized")
    status, body = await controller.api("GET", "/healthz", token="")
    assert (status, body) == (200, {"ok": True})
    for token in ("", "wrong-token-0123456789", controller.operator_token + "x"):
        status, body = await controller.api("GET", "/v1/projects", token=token)
        assert_error(status, body, 401, "unauthorized")


async def test_agent_token_reads_its_own_host_only(
    controller: ControllerProcess, mosquitto: Mosquitto
) -> None:
    async with (
        FakeAgent(f"ha-{secrets.token_hex(4)}", mosquitto, memory_mb=2**30) as a,
        FakeAgent(f"hb-{secrets.token_hex(4)}", mosquitto, memory_mb=2**30 - 1) as b,
    ):
        await controller.wait_host_online(a.host)
        await controller.wait_host_online(b.host)
        on_a, on_b = await new_project(controller), await new_project(controller)
        assert (on_a["host"], on_b["host"]) == (a.host, b.host)
        addon_a = await new_addon(controller, on_a, "db-a")
        addon_b = await new_addon(controller, on_b, "db-b")
        token_a = await controller.new_agent_token(a.host)
        token_b = await controller.new_agent_token(b.host)
        assert token_a.startswith("oka_")
        status, secret = await controller.api(
            "GET", f"/v1/agent/addons/{addon_a['id']}/secret", token=token_a
        )
        assert status == 200 and len(secret["password"]) >= 32, secret
        status, env = await controller.api(
            "GET", f"/v1/agent/projects/{on_a['id']}/env", token=token_a
        )
        assert status == 200 and f":{secret['password']}@db-a:" in env["env"]["DB_A_URL"]
        # Host A's credential gets nothing of host B, whatever the URL says.
        for path in (
            f"/v1/agent/addons/{addon_b['id']}/secret",
            f"/v1/agent/projects/{on_b['id']}/env",
            f"/v1/agent/hosts/{b.host}/addons/{addon_b['id']}/secret",
            f"/v1/agent/hosts/{b.host}/projects/{on_b['id']}/env",
        ):
            status, body = await controller.api("GET", path, token=token_a)
            assert_error(status, body, 404, "not_found")
        status, _ = await controller.api(
            "GET", f"/v1/agent/addons/{addon_b['id']}/secret", token=token_b
        )
        assert status == 200
        # An agent token is no user credential, and a user token no agent credential.
        status, body = await controller.api("GET", "/v1/projects", token=token_a)
        assert_error(status, body, 401, "unauthorized")
        status, body = await controller.api("GET", f"/v1/agent/projects/{on_a['id']}/env")
        assert_error(status, body, 401, "unauthorized")
        # Listed without the secret, revoked at once.
        status, listed = await controller.api("GET", f"/v1/hosts/{a.host}/agent-tokens")
        assert status == 200 and len(listed["tokens"]) == 1 and "token" not in listed["tokens"][0]
        token_id = listed["tokens"][0]["id"]
        status, _ = await controller.api("DELETE", f"/v1/hosts/{a.host}/agent-tokens/{token_id}")
        assert status == 204
        status, body = await controller.api(
            "GET", f"/v1/agent/addons/{addon_a['id']}/secret", token=token_a
        )
        assert_error(status, body, 401, "unauthorized")
        assert secret["password"] not in controller.log_text()


async def test_token_files_are_reread_without_a_restart(
    mosquitto: Mosquitto, plans_file: Path
) -> None:
    dsn = await create_database("orkestr_test")
    process = ControllerProcess(
        database_url=dsn, broker=mosquitto, plans_file=plans_file, token_files=True
    )
    try:
        await process.start()
        pid = process.pid
        old_operator, old_metrics = process.operator_token, process.metrics_token
        new_operator, new_metrics = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        process.operator_token_file.write_text(new_operator + "\n")
        process.metrics_token_file.write_text(new_metrics + "\n")
        status, body = await process.api("GET", "/v1/hosts", token=old_operator)
        assert_error(status, body, 401, "unauthorized")
        status, _ = await process.api("GET", "/v1/hosts", token=new_operator)
        assert status == 200
        status, _ = await process.api("GET", "/metrics", token=old_metrics)
        assert status == 401
        status, _ = await process.api("GET", "/metrics", token=new_metrics)
        assert status == 200
        # A broken rotation (an empty file) keeps the last good token.
        process.operator_token_file.write_text("")
        status, _ = await process.api("GET", "/v1/hosts", token=new_operator)
        assert status == 200
        # A host named in the bootstrap file is known before it reports: its tokens list.
        booted = f"boot-{secrets.token_hex(4)}"
        url = f"/v1/hosts/{booted}/agent-tokens"
        status, _ = await process.api("GET", url, token=new_operator)
        assert status == 404
        with process.agent_tokens_file.open("a") as f:
            f.write(f"{booted} {secrets.token_hex(32)}\n")
        status, body = await process.api("GET", url, token=new_operator)
        assert status == 200 and body["tokens"] == [], body
        # The bootstrap list of agent tokens: a line added is a host admitted.
        async with FakeAgent(f"boot-{secrets.token_hex(4)}", mosquitto) as agent:
            agent_token = "oka_" + secrets.token_urlsafe(32)
            url = f"/v1/agent/projects/{'0' * 32}/env"
            status, _ = await process.api("GET", url, token=agent_token)
            assert status == 401
            digest = hashlib.sha256(agent_token.encode()).hexdigest()
            with process.agent_tokens_file.open("a") as f:
                f.write(f"{agent.host} {digest}\n")
            status, body = await process.api("GET", url, token=agent_token)
            assert_error(status, body, 404, "not_found")  # admitted; no such project
        assert process.pid == pid and process.running
        assert "token_reload_failed" in process.log_text()
        assert new_operator not in process.log_text()
    finally:
        await process.close()
        await drop_database(dsn)


def self_signed(dir: Path) -> tuple[Path, Path]:
    cert, key = dir / "controller.crt", dir / "controller.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


async def test_agents_reach_the_controller_over_tls(
    mosquitto: Mosquitto, plans_file: Path, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    dsn = await create_database("orkestr_test")
    process = ControllerProcess(
        database_url=dsn, broker=mosquitto, plans_file=plans_file, tls=(cert, key, cert)
    )
    try:
        await process.start()
        assert process.url.startswith("https://")
        async with FakeAgent(f"tls-{secrets.token_hex(4)}", mosquitto) as host:
            await process.wait_host_online(host.host)
            project = await new_project(process)
            addon = await new_addon(process, project, "db")
            token = await process.new_agent_token(host.host)
            # The agent's own client, trusting the test CA.
            async with ControllerClient(process.url, token, str(cert)) as client:
                secret = await client.secret(addon["id"])
                assert len(secret.password) >= 32
                env = await client.env(project["id"])
                assert f":{secret.password}@db:" in env["DB_URL"]
                with pytest.raises(AgentNotFound):
                    await client.secret("0" * 32)
            # A token file is read on every request: a rotated token is used at once.
            token_file = tmp_path / "agent_token"
            token_file.write_text("oka_" + "x" * 43 + "\n")
            reader = lambda: token_file.read_text().strip()  # noqa: E731
            async with ControllerClient(process.url, reader, str(cert)) as client:
                with pytest.raises(PermanentError):
                    await client.secret(addon["id"])
                token_file.write_text(token + "\n")
                assert (await client.secret(addon["id"])).password == secret.password
            # Without the CA the certificate is refused; plain HTTP gets no answer.
            async with ControllerClient(process.url, token) as client:
                with pytest.raises(TransientError, match="certificate"):
                    await client.secret(addon["id"])
            async with aiohttp.ClientSession() as session:
                with pytest.raises(aiohttp.ClientError):
                    plain = process.url.replace("https://", "http://") + "/healthz"
                    async with session.get(plain) as response:
                        await response.read()
            context = ssl.create_default_context(cafile=str(cert))
            async with aiohttp.ClientSession() as session:
                async with session.get(process.url + "/healthz", ssl=context) as response:
                    assert response.status == 200
    finally:
        await process.close()
        await drop_database(dsn)


async def test_every_route_refuses_a_missing_or_foreign_token(
    controller: ControllerProcess, big_host: FakeAgent
) -> None:
    agent_token = await controller.new_agent_token(big_host.host)
    values = {"project_id": "f" * 32, "addon_id": "e" * 32, "job_id": "d" * 32}
    values |= {"token_id": "c" * 32, "host": big_host.host, "number": "1"}
    values |= {"backup_id": "b" * 32, "restore_id": "a" * 32, "group_id": "9" * 32}
    for method, path in app_routes():
        if path == "/healthz":
            continue
        agent_route = path.startswith("/v1/agent/")
        foreign = [controller.operator_token] if agent_route else [agent_token]
        if path != "/metrics":
            foreign.append(controller.metrics_token)
        url, body = fill(path, values), BODIES.get(path, {})
        for token in ("", "wrong-token-0123456789", controller.operator_token + "x", *foreign):
            status, answer = await controller.api(method, url, body, token=token)
            assert_error(status, answer, 401, "unauthorized")
        status, answer = await controller.api(
            method, url, body, token="", headers={"Authorization": f"Basic {foreign[0]}"}
        )
        assert_error(status, answer, 401, "unauthorized")
        assert answer["message"].startswith(("this route needs", "the metrics token"))


async def test_unknown_project_token_prefix_is_refused(controller: ControllerProcess) -> None:
    status, body = await controller.api("GET", "/v1/projects", token="okp_" + "a" * 43)
    assert_error(status, body, 401, "unauthorized")
    status, body = await controller.api("GET", "/v1/projects", token="oka_" + "a" * 43)
    assert_error(status, body, 401, "unauthorized")
    status, body = await controller.api("GET", f"/v1/projects/{unique()}", token="")
    assert_error(status, body, 401, "unauthorized")


def controller_cli(process: ControllerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", "--config", str(process.config_path), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


async def test_agent_tokens_from_the_command_line(
    controller: ControllerProcess, big_host: FakeAgent
) -> None:
    project = await new_project(controller)
    addon = await new_addon(controller, project, "db")
    made = await asyncio.to_thread(controller_cli, controller, "hosts", "add-token", big_host.host)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("oka_") and "shown once" in made.stderr
    url = f"/v1/agent/addons/{addon['id']}/secret"
    status, _ = await controller.api("GET", url, token=token)
    assert status == 200
    listed = await asyncio.to_thread(
        controller_cli, controller, "hosts", "list-tokens", big_host.host
    )
    assert listed.returncode == 0 and token not in listed.stdout
    token_id = listed.stdout.split()[0]
    revoked = await asyncio.to_thread(
        controller_cli, controller, "hosts", "revoke-token", big_host.host, token_id
    )
    assert revoked.returncode == 0, revoked.stderr
    status, _ = await controller.api("GET", url, token=token)
    assert status == 401
    again = await asyncio.to_thread(
        controller_cli, controller, "hosts", "revoke-token", big_host.host, token_id
    )
    assert again.returncode == 1 and "does not exist" in again.stderr
    typo = await asyncio.to_thread(
        controller_cli, controller, "hosts", "revoke-token", big_host.host, token_id[:8]
    )
    assert typo.returncode == 2 and f"{token_id[:8]!r} is not a token id" in typo.stderr, typo
    lonely = f"h-{unique()[:8]}"
    none = await asyncio.to_thread(controller_cli, controller, "hosts", "list-tokens", lonely)
    assert none.returncode == 0 and none.stdout == "", none
    assert f"no agent tokens of {lonely} in the database" in none.stderr
    bad = await asyncio.to_thread(controller_cli, controller, "hosts", "add-token", "Bad_Host")
    assert bad.returncode == 2 and "not a host name" in bad.stderr


async def test_two_real_agents_with_their_own_tokens_converge_over_tls(tmp_path: Path) -> None:
    """Two `python -m agent` processes, each with its own token and the test CA, against a
    controller serving HTTPS: each provisions the add-on placed on it (the password comes
    over TLS) and a job on each project reaches its database. A broker of its own: the
    session's controller would publish its own desired states for these hosts."""
    cert, key = self_signed(tmp_path)
    mosquitto = Mosquitto()
    await mosquitto.start()
    plans = tmp_path / "plans.toml"
    plans.write_text(TEST_PLANS)
    dsn = await create_database("orkestr_test")
    process = ControllerProcess(
        database_url=dsn, broker=mosquitto, plans_file=plans, tls=(cert, key, cert)
    )
    agents: list[AgentProcess] = []
    try:
        await process.start()
        for _ in range(2):
            host = f"t{uuid.uuid4().hex[:10]}"
            token = await process.new_agent_token(host)
            agent = AgentProcess(
                host,
                mosquitto,
                process.url,
                token,
                ca_file=str(cert),
                public_key_file=process.public_key_file,
            )
            agents.append(agent)
            await agent.start()
            await wait_for(lambda h=host: host_online(process, h), 30, f"{host} online")
            project = await create_project(process, "team")
            assert project["host"] == host
            made = await create_addon(process, project["id"], "db", "postgres")
            await wait_phase(process, project["id"], made["id"], "ready", 120)
            job = await run_job(process, project["id"], 'psql "$DATABASE_URL" -tAc "select 41+1"')
            assert job["exit_code"] == 0 and job["output"].strip() == "42", job
        assert "secret_served" in process.log_text()
    finally:
        for agent in agents:
            await agent.close()
            remove_host_objects(agent.host)
            shutil.rmtree(agent.dir, ignore_errors=True)
        await process.close()
        await drop_database(dsn)
        await mosquitto.close()


async def test_agent_tokens_of_an_unknown_host_are_a_404_naming_it(
    controller: ControllerProcess, mosquitto: Mosquitto
) -> None:
    host = f"nohost-{secrets.token_hex(4)}"
    url = f"/v1/hosts/{host}/agent-tokens"
    status, body = await controller.api("GET", url)
    assert_error(status, body, 404, "not_found")
    assert host in body["message"], body
    # Known before its first report: a ceiling (or a line in the bootstrap file: test_token_files_are_reread_*)...
    status, _ = await controller.api("PUT", f"/v1/hosts/{host}/ceiling", {"cpus": 2})
    assert status == 200
    status, body = await controller.api("GET", url)
    assert (status, body["tokens"]) == (200, []), body
    # ...or a host that reported, with no token in the database.
    async with FakeAgent(f"seen-{secrets.token_hex(4)}", mosquitto) as agent:
        await controller.wait_host_online(agent.host)
        status, body = await controller.api("GET", f"/v1/hosts/{agent.host}/agent-tokens")
        assert (status, body["tokens"]) == (200, []), body
    status, _ = await controller.api("DELETE", f"/v1/hosts/{host}/ceiling")
    assert status == 204
