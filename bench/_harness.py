"""Shared set-up for the benchmarks in bench/.

- `Bench`: a mosquitto broker, a controller (with the benchmark's plans file) and a host
  agent, each a real separate process, with a unique host name. Everything created on
  Docker carries `orkestr.host=<host>` and is removed by `close()` (through
  tests.agent_fixtures.remove_host_objects), whatever happened.
- API helpers: projects, add-ons, connection details, deletion.
- `Client`: a toolbox container on a project network (`sleep infinity`) plus a Python
  client process living in that container's network namespace (bench/_client.py under
  nsenter), driven over JSON lines. It can also `docker exec` tools (pgbench,
  redis-benchmark) in the toolbox container.
- `Plain`: an equivalent plain database container (the agent's own container spec, with
  the agent's label removed so the agent never sees it), for baselines.
- statistics and table printing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import aiodocker
import msgspec

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent import model, placement, specs  # noqa: E402
from agent.secrets import SecretStore  # noqa: E402
from controller.env import variable_name  # noqa: E402
from schemas.messages import PORTS, AddonSpec, Resources  # noqa: E402
from tests.agent_fixtures import (  # noqa: E402
    IMAGES,
    TOOLBOX,
    AgentProcess,
    detach_loops,
    remove_host_objects,
)
from tests.services import (  # noqa: E402
    ControllerProcess,
    Mosquitto,
    create_database,
    drop_database,
)

CLIENT_SCRIPT = Path(__file__).resolve().parent / "_client.py"
LABEL_HOST = model.LABEL_HOST
LABEL_BENCH = "orkestr.bench"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- docker CLI ------------------------------------------------------------------------


def docker_cli(*args: str, check: bool = True, timeout: float = 300) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} ...: {out.stderr.strip()}")
    return out.stdout.strip()


async def adocker_cli(*args: str, check: bool = True) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    code = proc.returncode or 0
    if check and code != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} ...: {err.decode().strip()}")
    return code, out.decode(), err.decode()


# --- statistics and output -------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def rnd(x: float, digits: int = 3) -> float:
    return round(x, digits) if x == x else x  # keeps NaN


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def machine_facts() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    server = docker_cli("version", "--format", "{{.Server.Version}}", check=False)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "docker_server": server,
        "python": platform.python_version(),
    }


def code_state(root: Path = ROOT, ref: str = "") -> dict[str, Any]:
    """Which code was measured: other engineers edit agent/ and controller/ meanwhile."""
    import hashlib

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout

    digest = hashlib.sha256()
    for d in ("agent", "controller", "schemas"):
        for f in sorted((root / d).rglob("*.py")):
            digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    if ref:
        return {
            "source": f"git archive of {ref} (ORKESTR_BENCH_CODE)",
            "head": git("rev-parse", "--short", ref).strip(),
            "modified": [],
            "sources_sha256": digest.hexdigest()[:16],
        }
    dirty = git("status", "--porcelain", "--", "agent", "controller", "schemas")
    return {
        "source": "working tree",
        "head": git("rev-parse", "--short", "HEAD").strip(),
        "modified": sorted(line[3:] for line in dirty.splitlines() if line.strip()),
        "sources_sha256": digest.hexdigest()[:16],
    }


def export_code(ref: str, into: Path) -> Path:
    """`git archive <ref>` of the services' packages (and the agent unit the launcher reads)."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", ref, "agent", "controller", "schemas", "systemd"],
        cwd=ROOT, capture_output=True, check=True,
    )  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def activity(own_host: str) -> dict[str, Any]:
    """Signs of other work on the machine (other engineers' tests may share it)."""
    labels = docker_cli("ps", "--format", '{{.Label "orkestr.host"}}', check=False)
    hosts = labels.splitlines() if labels else []
    return {
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "other_running_containers": sum(1 for h in hosts if h != own_host),
    }


