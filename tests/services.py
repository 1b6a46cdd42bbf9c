"""Real services for tests: a mosquitto broker, throwaway PostgreSQL databases, a
controller subprocess and small MQTT peers that speak the real protocol.

Everything listens on loopback only. Used by the controller tests and by the end-to-end
tests, so keep it generic:

    async with Mosquitto() as broker:                    # broker.port, await broker.identity()
        dsn = await create_database()                    # orkestr_test_<random>
        controller = ControllerProcess(database_url=dsn, broker=broker)
        await controller.start()                         # waits for GET /v1/hosts -> 200
        status, body = await controller.api("GET", "/v1/hosts")
        async with FakeAgent("host-a", broker):          # a host the controller can use
            ...
        await controller.close()
        await drop_database(dsn)

Environment: ORKESTR_TEST_PG_DSN is the admin DSN used to create and drop databases
(default: the `orkestr` role on 127.0.0.1:5432); ORKESTR_MOSQUITTO overrides the broker
binary (default: `mosquitto` on PATH or in the sbin directories).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import aiomqtt
import asyncpg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas import broker_acl, topics
from schemas.codec import MessageRejected, decode, encode
from schemas.messages import (
    SCHEMA_VERSION,
    AddonStatus,
    Capacity,
    Condition,
    ConditionStatus,
    DesiredState,
    HostStatus,
    JobResult,
    Presence,
    SignedDesiredState,
)
from schemas.mqtt_tls import client_context
from schemas.signed import Verifier

ROOT = Path(__file__).resolve().parent.parent
ADMIN_DSN = os.environ.get(
    "ORKESTR_TEST_PG_DSN", "postgresql://orkestr:orkestr@127.0.0.1:5432/postgres"
)
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


async def wait_for_port(port: int, wait_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until loopback `port` accepts connections (and `alive()` stays true)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        if not alive():
            raise RuntimeError(f"process exited before port {port} accepted connections")
        try:
            _, writer = await asyncio.open_connection(LOOPBACK, port)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"port {port} did not accept connections in {wait_s}s") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


def _mosquitto_binary() -> str:
    found = os.environ.get("ORKESTR_MOSQUITTO") or shutil.which("mosquitto")
    found = found or shutil.which(
        "mosquitto", path=os.pathsep.join(["/usr/sbin", "/usr/local/sbin"])
    )
    if not found:
        raise RuntimeError("mosquitto not found; install it (deploy/services.sh does)")
    return found


async def _terminate(proc: asyncio.subprocess.Process, grace_s: float) -> int:
    """SIGTERM, then SIGKILL after `grace_s`; returns the exit code."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode


@dataclass(frozen=True)
class MqttIdentity:
    """A broker user: its password is also in `password_file` (what the services read)."""

    username: str
    password: str
    password_file: Path


