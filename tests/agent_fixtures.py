"""Fixtures that run real host agents (`python -m agent`) against the real dockerd.

Every agent gets a unique host name; everything it creates carries that name in the
`orkestr.host` label, and the fixture removes all of it afterwards, so leftovers never
confuse the next run. Images come from deploy/images/build.sh (run by deploy/services.sh).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent import firewall
from tests.docker_leaks import host_name
from tests.services import ControllerProcess, Mosquitto, create_database, drop_database, free_port

IMAGES = {
    "postgres": os.environ.get("ORKESTR_TEST_POSTGRES_IMAGE", "orkestr-local/postgres:15"),
    "redis": os.environ.get("ORKESTR_TEST_REDIS_IMAGE", "orkestr-local/redis:7"),
}
TOOLBOX = os.environ.get("ORKESTR_TEST_TOOLBOX_IMAGE", "orkestr-local/toolbox:bookworm")
ROOT = Path(__file__).resolve().parent.parent


def docker(*args: str, check: bool = True) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    if check and out.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def remove_host_objects(host: str) -> list[str]:
    """Remove what the host's agent made; returns what Docker would not remove."""
    # An agent stopped mid-request leaves dockerd to finish it (a network create on a
    # loaded daemon takes seconds, and lands after a first sweep): sweep until a look
    # half a second later finds nothing of the host's. The first half second removes the
    # agent's host-level egress chains (agent/firewall.py), which outlive it by design.
    left: list[str] = []
    for attempt in range(4):
        _remove_docker_objects(host)
        swept = time.monotonic()
        if attempt == 0:
            _remove_host_chains(host)
        time.sleep(max(0.0, swept + 0.5 - time.monotonic()))
        left = _host_objects(host)
        if not left:
            break
    if left:
        # Seen: a network Docker calls in use with no container on it, after 60 containers
        # on it were removed at once (moby/moby#42119; a dockerd restart clears it).
        print(f"host {host}: Docker would not remove {' '.join(left)}", file=sys.stderr)
    return left


def _remove_host_chains(host: str) -> None:
    for jump in firewall.host_jumps(host):
        while (
            subprocess.run(["iptables", "-w", "5", "-D", *jump], capture_output=True).returncode
            == 0
        ):
            pass
    for chain in firewall.chains(host):
        subprocess.run(["iptables", "-w", "5", "-F", chain], capture_output=True)
        subprocess.run(["iptables", "-w", "5", "-X", chain], capture_output=True)


