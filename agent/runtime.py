"""The agent's main loops: a level-triggered planning pass feeding one worker per key.

A desired-state message, a Docker event, a finished job or chain, a wake and the periodic
resync all do the same thing: set the trigger. The loop then runs a full pass,
observe -> plan -> hand each key's chain to its worker -> probe -> report, so no event is
ever interpreted on its own and a burst of events coalesces into one more pass. Keys (an
add-on, a job, a project network) run in parallel, each serially (agent/workqueue.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import ssl
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from agent import apps, model, netns, netremoval, placement, probe, resp, specs, status
from agent import desired as desired_mod
from agent import plan as p
from agent import pool as pool_mod
from agent.apply import Applier, Outcome
from agent.backup_store import BackupStore
from agent.backups import BackupRunner
from agent.conditions import ConditionBook
from agent.config import AgentConfig
from agent.controller_client import ControllerClient
from agent.docker import Docker
from agent.egress import Firewall
from agent.errors import AgentError, NotFound
from agent.joboutput import JobOutputs
from agent.keeper_client import KeeperClient
from agent.loopfs import LoopFs
from agent.metrics import (
    ADDON_READY,
    ADDON_SLEEP_STATE,
    APPLIED_GENERATION,
    DESIRED_REJECTED,
    MQTT_CONNECTED,
    NETWORKS_UNREMOVABLE,
    RECONCILE_DURATION,
    RECONCILE_TOTAL,
    SLEEP_LEVEL,
    start_at_zero,
)
from agent.mqtt import Broker
from agent.pool import HolderPool
from agent.sdnotify import notify
from agent.secrets import SecretStore
from agent.sleep.listener import RelayBudget
from agent.sleep.manager import SleepManager
from agent.state import StateDir
from agent.upkeep import Upkeep
from agent.watchdog import Watchdog, interval_from_env
from agent.workqueue import KeyedWorkers
from schemas import topics
from schemas.codec import encode
from schemas.messages import (
    SCHEMA_VERSION,
    AddonSpec,
    AddonStatus,
    AppStatus,
    Capacity,
    DesiredState,
    HostStatus,
)
from schemas.signed import Verifier

log = logging.getLogger("orkestr.agent")
# Making the least roles right before a backup step (_backup_roles): per attempt, attempts.
BACKUP_ROLES_TIMEOUT_S = 15.0
BACKUP_ROLES_ATTEMPTS = 3

HOST = "_host"  # owner key of host-level conditions
_EPOCH = datetime.fromtimestamp(0, UTC)
# While chains run, passes start at most this often (a quiet host's pass runs at once).
PASS_SPACING_S = 0.25
# A kept re-probe connection serves this many rounds, then a fresh one is opened.
KEEP_ROUNDS = 8


@functools.cache
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
        self.loopfs = LoopFs(root / "volumes") if config.agent.volume_filesystems else None
        self.settings = p.Settings(
            images=config.images,
            secrets_root=str(self.secrets.root),
            jobs=specs.JobLimits(
                memory_mb=config.agent.job_memory_mb,
                cpus=config.agent.job_cpus,
                pids=config.agent.job_pids,
                per_project=config.agent.jobs_per_project,
            ),
            wal_volumes=config.agent.volume_filesystems and config.agent.wal_filesystems,
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
            keep_deleted_days=config.backups.deleted_addon_days,
            keep_deleted_projects=config.backups.keep_deleted_projects,
            prepare=self._backup_roles,
        )
        self.firewall = Firewall(self.host, config.network, docker)
        self.outputs = JobOutputs(
            self.host,
            self.state,
            docker.follow_logs,
            self.broker.publish,
            config.agent.job_stream_interval_s,
            config.agent.job_stream_chunk_chars,
        )
        self.pool = HolderPool(
            docker,
            self.settings.images,
            config.agent.holder_pool,
            busy=lambda: pool_mod.refill_waits(self.workers.in_flight(), self._starting()),
        )
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
            loopfs=self.loopfs,
            backups=self.backups,
            outputs=self.outputs,
            pool=self.pool,
        )
        # Progress, for systemd's watchdog: a finished action or pass, a sleep tick.
        self.watchdog = Watchdog(("reconcile", "sleep"), interval_from_env() or 180.0)
        self.applier.on_progress = lambda: self.watchdog.beat("reconcile")
        self.observed = model.Observed()
        self.workers: KeyedWorkers[p.Action] = KeyedWorkers(self.applier.run_chain, self.trigger)
        start_at_zero(p.ACTION_KINDS, desired_mod.REJECTION_REASONS)
        self._readiness: dict[str, asyncio.Task[None]] = {}
        # add-on id -> (database container id, address, connection, rounds used): re-probe
        # connections kept open between rounds (see _redis_round)
        self._kept: dict[str, tuple[str, str, resp.Connection, int]] = {}
        # add-on id -> (database container id, latest answer) of its running readiness poll
        self._polled: dict[str, tuple[str, status.Probe]] = {}
        # add-on id -> (database container id, holder run) last checked for a split namespace
        self._split_checked: dict[str, tuple[str, tuple[str, str, int] | None]] = {}
        # add-on id -> (database container id, when, result) of its last successful probe
        self._last_probe: dict[str, tuple[str, float, status.Probe]] = {}
        # add-on id -> the database container that has answered a probe; kept for a
        # tombstone until it is gone: the planner kills one that never did (p.Local.answered)
        self._answered: dict[str, str] = {}
        self._reprobe_s = config.agent.resync_interval_s
        # Re-probes of ready add-ons, off the pass (see _refresh_status).
        self._reprobing: asyncio.Task[None] | None = None
        self._app_max_age = config.agent.heartbeat_s
        self._metric_labels: set[tuple[str, str, str]] = set()
        self.sleep = SleepManager(
            root,
            docker,
            KeeperClient(config.agent.keeper_socket),
            self._wake_probe,
            self._sleep_changed,
            config.agent.sleep_tick_s,
            RelayBudget(config.agent.wake_relays_per_addon, config.agent.wake_relays_total),
            config.agent.deep_wake,
        )
        self.sleep.on_tick = self._sleep_ticked
        # The pass at the earliest sleep deadline (see _arm_sleep_timer): (when, handle).
        self._sleep_timer: tuple[float, asyncio.TimerHandle] | None = None
        self.sleep.on_wake_request = self._wake_requested
        self.applier.sleep_addon = self.sleep.sleep
        self.applier.wake_addon = self.sleep.wake
        self._project_of: dict[str, str] = {}  # add-on id -> project id (the desired state's)
        self._live: set[str] = set()  # add-on ids desired here and not deleted
        self.desired: DesiredState | None = self.state.load_desired()
        self._fingerprints = self._key_fingerprints(self.desired)
        self.book = ConditionBook()
        self.upkeep = Upkeep(docker, self.secrets, self.book, self.loopfs)
        self.upkeep.others_starting = self._others_starting
        # The CPUs add-ons are placed on (agent/placement.py); none: Docker's default, all.
        self._host_cpus = sorted(os.sched_getaffinity(0)) if config.agent.home_cores else []
        self._place()
        self.addon_status: dict[str, AddonStatus] = {}
        self.app_status: tuple[AppStatus, ...] = ()
        # app id -> ((container id, state), when, status): inspected again on a change
        # of either, or after a heartbeat interval (restart counts move within a state).
        self._app_seen: dict[
            str, tuple[tuple[str, str, apps.LastExit | None], float, AppStatus]
        ] = {}
        # How each app's container (id) last ended, from Docker's events (agent/apps.py).
        self._app_exits: dict[str, tuple[str, apps.LastExit]] = {}
        self._app_oom: set[str] = set()
        self.removed: tuple[str, ...] = ()
        self._published = b""  # the last status published, with _EPOCH for its time
        self._status_sent = 0.0  # loop time of the last status sent, a pass's or a heartbeat's
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

    def _place(self) -> None:
        """Home cores for the desired add-ons, applied by their next upkeep rounds (a
        sleeping one's by the pass, `_place_sleeping`)."""
        desired = self.desired
        addons = [a for pr in desired.projects for a in pr.addons] if desired else []
        self.upkeep.homes = placement.homes(addons, self._host_cpus)

    async def _place_sleeping(self, observed: model.Observed) -> None:
        """A sleeping add-on goes to its home cores while it sleeps (placement is over all
        add-ons: one created after it fell asleep can move it). Under the sleeper's
        transition lock, so a wake waits for the one `docker update` rather than
        having it land on the clients that woke the database."""
        for addon_id, sleeper in list(self.sleep.sleepers.items()):
            db = observed.container(model.db_name(addon_id))
            if sleeper.state == "awake" or db is None or db.state not in ("paused", "exited"):
                continue
            cores = await self.upkeep.stale_cores(sleeper.addon)
            if not cores:
                continue
            async with sleeper.transition:
                if self.sleep.state(addon_id) != "awake":  # not woken meanwhile
                    await self.upkeep.move_asleep(sleeper.addon, cores)

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
        self._fingerprints = self._key_fingerprints(state)
        self._place()
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
        started = 0.0
        while True:
            try:
                await asyncio.wait_for(self._trigger.wait(), self.config.agent.resync_interval_s)
            except TimeoutError:
                pass
            if self.workers.in_flight():
                # Chains run: each completion and each Docker event asks for a pass, and a
                # pass per event observed the whole host many times a second while sixty
                # add-ons converged. Meanwhile the asks coalesce into one pass per spacing.
                await asyncio.sleep(started + PASS_SPACING_S - time.monotonic())
            self._trigger.clear()
            started = time.monotonic()
            try:
                await self.reconcile_once()
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
            backoff = 0.5
            # A clean pass: nothing left to do, nothing in flight, no key retrying.
            # Keys retry on their own schedule (agent/workqueue.py), not the pass's.
            if len(self.workers.failed()) > len(self.workers.permanent()):
                RECONCILE_TOTAL.labels("requeue").inc()
            elif self.workers.in_flight() == 0:
                RECONCILE_TOTAL.labels("success").inc()
            self.last_pass_ok = time.monotonic()
            if not self._ready_notified:
                notify("READY=1")
                self._ready_notified = True

    async def events_loop(self) -> None:
        while True:
            try:
                # Events missed while the stream was down may hide restarted holders.
                self.firewall.forget()
                self.upkeep.container_changed()
                async with self.docker.events() as queue:
                    while (event := await queue.get()) is not None:
                        self._note_app_exit(event)
                        if (cid := (event.get("Actor") or {}).get("ID")) is not None:
                            self.upkeep.container_changed(cid)
                        attributes = (event.get("Actor") or {}).get("Attributes") or {}
                        # A claimed holder keeps its parked labels (agent/pool.py).
                        if (
                            attributes.get(model.LABEL_ROLE) in ("holder", "parked")
                            and "name" in attributes
                        ):
                            if event.get("status") == "die":
                                self.firewall.holder_died(attributes["name"])
                            elif event.get("status") == "destroy":
                                self.firewall.holder_removed(attributes["name"])
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

    def _note_app_exit(self, event: dict[str, object]) -> None:
        """An app container's `oom` and `die` events: how it last ended (Docker's inspect
        forgets it once the container restarts)."""
        actor = event.get("Actor")
        attributes = actor.get("Attributes") if isinstance(actor, dict) else None
        if not isinstance(attributes, dict) or attributes.get(model.LABEL_ROLE) != "app":
            return
        app_id = attributes.get(model.LABEL_APP)
        if not isinstance(app_id, str):
            return
        if event.get("status") == "oom":
            self._app_oom.add(app_id)
        elif event.get("status") == "die":
            code = str(attributes.get("exitCode", ""))
            oom = app_id in self._app_oom
            self._app_oom.discard(app_id)
            if code.lstrip("-").isdigit() and isinstance(actor, dict):
                self._app_exits[app_id] = (str(actor.get("ID", "")), apps.LastExit(int(code), oom))

    async def quota_guard_loop(self) -> None:
        """Between passes: a Postgres whose filesystem grew fast gets its upkeep round now.

        A round a resync interval is too slow for a tenant that writes tens of MB a second;
        a statfs is cheap enough to do every `quota_guard_s` (agent/upkeep.py).
        """
        rounds: dict[str, asyncio.Task[None]] = {}
        self._guarded_gen: tuple[int, bool] = (-1, False)  # (generation, any to guard)
        while True:
            await asyncio.sleep(self.config.agent.quota_guard_s)
            for aid in [a for a, task in rounds.items() if task.done()]:
                del rounds[aid]
            if self.desired is None or self.loopfs is None:
                continue
            if self._guarded_gen[0] != self.desired.generation:
                # Only a Postgres with a quota has a filesystem to guard: a host of Redis
                # add-ons skips the round of targets four times a second.
                self._guarded_gen = (
                    self.desired.generation,
                    any(
                        a.kind == "postgres" and a.storage_mb and not a.deleted
                        for p_ in self.desired.projects
                        for a in p_.addons
                    ),
                )
            if not self._guarded_gen[1]:
                continue
            try:
                targets = status.probe_targets(self.desired, self.observed, self._sleep_views())
            except Exception:  # a bug here must not take the agent down
                log.exception("upkeep.guard_crashed")
                continue
            for t in targets:
                last = self._last_probe.get(t.addon.id)
                # Only a database the last probe found ready, in the container it probed.
                if t.addon.id in rounds or last is None or last[0] != t.db_id:
                    continue
                if t.addon.kind == "postgres" and self.upkeep.guard_due(t.addon, t.db_id):
                    log.debug("upkeep.guard_round addon=%s", t.addon.id)
                    rounds[t.addon.id] = asyncio.create_task(
                        self._guarded_tend(t.addon, t.ip), name=f"guard-{t.addon.id}"
                    )

    async def _guarded_tend(self, addon: AddonSpec, ip: str) -> None:
        """An upkeep round outside a probe, under the same guard as the probe's."""
        timeout_s = self.config.agent.probe_timeout_s
        sleeper = self.sleep.sleepers.get(addon.id)
        try:
            if sleeper is None:
                await self._tend(addon, ip, timeout_s, quota_only=True)
                return
            async with sleeper.platform_connection():
                if sleeper.state == "awake":
                    await self._tend(addon, ip, timeout_s, quota_only=True)
        except Exception:
            log.exception("upkeep.guard_round_crashed addon=%s", addon.id)

    async def heartbeat_loop(self) -> None:
        """A status at least every `heartbeat_s`. One a pass sent counts: while a host
        converges its passes send a status every few hundred ms (each a row per add-on
        for the controller to compare), and a heartbeat between them said nothing new."""
        loop = asyncio.get_running_loop()
        every = self.config.agent.heartbeat_s
        while True:
            wait = self._status_sent + every - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            MQTT_CONNECTED.set(1 if self.broker.connected else 0)
            await self.publish_status()
            await self.publish_job_results()

    # --- one pass -----------------------------------------------------------------------
    async def reconcile_once(self) -> None:
        """Observe, plan the whole host, hand each key's chain to its worker, report.

        The pass itself never waits on a chain: a slow key (a database that takes its full
        stop timeout) holds up only its own worker.
        """
        seen = self.workers.epoch
        observed = await self.docker.snapshot()
        versions = self.secrets.versions()
        local = p.Local(
            secrets=versions,
            redis_conf_quota=self.secrets.redis_conf_quotas(
                a.id
                for pr in (self.desired.projects if self.desired else ())
                for a in pr.addons
                if a.kind == "redis" and a.id in versions
            ),
            finished_jobs=frozenset(self.state.job_results()),
            sleep=self._sleep_facts(),
            now=time.time(),
            backups_done=frozenset(self.backups.results()),
            backups_running=self.backups.running_ops(),
            watched_jobs=self.applier.watched_jobs(),
            resized_apps=self.applier.resized_apps(),
            refused_networks=self._refused_networks(observed),
            answered=dict(self._answered),
        )
        actions = p.plan(self.desired, observed, local, self.settings)
        self.firewall.shared = p.shared_ports(self.desired)
        # Fences first: nothing may start on a bridge or in a namespace left open.
        await self.firewall.sync(observed)
        planned = p.chains(self.desired, actions)
        for key, chain in planned.items():
            first = p.starts_slow(self.desired, key, chain)
            self.workers.submit(key, chain, self._fingerprints.get(key, ""), seen, first)
        self.workers.settle({a.key for a in actions}, seen)
        self.backups.sweep_deleted(self.desired, local.now)
        self.observed = observed
        await self.sleep.sync(self.desired, observed, self._is_ready)
        outcome = Outcome()
        outcome.failed = self.workers.failed()
        outcome.permanent = self.workers.permanent()
        await self._refresh_status(observed, outcome)
        await self._place_sleeping(observed)
        self._arm_sleep_timer()
        await self.publish_status(if_changed=True)
        await self.publish_job_results()

    def _refused_networks(self, observed: model.Observed) -> dict[str, netremoval.Refusal]:
        """The refusals still meaningful, and the host condition and metric from them. The
        condition appears at the first network stuck, and stays (True) once it is gone."""
        refused = netremoval.keep(
            self.applier.refused_networks, p.unwanted_networks(self.desired, observed)
        )
        self.applier.refused_networks = refused
        NETWORKS_UNREMOVABLE.set(len(netremoval.stuck(refused)))
        if netremoval.stuck(refused) or self.book.get(HOST, netremoval.CONDITION) is not None:
            st, reason, message = netremoval.condition(refused)
            self.book.set(HOST, netremoval.CONDITION, st, reason, message, datetime.now(UTC))
        return refused

    def _sleep_facts(self) -> dict[str, p.SleepFacts]:
        """The sleep manager's facts, and the add-ons whose new password the database has
        not been given yet (a rotation that came while it slept)."""
        facts = self.sleep.facts()
        for aid, f in facts.items():
            version = self.secrets.version(aid)
            if version and self.secrets.applied(aid) != version:
                facts[aid] = msgspec.structs.replace(f, credentials=True)
        return facts

    def _arm_sleep_timer(self) -> None:
        """A pass exactly when the next idle add-on's sleep falls due.

        Without it a sleep waited for the next pass something else caused, or the sleep
        tick's, and under load fell seconds late. Re-armed after each pass and each tick
        (the tick measures activity, which moves the deadlines).
        """
        now = time.time()
        deadline = p.next_sleep_deadline(self.desired, self._sleep_facts(), now)
        if self._sleep_timer is not None:
            if deadline == self._sleep_timer[0]:
                return
            self._sleep_timer[1].cancel()
            self._sleep_timer = None
        if deadline is None:
            return
        # A hair late rather than early: the executor decides again from the clock.
        delay = deadline - now + 0.005
        self._sleep_timer = (deadline, asyncio.get_running_loop().call_later(delay, self.trigger))

    def _sleep_ticked(self) -> None:
        self.watchdog.beat("sleep")
        self._arm_sleep_timer()

    def _key_fingerprints(self, desired: DesiredState | None) -> dict[str, str]:
        """A key's spec, as text: a permanently failed key is retried once it changes."""
        prints: dict[str, str] = {}
        self._project_of = {}
        live: set[str] = set()
        for project in desired.projects if desired is not None else ():
            for addon in project.addons:
                prints[addon.id] = msgspec.json.encode(addon).decode()
                self._project_of[addon.id] = project.id
                if not addon.deleted:
                    live.add(addon.id)
            for job in project.jobs:
                prints[job.id] = msgspec.json.encode(job).decode()
        self._live = live
        return prints

    def _sleep_views(self) -> dict[str, status.SleepView]:
        views: dict[str, status.SleepView] = {}
        for aid, saved in self.sleep.saved.items():
            sleeper = self.sleep.sleepers.get(aid)
            views[aid] = status.SleepView(
                state=saved.state,
                last_activity=saved.last_activity,
                clients=sleeper.clients if sleeper is not None else (),
                sleeps=saved.sleeps,
                wakes=saved.wakes,
                last_wake_ms=tuple(saved.last_wake_ms),
            )
        return views

    @staticmethod
    def _unanswered(
        desired: DesiredState,
        observed: model.Observed,
        derived: status.Derived,
        views: Mapping[str, status.SleepView],
    ) -> list[tuple[AddonSpec, model.ObservedContainer]]:
        """The awake add-ons whose database exists but is not ready."""
        out = []
        for project in desired.projects:
            for addon in project.addons:
                if addon.deleted or derived.ready.get(addon.id, True):
                    continue
                if views.get(addon.id, status.SleepView()).state != "awake":
                    continue
                if (db := observed.container(model.db_name(addon.id))) is not None:
                    out.append((addon, db))
        return out

    async def _refresh_status(self, observed: model.Observed, outcome: Outcome) -> None:
        """Probe what is awake and running, derive the status (agent/status.py), record it."""
        desired = self.desired
        if desired is None:
            return
        views = self._sleep_views()
        targets = status.probe_targets(desired, observed, views)
        await self._drop_kept(targets)
        # The pass probes what has no answer for its current database yet (new, restarted,
        # failing). A ready add-on keeps its last answer here and is probed again once per
        # resync interval by a background round: probing a hundred databases inside the
        # pass made every pass at a resync seconds long under load, and a pass per finished
        # chain would otherwise probe every database many times a second.
        now_m = time.monotonic()
        probes: dict[str, status.Probe] = {}
        due: list[status.Target] = []
        stale: list[status.Target] = []
        polled: list[status.Target] = []
        for t in targets:
            last = self._last_probe.get(t.addon.id)
            if last is not None and last[0] == t.db_id:
                probes[t.addon.id] = last[2]
                if now_m - last[1] >= self._reprobe_s:
                    stale.append(t)
            elif (latest := self._polled.get(t.addon.id)) is not None and latest[0] == t.db_id:
                # Its readiness poll runs: the poll's latest answer stands (a second probe
                # here, per pass, doubled the connections to every starting database).
                probes[t.addon.id] = latest[1]
                polled.append(t)
            else:
                due.append(t)
        self._last_probe = {
            t.addon.id: last
            for t in targets
            if (last := self._last_probe.get(t.addon.id)) is not None and last[0] == t.db_id
        }
        if stale and (self._reprobing is None or self._reprobing.done()):
            self._reprobing = asyncio.create_task(self._reprobe(stale), name="reprobe")
        results = await asyncio.gather(*(self._probe(t.addon, t.ip) for t in due))
        for target, (ok, reason, message) in zip(due, results, strict=True):
            probes[target.addon.id] = status.Probe(ok, reason, message)
            if ok:
                log.info("addon.answered addon=%s by=pass", target.addon.id)
                self._last_probe[target.addon.id] = (target.db_id, now_m, probes[target.addon.id])
                self._answered[target.addon.id] = target.db_id
            if (sleeper := self.sleep.sleepers.get(target.addon.id)) is not None:
                sleeper.ready = ok
            if not ok:
                self._await_readiness(target)
        for target in [*due, *polled]:
            if probes[target.addon.id].reason == "Unreachable":
                await self._repair_split_namespace(target)
        derived = status.derive(desired, observed, outcome.failed, outcome.permanent, probes, views)
        now = datetime.now(UTC)
        for u in derived.updates:
            self.book.set(u.owner, u.type, u.status, u.reason, u.message, now)
        await asyncio.gather(
            *(
                self.upkeep.memory_check(a, db)
                for a, db in self._unanswered(desired, observed, derived, views)
            )
        )
        present = {a.id for pr in desired.projects for a in pr.addons}
        self._answered = {
            a: db for a, db in self._answered.items() if a in present and a not in derived.removed
        }
        for aid in derived.removed:
            self.book.forget(aid)
            self._split_checked.pop(aid, None)
            self.upkeep.forget(aid)
        statuses: dict[str, AddonStatus] = {}
        labels: set[tuple[str, str, str]] = set()
        for project in desired.projects:
            for addon in project.addons:
                if addon.deleted:
                    continue
                view = views.get(addon.id, status.SleepView())
                statuses[addon.id] = status.addon_status(
                    project.id,
                    addon,
                    desired.generation,
                    self.book.of(addon.id),
                    view,
                    usage_bytes=self.upkeep.usage.get(addon.id),
                    quota_bytes=self.upkeep.quota.get(addon.id),
                )
                label = (addon.id, project.id, addon.kind)
                ADDON_READY.labels(*label).set(1 if derived.ready.get(addon.id) else 0)
                ADDON_SLEEP_STATE.labels(*label).set(SLEEP_LEVEL[view.state])
                labels.add(label)
        # Drop the series of add-ons that left this host, so dashboards don't show ghosts.
        for gone in self._metric_labels - labels:
            for gauge in (ADDON_READY, ADDON_SLEEP_STATE):
                with contextlib.suppress(KeyError):
                    gauge.remove(*gone)
        self._metric_labels = labels
        self.addon_status = statuses
        self.removed = derived.removed
        await self._refresh_apps(desired, observed)

    async def _refresh_apps(self, desired: DesiredState, observed: model.Observed) -> None:
        """Each app's container as Docker shows it (agent/apps.py), for the status."""
        now_m = time.monotonic()
        seen: dict[str, tuple[tuple[str, str, apps.LastExit | None], float, AppStatus]] = {}
        found: list[AppStatus] = []
        for project in desired.projects:
            for app in project.apps:
                container = observed.container(model.app_container_name(app.id))
                if container is None:
                    found.append(apps.app_status(project.id, app, None))
                    continue
                noted = self._app_exits.get(app.id)
                # Another container's exit (one a new release replaced) is not this one's.
                exited = noted[1] if noted is not None and noted[0] == container.id else None
                key = (container.id, container.state, exited)
                last = self._app_seen.get(app.id)
                if last is not None and last[0] == key and now_m - last[1] < self._app_max_age:
                    seen[app.id] = last
                    found.append(last[2])
                    continue
                try:
                    inspected = await self.docker.inspect(container.name)
                    current = apps.app_status(project.id, app, inspected, exited)
                    if (seen_exit := apps.last_exit(inspected)) is not None:
                        self._app_exits[app.id] = (container.id, seen_exit)
                except NotFound:
                    current = apps.app_status(project.id, app, None)
                except AgentError as exc:
                    log.warning("app.inspect_failed app=%s error=%s", app.id, exc)
                    if last is None:
                        continue
                    current = last[2]
                seen[app.id] = (key, now_m, current)
                found.append(current)
        self._app_seen = seen
        self.app_status = tuple(found)
        wanted = {a.id for proj in desired.projects for a in proj.apps}
        self._app_exits = {k: v for k, v in self._app_exits.items() if k in wanted}

    async def _repair_split_namespace(self, target: status.Target) -> None:
        """A holder restarted in place has a new namespace the database is not in.

        Docker keeps the holder's id, so the plan cannot see it; the database then has no
        network at all. Found by comparing namespaces, once per database container and run
        of its holder (the firewall's record of it: every new run is fenced before the pass
        probes); the fix is a new database container (same volume), which the next pass
        creates.
        """
        addon = target.addon
        key = (target.db_id, self.firewall.run(model.holder_name(addon.id)))
        if self._split_checked.get(addon.id) == key:
            return
        try:
            holder = await self.docker.inspect(model.holder_name(addon.id))
            db = await self.docker.inspect(model.db_name(addon.id))
            h_pid, d_pid = holder["State"]["Pid"], db["State"]["Pid"]
            if not (h_pid and d_pid):
                return
            if netns.netns_inode(h_pid) == netns.netns_inode(d_pid):
                self._split_checked[addon.id] = key
                return
        except (AgentError, OSError, KeyError):
            return
        log.warning("addon.split_namespace addon=%s action=recreate_db", addon.id)
        # Through the add-on's worker: never beside another chain on the same add-on.
        if self.workers.submit(
            addon.id,
            (p.RemoveContainer(addon.id, model.db_name(addon.id), "SplitNamespace"),),
            self._fingerprints.get(addon.id, ""),
        ):
            self._split_checked[addon.id] = key

    async def _reprobe(self, targets: list[status.Target], concurrency: int = 4) -> None:
        """Probe ready add-ons again (and tend them), a few at a time, off the pass.

        A failed probe drops the add-on's answer, so the next pass probes it itself and
        acts on the failure; that pass is asked for at once, as is one when the upkeep
        flipped a condition (a quota reached, a memory kill; not a usage figure that moved).
        """
        changed = False
        queue = iter(targets)

        async def one(t: status.Target) -> None:
            nonlocal changed
            before = self.book.flips(t.addon.id)
            ok, reason, message = await self._probe(t.addon, t.ip, keep=t.db_id)
            last = self._last_probe.get(t.addon.id)
            if last is None or last[0] != t.db_id:
                return  # replaced or gone meanwhile: the pass has it
            if (sleeper := self.sleep.sleepers.get(t.addon.id)) is not None:
                sleeper.ready = ok
            if ok:
                self._last_probe[t.addon.id] = (
                    t.db_id,
                    time.monotonic(),
                    status.Probe(ok, reason, message),
                )
                self._answered[t.addon.id] = t.db_id
            else:
                del self._last_probe[t.addon.id]
            changed = changed or not ok or self.book.flips(t.addon.id) != before

        async def worker() -> None:
            # `concurrency` of these take the targets in turn: a task and a semaphore wait
            # per add-on were a good part of the round's own cost at a hundred add-ons.
            for t in queue:
                try:
                    await one(t)
                except Exception:  # a bug here must not stop the other add-ons' probes
                    log.exception("reprobe.crashed addon=%s", t.addon.id)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        if changed:
            self.trigger()

    def _starting(self) -> int:
        """Add-ons whose readiness poll runs (started, no answer yet)."""
        return sum(1 for a, task in self._readiness.items() if not task.done() and a in self._live)

    def _others_starting(self, addon_id: str) -> bool:
        """Whether add-ons other than `addon_id` are being made or started here: a chain
        runs for another key, or another add-on's readiness poll (it has not answered)."""
        own = 1 if self.workers.busy(addon_id) else 0
        return self.workers.in_flight() > own or any(
            aid != addon_id and not task.done() and aid in self._live
            for aid, task in self._readiness.items()
        )

    def _await_readiness(self, target: status.Target) -> None:
        """Poll a starting add-on quickly, so Ready does not wait for the next resync.

        The poll's latest answer is the add-on's probe result while it runs (passes do not
        probe it again), and its success is the add-on's last good probe.
        """
        addon, ip, db_id = target.addon, target.ip, target.db_id
        task = self._readiness.get(addon.id)
        if task is not None and not task.done():
            return

        async def poll() -> None:
            began = time.monotonic()
            deadline = began + 120
            # Quick at first, then every 250 ms, then backing off with the time waited
            # (status.next_poll_delay): a Postgres forks a backend for each attempt once
            # it listens, and sixty add-ons being created at once polled 20 times a second
            # each took the CPU they start on.
            delay = status.POLL_FIRST_S
            try:
                while time.monotonic() < deadline:
                    await asyncio.sleep(delay)
                    delay = status.next_poll_delay(delay, time.monotonic() - began)
                    # Deleted before it answered (a client that deletes right after its
                    # first query): polling it on for two minutes would count it as still
                    # starting (the pool's refill and home-core moves wait for those).
                    if self.sleep.state(addon.id) != "awake" or addon.id not in self._live:
                        return
                    result = status.Probe(*await self._probe(addon, ip, 1.0))
                    self._polled[addon.id] = (db_id, result)
                    if result.ok:
                        log.info("addon.answered addon=%s by=poll", addon.id)
                        self._last_probe[addon.id] = (db_id, time.monotonic(), result)
                        self._answered[addon.id] = db_id
                        if (sleeper := self.sleep.sleepers.get(addon.id)) is not None:
                            sleeper.ready = True
                        self.trigger()
                        return
            finally:
                self._polled.pop(addon.id, None)

        self._readiness[addon.id] = asyncio.create_task(poll(), name=f"ready-{addon.id}")

    async def _probe(
        self,
        addon: AddonSpec,
        ip: str,
        timeout_s: float | None = None,
        keep: str | None = None,
    ) -> tuple[bool, str, str]:
        """`keep`: the database container id of a re-probe (see `_redis_round`)."""
        if not self.secrets.has(addon.id):
            return False, "NoSecret", "the add-on's secret is not on this host yet"
        sleeper = self.sleep.sleepers.get(addon.id)
        timeout_s = timeout_s or self.config.agent.probe_timeout_s
        if addon.kind == "redis":
            # One connection for the probe and the upkeep round, so one guard counts it.
            if sleeper is None:
                return await self._redis_round(addon, ip, timeout_s, keep)
            async with sleeper.platform_connection():
                if sleeper.state != "awake":
                    return False, "Sleeping", f"in {sleeper.state} sleep"
                return await self._redis_round(addon, ip, timeout_s)
        if sleeper is None:
            result = await self._wake_probe(addon, ip, timeout_s)
            if result[0] or probe.server_full(result):
                await self._tend(addon, ip, timeout_s)
            return result
        async with sleeper.platform_connection():
            # Checked under the lock that a falling-asleep add-on also takes: never probe a
            # paused database (the probe would hang) or count a probe as a client.
            if sleeper.state != "awake":
                return False, "Sleeping", f"in {sleeper.state} sleep"
            result = await self._wake_probe(addon, ip, timeout_s)
        if result[0] or probe.server_full(result):
            # A guard of its own: each admits one platform connection, not a client's.
            async with sleeper.platform_connection():
                if sleeper.state == "awake":
                    await self._tend(addon, ip, timeout_s)
        return result

    async def _redis_round(
        self, addon: AddonSpec, ip: str, timeout_s: float, keep: str | None = None
    ) -> tuple[bool, str, str]:
        """PING, then the upkeep round on the same connection if it answered.

        A re-probe (`keep`: its database container id) of an add-on that never sleeps keeps
        its connection for the next round: connecting, AUTH and CLIENT SETNAME were most of
        an idle host's CPU, a hundred add-ons every resync interval. A kept connection that
        does not answer PING is dropped and a fresh one decides; one is opened afresh every
        KEEP_ROUNDS rounds anyway, so accepting new clients stays checked too.
        """
        conn, rounds = await self._take_kept(addon.id, keep, ip)
        # The upkeep's INFO goes in the probe's write: a kept connection's round is one
        # round trip (a fresh one's two: CONFIG GET is its own, once per connection).
        if conn is not None:
            result, info = await probe.redis_ping_info(conn, ip)
            if not result[0]:
                await conn.close()
                conn = None
        if conn is None:
            rounds = 0
            conn, result, info = await self._redis_fresh(addon, ip, timeout_s)
            if conn is None:
                return result
        try:
            if result[0]:
                await self._tend(addon, ip, timeout_s, conn, info=info)
        finally:
            if keep is not None and result[0] and not conn.closed and rounds + 1 < KEEP_ROUNDS:
                self._kept[addon.id] = (keep, ip, conn, rounds + 1)
            else:
                await conn.close()
        return result

    async def _redis_fresh(
        self, addon: AddonSpec, ip: str, timeout_s: float
    ) -> tuple[resp.Connection | None, tuple[bool, str, str], resp.Reply]:
        """A new connection as the probe's user, PING and INFO sent; a login refused to
        the user is mended as the admin (Upkeep.probe_role) and tried once more."""
        conn, result, info = await self._redis_login(addon, ip, timeout_s)
        if conn is not None and result[1] == probe.ROLE_REFUSED:
            await conn.close()
            if not await self._mend_probe_role(addon, ip, timeout_s, result[2]):
                return None, result, None
            conn, result, info = await self._redis_login(addon, ip, timeout_s)
        return conn, result, info

    async def _redis_login(
        self, addon: AddonSpec, ip: str, timeout_s: float
    ) -> tuple[resp.Connection | None, tuple[bool, str, str], resp.Reply]:
        password = self.secrets.platform_password(addon.id, specs.PROBE_USER)
        conn, result = await probe.redis_connect(ip, password, timeout_s)
        if conn is None:
            return None, result, None
        result, info = await probe.redis_ping_info(conn, ip)
        return conn, result, info

    async def _mend_probe_role(
        self, addon: AddonSpec, ip: str, timeout_s: float, refusal: str
    ) -> bool:
        try:
            await self.upkeep.probe_role(addon, ip, timeout_s, refusal)
        except (*probe.QUERY_ERRORS, resp.RespError, AgentError) as exc:
            log.warning("probe.role_mend_failed addon=%s error=%r", addon.id, exc)
            return False
        return True

    async def _take_kept(
        self, addon_id: str, db_id: str | None, ip: str
    ) -> tuple[resp.Connection | None, int]:
        """The add-on's kept connection if it is to this database and address (else closed)."""
        kept = self._kept.pop(addon_id, None)
        if kept is None:
            return None, 0
        if db_id is None or kept[:2] != (db_id, ip) or kept[2].closed:
            await kept[2].close()
            return None, 0
        return kept[2], kept[3]

    async def _drop_kept(self, targets: tuple[status.Target, ...] | None = None) -> None:
        """Close kept connections of add-ons that left, changed or may now sleep."""
        valid = {t.addon.id: (t.db_id, t.ip) for t in targets or ()}
        # All taken out before the first close yields: a re-probe's round takes its add-on's
        # connection (`_take_kept`) meanwhile, and deleting from a list made before that
        # raised KeyError out of the pass (reconcile.crashed, twice in one 60-add-on
        # delete) after closing the connection under the round that had it.
        drop = [
            aid
            for aid, (db_id, ip, conn, _rounds) in self._kept.items()
            if valid.get(aid) != (db_id, ip) or aid in self.sleep.sleepers or conn.closed
        ]
        for conn in [self._kept.pop(aid)[2] for aid in drop]:
            await conn.close()

    async def _tend(
        self,
        addon: AddonSpec,
        ip: str,
        timeout_s: float,
        redis: resp.Connection | None = None,
        quota_only: bool = False,
        info: resp.Reply = None,
    ) -> None:
        """Limits, password rotation and storage quota, in the probe's guard (upkeep.py).

        `info`: the reply to `INFO memory` the probe had `redis` answer with its PING."""
        project_id = self._project_of.get(addon.id, "")
        try:
            # One round is a handful of statements; more than this is a stuck database, and
            # the pass that awaits it must go on for the other add-ons.
            async with asyncio.timeout(4 * timeout_s):
                await self.upkeep.tend(
                    project_id, addon, ip, timeout_s, redis, quota_only=quota_only, info=info
                )
        except TimeoutError:
            log.warning("upkeep.timed_out addon=%s after_s=%s", addon.id, 4 * timeout_s)

    async def _wake_probe(
        self, addon: AddonSpec, ip: str, timeout_s: float
    ) -> tuple[bool, str, str]:
        """A real client's connection and first query, straight to the database, as the
        probe's least role; a login refused to it is mended as the admin, then tried again."""
        result = await self._probe_as_role(addon, ip, timeout_s)
        if result[1] == probe.ROLE_REFUSED and await self._mend_probe_role(
            addon, ip, timeout_s, result[2]
        ):
            result = await self._probe_as_role(addon, ip, timeout_s)
        return result

    async def _probe_as_role(
        self, addon: AddonSpec, ip: str, timeout_s: float
    ) -> tuple[bool, str, str]:
        password = self.secrets.platform_password(addon.id, specs.PROBE_USER)
        if addon.kind == "postgres":
            return await probe.postgres(ip, addon.database, password, timeout_s)
        return await probe.redis(ip, password, timeout_s)

    async def _backup_roles(self, addon: AddonSpec, ip: str, role: str) -> None:
        """The least roles made right on the live server before a backup step logs in.

        A backup may run for hours: a busy host's slow login (a probe's few seconds ran
        out at load 40) is waited for longer, and tried again, before the step fails."""
        timeout_s = max(BACKUP_ROLES_TIMEOUT_S, self.config.agent.probe_timeout_s)
        for attempt in range(1, BACKUP_ROLES_ATTEMPTS + 1):
            try:
                await self.upkeep.platform_roles(addon, ip, timeout_s, role)
                return
            except (*probe.QUERY_ERRORS, resp.RespError) as exc:
                if attempt == BACKUP_ROLES_ATTEMPTS:
                    raise AgentError(f"{exc.__class__.__name__}: {exc}") from None
                log.warning(
                    "backup.roles_retry addon=%s attempt=%s error=%r", addon.id, attempt, exc
                )
                await asyncio.sleep(attempt)

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
            await asyncio.sleep(0.02)  # Redis answers LOADING at once until it has loaded
        return False

    async def _addon_started(self, addon_id: str) -> None:
        await self.sleep.addon_started(addon_id)

    def _sleep_changed(self) -> None:
        self.trigger()

    def _wake_requested(self, addon_id: str) -> None:
        """A client waits at the wake listener: the wake goes ahead of the key's queue.

        The add-on's worker runs it (never beside another of its chains); the pass that
        follows plans the same wake from the request if this one fails.
        """
        self.workers.urgent(addon_id, (p.WakeAddon(addon_id, model.db_name(addon_id)),))
        self.trigger()

    def _is_ready(self, addon_id: str) -> bool:
        ready = self.book.get(addon_id, "Ready")
        return ready is not None and ready.status == "True"

    async def close_sleepers(self) -> None:
        tasks = [*self._readiness.values(), *([self._reprobing] if self._reprobing else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._drop_kept()
        await self.sleep.close()

    # --- outputs ------------------------------------------------------------------------
    async def publish_status(self, if_changed: bool = False) -> None:
        """Publish the host's status; `if_changed`: only if it differs from the last one
        published, apart from its time (a pass's; the heartbeat sends it regardless).

        Passes come many a second while a host converges, and the controller writes every
        add-on's row of each report in one transaction: a report per change is enough.
        """
        status = HostStatus(
            version=SCHEMA_VERSION,
            host=self.host,
            sent_at=_EPOCH,
            applied_generation=self.desired.generation if self.desired else 0,
            capacity=_capacity(),
            conditions=self.book.of(HOST),
            addons=tuple(self.addon_status.values()),
            removed=self.removed,
            apps=self.app_status,
        )
        body = encode(status)
        if if_changed and body == self._published:
            return
        sent = msgspec.structs.replace(status, sent_at=datetime.now(UTC))
        self._status_sent = asyncio.get_running_loop().time()
        if await self.broker.publish(topics.status(self.host), encode(sent), retain=True):
            self._published = body

    async def publish_job_results(self) -> None:
        wanted = {
            job.id
            for project in (self.desired.projects if self.desired else ())
            for job in project.jobs
        }
        for job_id in self.state.job_streams() - wanted:
            if self.desired is not None:
                self.state.forget_job(job_id)  # cancelled while it ran: no result comes
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