class Mosquitto:
    """A mosquitto broker subprocess on loopback with its own temp dir and persistence,
    configured as production is: no anonymous access, a password file made with
    mosquitto_passwd, the ACL from `schemas.broker_acl`, and `use_username_as_clientid`.

    `await identity(name)` adds a host user (username = host name), `role="controller"`
    a user with the controller's rights, `role="peer"` a test-only user that may read and
    write every orkestr topic (a stand-in for a broken broker or a stolen credential).
    New users take effect through a reload (SIGHUP). With `tls=True` a second listener on
    `tls_port` serves TLS with certificates from deploy/mqtt-certs.sh (`ca_file`).

    `start()` waits until the port accepts connections; `stop()` is graceful (retained
    messages and persistent sessions are saved) and `start()` again reuses the same port,
    users and data, like a broker restart. `kill()` simulates a crash.
    """

    def __init__(self, port: int | None = None, *, tls: bool = False) -> None:
        self.port = port or free_port()
        self.tls = tls
        self.tls_port = free_port() if tls else 0
        self.dir = Path(tempfile.mkdtemp(prefix="orkestr-mosquitto-"))
        self.log_path = self.dir / "mosquitto.log"
        # Started as root, mosquitto drops to its own user: it must reach its data dir
        # and read its password and ACL files (they are re-read on reload).
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir()
        self.dir.chmod(0o755)
        self.data_dir.chmod(0o777)
        self.passwd_path = self.dir / "passwd"
        self.acl_path = self.dir / "acl"
        self.cert_dir = self.dir / "certs"
        self.ca_file = self.cert_dir / "ca.crt"
        self._identities: dict[str, MqttIdentity] = {}
        self._roles: dict[str, str] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._write_security()
        if tls:
            subprocess.run(
                ["bash", str(ROOT / "deploy" / "mqtt-certs.sh"), str(self.cert_dir)],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self.cert_dir.chmod(0o755)
            for key in ("server.key", "server.crt"):
                _give_to_mosquitto(self.cert_dir / key)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def _write_security(self) -> None:
        controllers = [u for u, r in self._roles.items() if r == "controller"]
        text = broker_acl.acl_text(controllers)
        for user, role in self._roles.items():
            if role == "peer":
                text += f"\nuser {user}\ntopic readwrite {topics.PREFIX}/#\n"
        self.acl_path.write_text(text)
        if not self.passwd_path.exists():
            self.passwd_path.write_text("")
        for path in (self.acl_path, self.passwd_path):
            path.chmod(0o600)
            _give_to_mosquitto(path)

    def config_text(self) -> str:
        text = (
            "per_listener_settings false\n"
            "allow_anonymous false\n"
            f"password_file {self.passwd_path}\n"
            f"acl_file {self.acl_path}\n"
            # A listener option: given before any listener it would open the default one.
            f"listener {self.port} {LOOPBACK}\n"
            "use_username_as_clientid true\n"
        )
        if self.tls:
            text += (
                f"listener {self.tls_port} {LOOPBACK}\n"
                "use_username_as_clientid true\n"
                f"cafile {self.ca_file}\n"
                f"certfile {self.cert_dir / 'server.crt'}\n"
                f"keyfile {self.cert_dir / 'server.key'}\n"
            )
        return text + (
            "max_packet_size 1114112\n"  # as deploy/mosquitto.conf
            "persistence true\n"
            f"persistence_location {self.data_dir}/\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )

    def _write_config(self) -> Path:
        conf = self.dir / "mosquitto.conf"
        conf.write_text(self.config_text())
        return conf

    async def identity(
        self, username: str, role: str = "host", *, probe: bool = True
    ) -> MqttIdentity:
        """The user `username`, created (and the broker reloaded) on first use; the reload
        is awaited by connecting as it (`probe=False`: not, for a user that cannot)."""
        found = self._identities.get(username)
        if found is not None:
            return found
        password = secrets.token_urlsafe(18)
        password_file = self.dir / f"password-{len(self._identities)}"
        password_file.write_text(password + "\n")
        # As deploy/broker-setup.sh does: the password on stdin (entered, confirmed).
        done = await asyncio.create_subprocess_exec(
            "mosquitto_passwd",
            str(self.passwd_path),
            username,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await done.communicate(f"{password}\n{password}\n".encode())
        if done.returncode != 0:
            raise RuntimeError(f"mosquitto_passwd {username!r}: {out.decode(errors='replace')}")
        identity = MqttIdentity(username, password, password_file)
        self._identities[username] = identity
        self._roles[username] = role
        self._write_security()
        if self.running and probe:
            await self._reload_until_accepted(identity)
        elif self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGHUP)
        return identity

    async def _reload_until_accepted(self, identity: MqttIdentity, wait_s: float = 10.0) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGHUP)
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            try:
                async with self.client(identity):
                    return
            except aiomqtt.MqttError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def publish_as(
        self, username: str, topic: str, payload: bytes, *, retain: bool = False
    ) -> None:
        """Publish once (QoS 1) as host user `username`, created if needed."""
        async with self.client(await self.identity(username)) as client:
            await client.publish(topic, payload, qos=1, retain=retain)

    def client(
        self, identity: MqttIdentity | None, *, tls: bool = False, **kw: Any
    ) -> aiomqtt.Client:
        """An aiomqtt client for `identity` (None: anonymous), plain or over TLS."""
        if identity is not None:
            kw.setdefault("identifier", identity.username)  # the broker uses it anyway
            kw.setdefault("username", identity.username)
            kw.setdefault("password", identity.password)
        if tls:
            kw["tls_context"] = client_context(str(self.ca_file))
        return aiomqtt.Client(LOOPBACK, self.tls_port if tls else self.port, **kw)

    async def start(self, wait_s: float = 10.0) -> None:
        if self.running:
            return
        conf = self._write_config()
        with self.log_path.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                _mosquitto_binary(), "-c", str(conf), stdout=log, stderr=log
            )
        try:
            for port in (self.port, self.tls_port) if self.tls else (self.port,):
                await wait_for_port(port, wait_s, lambda: self.running)
        except (RuntimeError, TimeoutError) as exc:
            await self.stop()
            raise RuntimeError(f"mosquitto did not start: {exc}\n{self.log_text()}") from None

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._proc is not None:
            await _terminate(self._proc, grace_s)
            self._proc = None

    async def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        self._proc = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def close(self) -> None:
        await self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _give_to_mosquitto(path: Path) -> None:
    """As root, hand a file to the user mosquitto drops to (as deploy/up.sh does)."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    os.chown(path, user.pw_uid, user.pw_gid)


# --- PostgreSQL -----------------------------------------------------------------------


def _with_database(dsn: str, name: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


async def create_database(prefix: str = "orkestr_test") -> str:
    """Create an empty database `<prefix>_<random>`; returns its DSN."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", prefix):
        raise ValueError(f"database prefix {prefix!r} must be a lower-case identifier")
    name = f"{prefix}_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _with_database(ADMIN_DSN, name)


