"""A Hypothesis state machine over the planner and its grouping into per-key chains.

The host is a model: actions apply to frozen `Observed` values, one action at a time, and
chains of different keys interleave the way the agent's workers do (agent/workqueue.py),
each key serially. Rules change the desired state (create, delete, reuse a name, change a
plan, add jobs), damage the host (kill, remove, pause, stop containers), fail actions and
let jobs finish. Invariants: no volume is removed without a tombstone, no object is touched
by two keys' chains, a key never has two chains at once, and the host converges once quiet.
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
from schemas.messages import AddonSpec, DesiredState, JobSpec, ProjectSpec, Resources

SETTINGS = p.Settings(images=specs.Images(), secrets_root="/secrets")
PROJECTS = ("p" * 32, "q" * 32)
NAMES = ("orders", "cache", "jobs")


class Failed(Exception):
    """What Docker would refuse: the chain stops, the key retries on a later pass."""


@dataclass
class Host:
    containers: dict[str, ObservedContainer] = field(default_factory=dict)
    networks: dict[str, ObservedNetwork] = field(default_factory=dict)
    volumes: dict[str, ObservedVolume] = field(default_factory=dict)
    secrets: dict[str, int] = field(default_factory=dict)
    finished_jobs: set[str] = field(default_factory=set)
    sleep: dict[str, str] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=itertools.count)

    def observed(self) -> Observed:
        return Observed(
            tuple(self.containers.values()),
            tuple(self.networks.values()),
            tuple(self.volumes.values()),
        )

    def local(self) -> p.Local:
        return p.Local(
            secrets=dict(self.secrets),
            finished_jobs=frozenset(self.finished_jobs),
            sleep=dict(self.sleep),  # type: ignore[arg-type]
        )

    def create(self, spec: specs.ContainerSpec) -> None:
        if spec.name in self.containers:
            return  # create-409: start the existing one
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
            case p.FetchSecret(key, _, _, version):
                self.secrets[key] = version
            case p.RunContainer(_, spec):
                self.create(spec)
            case p.StartJob(_, project_id, job):
                self.create(specs.job_spec(project_id, job, SETTINGS.jobs))
            case p.StartContainer(_, name) | p.UnpauseContainer(_, name):
                if name not in self.containers:
                    raise Failed(f"no such container {name}")
                self.containers[name] = replace(self.containers[name], state="running")
            case p.RemoveContainer(_, name, _):
                self.containers.pop(name, None)
            case p.RemoveVolume(_, name):
                self.volumes.pop(name, None)
            case p.RemoveSecret(key):
                self.secrets.pop(key, None)
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
            | p.RemoveContainer(_, name, _)
            | p.CollectJob(_, _, name)
            | p.WatchJob(_, _, _, name)
        ):
            return name
        case p.EnsureVolume(key, _, _) | p.RemoveVolume(key, _):
            return key
        case p.FetchSecret(key, _, _, _) | p.RemoveSecret(key):
            return key
        case p.StartBackupOp(_, _, spec, _):
            return spec.addon_id
        case p.RunApp(key, _, _):
            return key


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
    )
    def create_addon(self, project: str, name: str, kind: str) -> None:
        taken = {a.name for proj, a in self.addons.values() if proj == project and not a.deleted}
        if name in taken:
            return  # the controller refuses a duplicate name
        aid = f"{next(self.serial):032x}"
        spec = AddonSpec(
            id=aid,
            name=name,  # may reuse the name of a tombstone
            kind=kind,  # type: ignore[arg-type]
            resources=Resources(cpus=0.5, memory_mb=256),
        )
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
    @rule(data=st.data(), stage=st.sampled_from(["light", "deep", "awake"]))
    def sleep_or_wake(self, data: st.DataObject, stage: str) -> None:
        """What the sleep manager does: record the stage, then pause or stop the db."""
        aid = data.draw(st.sampled_from(self.live()))
        db = self.host.containers.get(model.db_name(aid))
        if stage != "awake" and (db is None or db.state != "running"):
            return
        self.host.sleep[aid] = stage
        if db is not None and stage != "awake":
            state = "paused" if stage == "light" else "exited"
            self.host.containers[db.name] = replace(db, state=state)

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
        tombs = {model.volume_name(a.id) for _, a in self.addons.values() if a.deleted}
        for a in actions:
            if isinstance(a, p.RemoveVolume):
                assert a.name in tombs, f"{a.name} planned for removal without a tombstone"
        for key, chain in p.chains(desired, actions).items():
            assert all(a.key == key for a in chain)
            if key not in self.in_flight:  # a busy key's new work waits for its next pass
                self.in_flight[key] = list(chain)

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
            else:
                assert db is not None and model.volume_name(aid) in self.host.volumes
                asleep = self.host.sleep.get(aid, "awake") != "awake"
                assert asleep or db.state == "running", db
        for jid in self.jobs:
            assert jid in self.host.finished_jobs


PlannerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_planner_machine = PlannerMachine.TestCase