def cpu_ms(pids: Sequence[int]) -> float:
    """CPU time (user + system, with reaped children) of these processes so far, in ms."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total * 1000 / tick


def container_cpu_ns(container_id: str) -> int | None:
    """CPU time every process of a container has used so far (its cgroup's), in ns: the
    server's own work and, on this side of a veth, part of the network stack's. None when
    the cgroup is not where Docker's cgroupfs or systemd driver puts it."""
    v1 = (f"docker/{container_id}", f"system.slice/docker-{container_id}.scope")
    for sub in v1:
        with contextlib.suppress(OSError), open(f"/sys/fs/cgroup/cpuacct/{sub}/cpuacct.usage") as f:
            return int(f.read())
    for sub in (f"docker/{container_id}", f"system.slice/docker-{container_id}.scope"):
        with contextlib.suppress(OSError), open(f"/sys/fs/cgroup/{sub}/cpu.stat") as f:
            for line in f:
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) * 1000
    return None


def container_memory(container_id: str) -> dict[str, int]:
    """A container's memory cgroup (v1): usage, page cache, dirty and writeback bytes and
    how often it hit its limit; {} where there is no such cgroup."""
    keys = ("total_cache", "total_dirty", "total_writeback", "total_rss")
    for sub in (f"docker/{container_id}", f"system.slice/docker-{container_id}.scope"):
        base = f"/sys/fs/cgroup/memory/{sub}"
        try:
            with open(f"{base}/memory.stat") as f:
                stat = dict(line.split() for line in f)
            with open(f"{base}/memory.usage_in_bytes") as f:
                usage = int(f.read())
            with open(f"{base}/memory.failcnt") as f:
                failcnt = int(f.read())
        except OSError:
            continue
        return {
            "mem_usage": usage,
            "mem_failcnt": failcnt,
            **{k: int(stat[k]) for k in keys if k in stat},
        }
    return {}


def host_cpuset() -> str:
    """Every core this process may run on, the set the agent places add-ons within."""
    return placement.cpuset(sorted(os.sched_getaffinity(0)))


def deep_wake_mode() -> str:
    """ORKESTR_BENCH_DEEP_WAKE: the agent's deep_wake ("queue", its default, or "relay")."""
    mode = os.environ.get("ORKESTR_BENCH_DEEP_WAKE", "queue")
    if mode not in ("queue", "relay"):
        raise SystemExit(f"ORKESTR_BENCH_DEEP_WAKE: queue or relay, not {mode!r}")
    return mode


def plans_toml(
    *,
    cpus: float,
    memory_mb: int,
    light_after_s: float = 300,
    deep_after_s: float = 1800,
    max_addons: int = 50,
    pro_sleep: tuple[float, float] = (300, 1800),
    storage_mb: int | None = None,
) -> str:
    """A plans file: `starter` sleeps after the given timeouts, `pro` after `pro_sleep`'s
    (light, deep), `team` never sleeps. `storage_mb`: every plan's storage quota, so each
    add-on's data lives on its own loop filesystem (agent/loopfs.py), as in the shipped
    plans; None: a plain Docker volume."""
    quota = f"storage_mb = {storage_mb}\n" if storage_mb else ""
    return f"""
[starter]
max_addons = {max_addons}
cpus = {cpus}
memory_mb = {memory_mb}
{quota}sleep = {{ enabled = true, light_after_s = {light_after_s}, deep_after_s = {deep_after_s} }}

[pro]
max_addons = {max_addons}
cpus = {cpus}
memory_mb = {memory_mb}
{quota}sleep = {{ enabled = true, light_after_s = {pro_sleep[0]}, deep_after_s = {pro_sleep[1]} }}

[team]
max_addons = {max_addons}
cpus = {cpus}
memory_mb = {memory_mb}
{quota}sleep = {{ enabled = false }}
"""


# --- connection details ----------------------------------------------------------------