def _host_objects(host: str) -> list[str]:
    """The host's containers, volumes and networks (the three lists asked at once)."""
    label = f"label=orkestr.host={host}"
    lists = [
        subprocess.Popen(
            ["docker", *kind, "-q", "--filter", label],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for kind in (("ps", "-a"), ("volume", "ls"), ("network", "ls"))
    ]
    return [name for proc in lists for name in proc.communicate(timeout=120)[0].split()]


def _remove_docker_objects(host: str) -> None:
    label = f"label=orkestr.host={host}"
    ids = docker("ps", "-aq", "--filter", label, check=False).split()
    if ids:
        docker("rm", "-f", "-v", *ids, check=False)
    vols = docker("volume", "ls", "-q", "--filter", label, check=False).split()
    if vols:
        docker("volume", "rm", "-f", *vols, check=False)
    for attempt in range(5):
        nets = docker("network", "ls", "-q", "--filter", label, check=False).split()
        if not nets:
            break
        if attempt:
            # A loaded daemon can keep the endpoint of a removed container a while.
            time.sleep(1)
            for net in nets:
                for endpoint in docker(
                    "network", "inspect", "-f", "{{range .Containers}}{{.Name}} {{end}}", net,
                    check=False,
                ).split():  # fmt: skip
                    docker("network", "disconnect", "-f", net, endpoint, check=False)
        docker("network", "rm", *nets, check=False)


def detach_loops(under: Path) -> None:
    """Loop devices of the add-on filesystems (agent/loopfs.py) whose images live under
    `under`, once their volumes are gone."""
    out = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    for line in out.splitlines():
        name, _, back = line.strip().partition(" ")
        if back.strip().startswith(str(under)):
            subprocess.run(["losetup", "-d", name], check=False)


def agent_capabilities() -> list[str]:
    """Run the agent with only the capabilities its systemd unit leaves it, as in production."""
    unit = (ROOT / "systemd" / "orkestr-agent.service").read_text()
    caps = next(
        line.split("=", 1)[1].split()
        for line in unit.splitlines()
        if line.startswith("CapabilityBoundingSet=")
    )
    # Only those this machine grants at all (a container may lack CAP_SYS_RESOURCE):
    # setpriv cannot add a capability its own bounding set does not hold.
    caps = [c for c in caps if c in _bounding_set()]
    keep = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
    return ["setpriv", f"--bounding-set={keep}", f"--inh-caps={keep}", "--"]


# The capability numbers the agent's unit names (linux/capability.h).
_CAP_NUMBERS = {
    "CAP_DAC_OVERRIDE": 1,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_RESOURCE": 24,
}


def _bounding_set() -> set[str]:
    status = Path("/proc/self/status").read_text()
    mask = int(status.split("CapBnd:")[1].split()[0], 16)
    return {name for name, bit in _CAP_NUMBERS.items() if mask >> bit & 1}


def has_capability(name: str) -> bool:
    return name in _bounding_set()


class AgentProcess:
    def __init__(
        self,
        host: str,
        broker: Mosquitto,
        controller_url: str,
        agent_token: str,
        sleep_tick_s: float = 0.5,
        agent_extra: str = "",
        log_format: str = "text",
        extra_config: str = "",
        ca_file: str = "",
        *,
        public_key_file: Path,
        tls: bool = False,
        own_metrics_token: bool = False,
        job_images: tuple[str, ...] = (),
    ) -> None:
        self.host = host
        self.broker = broker
        self.dir = Path(tempfile.mkdtemp(prefix=f"orkestr-agent-{host}-"))
        self.state_dir = self.dir / "state"
        self.metrics_port = free_port()
        # The scrape token, as deploy/up.sh makes it: /metrics answers 401 without it.
        self.metrics_token = secrets.token_urlsafe(24)
        self.metrics_token_file = self.dir / "metrics.token"
        self.metrics_token_file.write_text(self.metrics_token + "\n")
        token_line = f'token_file = "{self.metrics_token_file}"'
        if own_metrics_token:  # no token_file: the agent makes its own (read after start)
            self.metrics_token, token_line = "", ""
            self.metrics_token_file = self.state_dir / "metrics_token"
        self.log_path = self.dir / "agent.log"
        self.config_path = self.dir / "agent.toml"
        self.mqtt_password_file = self.dir / "mqtt.password"
        mqtt_port = broker.tls_port if tls else broker.port
        ca_line = f'ca_file = "{broker.ca_file}"' if tls else ""
        # The images jobs and apps may run on this host (the agent's default without it).
        jobs_line = f"jobs = {json.dumps(list(job_images))}" if job_images else ""
        self.config_path.write_text(
            f"""
[agent]
host = "{host}"
state_dir = "{self.state_dir}"
resync_interval_s = 2
heartbeat_s = 1
sleep_tick_s = {sleep_tick_s}
{agent_extra}
keeper_socket = "{self.dir / "keeper.sock"}"

[controller]
url = "{controller_url}"
agent_token = "{agent_token}"
ca_file = "{ca_file}"

[signing]
public_key_file = "{public_key_file}"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
password_file = "{self.mqtt_password_file}"
{ca_line}
keepalive_s = 5

[images]
postgres = "{IMAGES["postgres"]}"
redis = "{IMAGES["redis"]}"
{jobs_line}

[log]
format = "{log_format}"

[metrics]
listen = "127.0.0.1:{self.metrics_port}"
{token_line}
{extra_config}
"""
        )
        self.proc: asyncio.subprocess.Process | None = None
        self.keeper: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        identity = await self.broker.identity(self.host)
        self.mqtt_password_file.write_text(identity.password + "\n")
        if self.keeper is None:
            # The wake-socket keeper outlives agent restarts, as its systemd unit does.
            self.keeper = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent.keeper",
                "--socket",
                str(self.dir / "keeper.sock"),
                cwd=ROOT,
            )
        log = open(self.log_path, "ab")
        self.proc = await asyncio.create_subprocess_exec(
            *agent_capabilities(),
            sys.executable,
            "-m",
            "agent",
            "--config",
            str(self.config_path),
            cwd=ROOT,
            env={
                **os.environ,
                "ORKESTR_LOG_LEVEL": os.environ.get("ORKESTR_TEST_AGENT_LOG", "INFO"),
            },
            stdout=log,
            stderr=log,
        )
        log.close()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    async def restart_keeper(self) -> None:
        assert self.keeper is not None
        self.keeper.terminate()
        await self.keeper.wait()
        self.keeper = None
        if self.proc is not None and self.proc.returncode is None:
            # Start only the keeper: the agent keeps running.
            self.keeper = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent.keeper",
                "--socket",
                str(self.dir / "keeper.sock"),
                cwd=ROOT,
            )

    async def close(self) -> None:
        await self.stop()
        if self.keeper is not None and self.keeper.returncode is None:
            self.keeper.terminate()
            await self.keeper.wait()

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# Short sleep timeouts so the sleep tests run in seconds; Team never sleeps, so the other
# end-to-end tests use it and their add-ons stay awake however long a step takes.
TEST_PLANS = """
[starter]
max_addons = 1
cpus = 0.5
memory_mb = 256
sleep = { enabled = true, light_after_s = 3, deep_after_s = 8 }

[pro]
max_addons = 2
cpus = 1.0
memory_mb = 512
sleep = { enabled = true, light_after_s = 3, deep_after_s = 8 }

[team]
max_addons = 5
cpus = 1.0
memory_mb = 512
sleep = { enabled = false }
"""


