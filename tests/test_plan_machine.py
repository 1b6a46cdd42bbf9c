"""A Hypothesis state machine over the planner and its grouping into per-key chains.

The host is a model: actions apply to frozen `Observed` values, one action at a time, and
chains of different keys interleave the way the agent's workers do (agent/workqueue.py),
each key serially. Rules change the desired state (create, delete, reuse a name, change a
plan, add jobs), damage the host (kill, remove, pause, stop containers), fail actions and
let jobs finish; clients connect (to a sleeping add-on: they wait at its wake listener) and
leave, and time passes. Sleep is the planner's: the model's executor re-checks activity
before a sleep, as the real one does after setting the redirect. Invariants: no volume is
removed without a tombstone, no object is touched by two keys' chains, a key never has two
chains at once, never asleep while a client holds a connection (and never planned to sleep
then), and the host converges once quiet, every waiting client served.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from msgspec.structs import replace

from agent import model, specs
from agent import plan as p
from agent.model import Observed, ObservedContainer, ObservedNetwork, ObservedVolume
from schemas import storage
from schemas.messages import (
    AddonSpec,
    DesiredState,
    JobSpec,
    ProjectSpec,
    Resources,
    SleepPolicy,
    SleepState,
)

SETTINGS = p.Settings(images=specs.Images(), secrets_root="/secrets", wal_volumes=True)
PROJECTS = ("p" * 32, "q" * 32)
NAMES = ("orders", "cache", "jobs")
SLEEPY = SleepPolicy(enabled=True, light_after_s=10, deep_after_s=60)
NOW = 1_000_000.0


class Failed(Exception):
    """What Docker would refuse: the chain stops, the key retries on a later pass."""


@dataclass
class Host:
    containers: dict[str, ObservedContainer] = field(default_factory=dict)
    networks: dict[str, ObservedNetwork] = field(default_factory=dict)
    volumes: dict[str, ObservedVolume] = field(default_factory=dict)
    secrets: dict[str, int] = field(default_factory=dict)
    conf_quota: dict[str, int] = field(default_factory=dict)  # Redis: its redis.conf's maxmemory
    finished_jobs: set[str] = field(default_factory=set)
    sleep: dict[str, SleepState] = field(default_factory=dict)
    clients: dict[str, int] = field(default_factory=dict)  # connections held, per add-on
    waiting: set[str] = field(default_factory=set)  # a client waits at the wake listener
    idle: dict[str, float] = field(default_factory=dict)  # seconds without clients
    ids: itertools.count[int] = field(default_factory=itertools.count)
    # add-on id -> whether its database was first made with its WAL on a volume of its own
    # (the data volume is initialised one way and must be run that way ever after)
    layout: dict[str, bool] = field(default_factory=dict)

    def observed(self) -> Observed:
        return Observed(
            tuple(self.containers.values()),
            tuple(self.networks.values()),
            tuple(self.volumes.values()),
        )

    def local(self) -> p.Local:
        facts = {}
        for aid in set(self.sleep) | set(self.clients) | self.waiting | set(self.idle):
            db = self.containers.get(model.db_name(aid))
            facts[aid] = p.SleepFacts(
                state=self.sleep.get(aid, "awake"),
                last_activity=NOW - self.idle.get(aid, 0.0),
                clients=self.clients.get(aid, 0),
                # The probe: a running, awake database answers.
                ready=db is not None and db.state == "running",
                wake_requested=aid in self.waiting,
                listening=True,
            )
        return p.Local(
            secrets=dict(self.secrets),
            redis_conf_quota=dict(self.conf_quota),
            finished_jobs=frozenset(self.finished_jobs),
            sleep=facts,
            now=NOW,
        )

    def started(self, addon_id: str) -> None:
        """A database (re)started by the worker is awake; waiting clients are relayed."""
        self.sleep[addon_id] = "awake"
        if addon_id in self.waiting:
            self.waiting.discard(addon_id)
            self.clients[addon_id] = self.clients.get(addon_id, 0) + 1
            self.idle[addon_id] = 0.0

    def create(self, spec: specs.ContainerSpec) -> None:
        if spec.name in self.containers:
            return  # create-409: start the existing one
        for m in spec.mounts:
            # Docker would make a missing named volume itself, plain and unlabelled.
            assert m.kind != "volume" or m.source in self.volumes, f"{m.source} not made first"
        if spec.role == "db" and spec.addon_id is not None:
            wal = any(m.target == specs.WAL_DIR for m in spec.mounts)
            assert self.layout.setdefault(spec.addon_id, wal) == wal, f"{spec.name}: WAL moved"
        mode = ""
        ip = None
        if spec.netns_of is not None:
            holder = self.containers.get(spec.netns_of)
            if holder is None or holder.state != "running":
                raise Failed(f"no running holder for {spec.name}")
            mode = f"container:{holder.id}"
        elif spec.network is not None:
            if spec.network not in self.networks:
                raise Failed(f"network {spec.network} not found")
            ip = "172.30.0.2"
        self.containers[spec.name] = ObservedContainer(
            id=f"c{next(self.ids)}",
            name=spec.name,
            role=spec.role,
            project_id=spec.project_id,
            state="running",
            spec_hash=spec.spec_hash,
            addon_id=spec.addon_id,
            job_id=spec.job_id,
            network_mode=mode,
            ip=ip,
        )

    def apply(self, action: p.Action) -> None:
        match action:
            case p.EnsureNetwork(key, name):
                self.networks.setdefault(name, ObservedNetwork(f"n-{name}", name, key))
            case p.RemoveNetwork(key, name):
                if any(c.project_id == key for c in self.containers.values()):
                    raise Failed("network has active endpoints")
                self.networks.pop(name, None)
            case p.EnsureVolume(key, name, _):
                self.volumes.setdefault(name, ObservedVolume(name, key))
            case p.FetchSecret(key, _, kind, version, maxmemory):
                self.secrets[key] = version
                if kind == "redis":
                    self.conf_quota[key] = maxmemory or 0
            case p.LimitRedisConf(key, maxmemory):
                if key not in self.secrets:
                    raise Failed(f"no secret files for {key}")
                self.conf_quota[key] = maxmemory
            case p.RunContainer(key, spec):
                self.create(spec)
                if spec.role == "db":
                    self.started(key)
            case p.StartJob(_, project_id, job):
                self.create(specs.job_spec(project_id, job, SETTINGS.jobs))
            case p.StartContainer(key, name) | p.UnpauseContainer(key, name):
                if name not in self.containers:
                    raise Failed(f"no such container {name}")
                self.containers[name] = replace(self.containers[name], state="running")
                if name == model.db_name(key):
                    self.started(key)
            case p.SleepAddon(key, name, stage):
                db = self.containers.get(name)
                if db is None or (db.state == "exited" and stage == "light"):
                    raise Failed(f"cannot put {name} to {stage} sleep")
                # The executor's re-check after the redirect: a client came meanwhile.
                if self.clients.get(key, 0) or key in self.waiting:
                    return
                self.sleep[key] = stage
                self.containers[name] = replace(
                    db, state="paused" if stage == "light" else "exited"
                )
            case p.WakeAddon(key, name):
                db = self.containers.get(name)
                if db is None:
                    raise Failed(f"no such container {name}")
                self.containers[name] = replace(db, state="running")
                self.started(key)
            case p.RemoveContainer(_, name, _):
                self.containers.pop(name, None)
            case p.RemoveVolume(_, name):
                self.volumes.pop(name, None)
            case p.RemoveSecret(key):
                self.secrets.pop(key, None)
                self.conf_quota.pop(key, None)
            case p.CollectJob(key, _, name):
                self.finished_jobs.add(key)
                self.containers.pop(name, None)
            case p.WatchJob():
                pass


def touches(action: p.Action) -> str:
    """The one object (or the add-on's set of objects) an action changes."""
    match action:
        case p.EnsureNetwork(_, name) | p.RemoveNetwork(_, name):
            return name
        case p.RunContainer(_, spec):
            return spec.addon_id or spec.name
        case p.StartJob(key, _, _):
            return model.job_container_name(key)
        case (
            p.StartContainer(_, name)
            | p.UnpauseContainer(_, name)
            | p.SleepAddon(_, name, _)
            | p.WakeAddon(_, name)
            | p.RemoveContainer(_, name, _)
            | p.CollectJob(_, _, name)
            | p.WatchJob(_, _, _, name)
        ):
            return name
        case p.EnsureVolume(key, _, _) | p.RemoveVolume(key, _):
            return key
        case p.FetchSecret(key, _, _, _) | p.RemoveSecret(key) | p.LimitRedisConf(key, _):
            return key
        case p.StartBackupOp(_, _, spec, _):
            return spec.addon_id
        case p.RunApp(key, _, _) | p.ResizeApp(key, _, _, _, _):
            return key
        case p.EnsureGroupNetwork(_, name):
            return name
        case p.ConnectNetwork(_, network, container, _) | p.DisconnectNetwork(
            _, network, container, _
        ):
            return f"{network}:{container}"  # the attachment (groups are not modelled here)


class PlannerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.host = Host()
        self.addons: dict[str, tuple[str, AddonSpec]] = {}  # id -> (project, spec)
        self.jobs: dict[str, tuple[str, JobSpec]] = {}
        self.generation = 1
        self.serial = itertools.count(1)
        self.in_flight: dict[str, list[p.Action]] = {}  # key -> the rest of its chain
        self.fail_next: set[str] = set()
        self.owner: dict[str, str] = {}  # object -> the key that last touched it

    # --- desired state ---------------------------------------------------------------
    def desired(self) -> DesiredState:
        projects = []
        for pid in PROJECTS:
            addons = tuple(a for proj, a in self.addons.values() if proj == pid)
            jobs = tuple(j for proj, j in self.jobs.values() if proj == pid)
            projects.append(ProjectSpec(id=pid, name=pid[:8], addons=addons, jobs=jobs))
        return DesiredState(
            version=1, host="h", generation=self.generation, projects=tuple(projects)
        )

    def live(self) -> list[str]:
        return sorted(aid for aid, (_, a) in self.addons.items() if not a.deleted)

    @rule(
        project=st.sampled_from(PROJECTS),
        name=st.sampled_from(NAMES),
        kind=st.sampled_from(["postgres", "redis"]),
        sleepy=st.booleans(),
        storage=st.sampled_from([None, 24]),
    )
    def create_addon(
        self, project: str, name: str, kind: str, sleepy: bool, storage: int | None
    ) -> None:
        taken = {a.name for proj, a in self.addons.values() if proj == project and not a.deleted}
        if name in taken:
            return  # the controller refuses a duplicate name
        aid = f"{next(self.serial):032x}"
        spec = AddonSpec(
            id=aid,
            name=name,  # may reuse the name of a tombstone
            kind=kind,  # type: ignore[arg-type]
            resources=Resources(cpus=0.5, memory_mb=256),
            sleep=SLEEPY if sleepy else SleepPolicy(),
            storage_mb=storage,
        )
        self.addons[aid] = (project, spec)
        self.generation += 1

    @rule(project=st.sampled_from(PROJECTS))
    def adopt_an_older_addon(self, project: str) -> None:
        """A Postgres made before WAL volumes: its data volume holds pg_wal."""
        taken = {a.name for proj, a in self.addons.values() if proj == project and not a.deleted}
        if "legacy" in taken:
            return
        aid = f"{next(self.serial):032x}"
        spec = AddonSpec(
            id=aid, name="legacy", kind="postgres", resources=Resources(0.5, 256), storage_mb=24
        )
        self.host.volumes[model.volume_name(aid)] = ObservedVolume(model.volume_name(aid), aid)
        self.host.layout[aid] = False
        self.addons[aid] = (project, spec)
        self.generation += 1

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def delete_addon(self, data: st.DataObject) -> None:
        aid = data.draw(st.sampled_from(self.live()))
        project, spec = self.addons[aid]
        self.addons[aid] = (project, replace(spec, deleted=True))
        self.generation += 1

    @precondition(lambda self: self.live())
    @rule(data=st.data(), memory=st.sampled_from([128, 256, 512]))
    def change_plan(self, data: st.DataObject, memory: int) -> None:
        aid = data.draw(st.sampled_from(self.live()))
        project, spec = self.addons[aid]
        self.addons[aid] = (project, replace(spec, resources=Resources(0.5, memory)))
        self.generation += 1

    @precondition(lambda self: any(a in self.host.conf_quota for a in self.live()))
    @rule(data=st.data())
    def redis_conf_from_an_older_agent(self, data: st.DataObject) -> None:
        """A redis.conf written before it carried the quota."""
        aid = data.draw(st.sampled_from([a for a in self.live() if a in self.host.conf_quota]))
        self.host.conf_quota[aid] = 0

    @rule(project=st.sampled_from(PROJECTS))
    def add_job(self, project: str) -> None:
        jid = f"{next(self.serial):032x}"
        self.jobs[jid] = (project, JobSpec(id=jid, image="toolbox:1", command=("true",)))
        self.generation += 1

    # --- the host misbehaving ------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.host.containers)

    @precondition(lambda self: self.host.containers)
    @rule(data=st.data(), state=st.sampled_from(["exited", "dead", "paused", "gone"]))
    def damage_container(self, data: st.DataObject, state: str) -> None:
        name = data.draw(st.sampled_from(self.names()))
        if state == "gone":
            del self.host.containers[name]
        else:
            c = self.host.containers[name]
            self.host.containers[name] = replace(c, state=state)

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def client_connects(self, data: st.DataObject) -> None:
        """Awake: straight to the database. Asleep: accepted by the wake listener, waits."""
        aid = data.draw(st.sampled_from(self.live()))
        db = self.host.containers.get(model.db_name(aid))
        if self.host.sleep.get(aid, "awake") != "awake":
            self.host.waiting.add(aid)
        elif db is not None and db.state == "running":
            self.host.clients[aid] = self.host.clients.get(aid, 0) + 1
            self.host.idle[aid] = 0.0

    @precondition(lambda self: any(self.host.clients.values()))
    @rule(data=st.data())
    def client_leaves(self, data: st.DataObject) -> None:
        aid = data.draw(st.sampled_from(sorted(a for a, n in self.host.clients.items() if n)))
        self.host.clients[aid] -= 1

    @rule(seconds=st.sampled_from([5.0, 15.0, 90.0]))
    def time_passes(self, seconds: float) -> None:
        """Idle is measured from the last new connection: a client may hold one all along."""
        for aid in self.live():
            self.host.idle[aid] = self.host.idle.get(aid, 0.0) + seconds

    @precondition(lambda self: any(c.role == "job" for c in self.host.containers.values()))
    @rule()
    def jobs_finish(self) -> None:
        for name, c in list(self.host.containers.items()):
            # Running or not, a job ends by its timeout at the latest (the watcher kills it).
            if c.role == "job" and c.state not in ("exited", "dead"):
                self.host.containers[name] = replace(c, state="exited")

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def fail_an_action(self, data: st.DataObject) -> None:
        self.fail_next.add(data.draw(st.sampled_from(sorted(self.in_flight))))

    # --- the agent ---------------------------------------------------------------------------
    @rule()
    def plan_pass(self) -> None:
        """One pass: plan the whole host, hand each idle key its chain."""
        desired = self.desired()
        actions = p.plan(desired, self.host.observed(), self.host.local(), SETTINGS)
        tombs = {
            v
            for _, a in self.addons.values()
            if a.deleted
            for v in (model.volume_name(a.id), model.wal_volume_name(a.id))
        }
        for a in actions:
            if isinstance(a, p.RemoveVolume):
                assert a.name in tombs, f"{a.name} planned for removal without a tombstone"
            if isinstance(a, p.SleepAddon):
                busy = self.host.clients.get(a.key, 0) or a.key in self.host.waiting
                assert not busy, f"{a.key} planned to sleep while a client is connected"
        for key, chain in p.chains(desired, actions).items():
            assert all(a.key == key for a in chain)
            if key not in self.in_flight:  # a busy key's new work waits for its next pass
                self.in_flight[key] = list(chain)

    @rule()
    def quiet_for_a_while(self) -> None:
        """Passes and steps until nothing is left to do: reaches the states sleep needs."""
        for _ in range(10):
            while self.in_flight:
                self.run_one(sorted(self.in_flight)[0])
            self.plan_pass()
            if not self.in_flight:
                return

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        """One action of one key's chain: chains of different keys interleave."""
        key = data.draw(st.sampled_from(sorted(self.in_flight)))
        self.run_one(key)

    def run_one(self, key: str) -> None:
        chain = self.in_flight[key]
        action = chain.pop(0)
        obj = touches(action)
        if (other := self.owner.get(obj)) is not None and other != key:
            # Another key touched this object before: it must not still hold a chain.
            assert other not in self.in_flight, f"{obj} is acted on by {other} and {key}"
        self.owner[obj] = key
        if isinstance(action, p.RemoveVolume):
            project_addon = self.addons.get(action.key)
            assert project_addon is not None and project_addon[1].deleted, action
        try:
            if key in self.fail_next:
                self.fail_next.discard(key)
                raise Failed("injected")
            self.host.apply(action)
        except Failed:
            chain.clear()
        if not chain:
            del self.in_flight[key]

    # --- invariants --------------------------------------------------------------------------
    @invariant()
    def live_addons_keep_their_volumes_once_made(self) -> None:
        for aid, (_, a) in self.addons.items():
            if not a.deleted and self.host.containers.get(model.db_name(aid)) is not None:
                assert model.volume_name(aid) in self.host.volumes

    @invariant()
    def never_asleep_while_a_client_is_connected(self) -> None:
        for aid, n in self.host.clients.items():
            if n:
                assert self.host.sleep.get(aid, "awake") == "awake", (aid, n)

    def teardown(self) -> None:
        """Once quiet (no new changes, no faults), the host converges."""
        self.fail_next.clear()
        desired = self.desired()
        for _ in range(40):
            while self.in_flight:
                self.run_one(sorted(self.in_flight)[0])
            self.plan_pass()
            if not self.in_flight:
                break
            self.jobs_finish()
        assert p.plan(desired, self.host.observed(), self.host.local(), SETTINGS) == ()
        for aid, (_, a) in self.addons.items():
            db = self.host.containers.get(model.db_name(aid))
            if a.deleted:
                assert db is None and model.volume_name(aid) not in self.host.volumes
                assert model.wal_volume_name(aid) not in self.host.volumes
            else:
                assert db is not None and model.volume_name(aid) in self.host.volumes
                wal = model.wal_volume_name(aid) in self.host.volumes
                assert wal == self.host.layout[aid], (aid, wal)
                asleep = self.host.sleep.get(aid, "awake") != "awake"
                assert asleep or db.state == "running", db
                if a.kind == "redis":  # asleep or not, its next start has its quota
                    quota = storage.quota_bytes(a.kind, a.storage_mb, a.resources.memory_mb)
                    assert self.host.conf_quota.get(aid) == quota, (aid, quota)
        for jid in self.jobs:
            assert jid in self.host.finished_jobs
        live_waiting = {a for a in self.host.waiting if a in self.live()}
        assert not live_waiting, f"clients of {live_waiting} still wait for a wake"


PlannerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_planner_machine = PlannerMachine.TestCase