async def drop_database(dsn: str) -> None:
    """Drop a database made by `create_database`, even with clients still connected."""
    name = urllib.parse.urlsplit(dsn).path.lstrip("/")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,60}", name):
        raise ValueError(f"refusing to drop database {name!r}")
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        for attempt in range(20):
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                return
            except asyncpg.InsufficientPrivilegeError:
                # A client still authenticating has no role yet, and PostgreSQL lets only
                # pg_signal_backend members terminate it; it has one a moment later.
                if attempt == 19:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def wait_blocked_by(holder: asyncpg.Connection, wait_s: float = 30.0) -> None:
    """Until another session waits on a lock `holder` holds (a request of the controller
    has reached it): a race test then knows the request is inside the race, however
    loaded the machine, instead of hoping a fixed sleep was long enough."""
    pid = holder.get_server_pid()
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        deadline = asyncio.get_running_loop().time() + wait_s
        while not await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid
        ):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no session waited on a lock of backend {pid} in {wait_s}s")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


# --- the controller -------------------------------------------------------------------


def toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ControllerProcess:
    """`python -m controller` as a subprocess with a generated config in a temp dir.

    Output goes to `log_path` (`log_text()`; printed by `start()` on failure).
    `api()` calls the HTTP API with the operator token (or `token=`), returning
    (status, parsed JSON or text). `new_agent_token(host)` and `new_project_token(id)`
    make credentials through the API. With `tls=(cert, key, ca)` it serves HTTPS and the
    client trusts `ca`. Restartable: `stop()` then `start()` keeps the port, tokens, key
    and database.
    """

    def __init__(
        self,
        *,
        database_url: str,
        broker: Mosquitto,
        mqtt_tls: bool = False,
        plans_file: Path | None = None,
        port: int | None = None,
        offline_after_s: float = 30.0,
        client_id: str | None = None,
        log_level: str = "INFO",
        log_format: str = "text",
        tls: tuple[Path, Path, Path] | None = None,
        token_files: bool = False,
        extra_config: str = "",
        jobs_config: str = "",
        # The API tests name debian:12, which no agent there runs.
        allowed_images: tuple[str, ...] = ("orkestr-local/toolbox:*", "debian:*"),
    ) -> None:
        self.allowed_images = allowed_images
        self.log_format = log_format
        self.database_url = database_url
        self.broker = broker
        self.mqtt_tls = mqtt_tls
        self.mqtt_port = broker.tls_port if mqtt_tls else broker.port
        # Its own broker user with the controller's rights (a dot: never a host name).
        self.mqtt_username = f"controller.{secrets.token_hex(4)}"
        self.plans_file = plans_file
        self.port = port or free_port()
        self.offline_after_s = offline_after_s
        self.client_id = client_id or f"orkestr-controller-{secrets.token_hex(4)}"
        self.log_level = log_level
        self.operator_token = secrets.token_urlsafe(32)
        self.metrics_token = secrets.token_urlsafe(32)
        self.tls = tls
        self.token_files = token_files
        self.extra_config = extra_config
        self.jobs_config = jobs_config  # lines for the [jobs] table
        self.url = f"{'https' if tls else 'http'}://{LOOPBACK}:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="orkestr-controller-"))
        self.key_file = self.dir / "secrets.key"
        self.key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
        self.key_file.chmod(0o600)
        self.config_path = self.dir / "controller.toml"
        # With token_files: the operator and metrics tokens in files, and an (empty)
        # bootstrap list of agent tokens, all re-read by the controller when they change.
        self.operator_token_file = self.dir / "operator_token"
        self.metrics_token_file = self.dir / "metrics_token"
        self.agent_tokens_file = self.dir / "agent_tokens"
        if token_files:
            self.operator_token_file.write_text(self.operator_token + "\n")
            self.metrics_token_file.write_text(self.metrics_token + "\n")
            self.agent_tokens_file.write_text("# host sha256-of-token\n")
        self.log_path = self.dir / "controller.log"
        self.mqtt_password_file = self.dir / "mqtt.password"
        # The desired-state signing key pair; agents get `public_key_file`.
        self.signing_key = Ed25519PrivateKey.generate()
        self.signing_key_file = self.dir / "signing.key"
        self.signing_key_file.write_bytes(
            self.signing_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.public_key_file = self.dir / "signing.pub"
        self.public_key_file.write_bytes(
            self.signing_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        self.mqtt_extra = ""  # appended to the [mqtt] section, e.g. broker_config
        self.http_extra = ""  # appended to the [http] section
        # Connections api() may hold open (aiohttp's default). Here the agents share the
        # client address 127.0.0.1, and with it the controller's per-client cap.
        self.client_connections = 100
        self._proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def config_text(self) -> str:
        plans = toml_string(str(self.plans_file)) if self.plans_file else '""'
        tls = ""
        if self.tls is not None:
            tls = (
                f"tls_cert_file = {toml_string(str(self.tls[0]))}\n"
                f"tls_key_file = {toml_string(str(self.tls[1]))}\n"
            )
        return (
            "[http]\n"
            f'listen = "{LOOPBACK}:{self.port}"\n'
            f"{self._token_lines()}"
            f"{tls}"
            f"{self.http_extra}"
            "[secrets]\n"
            f"key_file = {toml_string(str(self.key_file))}\n"
            "[database]\n"
            f"url = {toml_string(self.database_url)}\n"
            "[mqtt]\n"
            f'host = "{LOOPBACK}"\n'
            f"port = {self.mqtt_port}\n"
            f"client_id = {toml_string(self.client_id)}\n"
            f"username = {toml_string(self.mqtt_username)}\n"
            f"password_file = {toml_string(str(self.mqtt_password_file))}\n"
            + (f"ca_file = {toml_string(str(self.broker.ca_file))}\n" if self.mqtt_tls else "")
            + self.mqtt_extra
            + "[signing]\n"
            f"key_file = {toml_string(str(self.signing_key_file))}\n"
            "[plans]\n"
            f"file = {plans}\n"
            "[hosts]\n"
            f"offline_after_s = {self.offline_after_s}\n"
            "[log]\n"
            f'level = "{self.log_level}"\n'
            f'format = "{self.log_format}"\n'
            "[jobs]\n"
            f"allowed_images = [{', '.join(toml_string(i) for i in self.allowed_images)}]\n"
            f"{self.jobs_config}"
            f"{self.extra_config}"
        )

    def _token_lines(self) -> str:
        if not self.token_files:
            return (
                f"operator_token = {toml_string(self.operator_token)}\n"
                f"metrics_token = {toml_string(self.metrics_token)}\n"
            )
        return (
            f"operator_token_file = {toml_string(str(self.operator_token_file))}\n"
            f"metrics_token_file = {toml_string(str(self.metrics_token_file))}\n"
            f"agent_tokens_file = {toml_string(str(self.agent_tokens_file))}\n"
        )

    async def start(self, wait_s: float = 30.0) -> None:
        if self.running:
            return
        identity = await self.broker.identity(self.mqtt_username, "controller")
        self.mqtt_password_file.write_text(identity.password + "\n")
        self.config_path.write_text(self.config_text())
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with self.log_path.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "controller",
                "--config",
                str(self.config_path),
                stdout=log,
                stderr=log,
                cwd=ROOT,
                env=env,
            )
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            if not self.running:
                raise RuntimeError(f"controller exited during start:\n{self.log_text()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                status, _ = await self.api("GET", "/v1/hosts", timeout_s=2.0)
                if status == 200:
                    return
            if asyncio.get_running_loop().time() > deadline:
                await self.stop()
                raise RuntimeError(f"controller not ready in {wait_s}s:\n{self.log_text()}")
            await asyncio.sleep(0.1)

    async def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM (graceful), SIGKILL after `grace_s`; returns the exit code."""
        if self._proc is None:
            return None
        code = await _terminate(self._proc, grace_s)
        self._proc = None
        return code

    async def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        self._proc = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def api(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        token: str | None = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> tuple[int, Any]:
        """Call the HTTP API; `token` defaults to the operator token ("" sends none)."""
        if self._session is None or self._session.closed:
            ssl_context = None
            if self.tls is not None:
                ssl_context = ssl.create_default_context(cafile=str(self.tls[2]))
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    ssl=ssl_context if ssl_context else True, limit=self.client_connections
                )
            )
        token = self.operator_token if token is None else token
        sent = dict(headers or {})
        if token:
            sent["Authorization"] = f"Bearer {token}"
        async with self._session.request(
            method,
            self.url + path,
            json=json,
            data=data,
            headers=sent,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    async def new_agent_token(self, host: str) -> str:
        status, body = await self.api("POST", f"/v1/hosts/{host}/agent-tokens", {"name": "test"})
        assert status == 201, body
        token: str = body["token"]
        return token

    async def new_project_token(self, project_id: str) -> str:
        status, body = await self.api("POST", f"/v1/projects/{project_id}/tokens", {})
        assert status == 201, body
        token: str = body["token"]
        return token

    async def wait_host_online(self, host: str, wait_s: float = 10.0) -> None:
        """Wait until GET /v1/hosts lists `host` as online."""
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            status, body = await self.api("GET", "/v1/hosts")
            if status == 200 and any(h["name"] == host and h["online"] for h in body["hosts"]):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"host {host} not online after {wait_s}s: {body}")
            await asyncio.sleep(0.05)

    async def close_session(self) -> None:
        """Close `api`'s pooled connections (a test counting connections wants none)."""
        if self._session is not None:
            await self._session.close()

    async def close(self) -> None:
        await self.stop()
        await self.close_session()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- MQTT peers -----------------------------------------------------------------------


def now() -> datetime:
    return datetime.now(UTC)


def condition(
    status: ConditionStatus = "True", reason: str = "Running", type: str = "Ready"
) -> Condition:
    return Condition(
        type=type, status=status, reason=reason, message=reason, last_transition_time=now()
    )


class FakeAgent:
    """A host agent reduced to its protocol, for controller tests only.

    It connects with a retained "offline" last will, publishes presence and a retained
    HostStatus every `interval` seconds (and on `report()`), reconnecting if the broker
    restarts. Tests set `addons`, `removed` and `applied_generation` to what the host
    should claim. It runs no containers: it is a real MQTT peer, not a mock.
    """

    def __init__(
        self,
        host: str,
        broker: Mosquitto,
        *,
        cpus: float = 8.0,
        memory_mb: int = 16384,
        interval: float = 1.0,
    ) -> None:
        self.host = host
        self.broker = broker
        self.capacity = Capacity(cpus=cpus, memory_mb=memory_mb)
        self.interval = interval
        self.addons: list[AddonStatus] = []
        self.removed: list[str] = []
        self.applied_generation = 0
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._identity: MqttIdentity | None = None

    def status(self) -> HostStatus:
        return HostStatus(
            version=SCHEMA_VERSION,
            host=self.host,
            sent_at=now(),
            applied_generation=self.applied_generation,
            capacity=self.capacity,
            addons=tuple(self.addons),
            removed=tuple(self.removed),
        )

    def _presence(self, online: bool) -> bytes:
        return encode(Presence(version=SCHEMA_VERSION, host=self.host, online=online, at=now()))

    async def _run(self) -> None:
        will = aiomqtt.Will(topics.presence(self.host), self._presence(False), qos=1, retain=True)
        while True:
            try:
                # The broker uses the username (the host) as client id: one connection
                # per host, as with a real agent.
                async with self.broker.client(self._identity, will=will) as client:
                    await client.publish(
                        topics.presence(self.host), self._presence(True), qos=1, retain=True
                    )
                    self._client = client
                    self._connected.set()
                    while True:
                        # A lost connection shows here, within one interval; callers of
                        # report() retry on the stale client until then.
                        await self._send_status(client)
                        await asyncio.sleep(self.interval)
            except aiomqtt.MqttError:
                pass
            self._client = None
            self._connected.clear()
            await asyncio.sleep(0.2)

    async def _send_status(self, client: aiomqtt.Client) -> None:
        # Built and handed to paho in one step, so reports reach the broker in order.
        await client.publish(topics.status(self.host), encode(self.status()), qos=1, retain=True)

    async def _connected_client(
        self, send: Callable[[aiomqtt.Client], Awaitable[None]], wait_s: float
    ) -> None:
        """Run `send` on a live connection, waiting out a reconnect if needed."""
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            await asyncio.wait_for(self._connected.wait(), max(remaining, 0.01))
            client = self._client
            assert client is not None
            try:
                await send(client)
                return
            except aiomqtt.MqttError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def report(self, wait_s: float = 10.0) -> None:
        """Publish a HostStatus with the current fields now (waits for a connection)."""
        await self._connected_client(self._send_status, wait_s)

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, wait_s: float = 10.0
    ) -> None:
        """Publish anything (QoS 1) on this agent's connection, e.g. a broken payload."""

        async def send(client: aiomqtt.Client) -> None:
            await client.publish(topic, payload, qos=1, retain=retain)

        await self._connected_client(send, wait_s)

    async def job_result(
        self,
        job_id: str,
        project_id: str,
        exit_code: int | None,
        output: str = "",
        error: str | None = None,
    ) -> None:
        result = JobResult(
            version=SCHEMA_VERSION,
            host=self.host,
            job_id=job_id,
            project_id=project_id,
            exit_code=exit_code,
            output=output,
            started_at=now(),
            finished_at=now(),
            error=error,
        )
        await self.publish(topics.job_result(self.host, job_id), encode(result))

    async def __aenter__(self) -> Self:
        self._identity = await self.broker.identity(self.host)
        self._task = asyncio.create_task(self._run(), name=f"fake-agent-{self.host}")
        await self.report()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Say goodbye like a stopping agent would, so the host is offline at once.
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await self.publish(
                topics.presence(self.host), self._presence(False), retain=True, wait_s=2.0
            )
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def unsigned(raw: bytes, verifier: Verifier | None = None) -> bytes:
    """The DesiredState inside a signed envelope (verified when a verifier is given)."""
    if verifier is not None:
        return verifier.open(raw)
    return decode(raw, SignedDesiredState).payload


class DesiredWatcher:
    """Collects every DesiredState published for one host (retained ones included).

    Subscribes with a clean session and resubscribes after a broker restart, which
    delivers the retained snapshot again. `wait_for(predicate, since=mark)` returns the
    first collected state at index >= since that matches.
    """

    def __init__(self, host: str, broker: Mosquitto, verify_with: Path | None = None) -> None:
        self.host = host
        self.broker = broker
        # The controller's public key: payloads are verified as an agent would.
        self.verifier = Verifier.from_pem(verify_with.read_bytes()) if verify_with else None
        self.states: list[DesiredState] = []
        self.rejected: list[MessageRejected] = []
        self._changed = asyncio.Condition()
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def mark(self) -> int:
        return len(self.states)

    async def _run(self) -> None:
        identity = await self.broker.identity(f"watcher.{secrets.token_hex(4)}", "peer")
        while True:
            try:
                async with self.broker.client(identity) as client:
                    await client.subscribe(topics.desired(self.host), qos=1)
                    self._subscribed.set()
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        try:
                            state = decode(unsigned(message.payload, self.verifier), DesiredState)
                        except MessageRejected as exc:
                            self.rejected.append(exc)
                            continue
                        async with self._changed:
                            self.states.append(state)
                            self._changed.notify_all()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)

    async def wait_for(
        self,
        predicate: Callable[[DesiredState], bool] = lambda _: True,
        *,
        since: int = 0,
        wait_s: float = 10.0,
    ) -> DesiredState:
        def found() -> DesiredState | None:
            return next((s for s in self.states[since:] if predicate(s)), None)

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: found() is not None), wait_s)
            except TimeoutError:
                seen: Sequence[int] = [s.generation for s in self.states[since:]]
                raise AssertionError(
                    f"no matching DesiredState for {self.host} in {wait_s}s; "
                    f"generations seen since {since}: {list(seen)}"
                ) from None
        state = found()
        assert state is not None
        return state

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name=f"desired-watcher-{self.host}")
        await asyncio.wait_for(self._subscribed.wait(), 10)
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