class Stack:
    """A broker, a controller database and a controller of its own, for one test module."""

    # A test module may run a controller with other settings (a subclass of its own).
    controller_class: type[ControllerProcess] = ControllerProcess

    def __init__(self, plans: str = TEST_PLANS, *, tls: bool = False) -> None:
        self.plans = plans
        self.tls = tls
        self.dir = Path(tempfile.mkdtemp(prefix="orkestr-stack-"))
        self.mosquitto = Mosquitto(tls=tls)
        self.controller: ControllerProcess | None = None
        self.dsn = ""

    async def start(self) -> None:
        plans = self.dir / "plans.toml"
        plans.write_text(self.plans)
        await self.mosquitto.start()
        self.dsn = await create_database("orkestr_e2e")
        self.controller = self.controller_class(
            database_url=self.dsn,
            broker=self.mosquitto,
            mqtt_tls=self.tls,
            plans_file=plans,
            offline_after_s=10,
        )
        await self.controller.start()

    async def close(self) -> None:
        if self.controller is not None:
            await self.controller.close()
        await self.mosquitto.close()
        if self.dsn:
            await drop_database(self.dsn)
        shutil.rmtree(self.dir, ignore_errors=True)  # plans, broker config and credentials


@pytest.fixture(scope="module")
def plans_text() -> str:
    """Override in a test module to give its controller other plans."""
    return TEST_PLANS


@pytest.fixture(scope="module")
async def stack(plans_text: str) -> AsyncIterator[Stack]:
    s = Stack(plans_text)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


@contextlib.asynccontextmanager
async def running_agent(
    stack: Stack,
    agent_extra: str = "",
    extra_config: str = "",
    own_metrics_token: bool = False,
    job_images: tuple[str, ...] = (),
) -> AsyncIterator[AgentProcess]:
    """A fresh host agent registered with the stack's controller; removed with all it made."""
    assert stack.controller is not None
    host = host_name("t")
    token = await stack.controller.new_agent_token(host)
    proc = AgentProcess(
        host,
        stack.mosquitto,
        stack.controller.url,
        token,
        public_key_file=stack.controller.public_key_file,
        tls=stack.tls,
        agent_extra=agent_extra,
        extra_config=extra_config,
        own_metrics_token=own_metrics_token,
        job_images=job_images,
    )
    try:
        await proc.start()
        await wait_for(lambda: host_online(stack.controller, host), 30, f"host {host} online")
        yield proc
    finally:
        await proc.close()
        remove_host_objects(host)
        detach_loops(proc.dir)
        if os.environ.get("ORKESTR_TEST_VERBOSE"):
            print(proc.log_tail(200))
        shutil.rmtree(proc.dir, ignore_errors=True)  # it holds add-on passwords


