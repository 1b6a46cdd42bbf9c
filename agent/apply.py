"""The thin I/O layer that executes a plan's actions against Docker, the disk and the controller.

Each action is idempotent (create-409 and delete-404 count as success). Each key's chain
runs on that key's worker (agent/workqueue.py); a failed action skips the rest of the
chain, and the next pass plans again from what it then observes, so nothing here needs to
remember partial progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from agent import model, netremoval, specs
from agent import plan as p
from agent.backups import BackupRunner
from agent.controller_client import ControllerClient
from agent.docker import Docker
from agent.egress import Firewall
from agent.errors import (
    AgentError,
    Conflict,
    NetworkRefused,
    NotFound,
    PermanentError,
    TransientError,
)
from agent.joboutput import JobOutputs
from agent.loopfs import LoopFs
from agent.metrics import ACTIONS
from agent.pool import HolderPool
from agent.secrets import SecretStore
from agent.state import StateDir
from agent.workqueue import ChainResult
from schemas.images import ImageRefused, check_reference, tagged
from schemas.messages import SCHEMA_VERSION, JobResult, SleepState

log = logging.getLogger("orkestr.agent.apply")


async def _no_sleep(addon_id: str, stage: SleepState) -> None:
    raise AgentError(f"no sleeper for {addon_id}")


async def _no_wake(addon_id: str) -> None:
    raise AgentError(f"no sleeper for {addon_id}")


class Outcome:
    def __init__(self) -> None:
        self.failed: dict[str, str] = {}  # key -> error message
        self.permanent: dict[str, str] = {}
        self.done: list[p.Action] = []


def _parse_time(value: str | None) -> datetime | None:
    if not value or value.startswith("0001-"):
        return None
    # Docker gives nanoseconds; Python parses microseconds.
    head, _, frac = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00")


class Applier:
    def __init__(
        self,
        host: str,
        docker: Docker,
        firewall: Firewall,
        secrets: SecretStore,
        controller: ControllerClient,
        state: StateDir,
        settings: p.Settings,
        job_output_bytes: int,
        on_job_exit: Callable[[], None],
        on_addon_started: Callable[[str], Awaitable[None]],
        backups: BackupRunner,
        outputs: JobOutputs,
        loopfs: LoopFs | None = None,
        pool: HolderPool | None = None,
    ) -> None:
        self.host = host
        self.docker = docker
        self.firewall = firewall
        self.secrets = secrets
        self.controller = controller
        self.state = state
        self.settings = settings
        self.job_output_bytes = job_output_bytes
        self._on_job_exit = on_job_exit
        self._on_addon_started = on_addon_started
        self.loopfs = loopfs
        self.backups = backups
        self.outputs = outputs
        self.pool = pool if pool is not None else HolderPool(docker, specs.Images(), 0, bool)
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._resized_apps: dict[str, str] = {}
        self._timed_out: set[str] = set()
        self.on_progress: Callable[[], None] = lambda: None  # after each action
        # The sleep manager's hands: a planned sleep or wake acts through the add-on's
        # sleeper (redirect, activity re-check, pause or stop), on the add-on's worker.
        self.sleep_addon: Callable[[str, SleepState], Awaitable[None]] = _no_sleep
        self.wake_addon: Callable[[str], Awaitable[None]] = _no_wake
        # network name -> Docker's refusals to remove it, for the planner's schedule and
        # the host's condition (agent/netremoval.py); pruned by the pass.
        self.refused_networks: dict[str, netremoval.Refusal] = {}

    async def apply(self, actions: Sequence[p.Action]) -> Outcome:
        outcome = Outcome()
        for action in actions:
            if action.key in outcome.failed:
                continue
            one = await self._attempt(action, functools.partial(self._one, action))
            outcome.failed.update(one.failed)
            outcome.permanent.update(one.permanent)
            outcome.done += one.done
        return outcome

    async def _attempt(
        self, action: p.Action, work: Callable[[], Awaitable[None]], last: bool = True
    ) -> Outcome:
        """`work` (all of `action`, or a part of it that is not `last`), counted and logged:
        an action is done when its last part is, and failed when any part fails."""
        outcome = Outcome()
        kind = type(action).__name__
        try:
            await work()
        except PermanentError as exc:
            outcome.failed[action.key] = outcome.permanent[action.key] = str(exc)
            ACTIONS.labels(kind, "permanent_error").inc()
            log.error("action.failed action=%s key=%s error=%s", kind, action.key, exc)
        except NetworkRefused:
            # Recorded (`_network_refused`) and asked again on the planner's schedule, not
            # the key's: the project's other work must not wait behind it.
            ACTIONS.labels(kind, "error").inc()
        except AgentError as exc:
            outcome.failed[action.key] = str(exc)
            ACTIONS.labels(kind, "error").inc()
            log.warning("action.failed action=%s key=%s error=%s", kind, action.key, exc)
        else:
            if last:
                outcome.done.append(action)
                ACTIONS.labels(kind, "ok").inc()
                log.info("action.done action=%s key=%s", kind, action.key)
        self.on_progress()
        return outcome

    async def run_chain(self, key: str, chain: Sequence[p.Action]) -> ChainResult:
        """One key worker's chain: its steps in order (the actions of a step side by side,
        plan.steps), stopping after the first stage with a failure.

        A new holder and the database that joins it overlap (`stages`): the holder is
        created beside its step, then started and fenced while the database is created,
        and the database starts once the holder runs fenced.
        """
        for stage in stages(p.steps(tuple(chain)), self._one, self._create, self._start):
            outcomes = await asyncio.gather(*(self._attempt(a, w, last) for a, w, last in stage))
            failed = [
                (o, a) for o, (a, _, _) in zip(outcomes, stage, strict=True) if a.key in o.failed
            ]
            if failed:
                permanent = any(a.key in o.permanent for o, a in failed)
                outcome, action = failed[0]
                return ChainResult(outcome.failed[action.key], permanent=permanent)
        return ChainResult()

    def _network_refused(self, name: str, exc: NetworkRefused) -> None:
        refusal = netremoval.refused(self.refused_networks.get(name), exc.attached, time.time())
        self.refused_networks[name] = refusal
        retry = netremoval.retry_in(refusal.attempts)
        more = len(refusal.attached) - 5
        attached = ",".join(refusal.attached[:5]) + (f",+{more}" if more > 0 else "") or "none"
        log.warning(
            "network.removal_refused network=%s attempt=%d attached=%s retry_in=%.0fs error=%s",
            name, refusal.attempts, attached, retry, exc,
        )  # fmt: skip
        if refusal.attempts == netremoval.STUCK_AFTER:
            hint = (
                f"disconnect {attached}"
                if refusal.attached
                else f"Docker leaked the endpoint count ({netremoval.LEAK}): restart dockerd"
            )
            log.error("network.removal_stuck network=%s attached=%s do=%r", name, attached, hint)

    async def _one(self, action: p.Action) -> None:
        match action:
            case p.EnsureNetwork(key, name):
                await self.docker.create_network(name, key)
                await self.firewall.sync_networks()
            case p.RemoveNetwork(_key, name):
                try:
                    await self.docker.remove_network(name)
                except NetworkRefused as exc:
                    self._network_refused(name, exc)
                    raise
                self.refused_networks.pop(name, None)
            case p.EnsureGroupNetwork(key, name):
                await self.docker.create_group_network(name, key)
                # Fenced (nothing passes but the shared ports) before anything joins it.
                await self.firewall.sync_networks()
            case p.ConnectNetwork(_key, network, container, aliases):
                await self.docker.connect(network, container, aliases)
                if aliases:  # a shared holder: its new address is what the fence lets through
                    await self.firewall.sync_networks()
            case p.DisconnectNetwork(_key, network, container, reason):
                log.info(
                    "network.disconnect container=%s network=%s reason=%s",
                    container,
                    network,
                    reason,
                )
                await self.docker.disconnect(network, container)
            case p.EnsureVolume(key, name, project_id, size_mb):
                opts = None
                if size_mb is not None and self.loopfs is not None:
                    device = await self.loopfs.create(name, size_mb)
                    opts = {"type": "ext4", "device": device}
                await self.docker.create_volume(name, key, project_id, opts)
            case p.FetchSecret(key, _project, kind, version, maxmemory):
                try:
                    secret = await self.controller.secret(key)
                except PermanentError as exc:
                    # A refused token is the host's, not the add-on's spec: an operator's
                    # token rotation fixes it, so the key keeps retrying (with backoff).
                    raise TransientError(str(exc)) from None
                if secret.secret_version < version:
                    raise AgentError(
                        f"controller has secret v{secret.secret_version}, want v{version}"
                    )
                valid_until = secret.previous_valid_until
                # In a thread: its four or five fsyncs took 10-50 ms each on a busy disk,
                # and sixty add-ons created at once held the event loop (every other
                # chain's Docker calls, fences and probes) for seconds.
                await asyncio.to_thread(
                    self.secrets.write,
                    key,
                    kind,
                    secret.password,
                    secret.secret_version,
                    valid_until.timestamp() if valid_until is not None else None,
                    maxmemory,
                )
            case p.LimitRedisConf(key, maxmemory):
                if await asyncio.to_thread(self.secrets.limit_redis, key, maxmemory):
                    log.info("apply.redis_conf_quota addon=%s maxmemory=%d", key, maxmemory)
            case p.RunContainer():
                await self._create(action)
                await self._start(action)
            case p.StartContainer(key, name) if name == model.job_container_name(key):
                await self._start_job(name)  # one left `created` by an interrupted agent
            case p.StartContainer(key, name):
                await self._on_addon_started(key)
                if name.endswith("-db"):
                    await self._attach(key)
                await self.docker.start(name)
            case p.UnpauseContainer(key, name):
                await self._on_addon_started(key)
                await self.docker.unpause(name)
            case p.SleepAddon(key, _name, stage):
                await self.sleep_addon(key, stage)
            case p.WakeAddon(key, _name):
                await self.wake_addon(key)
            case p.RemoveContainer(_key, name, reason, kill):
                log.info("container.remove name=%s reason=%s%s", name, reason, " kill=yes" * kill)
                if name.endswith("-db") and not kill:
                    # A clean shutdown first: no crash recovery, no lost Redis writes. Docker
                    # refuses to stop a paused container (409): unpaused first only then.
                    with contextlib.suppress(NotFound, Conflict):
                        try:
                            await self.docker.stop(name, grace_s=30)
                        except Conflict:
                            if not await self.docker.unpause(name):
                                raise
                            await self.docker.stop(name, grace_s=30)
                await self.docker.remove(name)
            case p.RemoveVolume(_key, name):
                await self.docker.remove_volume(name)
                if self.loopfs is not None:
                    await self.loopfs.remove(name)
            case p.RemoveSecret(key):
                await self.secrets.discard(key)
            case p.StartJob(key, project_id, job, groups):
                spec = specs.job_spec(project_id, job, self.settings.jobs)
                try:
                    scratch = await self._check_job_image(job.image)
                    env = await self.controller.env(project_id)
                    await self.docker.run(spec, env=env, start=False, scratch=scratch)
                except (NotFound, PermanentError, ImageRefused) as exc:
                    # No such image, or a spec Docker refuses: retrying will not help.
                    self._fail_job(key, project_id, str(exc))
                    return
                # Its group networks before it starts; a failure leaves it created, and the
                # next pass joins and starts it.
                for network in groups:
                    await self.docker.connect(network, spec.name, ())
                try:
                    # Once: the container may exist from a start an agent killed -9 sent.
                    await self._start_job(spec.name)
                except (NotFound, PermanentError) as exc:
                    self._fail_job(key, project_id, str(exc))
                    return
                self._watch(key, project_id, spec.name, job.timeout_s)
            case p.WatchJob(key, project_id, job, name):
                self._watch(key, project_id, name, job.timeout_s)
            case p.CollectJob(key, project_id, name):
                await self._collect(key, project_id, name)
            case p.StartBackupOp(_key, project_id, spec, addon):
                self.backups.start(project_id, addon, spec)
            case p.RunApp(key, project_id, app, groups):
                # The platform's deployer plugs in here: an app is one container of an
                # allowed image with its release's variables, nothing more.
                spec = specs.app_spec(project_id, app, self.settings.jobs)
                try:
                    scratch = await self._check_job_image(app.image)
                except ImageRefused as exc:
                    raise PermanentError(f"app {app.name}: {exc}") from None
                env = await self.controller.release_env(project_id, app.release)
                await self.docker.run(spec, env=env, start=False, scratch=scratch)
                for network in groups:
                    await self.docker.connect(network, spec.name, ())
                await self.docker.start(spec.name)
            case p.ResizeApp(key, name, cpus, memory_mb, spec_hash):
                await self.docker.update_limits(name, cpus, memory_mb)
                self._resized_apps[key] = spec_hash

    async def _create(self, action: p.RunContainer) -> None:
        """A RunContainer's first part: the container created, not started."""
        if action.spec.role == "db" and not self.secrets.complete(action.key):
            # The container mounts the secret directory: it must be complete first.
            raise AgentError("secret not fetched yet")
        if action.spec.role == "holder" and await self.pool.claim(action.spec):
            return  # a parked holder, running: its start below is a no-op, its fence is not
        await self.docker.run(action.spec, start=False)

    async def _start(self, action: p.RunContainer) -> None:
        """A RunContainer's second part: the container started (and a holder fenced)."""
        spec = action.spec
        if spec.role == "db":
            await self._on_addon_started(action.key)
            await self._attach(action.key)
        await self.docker.start(spec.name)
        if spec.role == "holder" and spec.network is not None:
            # Before its database joins the namespace: no egress beyond the network.
            await self.firewall.fence_holder(spec.name, spec.network)

    async def _attach(self, addon_id: str) -> None:
        """A volume with its own filesystem (the data's, the WAL's) needs its loop device
        before it can mount (after a reboot, say)."""
        if self.loopfs is None:
            return
        for volume in (model.volume_name(addon_id), model.wal_volume_name(addon_id)):
            if self.loopfs.size_mb(volume) is None:
                continue  # a plain volume, or no WAL volume: nothing to attach, no Docker call
            device = await self.docker.volume_device(volume)
            if device is not None and device.startswith("/dev/loop"):
                await self.loopfs.ensure_attached(volume, device)

    async def _check_job_image(self, ref: str) -> tuple[str, ...]:
        """Refuses an image jobs and apps may not run; returns the paths that get a
        tmpfs, its VOLUMEs (specs.image_scratch)."""
        check_reference(ref, self.settings.images.jobs)
        # Docker falls back to an image-id prefix for a name it does not know: accept only
        # an image that carries exactly this name.
        names, volumes = await self.docker.image_names(ref)
        if tagged(ref) not in names:
            raise ImageRefused(f"image: no local image is named {ref!r}")
        return specs.image_scratch(volumes)

    def _fail_job(self, job_id: str, project_id: str, error: str) -> None:
        now = datetime.now(UTC)
        self.state.save_job_result(
            JobResult(
                version=SCHEMA_VERSION,
                host=self.host,
                job_id=job_id,
                project_id=project_id,
                exit_code=None,
                output="",
                started_at=None,
                finished_at=now,
                error=f"could not start: {error}",
                output_chunks=0,
            )
        )

    def resized_apps(self) -> dict[str, str]:
        """App id -> the spec hash whose CPU and memory were applied in place."""
        return dict(self._resized_apps)

    def watched_jobs(self) -> frozenset[str]:
        """The jobs whose exit a task of this process awaits."""
        return frozenset(j for j, t in self._watchers.items() if not t.done())

    def _watch(self, job_id: str, project_id: str, name: str, timeout_s: float) -> None:
        task = self._watchers.get(job_id)
        if task is not None and not task.done():
            return
        self._watchers[job_id] = asyncio.create_task(
            self._wait_job(job_id, project_id, name, timeout_s), name=f"job-{job_id}"
        )

    async def _wait_job(self, job_id: str, project_id: str, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        # Its output goes out live while it runs (agent/joboutput.py).
        stream = asyncio.create_task(
            self.outputs.stream(job_id, project_id, name), name=f"job-output-{job_id}"
        )
        try:
            info = await self.docker.inspect(name)
            started = _parse_time(info["State"].get("StartedAt"))
            if started is not None:  # adopted after a restart: the clock started earlier
                deadline -= (datetime.now(UTC) - started).total_seconds()
            remaining = max(deadline - time.monotonic(), 0.0)
            try:
                await asyncio.wait_for(self.docker.wait(name, remaining + 5), remaining)
            except TimeoutError:
                self._timed_out.add(job_id)
                await self.docker.kill(name)
        except NotFound:
            pass
        except AgentError as exc:
            log.warning("job.wait_failed job=%s error=%s", job_id, exc)
        except asyncio.CancelledError:
            # The agent stops; the job runs on, and the next agent resumes the stream.
            stream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stream
            raise
        finally:
            if not stream.cancelled():
                await self.outputs.finish(job_id, stream)
            self._on_job_exit()

    async def _start_job(self, name: str) -> None:
        if not await self.docker.start_once(name):
            # Started by an agent killed before it watched it: WatchJob or CollectJob next.
            log.info("job.started_before container=%s", name)

    async def _collect(self, job_id: str, project_id: str, name: str) -> None:
        info = await self.docker.inspect(name)
        watcher = self._watchers.get(job_id)
        if watcher is None:
            # It ended while no process of ours watched it: send what the stream missed.
            stream = asyncio.create_task(self.outputs.stream(job_id, project_id, name))
            await self.outputs.finish(job_id, stream)
        elif not watcher.done():
            # Its watcher is still sending the rest of the log (a flood of short lines
            # takes Docker seconds to stream): removing the container now cut the stream
            # short of the output's end. Its flush is bounded; so is this wait.
            await asyncio.wait(
                [watcher], timeout=self.outputs.flush_max_s + self.outputs.flush_quiet_s + 1
            )
        state = info["State"]
        output = await self.docker.logs(name, self.job_output_bytes)
        timed_out = job_id in self._timed_out
        error = state.get("Error") or None
        if timed_out:
            error = "job exceeded its timeout and was killed"
        result = JobResult(
            version=SCHEMA_VERSION,
            host=self.host,
            job_id=job_id,
            project_id=project_id,
            exit_code=int(state.get("ExitCode", -1)),
            output=output,
            started_at=_parse_time(state.get("StartedAt")),
            finished_at=_parse_time(state.get("FinishedAt")) or datetime.now(UTC),
            error=error,
            output_chunks=self.outputs.sent(job_id),
        )
        # Recorded before the container goes, so a crash in between loses nothing.
        self.state.save_job_result(result)
        await self.docker.remove(name)
        self._timed_out.discard(job_id)
        self._watchers.pop(job_id, None)

    async def close(self) -> None:
        for task in self._watchers.values():
            task.cancel()
        await asyncio.gather(*self._watchers.values(), return_exceptions=True)


Work = Callable[[], Awaitable[None]]
# One stage of a chain: actions run side by side, each with the work to do for it now and
# whether that work completes the action.
Stage = list[tuple[p.Action, Work, bool]]


def stages(
    steps: Sequence[tuple[p.Action, ...]],
    whole: Callable[[p.Action], Awaitable[None]],
    create: Callable[[p.RunContainer], Awaitable[None]],
    start: Callable[[p.RunContainer], Awaitable[None]],
) -> list[Stage]:
    """A chain's steps as the stages run one after another.

    A step that starts a holder, followed by the step that runs the database in its
    namespace, becomes three stages: the step with the holder only created; the holder
    started and fenced beside the database's creation (Docker creates a container in the
    namespace of one that exists but does not run, and refuses to start it until that one
    runs); the database started. The database still starts only after its volume, its
    secret and its holder's fence, and one failure stops the rest as before.
    """
    out: list[Stage] = []
    i = 0
    while i < len(steps):
        step = steps[i]
        holder = next(
            (a for a in step if isinstance(a, p.RunContainer) and a.spec.role == "holder"),
            None,
        )
        after = steps[i + 1] if i + 1 < len(steps) else ()
        db = after[0] if len(after) == 1 else None
        if (
            holder is not None
            and isinstance(db, p.RunContainer)
            and db.key == holder.key
            and db.spec.netns_of == holder.spec.name
        ):
            out.append(
                [
                    (a, functools.partial(create, holder), False)
                    if a is holder
                    else (a, functools.partial(whole, a), True)
                    for a in step
                ]
            )
            out.append(
                [
                    (holder, functools.partial(start, holder), True),
                    (db, functools.partial(create, db), False),
                ]
            )
            out.append([(db, functools.partial(start, db), True)])
            i += 2
        else:
            out.append([(a, functools.partial(whole, a), True) for a in step])
            i += 1
    return out
