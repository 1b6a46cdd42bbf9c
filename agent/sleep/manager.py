"""The sleep manager: one `Sleeper` per sleep-enabled add-on, kept level-triggered.

Each reconcile pass calls `sync` with the desired and observed state; it creates sleepers
for add-ons that may sleep (once they have answered a client), replaces them when their
holder changed, wakes and drops them when sleep is disabled, and hands every wake listener
to the keeper so it outlives the agent. `loop` puts idle add-ons to sleep. Sleep states are
persisted, so a restarted agent keeps sleeping add-ons asleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from agent import model, netns
from agent.docker import Docker
from agent.errors import AgentError
from agent.keeper_client import KeeperClient
from agent.plan import SleepFacts
from agent.sleep import log
from agent.sleep.listener import WAKE_WAIT_S, Probe, RelayBudget, Sleeper
from agent.sleep.store import Persisted, SleepStore
from agent.synqueue import DeepWake
from schemas.messages import AddonSpec, DesiredState, SleepState


class SleepManager:
    def __init__(
        self,
        state_dir: Path,
        docker: Docker,
        keeper: KeeperClient,
        probe: Probe,
        on_change: Callable[[], None],
        tick_s: float,
        budget: RelayBudget,
        deep_wake: DeepWake = "queue",
    ) -> None:
        self.budget = budget
        self.deep_wake: DeepWake = deep_wake
        self.store = SleepStore(state_dir / "sleep.json")
        self.saved: dict[str, Persisted] = self.store.load()
        self.sleepers: dict[str, Sleeper] = {}
        self.docker = docker
        self.keeper = keeper
        self._probe = probe
        self._on_change = on_change
        self._tick_s = tick_s
        self._adopted: dict[str, socket.socket] | None = None
        # add-on id -> platform operations (backups) holding it awake; outlives a sleeper
        # replaced meanwhile (a new holder), so the new one is held as well.
        self.holds: dict[str, int] = {}
        # The keeper that holds every listener handed over so far (None: none yet).
        self._keeper_seen: tuple[int, int] | None = None
        self.on_tick: Callable[[], None] = lambda: None  # after each tick: the watchdog
        # A client waits at a wake listener: the runtime hands the add-on's worker a wake.
        self.on_wake_request: Callable[[str], None] = lambda _aid: None

    def state(self, addon_id: str) -> SleepState:
        saved = self.saved.get(addon_id)
        return saved.state if saved is not None else "awake"

    def states(self) -> dict[str, SleepState]:
        return {aid: saved.state for aid, saved in self.saved.items()}

    def facts(self) -> dict[str, SleepFacts]:
        """What the planner decides sleep from: each add-on's state and measured activity."""
        facts: dict[str, SleepFacts] = {}
        for aid, saved in self.saved.items():
            sleeper = self.sleepers.get(aid)
            if sleeper is None:
                facts[aid] = SleepFacts(
                    state=saved.state,
                    last_activity=saved.last_activity,
                    held=self.holds.get(aid, 0) > 0,
                )
                continue
            facts[aid] = SleepFacts(
                state=saved.state,
                last_activity=saved.last_activity,
                clients=len(sleeper.clients),
                ready=sleeper.ready,
                held=sleeper.held > 0,
                wake_requested=sleeper.wake_requested,
                listening=True,
            )
        return facts

    async def sleep(self, addon_id: str, stage: SleepState) -> None:
        """A planned sleep, on the add-on's worker."""
        sleeper = self.sleepers.get(addon_id)
        if sleeper is None:
            raise AgentError(f"no wake listener for {addon_id} yet")
        await sleeper.sleep(stage)

    async def wake(self, addon_id: str) -> None:
        """A planned wake, on the add-on's worker: a client waits, or a backup holds it."""
        sleeper = self.sleepers.get(addon_id)
        if sleeper is None:
            raise AgentError(f"no wake listener for {addon_id} yet")
        if sleeper.wake_requested:
            reason = "connection"
        elif sleeper.held:
            reason = "held by a platform operation"
        elif not sleeper.addon.sleep.enabled:
            reason = "sleep disabled by the plan"
        else:
            reason = "planned"
        await sleeper.wake(reason)

    async def addon_started(self, addon_id: str) -> None:
        sleeper = self.sleepers.get(addon_id)
        if sleeper is not None:
            await sleeper.mark_awake()
        elif addon_id in self.saved:
            self.saved[addon_id].state = "awake"
        self.store.save(self.saved)

    @contextlib.asynccontextmanager
    async def hold(self, addon_id: str, wake_wait_s: float = WAKE_WAIT_S) -> AsyncIterator[None]:
        """Keep an add-on awake for a platform operation (a backup), woken if asleep.

        The hold is a fact the planner reads (`SleepFacts.held`): a sleeping add-on is
        woken by its own worker like any other wake, asked for here at once, and this
        waits until it is awake. The operation is not client activity: the idle clock and
        the connection counter are put back afterwards, so a sleeping add-on falls asleep
        again on its own idle timer (at once, if it had been idle long enough) and an
        awake one is not kept up.
        """
        saved = self.saved.get(addon_id)
        # Held even without a sleeper yet: one created during the operation is held too.
        self._hold(addon_id, +1)
        idle_since = saved.last_activity if saved is not None else time.time()
        try:
            if self.state(addon_id) != "awake":
                log.info("addon.wake_requested addon=%s reason=held", addon_id)
                self.on_wake_request(addon_id)
                await self._until_awake(addon_id, wake_wait_s)
            yield
        finally:
            self._hold(addon_id, -1)
            if (saved := self.saved.get(addon_id)) is not None:
                saved.last_activity = idle_since
            if (sleeper := self.sleepers.get(addon_id)) is not None:
                with contextlib.suppress(OSError):
                    sleeper.last_opens = netns.passive_opens(sleeper.pid)
                # A client that connected during the hold was not measured: look again.
                sleeper.table_read = False
            self.store.save(self.saved)

    def _hold(self, addon_id: str, delta: int) -> None:
        held = self.holds.get(addon_id, 0) + delta
        if held > 0:
            self.holds[addon_id] = held
        else:
            self.holds.pop(addon_id, None)
        if (sleeper := self.sleepers.get(addon_id)) is not None:
            sleeper.held = max(held, 0)

    async def _until_awake(self, addon_id: str, timeout_s: float) -> None:
        """Until the add-on's worker has woken it (its sleeper may be replaced meanwhile)."""
        deadline = time.monotonic() + timeout_s
        while self.state(addon_id) != "awake":
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError(f"add-on {addon_id} did not wake within {timeout_s:.0f}s")
            sleeper = self.sleepers.get(addon_id)
            if sleeper is None:
                await asyncio.sleep(min(0.1, left))
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sleeper.resumed.wait(), min(1.0, left))

    async def sync(
        self,
        desired: DesiredState | None,
        observed: model.Observed,
        is_ready: Callable[[str], bool],
    ) -> None:
        """Keep one Sleeper per sleep-enabled add-on whose holder runs (level-triggered)."""
        if self._adopted is None:
            # Listeners that outlived the previous agent process, with clients queued.
            self._adopted = await self.keeper.take_all()
        if desired is None:
            return  # without a desired state nothing is known to be unwanted: keep all
        # A keeper restarted since the last hand-over lost the listeners: refill it.
        keeper = self.keeper.identity()
        refill = keeper is None or keeper != self._keeper_seen
        handed = True
        # Sleep-enabled add-ons, and any still asleep whose plan stopped allowing sleep:
        # the planner wakes those through their listener (which lifts the redirect), and
        # the pass after drops the listener.
        wanted: dict[str, tuple[str, AddonSpec]] = {}
        for project in desired.projects:
            for addon in project.addons:
                if not addon.deleted and (addon.sleep.enabled or self.state(addon.id) != "awake"):
                    wanted[addon.id] = (project.id, addon)
        for aid, sleeper in list(self.sleepers.items()):
            holder = observed.container(model.holder_name(aid))
            if (
                aid in wanted
                and holder is not None
                and holder.id == sleeper.holder_id
                and sleeper.alive()
            ):
                sleeper.addon = wanted[aid][1]
                if refill:
                    handed = await self._deposit(sleeper) and handed
                continue
            del self.sleepers[aid]
            await sleeper.close()
            await self.keeper.delete(sleeper.wake_name)
            if sleeper.synq is not None:
                await self.keeper.delete(sleeper.queue_name)
        for aid, (project_id, addon) in wanted.items():
            if aid in self.sleepers:
                continue
            holder = observed.container(model.holder_name(aid))
            network = observed.network(model.network_name(project_id))
            db = observed.container(model.db_name(aid))
            if (
                holder is None
                or holder.state != "running"
                or not holder.ip
                or network is None
                or db is None
            ):
                continue
            saved = self.saved.get(aid)
            repaired = saved is not None and saved.state != "awake" and db.state == "running"
            if saved is not None and repaired:
                # Recorded asleep, yet the database runs: a wake (or a sleep) was cut short
                # by a crash. Left so, it would be reported asleep and never slept again,
                # every client detoured through a wake. Awake is the safe reading: the
                # redirect goes and the idle timer decides afresh.
                log.warning("sleep.state_repaired addon=%s recorded=%s", aid, saved.state)
                saved.state = "awake"
                saved.last_activity = time.time()
            asleep = saved is not None and saved.state != "awake"
            if not asleep and not repaired and not is_ready(aid):
                continue  # not before it has answered a client once
            queue: socket.socket | None = None
            try:
                pid = int((await self.docker.inspect(holder.name))["State"]["Pid"])
                sleeper = Sleeper(
                    addon,
                    db.name,
                    holder.id,
                    pid,
                    holder.ip,
                    network.gateway,
                    self.saved.setdefault(aid, Persisted()),
                    self.docker,
                    self._probe,
                    self._changed,
                    self.budget,
                    self._wake_request,
                    self.keeper,
                    self.deep_wake,
                )
                sleeper.ready = not asleep
                sleeper.held = self.holds.get(aid, 0)
                adopted = self._adopted.pop(sleeper.wake_name, None)
                queue = self._adopted.pop(sleeper.queue_name, None)
                await sleeper.start(adopted, queue)
            except (AgentError, OSError) as exc:
                log.warning("sleep.listener_failed addon=%s error=%s", aid, exc)
                if queue is not None:
                    # Closed with the sleeper: the keeper's copy would keep the queue bound
                    # and the next sleeper from binding it (its SYNs are sent again).
                    await self.keeper.delete(sleeper.queue_name)  # popped after it was made
                continue
            # Registered before the next await: a wake it requested at start finds it.
            self.sleepers[aid] = sleeper
            if queue is not None and sleeper.synq is None:
                await self.keeper.delete(sleeper.queue_name)  # relaying now: of no use
            if adopted is None or (queue is None and sleeper.synq is not None):
                handed = await self._deposit(sleeper) and handed
        # Adopted listeners of add-ons that are gone or have a new holder are of no use.
        for name, sock in list(self._adopted.items()):
            aid = name.split("-")[1]
            holder = observed.container(model.holder_name(aid))
            if aid not in wanted or holder is None or not name.endswith(holder.id[:12]):
                sock.close()
                del self._adopted[name]
                await self.keeper.delete(name)
        for aid in [a for a in self.saved if a not in wanted]:
            del self.saved[aid]
        self.store.save(self.saved)
        if handed:
            self._keeper_seen = keeper

    async def _deposit(self, sleeper: Sleeper) -> bool:
        """Hand the keeper the sleeper's listener and SYN queue; False if unreachable."""
        put = sleeper.listener is None or await self.keeper.put(sleeper.wake_name, sleeper.listener)
        if sleeper.synq is not None and not sleeper.synq.closed:
            put = await self.keeper.put(sleeper.queue_name, sleeper.synq.sock) and put
        return put

    def _changed(self) -> None:
        self.store.save(self.saved)
        self._on_change()

    def _wake_request(self, addon_id: str) -> None:
        self.on_wake_request(addon_id)

    async def loop(self) -> None:
        """Measure activity each tick; ask for a pass when one would sleep an add-on, and a
        wake for a light-sleeping one with a client queued at its database.

        The decision and the action are the planner's and the add-on's worker's.
        """
        while True:
            await asyncio.sleep(self._tick_s)
            now = time.time()
            due = False
            for sleeper in list(self.sleepers.values()):
                if sleeper.held:
                    continue  # a backup's connections are not a client's: not measured
                try:
                    await sleeper.measure_activity(now)
                except OSError as exc:
                    log.warning("sleep.measure_failed addon=%s error=%s", sleeper.addon.id, exc)
                    continue
                sleeper.wake_if_queued()
                due = due or sleeper.due(now)
            self.budget.set_kept(sum(len(s.kept) for s in self.sleepers.values()))
            if due:
                self._on_change()
            self.on_tick()

    async def close(self) -> None:
        """On shutdown: listeners stay with the keeper, sleeping add-ons stay asleep."""
        for sleeper in self.sleepers.values():
            await sleeper.close()
        self.store.save(self.saved)