class SharedAgent:
    """One agent for a module's tests that never stop, kill or reconfigure it: starting and
    removing an agent per test was a large share of those modules' set-up. Each test
    leases it; at the lease's end its projects are deleted and gone from Docker, so the next
    test starts with the agent holding nothing but its holder pool."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self._running: contextlib.AbstractAsyncContextManager[AgentProcess] | None = None
        self.proc: AgentProcess | None = None

    async def get(self) -> AgentProcess:
        if self.proc is None:
            self._running = running_agent(self.stack)
            self.proc = await self._running.__aenter__()
        return self.proc

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[AgentProcess]:
        proc = await self.get()
        try:
            yield proc
        finally:
            await delete_projects(self.stack, proc.host)

    async def close(self) -> None:
        """Stopped and removed with all it made, and offline for the controller (at once
        after a clean shutdown; a stop that had to kill it takes `offline_after_s`): a test's
        own agent, then the only host online, gets the test's projects. With its projects
        deleted this host would otherwise tie with a new one for placement."""
        running, self._running, proc = self._running, None, self.proc
        self.proc = None
        if running is None or proc is None:
            return
        await running.__aexit__(None, None, None)
        c = self.stack.controller
        assert c is not None
        await wait_for(
            lambda: _offline(c, proc.host), 60, f"host {proc.host} offline", interval=0.1
        )


@pytest.fixture(scope="module")
async def shared_agent(stack: Stack) -> AsyncIterator[SharedAgent]:
    """A module opts in with an `agent` fixture of its own that leases this one."""
    shared = SharedAgent(stack)
    try:
        yield shared
    finally:
        await shared.close()


@pytest.fixture
async def agent(
    request: pytest.FixtureRequest, stack: Stack, shared_agent: SharedAgent
) -> AsyncIterator[AgentProcess]:
    """A host agent registered with the module's controller; removed with all it made.

    A fresh one per test; in a module marked `shared_agent` (its `pytestmark`), the module's
    one agent, leased by each test (`SharedAgent`), but for a test marked `own_agent` (it
    stops, kills or restarts its agent, or counts on a fresh one): that one gets a fresh
    agent, with the shared one stopped and offline first so that the controller places the
    test's projects on the fresh one. Such tests run after the module's others
    (tests/conftest.py), so the shared agent starts and stops once."""
    node = request.node
    if node.get_closest_marker("shared_agent") and not node.get_closest_marker("own_agent"):
        async with shared_agent.lease() as proc:
            yield proc
        return
    await shared_agent.close()  # nothing to do unless the module's agent ran
    async with running_agent(stack) as proc:
        yield proc


async def delete_projects(stack: Stack, host: str) -> None:
    """Delete the projects placed on `host`; wait until the controller has purged them (the
    agent confirmed every add-on gone) and Docker holds nothing labelled with them."""
    c = stack.controller
    assert c is not None
    status, body = await c.api("GET", "/v1/projects?limit=500")
    assert status == 200, body
    ids = [p["id"] for p in body["projects"] if p["host"] == host]
    for pid in ids:
        status, body = await c.api("DELETE", f"/v1/projects/{pid}")
        assert status in (202, 404), (pid, status, body)

    async def gone() -> bool:
        for pid in ids:
            status, _ = await c.api("GET", f"/v1/projects/{pid}")
            if status != 404:
                return False
        return not any(
            docker(*kind, "-q", "--filter", f"label=orkestr.project={pid}", check=False)
            for pid in ids
            for kind in (("ps", "-a"), ("volume", "ls"), ("network", "ls"))
        )

    await wait_for(gone, 60, f"projects {ids} deleted", interval=0.1)


async def wait_for(check: Any, timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll `check` (sync or async) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while True:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def metrics(port: int, token: str) -> dict[str, float]:
    """One GET of an agent's /metrics on loopback, with its scrape token: series -> value.
    OSError if it does not listen."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )
        await writer.drain()
        text = (await asyncio.wait_for(reader.read(), 10)).decode()
    finally:
        writer.close()
        await writer.wait_closed()
    out: dict[str, float] = {}
    for line in text.partition("\r\n\r\n")[2].splitlines():
        series, _, value = line.rpartition(" ")
        if series and not line.startswith("#"):
            out[series] = float(value)
    return out


