"""Idle sleep and wake-on-connect, at the add-on's unchanged address.

Each sleep-enabled add-on has, in its holder's network namespace, a SYN watch
(`agent/synwatch.py`), a SYN queue (`agent/synqueue.py`) and a wake listener (on the
add-on's port + 10000). While the add-on is awake nothing points at them: clients reach
the database directly, with no proxy in the data path. Light sleep pauses the database and
redirects nothing: the paused database keeps its socket, the kernel completes a client's
handshake on it, and the SYN watch reports the attempt, which asks for a wake. Deep sleep
first has the kernel queue new connections' SYNs (NFQUEUE), then stops the database; a
queued SYN asks for a wake, and once the database answers one verdict lets every held SYN
go on to it. Either way the connection is the database's own for its whole life.
Where NFQUEUE is missing (or with `agent.deep_wake = "relay"`), deep sleep instead
redirects new connections to the listener, which accepts them, asks for a wake, and hands
each to the keeper, which relays it with splice(2) for its whole life (agent/keeper.py).
The wake removes the queue rule or the redirect, so connections made after it go straight
to the database again. The host's own traffic (the gateway address) is exempt from all of
these, so probes and relays always reach the database itself and wake nothing.

Sleeping and waking are the planner's: a request (`wake_requested`, `on_wake_request`)
has the add-on's worker carry out the wake, ahead of its other queued work; nothing here
starts a wake of its own. This all runs in the agent, from its last good desired state:
the controller and the broker may be down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from agent import netns, synqueue
from agent.docker import Docker
from agent.errors import AgentError, Conflict, NotFound
from agent.keeper_client import KeeperClient, KeeperUnreachable, RelayRefused
from agent.metrics import (
    RELAYS_ACTIVE,
    RELAYS_REFUSED,
    SLEEPS,
    WAKE_DURATION,
    WAKE_QUEUE_FALLBACKS,
    WAKE_QUEUED,
    WAKES,
)
from agent.sleep import log, policy
from agent.sleep.store import Persisted
from agent.synqueue import DeepWake, Queued, SynQueue
from agent.synwatch import SynWatch
from schemas.messages import PORTS, AddonSpec, ClientConnection, SleepState

WAKE_PORT_OFFSET = 10000
LOOPBACK = frozenset({"127.0.0.1", "::1", "0.0.0.0", "::"})

Probe = Callable[[AddonSpec, str, float], Awaitable[tuple[bool, str, str]]]
# How long a client accepted by the wake listener waits for its add-on to wake: a deep
# wake is a database start-up (bounded by `_until_ready`), retried by the worker's backoff.
WAKE_WAIT_S = 120.0
_queue_fallback_logged = False  # NFQUEUE missing is a host's trait: warned once


class RelayBudget:
    """Caps on relayed connections, per add-on and for the host.

    Each relay holds two descriptors in the agent; unbounded, a few hundred idle
    connections at one listener would exhaust the agent's descriptors and with them the
    Docker and MQTT I/O of every tenant. Past a cap a connection is closed at once.
    """

    def __init__(self, per_addon: int, total: int) -> None:
        self.per_addon = per_addon
        self.total = total
        self.in_use = 0  # in the agent: waiting for a wake, or relayed here (no keeper)
        self.kept = 0  # relayed by the keeper, as last counted

    def refusal(self, addon_relays: int) -> str | None:
        if addon_relays >= self.per_addon:
            return "addon_cap"
        if self.in_use + self.kept >= self.total:
            return "host_cap"
        return None

    def take(self) -> None:
        self.in_use += 1
        RELAYS_ACTIVE.set(self.in_use + self.kept)

    def give_back(self) -> None:
        self.in_use -= 1
        RELAYS_ACTIVE.set(self.in_use + self.kept)

    def set_kept(self, kept: int) -> None:
        self.kept = kept
        RELAYS_ACTIVE.set(self.in_use + self.kept)


class Sleeper:
    """One add-on's sleep state, wake listener and activity accounting."""

    def __init__(
        self,
        addon: AddonSpec,
        db_name: str,
        holder_id: str,
        pid: int,
        ip: str,
        gateway: str,
        saved: Persisted,
        docker: Docker,
        probe: Probe,
        on_change: Callable[[], None],
        budget: RelayBudget,
        on_wake_request: Callable[[str], None] = lambda _aid: None,
        keeper: KeeperClient | None = None,
        deep_wake: DeepWake = "queue",
    ) -> None:
        self.addon = addon
        self.deep_wake = deep_wake
        self.keeper = keeper
        self.on_wake_request = on_wake_request
        self.budget = budget
        self.db_name = db_name
        self.holder_id = holder_id
        self.pid = pid
        self.ip = ip
        self.gateway = gateway
        self.port = PORTS[addon.kind]
        self.wake_port = self.port + WAKE_PORT_OFFSET
        self.saved = saved
        self.docker = docker
        self.probe = probe
        self.on_change = on_change
        self.transition = asyncio.Lock()  # one sleep or wake at a time
        self.measure = asyncio.Lock()  # probes and activity reads don't interleave
        self.relayed: dict[str, float] = {}  # the agent's own clients: source -> since
        self.kept: dict[str, float] = {}  # held or relayed by the keeper, as last listed
        self.attaching: set[str] = set()  # held clients this agent will attach
        self.keeper_accepting = False  # an ACCEPT in flight: what it holds is ours
        self.keeper_accept_failed = False  # logged once
        self.adopters: set[asyncio.Task[None]] = set()
        self.listener: socket.socket | None = None
        self.accept_task: asyncio.Task[None] | None = None
        self.handlers: set[asyncio.Task[None]] = set()
        self.refusal_logged_at = 0.0
        self.refusals_unlogged = 0
        self.redirect_on: bool | None = None
        # Set while the database serves: clients accepted by the listener may be relayed.
        self.resumed = asyncio.Event()
        if saved.state == "awake":
            self.resumed.set()
        # A client waits (at the wake listener, or queued at the paused database): the
        # planner wakes the add-on (its worker takes the wake ahead of other queued work);
        # cleared once it is awake.
        self.wake_requested = False
        self.synwatch: SynWatch | None = None  # light sleep's wake: see agent/synwatch.py
        self.synq: SynQueue | None = None  # deep sleep's: see agent/synqueue.py
        self.opening: asyncio.Task[None] | None = None  # SYNs let go once the db answers
        self.started = False  # wake requests made while starting are passed on at its end
        self.last_opens = netns.passive_opens(pid)
        self.netns = netns.netns_inode(pid)
        self.clients: tuple[ClientConnection, ...] = ()
        # Direct client connections at the last table read; none read yet (connections
        # made before this sleeper, e.g. across an agent restart, are found by the first).
        self.direct: tuple[ClientConnection, ...] = ()
        self.table_read = False
        # The namespace's (ActiveOpens, CurrEstab) just before that read: while they and
        # PassiveOpens stay put, the connections it listed are still the ones there.
        self.table_counters = (-1, -1)
        # Only a database that answered a client may fall asleep: pausing or stopping one
        # mid-initialisation would interrupt initdb. Set by the readiness probes and wakes.
        self.ready = False
        # Platform operations (backups) holding it awake; see SleepManager.hold.
        self.held = 0
        if self.saved.last_activity <= 0:
            self.saved.last_activity = time.time()

    @property
    def state(self) -> SleepState:
        return self.saved.state

    # --- life cycle ---------------------------------------------------------------------
    @property
    def wake_name(self) -> str:
        """The listener's name in the keeper: a new holder is a new namespace, a new name."""
        return f"wake-{self.addon.id}-{self.holder_id[:12]}"

    @property
    def queue_name(self) -> str:
        """The SYN queue's socket's name in the keeper."""
        return f"synq-{self.addon.id}-{self.holder_id[:12]}"

    async def start(
        self, listener: socket.socket | None = None, queue: socket.socket | None = None
    ) -> None:
        """Listen for wakes, on sockets handed back by the keeper if there are some."""
        try:
            self.listener = listener or await netns.listen_in(self.pid, self.wake_port)
            await self._fence_listener()
            self.synwatch = await SynWatch.open(
                self.pid, self.port, self.wake_port, self.gateway, self._on_syn
            )
            if self.deep_wake == "queue":
                await self._open_queue(queue)
            elif queue is not None:
                queue.close()  # this agent relays: SYNs still queued there are dropped
            self.accept_task = asyncio.create_task(self._accept(), name=f"wake-{self.addon.id}")
            await self._converge_rules()
            # Clients an earlier agent left with the keeper mid-wake are attached (and the
            # add-on woken for them) now, not a tick later.
            await self.refresh_kept(full=True)
            if self.state == "deep" and self.synq is not None and self.synq.waiting():
                # SYNs queued while no agent was there (or read by one that died).
                self.request_wake("connection attempt queued while the agent was away")
            self.started = True
            if self.wake_requested:
                self.on_wake_request(self.addon.id)
        except BaseException:
            await self.close()
            raise

    async def _open_queue(self, sock: socket.socket | None) -> None:
        try:
            sock = sock or await SynQueue.bind(self.pid, self.port, self.budget.per_addon)
        except OSError as exc:
            self._queue_unavailable(str(exc))
            return
        self.synq = SynQueue(sock, self.pid, self.port, self.gateway, self._on_queued)

    async def _converge_rules(self) -> None:
        """Whatever an earlier agent left (a redirect, a queue rule, either mode), the
        rules now match the state: deep sleep's path for a stopped database, none else."""
        if self.synq is None:
            # The redirect first: it acts before INPUT, so there is no moment with neither.
            await self._set_deep_path(self.state == "deep")
            await synqueue.remove_rule(self.pid, self.port, self.gateway)
            return
        if self.state == "awake" and await self.synq.rule_present() and self.synq.waiting():
            # Recorded awake with SYNs held: a wake cut short by a crash. They go on once
            # the database answers, not to a database still starting. (A paused one has
            # its socket: they go on at once, and the idle tick wakes it for them.)
            await self._set_redirect(False)
            self._open_when_ready()
            return
        await self._set_deep_path(self.state == "deep")

    def _queue_unavailable(self, reason: str) -> None:
        global _queue_fallback_logged
        WAKE_QUEUE_FALLBACKS.inc()
        level = logging.DEBUG if _queue_fallback_logged else logging.WARNING
        _queue_fallback_logged = True
        log.log(
            level,
            "addon.wake_queue_unavailable addon=%s error=%s: deep wakes relay",
            self.addon.id,
            reason,
        )

    def alive(self) -> bool:
        """False once the holder restarted (new namespace) or the accept loop ended."""
        try:
            same_ns = netns.netns_inode(self.pid) == self.netns
        except OSError:
            return False
        watching = self.synwatch is not None and not self.synwatch.closed
        queueing = self.synq is None or not self.synq.closed
        accepting = self.accept_task is not None and not self.accept_task.done()
        return same_ns and watching and queueing and accepting

    async def close(self) -> None:
        if self.synwatch is not None:
            self.synwatch.close()
        if self.synq is not None:
            self.synq.close()  # the keeper's copy keeps the queue and what waits in it
        tasks = [t for t in (self.accept_task, self.opening, *self.handlers, *self.adopters) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.listener is not None:
            self.listener.close()

    async def _fence_listener(self) -> None:
        rule = netns.listener_fence_rule(self.wake_port)
        if (await netns.iptables(self.pid, "-C", *rule))[0] == 0:
            return
        code, out = await netns.iptables(self.pid, "-I", *rule)
        if code != 0:
            raise AgentError(f"iptables in the namespace of {self.addon.id}: {out}")

    async def _set_deep_path(self, on: bool) -> None:
        """Deep sleep's path for new connections: held in the kernel's queue, or (relay
        mode, or NFQUEUE refused) redirected to the wake listener. Off: SYNs held go on
        to the database (the caller knows it answers) and new ones go there directly."""
        if on and self.synq is not None:
            try:
                await self.synq.hold()
            except AgentError as exc:
                self._queue_unavailable(str(exc))
            else:
                await self._set_redirect(False)  # after: no moment with neither in place
                return
        await self._set_redirect(on)
        if self.synq is not None:
            await self.synq.release()

    def _open_when_ready(self) -> None:
        """Let the held SYNs go once the database answers (it was started outside a wake:
        by the reconciler, or before a crash), under the lock: no sleep meanwhile."""

        async def open_when_ready() -> None:
            async with self.transition:
                if self.state != "awake" or self.synq is None:
                    return  # asleep again: that sleep, or the next wake, let them go
                try:
                    await self._until_ready()
                except AgentError as exc:
                    log.warning("addon.queue_release addon=%s error=%s", self.addon.id, exc)
                await self.synq.release()

        if not self._opening():
            self.opening = asyncio.create_task(open_when_ready(), name=f"synq-{self.addon.id}")

    async def _set_redirect(self, on: bool) -> None:
        if self.redirect_on == on:
            return
        rule = netns.redirect_rule(self.port, self.wake_port, self.gateway)
        # Each iptables run costs milliseconds on a wake's path: ask only when unknown.
        if self.redirect_on is None:
            present = (await netns.iptables(self.pid, "-t", "nat", "-C", *rule))[0] == 0
        else:
            present = self.redirect_on
        if on and not present:
            code, out = await netns.iptables(self.pid, "-t", "nat", "-I", *rule)
        elif not on and present:
            code, out = await netns.iptables(self.pid, "-t", "nat", "-D", *rule)
        else:
            code, out = 0, ""
        if code != 0:
            raise AgentError(f"iptables in the namespace of {self.addon.id}: {out}")
        self.redirect_on = on

    # --- activity -----------------------------------------------------------------------
    async def refresh_kept(self, full: bool = False) -> None:
        """Ask the keeper which of this add-on's connections it holds or relays (they
        outlive us), and attach any held one that nobody attaches.

        Only when some may exist: each one this agent hands over is recorded at once, so
        with none recorded there is none, except what an earlier agent left (`full`: at
        start, and the last check before a sleep). Idle add-ons cost no round trip.
        """
        if self.keeper is None or not (full or self.kept):
            return
        kept = await self.keeper.relays(self.addon.id)
        if kept is None:
            return
        now = {r.source: r.started for r in kept}
        if self.kept.keys() - now.keys():
            # Some ended since the last look, at an unknown moment: the idle clock starts
            # now, so an add-on never sleeps earlier than its timeout after a client left.
            self.saved.last_activity = time.time()
        self.kept = now
        if self.accept_task is None:
            return  # closed, or not started yet
        if self.keeper_accepting:
            return  # the clients being accepted are listed held, and not in `attaching` yet
        for r in kept:
            if r.held and r.source not in self.attaching:
                self._adopt_held(r.source)

    async def measure_activity(self, now: float, full: bool = False) -> bool:
        """Record client activity since the last call; True if any was seen.

        The namespace's TCP table is read only when it can have changed: a client's
        connection is a passive open, so with no new one and none seen last time there is
        still none; and while clients are connected, the set can only have changed if a
        connection was opened (passive or active) or one left the established count
        (`CurrEstab`) since the last read. A client's FIN alone leaves its socket counted
        (CLOSE_WAIT) until the database closes its end, which Postgres and Redis do at
        once; until then it counts as connected: never idle early. The read costs
        milliseconds whatever the namespace holds (the kernel walks the host-wide
        connection hash): idle add-ons are measured every tick, and a busy one's clients
        stay for minutes, during which the read ran on the cores its database and clients
        use (issue 12's light rows). `full` reads it anyway: the last check before a sleep.
        """
        await self.refresh_kept(full)
        async with self.measure:
            counters = netns.tcp_counters(self.pid)
            opens = counters.passive_opens
            new_connections = opens > self.last_opens
            self.last_opens = opens
            left = False
            moved = (counters.active_opens, counters.curr_estab) != self.table_counters
            if full or new_connections or (self.direct and moved) or not self.table_read:
                seen = self.direct
                self.table_counters = (counters.active_opens, counters.curr_estab)
                self.direct = tuple(
                    ClientConnection(f"{s.remote_ip}:{s.remote_port}")
                    for s in netns.tcp_table(self.pid)
                    if s.state == netns.ESTABLISHED
                    and s.local_port == self.port
                    and s.remote_ip not in LOOPBACK
                    and s.remote_ip != self.gateway
                )
                self.table_read = True
                # One left since the last read, at an unknown moment: the idle clock starts
                # now, so an add-on never sleeps earlier than its timeout after a client left.
                left = bool(set(seen) - set(self.direct))
        self.clients = self.direct + tuple(
            ClientConnection(src, via="activator") for src in {**self.kept, **self.relayed}
        )
        if new_connections or self.clients or left:
            log.debug(
                "addon.activity addon=%s new=%s clients=%s",
                self.addon.id,
                new_connections,
                [c.source for c in self.clients],
            )
            self.saved.last_activity = now
            return True
        return False

    @contextlib.asynccontextmanager
    async def platform_connection(self) -> AsyncIterator[None]:
        """Wrap a probe: the one connection it accepts is not a client's."""
        async with self.measure:
            before = _opens_or_none(self.pid)
            try:
                yield
            finally:
                after = _opens_or_none(self.pid)
                if before is not None and after is not None:
                    self.last_opens += min(1, after - before)

    # --- sleeping -----------------------------------------------------------------------
    def _goal(self, now: float, active: bool) -> SleepState:
        return policy.goal(
            self.addon.sleep,
            self.state,
            now - self.saved.last_activity,
            has_clients=active,
            ready=self.ready,
            held=self.held > 0,
            wake_requested=self.wake_requested,
        )

    def due(self, now: float) -> bool:
        """Whether a pass would plan a sleep or a wake for it now (the tick asks for one)."""
        return self._goal(now, bool(self.clients)) != self.state

    def wake_if_queued(self) -> None:
        """After a measurement: a client queued at the paused database's own socket.

        The SYN watch missed it (a restarted agent, a dropped message): this is the
        fallback wake, from the idle tick.
        """
        if self.state == "light" and self.clients:
            self.request_wake(f"client {self.clients[0].source} queued while paused")

    async def sleep(self, goal: SleepState) -> None:
        """Carry out a planned sleep: redirect first (deep), then pause (light) or stop (deep)."""
        async with self.transition:
            # Decided again under the lock: a client, a wake request or a backup may have
            # come in since the plan was made.
            fresh = self._goal(time.time(), bool(self.clients))
            if fresh == "awake" or fresh == self.state or goal == self.state:
                return
            # Deep sleep holds new connections' SYNs in the kernel (or redirects them to the
            # wake listener): a stopped database has no socket; light sleep needs nothing,
            # the paused one keeps its own.
            await self._set_deep_path(goal == "deep")
            # A client may have connected between the measurement and here (when deepening:
            # it may sit in the paused database's backlog and needs it to run, not to stop).
            if await self.measure_activity(time.time(), full=True) or self.wake_requested:
                await self._set_deep_path(self.state == "deep")
                if self.state == "light":
                    self.request_wake("client queued while paused")
                return
            previous = self.state
            self.saved.state = goal  # intent first: the reconciler leaves a sleeping db alone
            self.resumed.clear()
            try:
                if goal == "light":
                    await self.docker.pause(self.db_name)
                else:
                    if previous == "light":
                        # A frozen process cannot receive SIGINT: thaw, then fast shutdown.
                        await self.docker.unpause(self.db_name)
                    await self.docker.stop(self.db_name, grace_s=30)
            except AgentError:
                self.saved.state = previous
                if previous == "awake":
                    self.resumed.set()
                await self._set_deep_path(previous == "deep")
                raise
            log.info(
                "addon.sleep addon=%s stage=%s idle_s=%.1f",
                self.addon.id,
                goal,
                time.time() - self.saved.last_activity,
            )
            self.saved.sleeps += 1
            SLEEPS.labels(goal).inc()
            if goal == "light" and await self.measure_activity(time.time(), full=True):
                # Connected between the last check and the freeze; its SYN came while we
                # were still awake, so the SYN watch ignored it.
                self.request_wake("client connected while pausing")
            if goal == "deep" and self.synq is not None and self.synq.waiting():
                # Queued while stopping (from awake, its report found the add-on awake).
                self.request_wake("connection attempt while stopping")
        self.on_change()

    # --- waking -------------------------------------------------------------------------
    async def mark_awake(self) -> None:
        """The reconciler (re)started the database: it is awake whatever we thought."""
        async with self.transition:
            self.ready = False
            if self.state != "awake":
                self.saved.state = "awake"
            self.resumed.set()
            self.wake_requested = False  # awake: a request left would keep it up for good
            self.saved.last_activity = time.time()
            if self.synq is not None and self.synq.waiting():
                await self._set_redirect(False)
                self._open_when_ready()  # not into a database still starting
            else:
                await self._set_deep_path(False)

    async def wake(self, reason: str) -> None:
        async with self.transition:
            stage = self.state
            if stage == "awake":
                self.wake_requested = False
                return
            started = time.monotonic()
            try:
                await self._resume(stage)
            except NotFound:
                pass  # recreated by the reconciler, which wakes it anyway
            self.ready = True
            self.wake_requested = False
            elapsed_ms = (time.monotonic() - started) * 1000
            # Held SYNs go on and waiting clients are relayed now; then the queue rule or
            # the redirect goes, still under the lock, so no sleep can start before new
            # connections reach the db directly.
            self.saved.state = "awake"
            self.resumed.set()
            await self._set_deep_path(False)
            self.saved.last_activity = time.time()
            self.saved.wakes += 1
            self.saved.last_wake_ms = [*self.saved.last_wake_ms[-9:], round(elapsed_ms, 2)]
            WAKES.labels(stage).inc()
            WAKE_DURATION.labels(self.addon.kind, stage).observe(elapsed_ms / 1000)
            log.info(
                "addon.wake addon=%s stage=%s reason=%s ms=%.1f",
                self.addon.id,
                stage,
                reason,
                elapsed_ms,
            )
        self.on_change()

    def request_wake(self, reason: str) -> None:
        """A client waits: the add-on's worker wakes it, ahead of any other work queued for
        it. Asked once until it is awake: every client waiting meanwhile goes on then, and
        a flood of knocks costs a flag test each."""
        if self.resumed.is_set() or self.wake_requested:
            return
        self.wake_requested = True
        log.debug("addon.wake_requested addon=%s reason=%s", self.addon.id, reason)
        if self.started:  # else asked at the end of start, once the manager knows it
            self.on_wake_request(self.addon.id)

    def _on_queued(self, packet: Queued) -> None:
        """A SYN waits in the kernel's queue: wake; the wake lets it go on."""
        WAKE_QUEUED.inc()
        if not self.resumed.is_set():
            self.request_wake(f"connection attempt from {packet.source}")
        elif not self.transition.locked() and not self._opening():
            # Awake, yet queued: it raced the rule's removal, or the removal failed.
            asyncio.get_running_loop().call_soon(self._let_go_while_awake)

    def _opening(self) -> bool:
        return self.opening is not None and not self.opening.done()

    def _let_go_while_awake(self) -> None:
        if self.synq is None or self.state != "awake" or self.transition.locked():
            return  # a sleep or wake under way lets them go itself
        if self.synq.rule_on is False:
            self.synq.accept_waiting()  # a straggler: another CPU was past the rule
        else:
            self._open_when_ready()  # the rule is still there: remove it, then let go

    def _on_syn(self, source: str) -> None:
        """The SYN watch saw a client knock: in light sleep, thaw; its socket does the rest."""
        if self.state == "light":
            self.request_wake(f"connection attempt from {source}")

    async def _resume(self, stage: SleepState) -> None:
        # The fast path trusts the recorded stage; anything else (a crash between two
        # steps, a dockerd restart) is resolved from the container's real state.
        if stage == "light" and await self.docker.unpause(self.db_name):
            return
        if stage == "deep":
            try:
                await self.docker.start(self.db_name)
                await self._until_ready()
                return
            except Conflict:
                pass  # paused, not stopped
        state = await self.docker.state(self.db_name)
        if state == "paused":
            await self.docker.unpause(self.db_name)
        elif state != "running":
            await self.docker.start(self.db_name)
        await self._until_ready()

    async def _until_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            ok, _reason, message = await self.probe(self.addon, self.ip, 2.0)
            if ok:
                return
            if time.monotonic() > deadline:
                raise AgentError(f"add-on did not become ready after waking: {message}")
            await asyncio.sleep(0.002)  # a refused connect is cheap; every ms counts here

    async def _accept(self) -> None:
        assert self.listener is not None
        while True:
            await _readable(self.listener)
            if await self._taken_by_keeper():
                continue
            try:
                client, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                continue  # gone meanwhile: reset in the backlog, or taken by the keeper
            except OSError as exc:  # EMFILE, ECONNABORTED: the listener itself is fine
                log.warning("addon.accept_failed addon=%s error=%s", self.addon.id, exc)
                await asyncio.sleep(0.1)
                continue
            client.setblocking(False)
            # Yield between clients: a flood of connects must not hold the event loop,
            # and with it every other add-on's wake.
            await asyncio.sleep(0)
            refusal = self.budget.refusal(len(self.relayed) + len(self.kept))
            if refusal is not None:
                RELAYS_REFUSED.labels(refusal).inc()
                self._log_refusal(address, refusal)
                _reset(client)
                continue
            _keepalive(client)
            _nodelay(client)
            self.budget.take()
            task = asyncio.create_task(self._serve(client, f"{address[0]}:{address[1]}"))
            self.handlers.add(task)
            task.add_done_callback(self._relay_done)

    async def _taken_by_keeper(self) -> bool:
        """Have the keeper accept the waiting clients and hold them: none is ever the
        agent's alone, so an agent killed at any moment of a wake (even right after an
        accept of its own, before a HOLD) loses none. False when the keeper cannot (none
        configured, unreachable, older, or not holding this listener yet): the agent
        accepts them itself."""
        if self.keeper is None or not self.keeper.available():
            return False
        self.keeper_accepting = True  # refresh_kept adopts none meanwhile: they are ours
        try:
            got = await self.keeper.accept(
                self.wake_name, self.addon.id, self.budget.per_addon, self.budget.total
            )
        except OSError as exc:
            level = logging.DEBUG if self.keeper_accept_failed else logging.WARNING
            self.keeper_accept_failed = True
            log.log(level, "addon.keeper_accept_failed addon=%s error=%s", self.addon.id, exc)
            return False
        finally:
            self.keeper_accepting = False
        for reason, source in got.refused:
            RELAYS_REFUSED.labels(reason).inc()
            self._log_refusal(_address(source), reason)
        if got.held:
            if not self.resumed.is_set():
                self.request_wake(f"connection from {got.held[0]}")  # first: every ms counts
            self.saved.last_activity = time.time()
            self.budget.set_kept(self.budget.kept + len(got.held))
        for source in got.held:
            self.kept[source] = time.time()  # counted at once, listed again each tick
            self.attaching.add(source)
            task = asyncio.create_task(self._attach_when_awake(source))
            self.handlers.add(task)
            task.add_done_callback(self._relay_done)
        if got.error:  # descriptors exhausted in the keeper: what waits stays queued
            log.warning("addon.keeper_accept_failed addon=%s error=%s", self.addon.id, got.error)
            await asyncio.sleep(0.1)
        # Nothing taken, yet the listener was readable: the keeper's copy is not this
        # socket (or a client reset in the backlog): the agent looks itself, no busy loop.
        return bool(got.held or got.refused or got.error)

    def _log_refusal(self, address: tuple[str, int], reason: str) -> None:
        # One line per second at most: a flood must not become a flood of log lines.
        now = time.monotonic()
        self.refusals_unlogged += 1
        if now - self.refusal_logged_at < 1.0:
            return
        log.warning(
            "addon.relay_refused addon=%s source=%s:%s reason=%s count=%d",
            self.addon.id, address[0], address[1], reason, self.refusals_unlogged,
        )  # fmt: skip
        self.refusal_logged_at = now
        self.refusals_unlogged = 0

    def _relay_done(self, task: asyncio.Task[None]) -> None:
        self.handlers.discard(task)

    async def _serve(self, client: socket.socket, source: str) -> None:
        """One accepted client. With a keeper: hand it over at once (held while the
        database starts), then attach its database connection once awake; the keeper
        relays the pair from then on, agent restarts included. Without one: wait for the
        wake and relay here. The budget slot taken at accept is freed when the client
        leaves the agent."""
        self.relayed[source] = time.time()
        try:
            if not self.resumed.is_set():
                self.request_wake(f"connection from {source}")  # first: every ms counts
            if self.keeper is not None and self.keeper.available():
                held = await self._hold(client, source)
                if held is not None:
                    self._leave(source)
                    if held:
                        await self._attach_when_awake(source)
                    return
            if not self.resumed.is_set():
                self.request_wake(f"connection from {source}")
                if self.state != "light":
                    # A stopped database has no socket yet; a paused one does: the kernel
                    # completes the handshake and queues the client's bytes until it
                    # thaws, so a light-sleep relay starts at once and the thaw overlaps.
                    try:
                        await asyncio.wait_for(self.resumed.wait(), WAKE_WAIT_S)
                    except TimeoutError:
                        log.error("addon.wake_failed addon=%s error=timed out", self.addon.id)
                        client.close()
                        return
            await self._relay_here(client, source)
        finally:
            self._leave(source)
            self.saved.last_activity = time.time()

    def _leave(self, source: str) -> None:
        """The client is no longer the agent's own (handed over, refused or closed)."""
        if self.relayed.pop(source, None) is not None:
            self.budget.give_back()

    async def _hold(self, client: socket.socket, source: str) -> bool | None:
        """Hand the client to the keeper: True held there, False refused (reset) or
        failed (closed), None when the keeper cannot be reached (the client stays ours)."""
        assert self.keeper is not None
        self.attaching.add(source)  # before the keeper lists it: no second attacher
        try:
            await self.keeper.hold(
                self.addon.id, source, client, self.budget.per_addon, self.budget.total
            )
        except KeeperUnreachable as exc:
            self.attaching.discard(source)
            log.warning(
                "addon.keeper_unreachable addon=%s source=%s error=%s: relayed by the agent",
                self.addon.id, source, exc,
            )  # fmt: skip
            return None
        except RelayRefused as exc:
            self.attaching.discard(source)
            RELAYS_REFUSED.labels(exc.reason).inc()
            self._log_refusal(_address(source), exc.reason)
            _reset(client)
            return False
        except OSError as exc:
            self.attaching.discard(source)
            log.warning("addon.hold_failed addon=%s source=%s error=%s", self.addon.id, source, exc)
            client.close()
            return False
        self.kept[source] = time.time()  # counted at once, listed again each tick
        self.budget.set_kept(self.budget.kept + 1)
        client.close()  # the keeper has its own copy
        return True

    def _adopt_held(self, source: str) -> None:
        """A client the keeper holds for this add-on with nobody attaching it (an agent
        died during its wake): wake the add-on and attach it, as for a fresh one."""
        self.attaching.add(source)
        task = asyncio.create_task(self._attach_when_awake(source))
        self.adopters.add(task)
        task.add_done_callback(self.adopters.discard)

    async def _attach_when_awake(self, source: str) -> None:
        assert self.keeper is not None
        upstream: socket.socket | None = None
        try:
            if not self.resumed.is_set():
                self.request_wake(f"connection from {source}")
                if self.state != "light":  # a paused database's socket takes it at once
                    try:
                        await asyncio.wait_for(self.resumed.wait(), WAKE_WAIT_S)
                    except TimeoutError:
                        log.error("addon.wake_failed addon=%s error=timed out", self.addon.id)
                        await self.keeper.drop(self.addon.id, source)
                        return
            upstream = socket.socket(socket.AF_INET6 if ":" in self.ip else socket.AF_INET)
            upstream.setblocking(False)
            await asyncio.get_running_loop().sock_connect(upstream, (self.ip, self.port))
            _keepalive(upstream)
            _nodelay(upstream)
            await self.keeper.attach(self.addon.id, source, upstream)
        except RelayRefused:
            self.kept.pop(source, None)  # gone: the client closed while it waited
        except OSError as exc:
            log.warning(
                "addon.relay_failed addon=%s source=%s error=%s", self.addon.id, source, exc
            )
            await self.keeper.drop(self.addon.id, source)
        finally:
            if upstream is not None:
                upstream.close()
            self.attaching.discard(source)

    async def _relay_here(self, client: socket.socket, source: str) -> None:
        """The relay without a keeper: in this event loop, cut when the agent restarts."""
        writer_up: asyncio.StreamWriter | None = None
        writer_down: asyncio.StreamWriter | None = None
        try:
            reader_down, writer_down = await asyncio.open_connection(sock=client)
            reader_up, writer_up = await asyncio.open_connection(self.ip, self.port)
            _keepalive(writer_up.get_extra_info("socket"))
            await asyncio.gather(_pipe(reader_down, writer_up), _pipe(reader_up, writer_down))
        except OSError as exc:
            log.warning(
                "addon.relay_failed addon=%s source=%s error=%s", self.addon.id, source, exc
            )
        finally:
            for w in (writer_up, writer_down):
                if w is not None:
                    w.close()
            if writer_down is None:
                client.close()


async def _readable(sock: socket.socket) -> None:
    """Until a client waits in the listener's backlog (nothing is accepted here)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake_up() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake_up)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


def _address(source: str) -> tuple[str, int]:
    host, _, port = source.rpartition(":")
    return host, int(port)


def _opens_or_none(pid: int) -> int | None:
    try:
        return netns.passive_opens(pid)
    except OSError:
        return None  # the holder is gone; the next pass replaces this sleeper


def _reset(sock: socket.socket) -> None:
    """Refuse with a RST: the client learns at once, and no FIN_WAIT state is left behind."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _nodelay(sock: socket.socket) -> None:
    """A relay forwards what it gets at once: the two ends already chose their segments."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _keepalive(sock: socket.socket | None) -> None:
    """A relayed client that vanishes without a FIN must not keep the add-on awake forever."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()