def credentials(env: dict[str, str], addon_name: str) -> dict[str, Any]:
    """The client-command fields for an add-on, from the project's env variables."""
    url = urllib.parse.urlsplit(env[variable_name(addon_name)])
    password = urllib.parse.unquote(url.password or "")
    if url.scheme.startswith("postgres"):
        return {
            "kind": "postgres",
            "host": url.hostname,
            "port": url.port or 5432,
            "user": urllib.parse.unquote(url.username or ""),
            "password": password,
            "database": url.path.lstrip("/"),
        }
    return {"kind": "redis", "host": url.hostname, "port": url.port or 6379, "password": password}


# --- the stack ------------------------------------------------------------------------


def stop_leftovers(private_dir: Path) -> None:
    """SIGTERM (by pid) any process still naming our agent's private temp dir.

    The agent may start helpers that outlive it on purpose (the wake-socket keeper); they
    carry a path under the agent's unique temp dir on their command line.
    """
    marker = str(private_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGTERM)
                log(f"stopped leftover process {entry.name}: {command}")


class Bench:
    """Broker + controller + agent processes for one benchmark run, and their clean-up."""

    def __init__(
        self,
        plans: str,
        sleep_tick_s: float = 0.5,
        intervals: tuple[float, float] | None = None,
        agent_extra: str = "",
    ) -> None:
        """ORKESTR_BENCH_CODE=<git ref> runs the controller, agent and keeper from a
        `git archive` of that ref instead of the working tree (e.g. while the working
        tree is mid-edit); the results record which code ran."""
        self.plans = plans
        self.sleep_tick_s = sleep_tick_s
        # (resync_interval_s, heartbeat_s) for the agent; None: the tests' brisk 2 s and 1 s.
        self.intervals = intervals
        self.agent_extra = agent_extra  # more [agent] settings, e.g. deep_wake = "relay"
        self.host = f"bench-{uuid.uuid4().hex[:10]}"
        self.dir = Path(tempfile.mkdtemp(prefix="orkestr-bench-"))
        self.mosquitto = Mosquitto()
        self.controller: ControllerProcess | None = None
        self.agent: AgentProcess | None = None
        self.dsn = ""
        self.docker = aiodocker.Docker()
        self.clients: list[Client] = []
        self.code: dict[str, Any] = {}
        self.secrets = SecretStore(self.dir / "plain-secrets")
        self.secrets.ensure_root()

    def service_pids(self) -> list[int]:
        """The agent, its keeper and the controller: this run's own services."""
        procs = [self.agent and self.agent.proc, self.agent and self.agent.keeper]
        pids = [p.pid for p in procs if p]
        if self.controller is not None and self.controller.pid is not None:
            pids.append(self.controller.pid)
        return pids

    @property
    def c(self) -> ControllerProcess:
        assert self.controller is not None
        return self.controller

    async def __aenter__(self) -> Bench:
        try:
            await self.start()
        except BaseException:
            if self.agent is not None:
                print(f"agent log (tail):\n{self.agent.log_tail(60)}", file=sys.stderr)
            if self.controller is not None:
                tail = "\n".join(self.controller.log_text().splitlines()[-40:])
                print(f"controller log (tail):\n{tail}", file=sys.stderr)
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        log(f"host {self.host}: starting broker, controller and agent")
        ref = os.environ.get("ORKESTR_BENCH_CODE", "")
        if ref:
            import tests.agent_fixtures
            import tests.services

            code = export_code(ref, self.dir / "code")
            # The process launchers run `python -m ...` with this as cwd (and PYTHONPATH):
            # the exported packages shadow the editable install of the working tree.
            tests.services.ROOT = code
            tests.agent_fixtures.ROOT = code
            self.code = code_state(code, ref)
        else:
            self.code = code_state()
        log(f"code: {self.code}")
        plans = self.dir / "plans.toml"
        plans.write_text(self.plans)
        await self.mosquitto.start()
        self.dsn = await create_database("orkestr_bench")
        self.controller = ControllerProcess(
            database_url=self.dsn,
            broker=self.mosquitto,
            plans_file=plans,
            offline_after_s=15,
        )
        # The bench's calls come from the agent's address (loopback): a burst of 60 calls
        # on up to 100 connections, beside the agent's own, could pass the controller's
        # per-client cap (128) and get 503 too_many_connections.
        self.controller.client_connections = 32
        await self.controller.start()
        self.agent = AgentProcess(
            self.host,
            self.mosquitto,
            self.controller.url,
            await self.controller.new_agent_token(self.host),
            sleep_tick_s=self.sleep_tick_s,
            agent_extra=self.agent_extra,
            public_key_file=self.controller.public_key_file,
        )
        if self.intervals is not None:
            resync, heartbeat = self.intervals
            text = self.agent.config_path.read_text()
            text = text.replace("resync_interval_s = 2\n", f"resync_interval_s = {resync}\n")
            text = text.replace("heartbeat_s = 1\n", f"heartbeat_s = {heartbeat}\n")
            self.agent.config_path.write_text(text)
        if docker_url := os.environ.get("ORKESTR_BENCH_AGENT_DOCKER", ""):
            # A profiling aid (e.g. a proxy that logs the agent's Docker calls): not figures.
            with self.agent.config_path.open("a") as f:
                f.write(f'\n[docker]\nurl = "{docker_url}"\n')
        await self.agent.start()
        await self.controller.wait_host_online(self.host, 30)

    async def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()
        if self.agent is not None:
            with contextlib.suppress(Exception):
                # close() also ends the agent's helper processes (the wake-socket keeper).
                await getattr(self.agent, "close", self.agent.stop)()
            stop_leftovers(self.agent.dir)
            keep = os.environ.get("ORKESTR_BENCH_AGENT_LOG", "")
            if keep.endswith(".log"):  # a file to keep the whole log in
                shutil.copyfile(self.agent.log_path, keep)
            elif keep:
                print(self.agent.log_tail(400), file=sys.stderr)
        # The agent is stopped: nothing recreates what is removed now.
        left = await asyncio.to_thread(remove_host_objects, self.host)
        if self.controller is not None:
            with contextlib.suppress(Exception):
                await self.controller.stop()
            keep = os.environ.get("ORKESTR_BENCH_CONTROLLER_LOG", "")
            if keep.endswith(".log") and self.controller.log_path.exists():
                shutil.copyfile(self.controller.log_path, keep)
            with contextlib.suppress(Exception):
                await self.controller.close()
        with contextlib.suppress(Exception):
            await self.mosquitto.close()
        if self.dsn:
            with contextlib.suppress(Exception):
                await drop_database(self.dsn)
        await self.docker.close()
        if self.agent is not None:
            # The volumes are gone: their loop-mounted filesystems can let go of the images.
            detach_loops(self.agent.dir)
            shutil.rmtree(self.agent.dir, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        log(f"host {self.host}: " + (f"left by Docker: {left}" if left else "everything removed"))

    # --- API ----------------------------------------------------------------------------
    async def api(self, method: str, path: str, body: Any = None, want: int = 200) -> Any:
        status, out = await self.c.api(method, path, body)
        if status != want:
            raise RuntimeError(f"{method} {path}: {status} {out}")
        return out

    async def project(self, plan: str) -> dict[str, Any]:
        name = f"bench-{uuid.uuid4().hex[:8]}"
        return await self.api("POST", "/v1/projects", {"name": name, "plan": plan}, 201)  # type: ignore[no-any-return]

    async def create_addon(self, project_id: str, name: str, kind: str) -> dict[str, Any]:
        return await self.api(  # type: ignore[no-any-return]
            "POST", f"/v1/projects/{project_id}/addons", {"name": name, "kind": kind}, 201
        )

    async def addon(self, project_id: str, addon_id: str) -> dict[str, Any]:
        return await self.api("GET", f"/v1/projects/{project_id}/addons/{addon_id}")  # type: ignore[no-any-return]

    async def env(self, project_id: str) -> dict[str, str]:
        return (await self.api("GET", f"/v1/projects/{project_id}/env"))["env"]  # type: ignore[no-any-return]

    async def wait_phase(
        self, project_id: str, addon_id: str, phase: str, timeout: float = 120
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            view = await self.addon(project_id, addon_id)
            if view["phase"] == phase:
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(f"add-on {addon_id} not {phase} after {timeout}s: {view}")
            await asyncio.sleep(0.1)

    async def delete_addon(self, project_id: str, addon_id: str, timeout: float = 60) -> None:
        """Delete through the API and wait until its containers are gone."""
        await self.api("DELETE", f"/v1/projects/{project_id}/addons/{addon_id}", want=202)
        deadline = time.monotonic() + timeout
        while True:
            left = [
                n
                for n in (model.db_name(addon_id), model.holder_name(addon_id))
                if await self.state_of(n) != "missing"
            ]
            if not left:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"add-on {addon_id} containers still there: {left}")
            await asyncio.sleep(0.2)

    async def ready_addon(self, project_id: str, name: str, kind: str) -> dict[str, Any]:
        a = await self.create_addon(project_id, name, kind)
        await self.wait_phase(project_id, a["id"], "ready")
        return a

    # --- docker -------------------------------------------------------------------------
    async def state_of(self, name: str) -> str:
        try:
            info = await self.docker.containers.container(name).show()
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return "missing"
            raise
        return str(info["State"]["Status"])

    async def wait_state(
        self, name: str, state: str, timeout: float = 60, interval: float = 0.02
    ) -> float:
        """Poll the container state; returns the monotonic time it was first seen."""
        deadline = time.monotonic() + timeout
        while True:
            if await self.state_of(name) == state:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not {state} after {timeout}s")
            await asyncio.sleep(interval)

    async def ip_on(self, container: str, network: str) -> str:
        info = await self.docker.containers.container(container).show()
        return str(info["NetworkSettings"]["Networks"][network]["IPAddress"])

    async def home_cores(self, addon_id: str, timeout_s: float = 30.0) -> str:
        """An add-on database's cpuset once the agent has placed it ("" when it places
        nothing within timeout_s)."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = await self.docker.containers.container(model.db_name(addon_id)).show()
            cores = str((info.get("HostConfig") or {}).get("CpusetCpus") or "")
            if cores or time.monotonic() >= deadline:
                return cores
            await asyncio.sleep(0.5)

    async def client(self, project_id: str) -> Client:
        client = Client(self, model.network_name(project_id))
        await client.start()
        self.clients.append(client)
        return client

    def plain(self, kind: str, network: str, resources: Resources, shared_netns: bool) -> Plain:
        return Plain(self, kind, network, resources, shared_netns)


# --- docker events, for "where did the time go" breakdowns -----------------------------


class EventLog:
    """Collects Docker events (containers, volumes, networks) for objects of this host.

    Every event is stored with its monotonic time, converted from the daemon's wall clock
    (same machine) with an offset taken when the log starts.
    """

    def __init__(self, bench: Bench, volumes: bool = False) -> None:
        """volumes: volume events too (Docker matches a label filter against an event's
        attributes, and a volume's carry no labels): all of the daemon's, picked by name."""
        self.bench = bench
        self.volumes = volumes
        self.events: list[tuple[float, str, str, str]] = []  # (mono, type, action, name)
        self.offset = time.monotonic() - time.time()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> EventLog:
        self._task = asyncio.create_task(self._pump())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _pump(self) -> None:
        filters = {"label": [f"{LABEL_HOST}={self.bench.host}"]}
        if self.volumes:
            filters = {"type": ["container", "volume"]}
        params = {"filters": json.dumps(filters)}
        async with self.bench.docker._query("events", params=params, timeout=None) as response:
            self._ready.set()
            async for line in response.content:
                if not line.strip():
                    continue
                e = json.loads(line)
                actor = e.get("Actor") or {}
                name = (actor.get("Attributes") or {}).get("name") or actor.get("ID", "")
                mono = e["timeNano"] / 1e9 + self.offset
                self.events.append((mono, e.get("Type", ""), e.get("Action", ""), name))

    def first(self, type_: str, action: str, name: str, after: float) -> float | None:
        for mono, t, a, n in self.events:
            if t == type_ and a == action and n == name and mono >= after:
                return mono
        return None


# --- a client on a project network -----------------------------------------------------


class Client:
    def __init__(self, bench: Bench, network: str) -> None:
        self.bench = bench
        self.network = network
        self.name = f"bench-client-{uuid.uuid4().hex[:10]}"
        self.proc: asyncio.subprocess.Process | None = None
        self.ip = ""

    async def start(self) -> None:
        await adocker_cli(
            "run", "-d", "--name", self.name, "--network", self.network,
            "--label", f"{LABEL_HOST}={self.bench.host}", "--label", f"{LABEL_BENCH}=client",
            TOOLBOX, "sleep", "infinity",
        )  # fmt: skip
        info = await self.bench.docker.containers.container(self.name).show()
        pid = int(info["State"]["Pid"])
        self.ip = info["NetworkSettings"]["Networks"][self.network]["IPAddress"]
        # In this client's namespace only: ask ARP again every ~10 ms (default: 1 s, 3
        # times). A client that tries an address before its container is up would
        # otherwise wait for the next 1 s retry, which quantises start-up timings to
        # whole seconds for any system under test alike.
        iface = "eth0"
        await asyncio.to_thread(
            subprocess.run,
            ["nsenter", f"--net=/proc/{pid}/ns/net", "sysctl", "-q", "-w",
             f"net.ipv4.neigh.{iface}.retrans_time_ms=10", f"net.ipv4.neigh.{iface}.mcast_solicit=100"],
            check=True,
        )  # fmt: skip
        self.proc = await asyncio.create_subprocess_exec(
            "nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, str(CLIENT_SCRIPT),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=1 << 20,
        )  # fmt: skip
        hello = await self._read(30)
        assert hello.get("event") == "hello", hello

    async def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError("the benchmark client exited")
        return json.loads(line)  # type: ignore[no-any-return]

    async def _send(self, cmd: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()

    async def once(self, target: dict[str, Any], timeout: float = 90) -> dict[str, Any]:
        """One fresh connection and first query, timed inside the client."""
        await self._send({"op": "once", **target, "timeout_s": timeout})
        return await self._read(timeout + 10)

    async def poll_start(self, target: dict[str, Any], **options: Any) -> dict[str, Any]:
        """Start polling (connect + first query every few ms); returns once armed."""
        await self._send({"op": "poll", **target, **options})
        armed = await self._read(30)
        assert armed.get("event") == "armed", armed
        return armed

    async def poll_result(self, timeout: float = 180) -> dict[str, Any]:
        return await self._read(timeout)

    async def load(
        self, target: dict[str, Any], mode: str, clients: int, seconds: float
    ) -> dict[str, Any]:
        """A pool of `clients` connections opened at one instant, then a closed loop on
        each for `seconds` (see bench/_client.py, op "load")."""
        await self._send(
            {"op": "load", **target, "mode": mode, "clients": clients, "seconds": seconds}
        )
        return await self._read(seconds + 180)

    async def resolve(self, name: str) -> str | None:
        await self._send({"op": "resolve", "name": name})
        return (await self._read(10)).get("ip")

    async def sh(self, *argv: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
        """Run a tool in the toolbox container (docker exec); returns stdout."""
        env_args = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        proc = await asyncio.create_subprocess_exec(
            "docker", "exec", *env_args, self.name, *argv,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {err.decode()[-2000:]}")
        return out.decode()

    async def pin_away_from(self, cores: str) -> str:
        """Confine the toolbox container (and every tool `sh` runs in it) to the host
        cores outside `cores`, a server's cpuset; every host core when that leaves none.
        Returns the cpuset applied."""
        rest = sorted(set(os.sched_getaffinity(0)) - placement.cpus_of(cores)) if cores else []
        applied = placement.cpuset(rest) if rest else host_cpuset()
        body = json.dumps({"CpusetCpus": applied})
        await self.bench.docker._query_json(
            f"containers/{self.name}/update", method="POST", data=body
        )
        return applied

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self._send({"op": "quit"})
                await asyncio.wait_for(self.proc.wait(), 5)
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        await adocker_cli("rm", "-f", "-v", self.name, check=False)


# --- plain containers for baselines ----------------------------------------------------


class Plain:
    """The agent's own container spec for an add-on, run without the agent.

    Same image, command, env (POSTGRES_PASSWORD_FILE, ...), secret files (written by the
    agent's SecretStore), volume, CPU and memory limits and stop signal. The only label
    kept is `orkestr.host` (for clean-up), so the agent never observes these containers.

    shared_netns=False: one container straight on the network under the alias `name`
    (what a user would `docker run`). shared_netns=True: a plain holder (`sleep
    infinity`) on the network plus the database in its namespace, the same topology as an
    add-on, so a stopped database keeps its address.
    """

    def __init__(
        self, bench: Bench, kind: str, network: str, resources: Resources, shared_netns: bool
    ) -> None:
        self.bench = bench
        self.kind = kind
        self.network = network
        self.id = uuid.uuid4().hex
        self.name = f"plain-{self.id[:8]}"  # the DNS alias on the network
        self.password = secrets.token_urlsafe(24)
        self.resources = resources
        self.shared_netns = shared_netns
        self.db_name = f"bench-{self.id[:12]}-db"
        self.holder_name = f"bench-{self.id[:12]}-net"
        self.volume = f"bench-{self.id[:12]}-data"
        addon = AddonSpec(id=self.id, name=self.name, kind=kind, resources=resources)  # type: ignore[arg-type]
        images = specs.Images(postgres=IMAGES["postgres"], redis=IMAGES["redis"])
        bench.secrets.write(self.id, kind, self.password, 1)
        secret_dir = str(bench.secrets.dir(self.id))
        db = specs.db_spec("0" * 32, addon, images, secret_dir)
        mounts = tuple(
            msgspec.structs.replace(m, source=self.volume) if m.kind == "volume" else m
            for m in db.mounts
        )
        if shared_netns:
            holder = specs.holder_spec("0" * 32, addon, images)
            holder = msgspec.structs.replace(holder, name=self.holder_name, network=network)
            self.holder_body: dict[str, Any] | None = self._body(holder)
            db = msgspec.structs.replace(
                db, name=self.db_name, mounts=mounts, netns_of=self.holder_name
            )
        else:
            self.holder_body = None
            db = msgspec.structs.replace(
                db, name=self.db_name, mounts=mounts, netns_of=None, network=network,
                aliases=(self.name,),
            )  # fmt: skip
        self.db_body = self._body(db)

    def _body(self, spec: specs.ContainerSpec) -> dict[str, Any]:
        body = specs.create_body(spec, self.bench.host)
        body["Labels"] = {LABEL_HOST: self.bench.host, LABEL_BENCH: "plain"}
        for m in body["HostConfig"]["Mounts"]:  # type: ignore[index]
            if m["Type"] == "volume":
                m["VolumeOptions"] = {"Labels": {LABEL_HOST: self.bench.host}}
        return body

    @property
    def container(self) -> str:
        """The container whose address clients use."""
        return self.holder_name if self.shared_netns else self.db_name

    def target(self, host: str | None = None) -> dict[str, Any]:
        port = PORTS["postgres"] if self.kind == "postgres" else PORTS["redis"]
        if self.kind == "postgres":
            return {
                "kind": "postgres", "host": host or self.name, "port": port,
                "user": "app", "password": self.password, "database": "app",
            }  # fmt: skip
        return {"kind": "redis", "host": host or self.name, "port": port, "password": self.password}

    @staticmethod
    def run_args(body: dict[str, Any], name: str) -> list[str]:
        """`docker run -d` arguments equivalent to an Engine API create body."""
        hc = body["HostConfig"]
        args = ["run", "-d", "--name", name]
        for k, v in body["Labels"].items():
            args += ["--label", f"{k}={v}"]
        for e in body["Env"]:
            args += ["-e", e]
        for m in hc["Mounts"]:
            opt = f"type={m['Type']},source={m['Source']},target={m['Target']}"
            if m["ReadOnly"]:
                opt += ",readonly"
            for k, v in (m.get("VolumeOptions") or {}).get("Labels", {}).items():
                opt += f",volume-label={k}={v}"
            args += ["--mount", opt]
        if "NanoCpus" in hc:
            args += ["--cpus", str(hc["NanoCpus"] / 1e9)]
        if "Memory" in hc:
            args += ["--memory", f"{hc['Memory']}b", "--memory-swap", f"{hc['MemorySwap']}b"]
        args += ["--restart", hc["RestartPolicy"]["Name"]]
        if body.get("StopSignal"):
            args += ["--stop-signal", body["StopSignal"]]
        args += ["--network", hc["NetworkMode"]]
        for net, cfg in (body.get("NetworkingConfig") or {}).get("EndpointsConfig", {}).items():
            for alias in cfg.get("Aliases") or ():
                args += ["--network-alias", alias]
            assert net == hc["NetworkMode"]
        if "Entrypoint" in body:
            args += ["--entrypoint", body["Entrypoint"][0]]
            args += [body["Image"], *body["Entrypoint"][1:]]
        else:
            args += [body["Image"]]
        args += body["Cmd"] or []
        return args

    async def run_cli(self) -> None:
        """`docker run -d` (the holder first if any)."""
        if self.holder_body is not None:
            await adocker_cli(*self.run_args(self.holder_body, self.holder_name))
        await adocker_cli(*self.run_args(self.db_body, self.db_name))

    async def run_api(self) -> None:
        """Create and start through the Engine API, as the agent does."""
        d = self.bench.docker
        if self.holder_body is not None:
            await d.containers.create(self.holder_body, name=self.holder_name)
            await d.containers.container(self.holder_name).start()
        await d.containers.create(self.db_body, name=self.db_name)
        await d.containers.container(self.db_name).start()

    async def ip(self) -> str:
        return await self.bench.ip_on(self.container, self.network)

    async def pin_like(self, addon_id: str, timeout_s: float = 30.0) -> str:
        """The same home cores as an add-on's database (the agent sets them with `docker
        update` at its first upkeep round), so the baseline differs from the add-on in
        the data path only, not in where it may run. Returns the cpuset ("" when the
        agent places nothing)."""
        cores = await self.bench.home_cores(addon_id, timeout_s)
        await self.pin(cores)
        return cores

    async def pin(self, cores: str) -> None:
        """Move the database to these cores in place ("": every host core)."""
        body = json.dumps({"CpusetCpus": cores or host_cpuset()})
        await self.bench.docker._query_json(
            f"containers/{self.db_name}/update", method="POST", data=body
        )

    async def remove(self) -> None:
        names = [self.db_name] + ([self.holder_name] if self.holder_body else [])
        await adocker_cli("rm", "-f", "-v", *names, check=False)
        await adocker_cli("volume", "rm", "-f", self.volume, check=False)
        self.bench.secrets.remove(self.id)


def print_context(results: dict[str, Any]) -> None:
    """The machine, the other load on it and the code measured: what makes figures comparable."""
    m = results["machine"]
    print(
        f"machine: {m['nproc']} CPUs, {m['cpu_model']}, kernel {m['kernel']}, docker {m['docker_server']}"
    )
    print(f"other activity: before {results['activity_before']}, after {results['activity_after']}")
    c = results["code"]
    print(
        f"code: {c['source']} at {c['head']}, modified {c['modified'] or 'none'}, sources {c['sources_sha256']}"
    )


def run_cli(
    doc: str | None,
    main: Callable[[bool], Coroutine[Any, Any, dict[str, Any]]],
    report: Callable[[dict[str, Any]], None],
    quick_help: str,
) -> None:
    """Parse --quick, run the benchmark, print its table, then its one line of JSON."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    results = asyncio.run(main(parser.parse_args().quick))
    report(results)
    print(json.dumps(results, separators=(",", ":")))