async def agent_metric(agent: AgentProcess, series: str) -> float | None:
    """One sample's value from the agent's /metrics, e.g. 'name{label="v"}'; None if absent."""
    try:
        return (await metrics(agent.metrics_port, agent.metrics_token)).get(series)
    except OSError:
        return None  # not listening (yet): a starting or stopped agent


PASSES = 'orkestr_agent_reconcile_total{result="success"}'


async def wait_passes(agent: AgentProcess, at_least: float, timeout: float = 30) -> None:
    """Until the agent process has finished `at_least` clean reconcile passes in all."""

    async def done() -> bool:
        return (await agent_metric(agent, PASSES) or 0) >= at_least

    await wait_for(done, timeout, f"{at_least:g} reconcile passes", interval=0.1)


async def more_passes(agent: AgentProcess, count: int, timeout: float = 30) -> None:
    """Until the agent finished `count` more clean passes than it has now."""
    await wait_passes(agent, (await agent_metric(agent, PASSES) or 0) + count, timeout)


async def wait_status_after(
    controller: ControllerProcess, host: str, when: datetime, timeout: float = 30
) -> None:
    """Until the controller has stored a status the agent sent after `when`."""

    async def newer() -> bool:
        _, body = await controller.api("GET", "/v1/hosts")
        seen = next((h["last_seen"] for h in body["hosts"] if h["name"] == host), None)
        return seen is not None and datetime.fromisoformat(seen) > when

    await wait_for(newer, timeout, f"a status from {host} sent after {when}")


async def _offline(controller: ControllerProcess, host: str) -> bool:
    return not await host_online(controller, host)


async def host_online(controller: ControllerProcess, host: str) -> bool:
    status, body = await controller.api("GET", "/v1/hosts")
    assert status == 200, body
    return any(h["name"] == host and h["online"] for h in body["hosts"])


def container_state(name: str) -> dict[str, Any]:
    found = json.loads(docker("inspect", name, check=False) or "[]")
    return found[0]["State"] if found else {}


# --- API helpers for end-to-end tests ------------------------------------------------------

# How often the waits below ask the controller (a GET is a few ms of its time): an add-on's
# phase or a job's end is seen 0.05 s after it, on average, rather than 0.125 s.
API_POLL_S = 0.1


async def create_project(c: ControllerProcess, plan: str, name: str = "") -> dict[str, Any]:
    status, body = await c.api(
        "POST", "/v1/projects", {"name": name or f"p-{uuid.uuid4().hex[:6]}", "plan": plan}
    )
    assert status == 201, body
    return body  # type: ignore[no-any-return]


async def create_addon(
    c: ControllerProcess, project_id: str, name: str, kind: str
) -> dict[str, Any]:
    status, body = await c.api(
        "POST", f"/v1/projects/{project_id}/addons", {"name": name, "kind": kind}
    )
    assert status == 201, body
    return body  # type: ignore[no-any-return]


async def addon(c: ControllerProcess, project_id: str, addon_id: str) -> dict[str, Any]:
    status, body = await c.api("GET", f"/v1/projects/{project_id}/addons/{addon_id}")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


async def wait_phase(
    c: ControllerProcess, project_id: str, addon_id: str, phase: str, timeout: float = 90
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        view = await addon(c, project_id, addon_id)
        return view if view["phase"] == phase else None

    return await wait_for(check, timeout, f"add-on {addon_id} {phase}", API_POLL_S)  # type: ignore[no-any-return]


async def run_job(
    c: ControllerProcess, project_id: str, script: str, timeout: float = 120, image: str = TOOLBOX
) -> dict[str, Any]:
    """Run `sh -c script` as a one-off job on the project network; return the finished job."""
    status, body = await c.api(
        "POST",
        f"/v1/projects/{project_id}/jobs",
        {"image": image, "command": ["sh", "-c", script], "timeout_s": timeout},
    )
    assert status == 201, body
    job_id = body["id"]

    async def finished() -> dict[str, Any] | None:
        s, job = await c.api("GET", f"/v1/projects/{project_id}/jobs/{job_id}")
        assert s == 200, job
        return job if job["state"] in ("succeeded", "failed") else None

    return await wait_for(finished, timeout + 30, f"job {job_id}", API_POLL_S)  # type: ignore[no-any-return]
