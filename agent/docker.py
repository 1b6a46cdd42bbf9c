"""The Docker Engine adapter: the only module that imports aiodocker.

Every call translates aiodocker's and aiohttp's exceptions into `agent.errors`, so the
rest of the agent reasons about NotFound / Conflict / TransientError only.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiodocker
import aiohttp
import msgspec
from aiodocker.multiplexed import multiplexed_result_stream

from agent import model, observe, specs
from agent.errors import Conflict, NetworkRefused, NotFound, PermanentError, TransientError
from agent.logmark import LogMark
from agent.model import Observed
from agent.slots import PrioritySlots

T = TypeVar("T")
# Docker 20.10 answers these state conflicts with 500 rather than 409.
_STATE_CONFLICT = re.compile(
    r"already exists|is not paused|is already paused|is not running|paused container"
)


async def _call(what: str, fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return await fn()
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            raise NotFound(f"{what}: {exc.message}") from None
        if exc.status == 409 or (exc.status == 500 and _STATE_CONFLICT.search(str(exc.message))):
            raise Conflict(f"{what}: {exc.message}") from None
        if exc.status in (400, 403):
            raise PermanentError(f"{what}: {exc.message}") from None
        raise TransientError(f"{what}: [{exc.status}] {exc.message}") from None
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise TransientError(f"{what}: docker unreachable: {exc!r}") from None


class Docker:
    def __init__(self, host: str, url: str | None = None, max_in_flight: int = 16) -> None:
        self.host = host
        self._url = url
        self._client: aiodocker.Docker | None = None
        # Keys work in parallel; the daemon gets at most this many calls at once, the
        # oldest chain's first (agent/slots.py). Waits on jobs, stops and the event stream
        # hold no slot: they last as long as a job or a database's shutdown does.
        self._slots = PrioritySlots(max_in_flight)

    async def __aenter__(self) -> Docker:
        # aiodocker waits forever by default; a hung daemon must not hang the agent.
        self._client = aiodocker.Docker(
            url=self._url, timeout=aiohttp.ClientTimeout(total=60, sock_connect=5)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        async with self._slots.slot():
            return await _call(what, fn)

    @property
    def client(self) -> aiodocker.Docker:
        assert self._client is not None, "use Docker as an async context manager"
        return self._client

    def _filters(self) -> dict[str, list[str]]:
        return {"label": [f"{model.LABEL_MANAGED}=1", f"{model.LABEL_HOST}={self.host}"]}

    async def ping(self) -> None:
        await self._call("ping", lambda: self.client.version())

    async def _list(self, path: str, extra: dict[str, str] | None = None) -> Any:
        """One of the snapshot's lists, decoded by msgspec: two hundred containers are
        ~300 KB of JSON each pass, which the json module took a third of a pass to read."""
        params = {**(extra or {}), "filters": json.dumps(self._filters())}
        async with self.client._query(path, params=params) as response:
            body = await response.read()
        try:
            return msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise TransientError(f"list {path}: not JSON: {exc}") from None

    async def snapshot(self) -> Observed:
        # The three lists at once: each is a round trip to a daemon that may be busy.
        raw_containers, raw_networks, raw_volumes = await asyncio.gather(
            self._call("list containers", lambda: self._list("containers/json", {"all": "1"})),
            self._call("list networks", lambda: self._list("networks")),
            self._call("list volumes", lambda: self._list("volumes")),
        )
        return observe.observed(
            raw_containers, raw_networks, (raw_volumes or {}).get("Volumes") or []
        )

    def _bridge(
        self, name: str, labels: dict[str, str], internal: bool, options: dict[str, str]
    ) -> dict[str, Any]:
        """An IPv4-only bridge of this host's (the wake redirect and listener are IPv4: a
        v6 path would bypass them)."""
        config: dict[str, Any] = {
            "Name": name,
            "CheckDuplicate": True,
            "Driver": "bridge",
            "EnableIPv6": False,
            "Labels": {model.LABEL_MANAGED: "1", model.LABEL_HOST: self.host, **labels},
        }
        if internal:
            config["Internal"] = True
        if options:
            config["Options"] = options
        return config

    async def _create_bridge(self, config: dict[str, Any], slot: bool = True) -> None:
        what = f"create network {config['Name']}"
        call = self._call if slot else _call
        try:
            await call(what, lambda: self.client.networks.create(config))
        except Conflict:
            pass

    async def create_network(self, name: str, project_id: str) -> None:
        await self._create_bridge(self._bridge(name, {model.LABEL_PROJECT: project_id}, False, {}))

    async def create_group_network(self, name: str, group_id: str) -> None:
        """An internal bridge (no route out, no NAT) for one project group."""
        config = self._bridge(name, {model.LABEL_GROUP: group_id}, True, {})
        await self._create_bridge(config, slot=False)

    async def create_parking_network(self, name: str) -> None:
        """The host's parking network (agent/pool.py): internal (no route out, no NAT) and
        without inter-container traffic, so a parked holder reaches nothing."""
        options = {"com.docker.network.bridge.enable_icc": "false"}
        await self._create_bridge(self._bridge(name, {}, True, options))

    async def parked(self) -> list[dict[str, Any]]:
        """This host's parked holders, raw (agent/pool.py)."""
        filters = {"label": [*self._filters()["label"], f"{model.LABEL_ROLE}=parked"]}
        params = {"all": "1", "filters": json.dumps(filters)}

        async def listing() -> Any:
            async with self.client._query("containers/json", params=params) as response:
                return msgspec.json.decode(await response.read())

        return list(await self._call("list parked holders", listing))

    async def rename(self, name: str, new_name: str) -> None:
        await self._call(
            f"rename {name} to {new_name}",
            lambda: self.client.containers.container(name).rename(new_name),
        )

    async def connect(self, network: str, container: str, aliases: tuple[str, ...]) -> None:
        body = {"Container": container, "EndpointConfig": {"Aliases": list(aliases)}}

        async def connect() -> None:
            await self.client._query_json(
                f"networks/{network}/connect", method="POST", data=json.dumps(body)
            )

        try:
            await _call(f"connect {container} to {network}", connect)
        except NotFound as exc:
            # The network (made earlier in the pass) or the container is not there yet.
            raise TransientError(str(exc)) from None
        except (Conflict, PermanentError) as exc:
            # Already attached (Docker says 403 "already exists" on some versions).
            if "already" not in str(exc):
                raise

    async def disconnect(self, network: str, container: str) -> None:
        body = {"Container": container, "Force": True}

        async def disconnect() -> None:
            await self.client._query_json(
                f"networks/{network}/disconnect", method="POST", data=json.dumps(body)
            )

        try:
            await _call(f"disconnect {container} from {network}", disconnect)
        except NotFound:
            pass
        except PermanentError as exc:
            if "not connected" not in str(exc):
                raise

    async def remove_network(self, name: str) -> None:
        """Remove a network no container is on, running or not; NetworkRefused otherwise.

        Docker's own refusal is not enough: it counts the endpoints of running containers
        only, so a stopped container on the network (an operator's) could never start
        again ("network not found"); and Docker up to 28.0 reads that count from a
        persisted counter, not the endpoints, which concurrent endpoint changes leave
        wrong (too high: moby#42119, seen here after sixty containers left a network at
        once). The network filter lists containers by their own configuration, which that
        counter does not touch."""
        users = await self._users(name)
        if users:
            raise NetworkRefused(f"remove network {name}: {len(users)} container(s) on it", users)
        try:
            await self._call(
                f"remove network {name}",
                lambda: aiodocker.networks.DockerNetwork(self.client, name).delete(),  # type: ignore[no-untyped-call]
            )
        except NotFound:
            pass
        except (Conflict, PermanentError) as exc:
            if "active endpoints" not in str(exc):
                raise TransientError(str(exc)) from None
            # Docker refuses (403) while anything is attached, and also when only its
            # endpoint count says so (moby#42119): which one, the inspection tells.
            raise NetworkRefused(str(exc), await self._attached(name)) from None

    async def _users(self, name: str) -> tuple[str, ...]:
        """Every container configured on a network, in any state (the `network` filter)."""
        params = {"all": "1", "filters": json.dumps({"network": [name]})}
        listed = await self._call(
            f"list containers on {name}",
            lambda: self.client._query_json("containers/json", params=params),
        )
        return tuple(sorted(str((c.get("Names") or [c["Id"]])[0]).lstrip("/") for c in listed))

    async def _attached(self, name: str) -> tuple[str, ...]:
        """The containers Docker lists on a network (its inspection's `Containers`)."""
        info = await self._call(
            f"inspect network {name}", lambda: self.client._query_json(f"networks/{name}")
        )
        found = (info.get("Containers") or {}).items()
        return tuple(sorted(str(c.get("Name") or cid) for cid, c in found))

    async def create_volume(
        self,
        name: str,
        addon_id: str,
        project_id: str,
        driver_opts: dict[str, str] | None = None,
    ) -> None:
        config: dict[str, Any] = {
            "Name": name,
            "DriverOpts": driver_opts or {},
            "Labels": {
                model.LABEL_MANAGED: "1",
                model.LABEL_HOST: self.host,
                model.LABEL_PROJECT: project_id,
                model.LABEL_ADDON: addon_id,
            },
        }
        await self._call(
            f"create volume {name}",
            lambda: self.client.volumes.create(config),  # type: ignore[no-untyped-call]
        )

    async def run(
        self,
        spec: specs.ContainerSpec,
        env: dict[str, str] | None = None,
        start: bool = True,
        scratch: tuple[str, ...] = (),
    ) -> None:
        body = specs.create_body(spec, self.host, env, scratch)
        try:
            await self._call(
                f"create container {spec.name}",
                lambda: self.client.containers.create(body, name=spec.name),  # type: ignore[arg-type]
            )
        except Conflict:
            pass  # created by an earlier, interrupted pass: start it
        if start:
            await self.start(spec.name)

    async def image_names(self, ref: str) -> tuple[set[str], tuple[str, ...]]:
        """The tags and digests of the image that `ref` resolves to, and the paths it
        declares a VOLUME; NotFound if none."""
        info: dict[str, Any] = await self._call(
            f"inspect image {ref}",
            lambda: self.client.images.inspect(ref),
        )
        volumes = (info.get("Config") or {}).get("Volumes") or {}
        return {*(info.get("RepoTags") or ()), *(info.get("RepoDigests") or ())}, tuple(
            sorted(volumes)
        )

    async def start(self, name: str) -> None:
        await self._call(f"start {name}", lambda: self.client.containers.container(name).start())

    async def start_once(self, name: str) -> bool:
        """Start a container that never ran (a job's: it must run once); False if it ever
        started. A listing says `created` while dockerd still carries out a start, e.g.
        one an agent killed -9 right after had sent, and a start that reaches a job
        already exited runs it again. An inspect waits for a start in progress (both take
        the container's lock), so it tells."""
        info = await self.inspect(name)
        started = str((info.get("State") or {}).get("StartedAt") or "")
        if started and not started.startswith("0001-"):
            return False
        await self.start(name)
        return True

    async def pause(self, name: str) -> None:
        try:
            await self._call(
                f"pause {name}", lambda: self.client.containers.container(name).pause()
            )
        except Conflict:
            pass  # already paused

    async def unpause(self, name: str) -> bool:
        """True if it was paused; False if it was not (running, or not running at all)."""
        try:
            await self._call(
                f"unpause {name}", lambda: self.client.containers.container(name).unpause()
            )
        except Conflict:
            return False
        return True

    async def stop(self, name: str, grace_s: int = 10) -> None:
        # No slot: the daemon only waits for the container's own shutdown (up to grace_s),
        # and a database that takes its time must not hold up other keys' calls.
        async with asyncio.timeout(grace_s + 30):
            await _call(
                f"stop {name}", lambda: self.client.containers.container(name).stop(t=grace_s)
            )

    async def state(self, name: str) -> str:
        """Docker's state of one container: running, paused, exited, created, ..."""
        return str((await self.inspect(name))["State"]["Status"])

    async def kill(self, name: str) -> None:
        await self._call(f"kill {name}", lambda: self.client.containers.container(name).kill())

    async def remove(self, name: str) -> None:
        # v=True: the anonymous volumes of the image's VOLUME go with the container.
        try:
            await self._call(
                f"remove {name}",
                lambda: self.client.containers.container(name).delete(force=True, v=True),
            )
        except NotFound:
            pass

    async def remove_volume(self, name: str) -> None:
        try:
            await self._call(
                f"remove volume {name}",
                lambda: aiodocker.volumes.DockerVolume(self.client, name).delete(),  # type: ignore[no-untyped-call]
            )
        except NotFound:
            pass

    async def volume_device(self, name: str) -> str | None:
        """The block device a `local` volume mounts (its own filesystem), if any."""

        async def show() -> dict[str, Any]:
            return await aiodocker.volumes.DockerVolume(self.client, name).show()  # type: ignore[no-untyped-call,no-any-return]

        options = (await _call(f"inspect volume {name}", show)).get("Options") or {}
        device = options.get("device")
        return str(device) if device else None

    async def update_limits(self, name: str, cpus: float, memory_mb: int, cores: str = "") -> None:
        """`docker update`: new CPU and memory limits for a running container, no restart.
        `cores`: the CPUs it may run on (CpusetCpus); "" leaves them as they are."""
        body: dict[str, object] = {
            "NanoCpus": int(cpus * 1e9),
            "Memory": memory_mb * 1024 * 1024,
            "MemorySwap": memory_mb * 1024 * 1024,
        }
        if cores:
            body["CpusetCpus"] = cores

        async def update() -> None:
            await self.client._query_json(
                f"containers/{name}/update", method="POST", data=json.dumps(body)
            )

        await _call(f"update {name}", update)

    async def update_cores(self, name: str, cores: str) -> None:
        """`docker update --cpuset-cpus`: also for a paused or stopped container."""

        async def update() -> None:
            await self.client._query_json(
                f"containers/{name}/update",
                method="POST",
                data=json.dumps({"CpusetCpus": cores}),
            )

        await _call(f"update {name}", update)

    async def inspect(self, name: str) -> dict[str, Any]:
        async def show() -> dict[str, Any]:
            return await self.client.containers.container(name).show()

        return await self._call(f"inspect {name}", show)

    async def wait(self, name: str, timeout_s: float) -> int:
        async def wait() -> int:
            result = await self.client.containers.container(name).wait(timeout=timeout_s)
            return int(result.get("StatusCode", -1))

        return await _call(f"wait {name}", wait)

    async def logs(self, name: str, tail_bytes: int) -> str:
        async def logs() -> str:
            # Bounded at the daemon: a chatty job must not fill the agent's memory.
            lines = await self.client.containers.container(name).log(
                stdout=True, stderr=True, tail=max(tail_bytes // 40, 100)
            )
            return "".join(lines)

        text = await self._call(f"logs {name}", logs)
        return text[-tail_bytes:]

    async def follow_logs(self, name: str) -> AsyncIterator[str]:
        """The container's output from its start, as it comes, until it stops. No slot:
        it lasts as long as the job does. A follow that Docker ends early (at a rotated
        file's end: agent/logmark.py) is taken up again from where it got to: followed
        while the container runs, read to the end once it has stopped."""
        mark = LogMark()
        follow = True
        try:
            while True:
                params = {"timestamps": "1", "since": mark.reread()}
                if follow:
                    params["follow"] = "1"
                new = 0
                async for frame in self._log_frames(name, params):
                    if (text := mark.admit(frame)) is not None:
                        new += 1
                        yield text
                if not follow:
                    return
                info = await self.client.containers.container(name).show()
                follow = bool(info["State"].get("Running"))
                if follow and not new:
                    await asyncio.sleep(0.1)  # ended at once while it runs: do not spin
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                raise NotFound(f"logs {name}: {exc.message}") from None
            raise TransientError(f"logs {name}: [{exc.status}] {exc.message}") from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransientError(f"logs {name}: docker unreachable: {exc!r}") from None

    async def _log_frames(self, name: str, params: dict[str, str]) -> AsyncIterator[str]:
        """The log's messages as they stream (a read without follow too: not a list of a
        whole log in memory). A job's container is never a TTY: frames are multiplexed."""
        query = self.client._query(
            f"containers/{name}/logs",
            params={"stdout": "1", "stderr": "1", **params},
            timeout=None,
        )
        async with query as response:
            frames = multiplexed_result_stream(response, is_tty=False)  # type: ignore[no-untyped-call]
            async for frame in frames:
                yield frame

    @asynccontextmanager
    async def events(self) -> AsyncIterator[asyncio.Queue[dict[str, Any] | None]]:
        """Container events for this host's managed objects; None marks the stream's end."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        params = {"filters": json.dumps({**self._filters(), "type": ["container"]})}

        async def pump() -> None:
            try:
                async with self.client._query("events", params=params, timeout=None) as response:
                    async for line in response.content:
                        if line.strip():
                            await queue.put(json.loads(line))
            except (aiohttp.ClientError, OSError, aiodocker.DockerError, ValueError):
                pass
            finally:
                await queue.put(None)

        task = asyncio.create_task(pump(), name="docker-events")
        try:
            yield queue
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
