"""The agent's main loops: one level-triggered reconcile worker fed by triggers.

A desired-state message, a Docker event, a finished job, a wake and the periodic resync
all do the same thing: set the trigger. The worker then runs a full pass,
observe -> plan -> apply -> probe -> report, so no event is ever interpreted on its own
and a burst of events coalesces into one more pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import time
from datetime import UTC, datetime
from pathlib import Path

from agent import desired as desired_mod
from agent import model, netns, probe, specs
from agent import plan as p
from agent.activator import RelayBudget, utc
from agent.apply import Applier, Outcome
from agent.backup_store import BackupStore
from agent.backups import BackupRunner
from agent.conditions import ConditionBook
from agent.config import AgentConfig
from agent.controller_client import ControllerClient
from agent.docker import Docker
from agent.egress import Firewall
from agent.errors import AgentError
from agent.keeper_client import KeeperClient
from agent.metrics import (
    ADDON_READY,
    ADDON_SLEEP_STATE,
    APPLIED_GENERATION,
    DESIRED_REJECTED,
    MQTT_CONNECTED,
    RECONCILE_DURATION,
    RECONCILE_TOTAL,
    SLEEP_LEVEL,
    start_at_zero,
)
from agent.mqtt import Broker
from agent.sdnotify import notify
from agent.secrets import SecretStore
from agent.sleepers import SleepManager
from agent.state import StateDir
from agent.watchdog import Watchdog, interval_from_env
from schemas import topics
from schemas.codec import encode
from schemas.messages import (
    SCHEMA_VERSION,
    AddonSpec,
    AddonStatus,
    Capacity,
    DesiredState,
    HostStatus,
)
from schemas.signed import Verifier

log = logging.getLogger("orkestr.agent")

HOST = "_host"  # owner key of host-level conditions


def _capacity() -> Capacity:
    memory_kb = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memory_kb = int(line.split()[1])
    except OSError:
        pass
    return Capacity(cpus=float(os.cpu_count() or 1), memory_mb=memory_kb // 1024)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        docker: Docker,
        controller: ControllerClient,
        verifier: Verifier,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.verifier = verifier
        self.host = config.agent.host
        self.docker = docker
        root = Path(config.agent.state_dir)
        self.state = StateDir(root)
        self.secrets = SecretStore(root / "secrets")
        self.secrets.ensure_root()
        self.settings = p.Settings(
            images=config.images,
            secrets_root=str(self.secrets.root),
            jobs=specs.JobLimits(
                memory_mb=config.agent.job_memory_mb,
                cpus=config.agent.job_cpus,
                pids=config.agent.job_pids,
            ),
        )
        self.broker = Broker(
            self.host,
            config.mqtt.host,
            config.mqtt.port,
            on_desired=self.on_desired,
            on_connect=self.on_connect,
            username=config.mqtt.username or config.agent.host,
            password=config.mqtt.password(),
            tls=tls,
            keepalive_s=config.mqtt.keepalive_s,
        )
        self.backup_store = BackupStore(config.backups.root(config.agent.state_dir))
        self.backup_store.ensure_root()
        for leftover in self.backup_store.clean_all():  # no operation runs yet
            log.warning("backup.leftover_removed path=%s", leftover)
        self.backups = BackupRunner(
            self.host,
            docker,
            self.backup_store,
            root,
            self.secrets.root,
            config.backups.image,
            config.backups.memory_mb,
            config.backups.timeout_s,
            hold=self._hold_awake,
            ready=self._ready_after_restore,
            on_done=self.trigger,
        )
        self.firewall = Firewall(self.host, config.network, docker)
        self.applier = Applier(
            self.host,
            docker,
            self.firewall,
            self.secrets,
            controller,
            self.state,
            self.settings,
            config.agent.job_output_bytes,
            on_job_exit=self.trigger,
            on_addon_started=self._addon_started,
            backups=self.backups,
        )
        # Progress, for systemd's watchdog: a finished action or pass, a sleep tick.
        self.watchdog = Watchdog(("reconcile", "sleep"), interval_from_env() or 180.0)
        self.applier.on_progress = lambda: self.watchdog.beat("reconcile")
        self.observed = model.Observed()
        start_at_zero(p.ACTION_KINDS, desired_mod.REJECTION_REASONS)
        self._readiness: dict[str, asyncio.Task[None]] = {}
        self._metric_labels: set[tuple[str, str, str]] = set()
        self.sleep = SleepManager(
            root,
            docker,
            KeeperClient(config.agent.keeper_socket),
            self._wake_probe,
            self._sleep_changed,
            config.agent.sleep_tick_s,
            RelayBudget(config.agent.wake_relays_per_addon, config.agent.wake_relays_total),
        )
        self.sleep.on_tick = lambda: self.watchdog.beat("sleep")
        self.desired: DesiredState | None = self.state.load_desired()
        self.book = ConditionBook()
        self.addon_status: dict[str, AddonStatus] = {}
        self.removed: tuple[str, ...] = ()
        self._trigger = asyncio.Event()
        self._trigger.set()  # the first pass runs at once, broker or not
        self._ready_notified = False
        self.last_pass_ok: float = 0.0
        now = datetime.now(UTC)
        if self.desired is not None:
            self.book.set(
                HOST,
                "DesiredStateAccepted",
                "True",
                "Restored",
                f"generation {self.desired.generation} restored from disk",
                now,
            )
            APPLIED_GENERATION.set(self.desired.generation)
        else:
            self.book.set(
                HOST,
                "DesiredStateAccepted",
                "Unknown",
                "Waiting",
                "no desired state received yet",
                now,
            )

    # --- inputs -------------------------------------------------------------------------
    def trigger(self) -> None:
        self._trigger.set()

    async def on_connect(self) -> None:
        MQTT_CONNECTED.set(1)
        self.trigger()

    async def on_desired(self, raw: bytes) -> None:
        state, rejection = desired_mod.accept(self.desired, raw, self.host, self.verifier)
        now = datetime.now(UTC)
        if rejection is not None:
            DESIRED_REJECTED.labels(rejection.reason).inc()
            log.warning(
                "desired.rejected reason=%s message=%s", rejection.reason, rejection.message
            )
            self.book.set(
                HOST, "DesiredStateAccepted", "False", rejection.reason, rejection.message, now
            )
            await self.publish_status()
            return
        if state is None:
            return  # the same generation again (a retained copy after a reconnect)
        try:
            self.state.save_desired(encode(state))  # verified: the disk is ours
        except OSError as exc:  # a full disk: apply it anyway, the broker keeps a copy
            log.error("desired.not_saved error=%s", exc)
        self.desired = state
        APPLIED_GENERATION.set(state.generation)
        self.book.set(
            HOST,
            "DesiredStateAccepted",
            "True",
            "Applied",
            f"generation {state.generation} accepted",
            now,
        )
        log.info(
            "desired.accepted generation=%s projects=%s", state.generation, len(state.projects)
        )
        self.trigger()

    # --- loops --------------------------------------------------------------------------
    async def reconcile_loop(self) -> None:
        backoff = 0.5
        while True:
            try:
                await asyncio.wait_for(self._trigger.wait(), self.config.agent.resync_interval_s)
            except TimeoutError:
                pass
            self._trigger.clear()
            started = time.monotonic()
            try:
                outcome = await self.reconcile_once()
            except Exception as exc:
                # Expected failures are AgentErrors; anything else is a bug, and a bug in one
                # pass must not take the agent (and every sleeping add-on's waker) down.
                RECONCILE_TOTAL.labels("error").inc()
                if isinstance(exc, AgentError):
                    log.warning("reconcile.failed error=%s retry_in=%.1fs", exc, backoff)
                else:
                    log.exception("reconcile.crashed retry_in=%.1fs", backoff)
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, 30.0)
                self.trigger()
                continue
            finally:
                RECONCILE_DURATION.observe(time.monotonic() - started)
                self.watchdog.beat("reconcile")
            if outcome.failed:
                RECONCILE_TOTAL.labels("requeue").inc()
                asyncio.get_running_loop().call_later(
                    backoff * random.uniform(0.8, 1.2), self.trigger
                )
                backoff = min(backoff * 2, 30.0)
            else:
                RECONCILE_TOTAL.labels("success").inc()
                backoff = 0.5
            self.last_pass_ok = time.monotonic()
            if not self._ready_notified:
                notify("READY=1")
                self._ready_notified = True

    async def events_loop(self) -> None:
        while True:
            try:
                # Events missed while the stream was down may hide restarted holders.
                self.firewall.forget()
                async with self.docker.events() as queue:
                    while (event := await queue.get()) is not None:
                        if event.get("status") == "start":
                            actor = event.get("Actor") or {}
                            if (actor.get("Attributes") or {}).get(model.LABEL_ROLE) == "holder":
                                self.firewall.forget(actor.get("ID"))
                        if event.get("status") in (
                            "die",
                            "destroy",
                            "stop",
                            "pause",
                            "unpause",
                            "oom",
                            "start",
                        ):
                            self.trigger()
            except Exception as exc:
                log.warning("docker.events_failed error=%r", exc)
            await asyncio.sleep(1.0)

    async def heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.agent.heartbeat_s)
            MQTT_CONNECTED.set(1 if self.broker.connected else 0)
            await self.publish_status()
            await self.publish_job_results()

    # --- one pass -----------------------------------------------------------------------
    async def reconcile_once(self) -> Outcome:
        observed = await self.docker.snapshot()
        local = p.Local(
            secrets=self.secrets.versions(),
            finished_jobs=frozenset(self.state.job_results()),
            sleep=self.sleep.states(),
            backups_done=frozenset(self.backups.results()),
            backups_running=self.backups.running_ops(),
        )
        actions = p.plan(self.desired, observed, local, self.settings)
        self.firewall.shared = p.shared_ports(self.desired)
        # Fences first: nothing may start on a bridge or in a namespace left open.
        await self.firewall.sync(observed)
        outcome = await self.applier.apply(actions)
        if actions:
            observed = await self.docker.snapshot()
        self.observed = observed
        await self.sleep.sync(self.desired, observed, self._is_ready)
        await self._refresh_status(observed, outcome)
        await self.publish_status()
        await self.publish_job_results()
        return outcome

    async def _refresh_status(self, observed: model.Observed, outcome: Outcome) -> None:
        now = datetime.now(UTC)
        desired = self.desired
        if desired is None:
            return
        statuses: dict[str, AddonStatus] = {}
        removed: list[str] = []
        probes: list[tuple[str, AddonSpec, str, asyncio.Task[tuple[bool, str, str]]]] = []
        for project in desired.projects:
            for addon in project.addons:
                holder = observed.container(model.holder_name(addon.id))
                db = observed.container(model.db_name(addon.id))
                if addon.deleted:
                    gone = (
                        holder is None
                        and db is None
                        and observed.volume(model.volume_name(addon.id)) is None
                    )
                    if gone and addon.id not in outcome.failed:
                        removed.append(addon.id)
                        self.book.forget(addon.id)
                    continue
                self._provisioned(addon, holder, db, outcome, now)
                sleeping = self.sleep.state(addon.id) != "awake"
                if sleeping:
                    stage = self.sleep.state(addon.id)
                    self.book.set(
                        addon.id,
                        "Ready",
                        "False",
                        "Sleeping",
                        f"in {stage} sleep; wakes when a client connects",
                        now,
                    )
                    ADDON_READY.labels(addon.id, project.id, addon.kind).set(0)
                elif holder is not None and holder.ip and db is not None and db.state == "running":
                    probes.append(
                        (
                            project.id,
                            addon,
                            holder.ip,
                            asyncio.create_task(self._probe(addon, holder.ip)),
                        )
                    )
                else:
                    state = db.state if db is not None else "missing"
                    self.book.set(
                        addon.id,
                        "Ready",
                        "False",
                        "NotRunning",
                        f"database container is {state}",
                        now,
                    )
                    ADDON_READY.labels(addon.id, project.id, addon.kind).set(0)
        for project_id, addon, ip, task in probes:
            ok, reason, message = await task
            if (sleeper := self.sleep.sleepers.get(addon.id)) is not None:
                sleeper.ready = ok
            if not ok:
                if reason == "Unreachable":
                    await self._repair_split_namespace(addon)
                self._await_readiness(addon, ip)
            self.book.set(
                addon.id, "Ready", "True" if ok else "False", reason, message, datetime.now(UTC)
            )
            ADDON_READY.labels(addon.id, project_id, addon.kind).set(1 if ok else 0)
        labels: set[tuple[str, str, str]] = set()
        for project in desired.projects:
            for addon in project.addons:
                if addon.deleted:
                    continue
                statuses[addon.id] = self._addon_status(project.id, addon, desired.generation, now)
                labels.add((addon.id, project.id, addon.kind))
        # Drop the series of add-ons that left this host, so dashboards don't show ghosts.
        for stale in self._metric_labels - labels:
            for gauge in (ADDON_READY, ADDON_SLEEP_STATE):
                with contextlib.suppress(KeyError):
                    gauge.remove(*stale)
        self._metric_labels = labels
        self.addon_status = statuses
        self.removed = tuple(removed)

    def _provisioned(
        self,
        addon: AddonSpec,
        holder: model.ObservedContainer | None,
        db: model.ObservedContainer | None,
        outcome: Outcome,
        now: datetime,
    ) -> None:
        if addon.id in outcome.permanent:
            self.book.set(
                addon.id,
                "Provisioned",
                "False",
                "ProvisionFailed",
                outcome.permanent[addon.id],
                now,
            )
        elif addon.id in outcome.failed:
            self.book.set(
                addon.id, "Provisioned", "False", "Retrying", outcome.failed[addon.id], now
            )
        elif holder is not None and db is not None and holder.state == "running":
            self.book.set(
                addon.id,
                "Provisioned",
                "True",
                "ContainersCreated",
                f"holder {holder.name} and database {db.name} exist",
                now,
            )
        else:
            self.book.set(
                addon.id, "Provisioned", "False", "Creating", "containers are being created", now
            )

    async def _repair_split_namespace(self, addon: AddonSpec) -> None:
        """A holder restarted in place has a new namespace the database is not in.

        Docker keeps the holder's id, so the plan cannot see it; the database then has no
        network at all. Found by comparing namespaces; the fix is a new database container
        (same volume), which the next pass creates.
        """
        try:
            holder = await self.docker.inspect(model.holder_name(addon.id))
            db = await self.docker.inspect(model.db_name(addon.id))
            h_pid, d_pid = holder["State"]["Pid"], db["State"]["Pid"]
            if not (h_pid and d_pid) or netns.netns_inode(h_pid) == netns.netns_inode(d_pid):
                return
        except (AgentError, OSError, KeyError):
            return
        log.warning("addon.split_namespace addon=%s action=recreate_db", addon.id)
        await self.applier.apply(
            [p.RemoveContainer(addon.id, model.db_name(addon.id), "SplitNamespace")]
        )
        self.trigger()

    def _await_readiness(self, addon: AddonSpec, ip: str) -> None:
        """Poll a starting add-on quickly, so Ready does not wait for the next resync."""
        task = self._readiness.get(addon.id)
        if task is not None and not task.done():
            return

        async def poll() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                if self.sleep.state(addon.id) != "awake":
                    return
                if (await self._probe(addon, ip, 1.0))[0]:
                    self.trigger()
                    return

        self._readiness[addon.id] = asyncio.create_task(poll(), name=f"ready-{addon.id}")

    def _addon_status(
        self, project_id: str, addon: AddonSpec, generation: int, now: datetime
    ) -> AddonStatus:
        saved = self.sleep.saved.get(addon.id)
        sleeper = self.sleep.sleepers.get(addon.id)
        ADDON_SLEEP_STATE.labels(addon.id, project_id, addon.kind).set(
            SLEEP_LEVEL[saved.state if saved else "awake"]
        )
        if not addon.sleep.enabled:
            self.book.set(addon.id, "Sleeping", "False", "Disabled", "the plan keeps it awake", now)
        elif saved is not None and saved.state != "awake":
            self.book.set(
                addon.id,
                "Sleeping",
                "True",
                saved.state.capitalize(),
                f"{saved.state} sleep after {addon.sleep.light_after_s:g}s idle",
                now,
            )
        else:
            self.book.set(addon.id, "Sleeping", "False", "Awake", "serving clients directly", now)
        return AddonStatus(
            id=addon.id,
            project_id=project_id,
            observed_generation=generation,
            conditions=self.book.of(addon.id),
            sleep_state=saved.state if saved else "awake",
            last_activity=utc(saved.last_activity) if saved and saved.last_activity else None,
            clients=sleeper.clients if sleeper else (),
            sleeps=saved.sleeps if saved else 0,
            wakes=saved.wakes if saved else 0,
            last_wake_ms=tuple(saved.last_wake_ms) if saved else (),
        )

    async def _probe(
        self, addon: AddonSpec, ip: str, timeout_s: float | None = None
    ) -> tuple[bool, str, str]:
        if not self.secrets.has(addon.id):
            return False, "NoSecret", "the add-on's secret is not on this host yet"
        sleeper = self.sleep.sleepers.get(addon.id)
        if sleeper is None:
            return await self._wake_probe(addon, ip, timeout_s or self.config.agent.probe_timeout_s)
        async with sleeper.platform_connection():
            # Checked under the lock that a falling-asleep add-on also takes: never probe a
            # paused database (the probe would hang) or count a probe as a client.
            if sleeper.state != "awake":
                return False, "Sleeping", f"in {sleeper.state} sleep"
            return await self._wake_probe(addon, ip, timeout_s or self.config.agent.probe_timeout_s)

    async def _wake_probe(
        self, addon: AddonSpec, ip: str, timeout_s: float
    ) -> tuple[bool, str, str]:
        """A real client's connection and first query, straight to the database."""
        admin = self.secrets.admin_password(addon.id)
        if addon.kind == "postgres":
            tenant = (addon.user, self.secrets.password(addon.id))
            return await probe.postgres(ip, addon.database, admin, timeout_s, tenant)
        return await probe.redis(ip, admin, timeout_s)

    def _hold_awake(self, addon_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self.sleep.hold(addon_id)

    async def _ready_after_restore(self, addon: AddonSpec) -> bool:
        """Whether a restarted database answers a real client within a minute."""
        holder = self.observed.container(model.holder_name(addon.id))
        if holder is None or not holder.ip:
            return False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (await self._wake_probe(addon, holder.ip, 2.0))[0]:
                return True
            await asyncio.sleep(0.05)
        return False

    async def _addon_started(self, addon_id: str) -> None:
        await self.sleep.addon_started(addon_id)

    def _sleep_changed(self) -> None:
        self.trigger()

    def _is_ready(self, addon_id: str) -> bool:
        ready = self.book.get(addon_id, "Ready")
        return ready is not None and ready.status == "True"

    async def close_sleepers(self) -> None:
        for task in self._readiness.values():
            task.cancel()
        await asyncio.gather(*self._readiness.values(), return_exceptions=True)
        await self.sleep.close()

    # --- outputs ------------------------------------------------------------------------
    async def publish_status(self) -> None:
        status = HostStatus(
            version=SCHEMA_VERSION,
            host=self.host,
            sent_at=datetime.now(UTC),
            applied_generation=self.desired.generation if self.desired else 0,
            capacity=_capacity(),
            conditions=self.book.of(HOST),
            addons=tuple(self.addon_status.values()),
            removed=self.removed,
        )
        await self.broker.publish(topics.status(self.host), encode(status), retain=True)

    async def publish_job_results(self) -> None:
        wanted = {
            job.id
            for project in (self.desired.projects if self.desired else ())
            for job in project.jobs
        }
        for job_id, result in self.state.job_results().items():
            if self.desired is not None and job_id not in wanted:
                self.state.forget_job(
                    job_id
                )  # the controller has it: the job left the desired state
                continue
            await self.broker.publish(topics.job_result(self.host, job_id), encode(result))
        ops = {
            p.op_key(spec)
            for project in (self.desired.projects if self.desired else ())
            for spec in project.backups
        }
        for key, outcome in self.backups.results().items():
            if self.desired is not None and key not in ops:
                self.backups.forget(key)  # the controller has it
                continue
            await self.broker.publish(topics.backup_result(self.host, key), encode(outcome))
