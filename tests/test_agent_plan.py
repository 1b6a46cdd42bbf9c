"""The planner, without I/O: tables for the cases that matter and Hypothesis for convergence."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from agent import model, specs
from agent import plan as p
from agent.model import Observed, ObservedContainer, ObservedNetwork, ObservedVolume
from schemas.messages import (
    AddonSpec,
    DesiredState,
    JobSpec,
    ProjectSpec,
    Resources,
    SleepPolicy,
)

PID = "a" * 32
AID = "b" * 32
JID = "c" * 32
SETTINGS = p.Settings(images=specs.Images(), secrets_root="/secrets")
RES = Resources(cpus=0.5, memory_mb=256)


def addon(
    aid: str = AID, deleted: bool = False, kind: str = "postgres", memory: int = 256
) -> AddonSpec:
    return AddonSpec(
        id=aid,
        name=f"db-{aid[:4]}",
        kind=kind,  # type: ignore[arg-type]
        resources=Resources(cpus=0.5, memory_mb=memory),
        deleted=deleted,
    )


def desired(
    *addons: AddonSpec, jobs: tuple[JobSpec, ...] = (), generation: int = 1
) -> DesiredState:
    return DesiredState(
        version=1,
        host="h1",
        generation=generation,
        projects=(ProjectSpec(id=PID, name="p", addons=addons, jobs=jobs),),
    )


def running(
    spec: specs.ContainerSpec, cid: str, state: str = "running", mode: str = ""
) -> ObservedContainer:
    return ObservedContainer(
        id=cid,
        name=spec.name,
        role=spec.role,
        project_id=spec.project_id,
        state=state,  # type: ignore[arg-type]
        spec_hash=spec.spec_hash,
        addon_id=spec.addon_id,
        job_id=spec.job_id,
        network_mode=mode or (f"container:holder-{spec.addon_id}" if spec.role == "db" else "net"),
        ip="172.30.0.2" if spec.role == "holder" else None,
    )


def converged_world(a: AddonSpec) -> Observed:
    holder = specs.holder_spec(PID, a, SETTINGS.images)
    db = specs.db_spec(PID, a, SETTINGS.images, SETTINGS.secret_dir(a.id))
    return Observed(
        containers=(running(holder, f"holder-{a.id}"), running(db, f"db-{a.id}")),
        networks=(ObservedNetwork("n1", model.network_name(PID), PID),),
        volumes=(ObservedVolume(model.volume_name(a.id), a.id),),
    )


LOCAL = p.Local(secrets={AID: 1})


def kinds(actions: tuple[p.Action, ...]) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_no_desired_state_plans_nothing_even_with_managed_containers() -> None:
    assert p.plan(None, converged_world(addon()), LOCAL, SETTINGS) == ()


def test_empty_host_gets_network_volume_secret_holder_and_db_in_order() -> None:
    a = addon()
    actions = p.plan(desired(a), Observed(), p.Local(), SETTINGS)
    assert kinds(actions) == [
        "EnsureNetwork",
        "EnsureVolume",
        "FetchSecret",
        "RunContainer",
        "RunContainer",
    ]
    holder, db = actions[3], actions[4]
    assert isinstance(holder, p.RunContainer) and holder.spec.role == "holder"
    assert isinstance(db, p.RunContainer) and db.spec.netns_of == model.holder_name(AID)


def test_converged_world_plans_nothing() -> None:
    assert p.plan(desired(addon()), converged_world(addon()), LOCAL, SETTINGS) == ()


def test_addon_missing_from_desired_state_is_left_alone() -> None:
    other = addon("d" * 32)
    assert p.plan(
        desired(other), converged_world(addon()), p.Local(secrets={other.id: 1}), SETTINGS
    ) == (
        p.EnsureVolume(other.id, model.volume_name(other.id), PID),
        p.RunContainer(other.id, specs.holder_spec(PID, other, SETTINGS.images)),
        p.RunContainer(
            other.id, specs.db_spec(PID, other, SETTINGS.images, SETTINGS.secret_dir(other.id))
        ),
    )


def test_tombstone_removes_containers_then_volume_then_secret() -> None:
    a = addon(deleted=True)
    local = replace(LOCAL, answered={AID: f"db-{AID}"})
    actions = p.plan(desired(a), converged_world(addon()), local, SETTINGS)
    assert kinds(actions) == ["RemoveContainer", "RemoveContainer", "RemoveVolume", "RemoveSecret"]
    assert actions[0] == p.RemoveContainer(AID, model.db_name(AID), "AddonDeleted")
    assert actions[1] == p.RemoveContainer(AID, model.holder_name(AID), "AddonDeleted")


@pytest.mark.parametrize(
    ("answered", "stage", "kill"),
    [
        ({}, "awake", True),  # never answered: still in initdb
        ({AID: f"db-{AID}"}, "awake", False),  # has run: a clean shutdown
        ({AID: "db-before"}, "awake", True),  # a database made again, not answered yet
        ({}, "light", False),  # asleep: it answered before (a restarted agent forgot)
        ({}, "deep", False),
    ],
)
def test_a_tombstone_kills_only_a_database_that_never_answered(
    answered: dict[str, str], stage: str, kill: bool
) -> None:
    """Its volume goes in the same plan, but a database that has run still gets its clean
    shutdown; one still in initdb (whose shell ignores SIGTERM) would hold the deletion for
    the whole stop timeout."""
    local = replace(
        LOCAL,
        answered=answered,
        sleep={AID: p.SleepFacts(state=stage, listening=True)},  # type: ignore[arg-type]
    )
    actions = p.plan(desired(addon(deleted=True)), converged_world(addon()), local, SETTINGS)
    assert actions[0] == p.RemoveContainer(AID, model.db_name(AID), "AddonDeleted", kill)
    # The holder holds nothing to shut down: removed alike either way.
    assert actions[1] == p.RemoveContainer(AID, model.holder_name(AID), "AddonDeleted")


def test_db_removed_by_hand_is_recreated_on_the_same_volume() -> None:
    world = converged_world(addon())
    world = Observed(
        containers=tuple(c for c in world.containers if c.role != "db"),
        networks=world.networks,
        volumes=world.volumes,
    )
    actions = p.plan(desired(addon()), world, LOCAL, SETTINGS)
    assert kinds(actions) == ["RunContainer"]
    assert actions[0].spec.mounts[0].source == model.volume_name(AID)  # type: ignore[union-attr]


def test_changed_plan_resources_recreate_only_the_db() -> None:
    actions = p.plan(desired(addon(memory=512)), converged_world(addon()), LOCAL, SETTINGS)
    assert actions == (
        p.RemoveContainer(AID, model.db_name(AID), "SpecChanged"),
        p.RunContainer(
            AID, specs.db_spec(PID, addon(memory=512), SETTINGS.images, "/secrets/" + AID)
        ),
    )


def test_dead_holder_takes_the_db_with_it() -> None:
    world = converged_world(addon())
    holder = next(c for c in world.containers if c.role == "holder")
    db = next(c for c in world.containers if c.role == "db")
    world = Observed(
        containers=(replace(holder, state="exited"), db),
        networks=world.networks,
        volumes=world.volumes,
    )
    assert kinds(p.plan(desired(addon()), world, LOCAL, SETTINGS)) == [
        "RemoveContainer",
        "RemoveContainer",
        "RunContainer",
        "RunContainer",
    ]


@pytest.mark.parametrize(
    ("holder_state", "expected"),
    [
        # Cut off before the holder started (apply.stages): both made again.
        ("created", ["RemoveContainer", "RemoveContainer", "RunContainer", "RunContainer"]),
        # Cut off after the holder started: the database only starts (after the pass's fence).
        ("running", ["StartContainer"]),
    ],
)
def test_a_pair_cut_off_between_its_stages_is_finished_or_replaced(
    holder_state: str, expected: list[str]
) -> None:
    world = converged_world(addon())
    holder = next(c for c in world.containers if c.role == "holder")
    db = next(c for c in world.containers if c.role == "db")
    world = Observed(
        containers=(replace(holder, state=holder_state), replace(db, state="created")),
        networks=world.networks,
        volumes=world.volumes,
    )
    assert kinds(p.plan(desired(addon()), world, LOCAL, SETTINGS)) == expected


def test_stopped_db_is_started_unless_it_sleeps() -> None:
    world = converged_world(addon())
    stopped = tuple(replace(c, state="exited") if c.role == "db" else c for c in world.containers)
    world = Observed(containers=stopped, networks=world.networks, volumes=world.volumes)
    assert kinds(p.plan(desired(addon()), world, LOCAL, SETTINGS)) == ["StartContainer"]
    asleep = p.Local(secrets={AID: 1}, sleep={AID: p.SleepFacts(state="deep")})
    assert p.plan(desired(addon()), world, asleep, SETTINGS) == ()


SLEEPY = replace(addon(), sleep=SleepPolicy(enabled=True, light_after_s=10, deep_after_s=60))
NOW = 1_000_000.0


def sleep_plan(world: Observed, **facts: Any) -> tuple[p.Action, ...]:
    idle_s = facts.pop("idle_s", 0.0)
    f = p.SleepFacts(last_activity=NOW - idle_s, listening=True, **facts)
    return p.plan(
        desired(SLEEPY), world, p.Local(secrets={AID: 1}, sleep={AID: f}, now=NOW), SETTINGS
    )


def test_the_planner_puts_an_idle_addon_to_sleep_and_wakes_it_for_a_waiting_client() -> None:
    awake = converged_world(SLEEPY)
    db = model.db_name(AID)
    assert sleep_plan(awake, ready=True, idle_s=5) == ()
    assert sleep_plan(awake, ready=True, idle_s=10) == (p.SleepAddon(AID, db, "light"),)
    assert sleep_plan(awake, ready=True, idle_s=60) == (p.SleepAddon(AID, db, "deep"),)
    # Never while a client holds a connection or waits, a backup holds it, or before it
    # has answered a client once (initdb).
    assert sleep_plan(awake, ready=True, idle_s=60, clients=1) == ()
    assert sleep_plan(awake, ready=True, idle_s=60, wake_requested=True) == ()
    assert sleep_plan(awake, ready=True, idle_s=60, held=True) == ()
    assert sleep_plan(awake, ready=False, idle_s=60) == ()
    paused = Observed(
        containers=tuple(
            replace(c, state="paused") if c.role == "db" else c for c in awake.containers
        ),
        networks=awake.networks,
        volumes=awake.volumes,
    )
    assert sleep_plan(paused, state="light", idle_s=30) == ()
    assert sleep_plan(paused, state="light", idle_s=60) == (p.SleepAddon(AID, db, "deep"),)
    assert sleep_plan(paused, state="light", wake_requested=True) == (p.WakeAddon(AID, db),)
    assert sleep_plan(paused, state="light", held=True) == (p.WakeAddon(AID, db),)
    # After a restart, before its wake listener is back: nothing to act through yet.
    restarted = p.SleepFacts(state="light", last_activity=NOW - 600)
    local = p.Local(secrets={AID: 1}, sleep={AID: restarted}, now=NOW)
    assert p.plan(desired(SLEEPY), paused, local, SETTINGS) == ()
    # A plan without sleep leaves an awake add-on as it is.
    no_sleep = p.Local(secrets={AID: 1}, sleep={AID: p.SleepFacts(ready=True)}, now=NOW)
    assert p.plan(desired(addon()), awake, no_sleep, SETTINGS) == ()


def _with_db(world: Observed, state: str) -> Observed:
    return Observed(
        containers=tuple(
            replace(c, state=state) if c.role == "db" else c for c in world.containers
        ),
        networks=world.networks,
        volumes=world.volumes,
    )


NO_SLEEP = replace(SLEEPY, sleep=SleepPolicy(enabled=False))


@pytest.mark.parametrize(
    ("spec", "db_state", "facts", "expected"),
    [
        # A backup's hold wakes a sleeping add-on through its worker, from either stage.
        (SLEEPY, "paused", p.SleepFacts(state="light", held=True, listening=True), "wake"),
        (SLEEPY, "exited", p.SleepFacts(state="deep", held=True, listening=True), "wake"),
        # ... however long it has been idle (the hold wins over the idle timer).
        (
            SLEEPY,
            "exited",
            p.SleepFacts(state="deep", held=True, listening=True, last_activity=NOW - 1e6),
            "wake",
        ),
        # Held and awake: neither a sleep nor a wake.
        (
            SLEEPY,
            "running",
            p.SleepFacts(held=True, ready=True, listening=True, last_activity=NOW - 1e6),
            "nothing",
        ),
        # A new password the database has not been given (a rotation while it slept):
        # woken to be given it, and kept awake until it has it, however idle.
        (SLEEPY, "exited", p.SleepFacts(state="deep", credentials=True, listening=True), "wake"),
        (SLEEPY, "paused", p.SleepFacts(state="light", credentials=True, listening=True), "wake"),
        (
            SLEEPY,
            "running",
            p.SleepFacts(credentials=True, ready=True, listening=True, last_activity=NOW - 1e6),
            "nothing",
        ),
        # Held, but no listener yet (a restarted agent): the wake waits for it.
        (SLEEPY, "exited", p.SleepFacts(state="deep", held=True), "nothing"),
        # The plan stopped allowing sleep: a sleeping add-on wakes through its worker...
        (NO_SLEEP, "paused", p.SleepFacts(state="light", listening=True), "wake"),
        (NO_SLEEP, "exited", p.SleepFacts(state="deep", listening=True), "wake"),
        # ... once its listener runs (it lifts the deep-sleep redirect) ...
        (NO_SLEEP, "exited", p.SleepFacts(state="deep"), "nothing"),
        # ... and an awake one is never put to sleep, however idle.
        (
            NO_SLEEP,
            "running",
            p.SleepFacts(ready=True, listening=True, last_activity=NOW - 1e6),
            "nothing",
        ),
        # Still allowed and idle: it stays asleep.
        (SLEEPY, "exited", p.SleepFacts(state="deep", listening=True), "nothing"),
    ],
)
def test_holds_and_plan_changes_wake_through_the_planner(
    spec: AddonSpec, db_state: str, facts: p.SleepFacts, expected: str
) -> None:
    world = _with_db(converged_world(spec), db_state)
    facts = replace(facts, last_activity=facts.last_activity or NOW)
    local = p.Local(secrets={AID: 1}, sleep={AID: facts}, now=NOW)
    actions = p.plan(desired(spec), world, local, SETTINGS)
    want = (p.WakeAddon(AID, model.db_name(AID)),) if expected == "wake" else ()
    assert actions == want


def _facts(**kw: Any) -> p.SleepFacts:
    return p.SleepFacts(**{"listening": True, "last_activity": NOW, **kw})


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        # Awake and answered a client: due at light_after_s after its last activity.
        (_facts(ready=True), NOW + 10),
        (_facts(ready=True, last_activity=NOW - 4), NOW + 6),
        # Light sleep: due to deepen at deep_after_s.
        (_facts(state="light"), NOW + 60),
        # Nothing further after deep sleep.
        (_facts(state="deep"), None),
        # Nothing the planner could act on: a client, a hold, a waiting client, no
        # listener, not yet ready.
        (_facts(ready=True, clients=1), None),
        (_facts(ready=True, held=True), None),
        (_facts(ready=True, credentials=True), None),
        (_facts(ready=True, wake_requested=True), None),
        (_facts(ready=True, listening=False), None),
        (_facts(ready=False), None),
        # Past due: the pass that saw it planned the sleep; no timer that would spin.
        (_facts(ready=True, last_activity=NOW - 11), None),
    ],
)
def test_next_sleep_deadline(facts: p.SleepFacts, expected: float | None) -> None:
    assert p.next_sleep_deadline(desired(SLEEPY), {AID: facts}, NOW) == expected


def test_next_sleep_deadline_is_the_earliest_and_ignores_what_cannot_sleep() -> None:
    other = "d" * 32
    quick = replace(addon(other), sleep=SleepPolicy(enabled=True, light_after_s=3, deep_after_s=2))
    state = desired(SLEEPY, quick)
    facts = {AID: _facts(ready=True), other: _facts(ready=True)}
    # deep_after_s below light_after_s: it goes straight to deep, at 2 s.
    assert p.next_sleep_deadline(state, facts, NOW) == NOW + 2
    no_sleep = desired(NO_SLEEP, replace(quick, deleted=True))
    assert p.next_sleep_deadline(no_sleep, facts, NOW) is None
    assert p.next_sleep_deadline(None, facts, NOW) is None


def test_new_secret_version_is_fetched() -> None:
    actions = p.plan(
        desired(addon()), converged_world(addon()), p.Local(secrets={AID: 0}), SETTINGS
    )
    assert kinds(actions)[0] == "FetchSecret"


def test_jobs_run_once_and_are_collected() -> None:
    job = JobSpec(id=JID, image="toolbox", command=("true",))
    d = desired(jobs=(job,))
    net = (ObservedNetwork("n1", model.network_name(PID), PID),)
    assert p.plan(d, Observed(networks=net), p.Local(), SETTINGS) == (p.StartJob(JID, PID, job),)
    spec = specs.job_spec(PID, job, specs.JobLimits())
    exited = Observed(containers=(running(spec, "j", state="exited"),), networks=net)
    assert p.plan(d, exited, p.Local(), SETTINGS) == (p.CollectJob(JID, PID, spec.name),)
    assert (
        p.plan(d, Observed(networks=net), p.Local(finished_jobs=frozenset({JID})), SETTINGS) == ()
    )
    # The controller acknowledged the result: the job left the desired state.
    assert kinds(p.plan(desired(), exited, p.Local(), SETTINGS)) == ["RemoveContainer"]


def test_a_running_job_is_watched_once() -> None:
    # A watch that finishes at once asks for a pass; planned again on every pass, that
    # would be a pass loop for as long as the job runs.
    job = JobSpec(id=JID, image="toolbox", command=("true",))
    spec = specs.job_spec(PID, job, specs.JobLimits())
    net = (ObservedNetwork("n1", model.network_name(PID), PID),)
    busy = Observed(containers=(running(spec, "j"),), networks=net)
    d = desired(jobs=(job,))
    assert p.plan(d, busy, p.Local(), SETTINGS) == (p.WatchJob(JID, PID, job, spec.name),)
    assert p.plan(d, busy, p.Local(watched_jobs=frozenset({JID})), SETTINGS) == ()
    # Its exit is collected whether or not the watcher has noticed yet.
    exited = Observed(containers=(running(spec, "j", state="exited"),), networks=net)
    watched = p.Local(watched_jobs=frozenset({JID}))
    assert p.plan(d, exited, watched, SETTINGS) == (p.CollectJob(JID, PID, spec.name),)


def test_a_projects_jobs_run_at_most_per_project_at_once_in_order() -> None:
    """Each job has the plan's CPU and memory and a project may have 8 pending: all 8 at
    once were 8 times the plan (a Team project 16 GB of jobs on a 24 GB host). The rest
    wait, in order, and start as slots free; another project's jobs are not held back."""
    jobs = tuple(JobSpec(id=f"{n:032x}", image="toolbox", command=("true",)) for n in range(5))
    d = desired(jobs=jobs)
    net = (ObservedNetwork("n1", model.network_name(PID), PID),)
    two = replace(SETTINGS, jobs=specs.JobLimits(per_project=2))

    def started(observed: Observed) -> list[str]:
        return [a.key for a in p.plan(d, observed, p.Local(), two) if isinstance(a, p.StartJob)]

    assert started(Observed(networks=net)) == [jobs[0].id, jobs[1].id]
    spec = [specs.job_spec(PID, j, specs.JobLimits()) for j in jobs]
    one_running = Observed(containers=(running(spec[0], "j0"),), networks=net)
    assert started(one_running) == [jobs[1].id]
    # A created one (an agent killed between create and start) holds its slot too.
    busy = Observed(
        containers=(running(spec[0], "j0"), running(spec[1], "j1", state="created")),
        networks=net,
    )
    assert started(busy) == []
    # Ended ones free their slots at once (collected in the same pass).
    ended = Observed(
        containers=(
            running(spec[0], "j0", state="exited"),
            running(spec[1], "j1", state="dead"),
        ),
        networks=net,
    )
    assert started(ended) == [jobs[2].id, jobs[3].id]
    finished = p.Local(finished_jobs=frozenset({jobs[0].id, jobs[1].id}))
    planned = p.plan(d, Observed(networks=net), finished, two)
    assert [a.key for a in planned if isinstance(a, p.StartJob)] == [jobs[2].id, jobs[3].id]


NET = ObservedNetwork("n1", model.network_name(PID), PID)


def test_network_of_a_project_with_nothing_left_is_removed() -> None:
    # Tombstones only, their containers and volumes gone: the network goes.
    assert p.plan(desired(addon(deleted=True)), Observed(networks=(NET,)), p.Local(), SETTINGS) == (
        p.RemoveNetwork(PID, NET.name),
    )
    # A project that left the desired state altogether: its network goes too.
    gone = DesiredState(version=1, host="h1", generation=2, projects=())
    assert p.plan(gone, Observed(networks=(NET,)), p.Local(), SETTINGS) == (
        p.RemoveNetwork(PID, NET.name),
    )


def test_network_stays_while_any_container_of_the_project_exists() -> None:
    world = converged_world(addon())
    # The tombstone's holder and database are still attached: remove them, not the network.
    actions = p.plan(desired(addon(deleted=True)), world, LOCAL, SETTINGS)
    assert "RemoveNetwork" not in kinds(actions)
    # Only the holder left (its removal failed last pass): the network still stays.
    holder = next(c for c in world.containers if c.role == "holder")
    only_holder = Observed(containers=(holder,), networks=(NET,))
    assert "RemoveNetwork" not in kinds(
        p.plan(desired(addon(deleted=True)), only_holder, p.Local(), SETTINGS)
    )
    # A project gone from the desired state whose add-on was left alone keeps its network.
    gone = DesiredState(version=1, host="h1", generation=2, projects=())
    assert p.plan(gone, world, LOCAL, SETTINGS) == ()
    # A job container (running, or exited and not yet collected) keeps it as well.
    job = JobSpec(id=JID, image="toolbox", command=("true",))
    spec = specs.job_spec(PID, job, specs.JobLimits())
    exited = Observed(containers=(running(spec, "j", state="exited"),), networks=(NET,))
    assert kinds(p.plan(desired(), exited, p.Local(), SETTINGS)) == ["RemoveContainer"]


def test_network_stays_for_a_live_addon_or_a_pending_job() -> None:
    assert p.plan(desired(addon()), converged_world(addon()), LOCAL, SETTINGS) == ()
    job = JobSpec(id=JID, image="toolbox", command=("true",))
    finished = p.Local(finished_jobs=frozenset({JID}))
    assert p.plan(desired(jobs=(job,)), Observed(networks=(NET,)), finished, SETTINGS) == ()


def test_other_projects_networks_are_independent() -> None:
    other = ObservedNetwork("n2", model.network_name("f" * 32), "f" * 32)
    world = converged_world(addon())
    world = Observed(world.containers, (*world.networks, other), world.volumes)
    assert p.plan(desired(addon()), world, LOCAL, SETTINGS) == (
        p.RemoveNetwork("f" * 32, other.name),
    )


# --- convergence under a simulated host ----------------------------------------------------


def simulate(
    world: Observed, actions: tuple[p.Action, ...], local: p.Local, fail: set[int]
) -> tuple[Observed, p.Local]:
    """Apply actions to a model of the host; indexes in `fail` fail (and skip their key's chain)."""
    containers = {c.name: c for c in world.containers}
    networks = {n.name: n for n in world.networks}
    volumes = {v.name: v for v in world.volumes}
    secrets = dict(local.secrets)
    failed: set[str] = set()
    for i, a in enumerate(actions):
        if a.key in failed:
            continue
        if i in fail:
            failed.add(a.key)
            continue
        match a:
            case p.EnsureNetwork(key, name):
                networks[name] = ObservedNetwork(f"id-{name}", name, key)
            case p.EnsureVolume(key, name, _):
                volumes[name] = ObservedVolume(name, key)
            case p.FetchSecret(key, _, _, version):
                secrets[key] = version
            case p.RunContainer(_, spec):
                mode = f"container:id-{spec.netns_of}" if spec.netns_of else "net"
                containers[spec.name] = running(spec, f"id-{spec.name}", mode=mode)
            case p.StartContainer(_, name) | p.UnpauseContainer(_, name):
                containers[name] = replace(containers[name], state="running")
            case p.RemoveContainer(_, name, _):
                containers.pop(name, None)
            case p.RemoveVolume(_, name):
                volumes.pop(name, None)
            case p.RemoveNetwork(key, name):
                attached = [c.name for c in containers.values() if c.project_id == key]
                assert not attached, f"network {name} removed with {attached} attached"
                networks.pop(name, None)
            case p.RemoveSecret(key):
                secrets.pop(key, None)
            case _:
                pass
    new_world = Observed(
        tuple(containers.values()), tuple(networks.values()), tuple(volumes.values())
    )
    return new_world, p.Local(secrets=secrets, finished_jobs=local.finished_jobs, sleep=local.sleep)


ids = st.sampled_from(["1" * 32, "2" * 32, "3" * 32, "4" * 32])
addons = st.builds(
    lambda aid, kind, mem, deleted: AddonSpec(
        id=aid,
        name=f"a{aid[:3]}",
        kind=kind,
        resources=Resources(cpus=0.5, memory_mb=mem),
        deleted=deleted,
    ),
    ids,
    st.sampled_from(["postgres", "redis"]),
    st.sampled_from([128, 256]),
    st.booleans(),
)
addon_sets = st.lists(addons, max_size=4, unique_by=lambda a: a.id).map(tuple)


@settings(max_examples=200, deadline=None)
@given(before=addon_sets, after=addon_sets, faults=st.sets(st.integers(0, 12), max_size=4))
def test_any_world_converges_and_only_tombstones_lose_data(
    before: tuple[AddonSpec, ...], after: tuple[AddonSpec, ...], faults: set[int]
) -> None:
    world, local = Observed(), p.Local()
    # Converge to `before`, then change the desired state to `after`, with faults injected.
    for target, fail in ((before, set()), (after, faults)):
        for _ in range(20):
            actions = p.plan(desired(*target), world, local, SETTINGS)
            if not actions:
                break
            removed_volumes = {a.name for a in actions if isinstance(a, p.RemoveVolume)}
            tomb = {model.volume_name(a.id) for a in target if a.deleted}
            assert removed_volumes <= tomb, "a volume was removed without a tombstone"
            world, local = simulate(world, actions, local, fail)
            fail = set()  # faults are transient: the next pass succeeds
        assert p.plan(desired(*target), world, local, SETTINGS) == (), "did not converge"
    live = {a.id for a in after if not a.deleted}
    for aid in live:
        assert world.container(model.db_name(aid)) is not None
        assert world.volume(model.volume_name(aid)) is not None
    for a in after:
        if a.deleted:
            assert world.volume(model.volume_name(a.id)) is None
    # The project's network lives exactly as long as something of the project does (an
    # add-on left out of the desired state is left alone, and so is its network).
    assert (world.network(model.network_name(PID)) is not None) == bool(live or world.containers)


# --- sleep decisions ------------------------------------------------------------------------

from agent.sleep.policy import target as sleep_target  # noqa: E402
from schemas.messages import SleepPolicy  # noqa: E402

POLICY = SleepPolicy(enabled=True, light_after_s=10, deep_after_s=60)


def test_sleep_stages_follow_idle_time() -> None:
    assert sleep_target(POLICY, "awake", 9.9, False) == "awake"
    assert sleep_target(POLICY, "awake", 10, False) == "light"
    assert sleep_target(POLICY, "light", 59, False) == "light"
    assert sleep_target(POLICY, "light", 60, False) == "deep"
    assert sleep_target(POLICY, "awake", 61, False) == "deep"


def test_open_clients_or_disabled_policy_never_sleep() -> None:
    assert sleep_target(POLICY, "awake", 1e9, True) == "awake"
    assert sleep_target(SleepPolicy(enabled=False), "awake", 1e9, False) == "awake"


@given(idle=st.floats(0, 1e6), state=st.sampled_from(["awake", "light", "deep"]))
def test_sleep_only_deepens(idle: float, state: str) -> None:
    order = ["awake", "light", "deep"]
    assert order.index(sleep_target(POLICY, state, idle, False)) >= order.index(state)  # type: ignore[arg-type]


def test_reused_name_waits_until_the_tombstoned_holder_is_gone() -> None:
    old = addon(AID, deleted=True)
    new = AddonSpec(id="e" * 32, name=old.name, kind="postgres", resources=RES)
    world = converged_world(addon())
    actions = p.plan(desired(new, old), world, LOCAL, SETTINGS)
    # The tombstone is removed first and nothing is created under its name in this pass.
    assert kinds(actions) == ["RemoveContainer", "RemoveContainer", "RemoveVolume", "RemoveSecret"]
    net = Observed(networks=world.networks)
    later = p.plan(desired(new, old), net, p.Local(), SETTINGS)
    assert "RunContainer" in kinds(later)


# --- the WAL on a volume of its own ----------------------------------------------------------
WAL_SETTINGS = replace(SETTINGS, wal_volumes=True)


def quota_addon(kind: str = "postgres") -> AddonSpec:
    return replace(addon(kind=kind), storage_mb=24)


def test_a_new_postgres_gets_its_wal_volume_before_its_data_volume() -> None:
    a = quota_addon()
    actions = p.plan(desired(a), Observed(), p.Local(), WAL_SETTINGS)
    assert actions[1:3] == (
        p.EnsureVolume(AID, model.wal_volume_name(AID), PID, specs.wal_fs_size_mb(24)),
        p.EnsureVolume(AID, model.volume_name(AID), PID, specs.fs_size_mb(24)),
    )
    db = actions[-1]
    assert isinstance(db, p.RunContainer) and db.spec.role == "db"
    assert specs.Mount("volume", model.wal_volume_name(AID), specs.WAL_DIR) in db.spec.mounts
    assert ("POSTGRES_INITDB_WALDIR", specs.WAL_DIR) in db.spec.env


def test_an_addon_made_before_wal_volumes_keeps_its_wal_and_its_container() -> None:
    """Its data volume exists without a WAL volume: pg_wal is inside it. Nothing is
    created for it and the database's spec is what it was (no recreation)."""
    a = quota_addon()
    world = converged_world(a)  # made with the spec of before
    assert p.plan(desired(a), world, LOCAL, WAL_SETTINGS) == ()
    db = specs.db_spec(PID, a, SETTINGS.images, SETTINGS.secret_dir(AID))
    assert all(m.target != specs.WAL_DIR for m in db.mounts)
    assert all(k != "POSTGRES_INITDB_WALDIR" for k, _ in db.env)


def test_a_database_recreated_later_keeps_the_layout_its_volumes_have() -> None:
    a = quota_addon()
    with_wal = specs.db_spec(PID, a, SETTINGS.images, SETTINGS.secret_dir(AID), wal=True)
    holder = specs.holder_spec(PID, a, SETTINGS.images)
    volumes = (
        ObservedVolume(model.volume_name(AID), AID),
        ObservedVolume(model.wal_volume_name(AID), AID),
    )
    world = Observed(
        containers=(running(holder, f"holder-{AID}"),),
        networks=(ObservedNetwork("n1", model.network_name(PID), PID),),
        volumes=volumes,
    )
    # Even with WAL volumes turned off since: the volume is there, the database needs it.
    for settings_ in (WAL_SETTINGS, SETTINGS):
        assert p.plan(desired(a), world, LOCAL, settings_) == (p.RunContainer(AID, with_wal),)
    converged = replace(world, containers=(*world.containers, running(with_wal, f"db-{AID}")))
    assert p.plan(desired(a), converged, LOCAL, WAL_SETTINGS) == ()


def test_wal_volume_made_but_not_the_data_volume_yet() -> None:
    """An agent killed between the two: the next pass makes the data volume, WAL kept."""
    a = quota_addon()
    world = Observed(volumes=(ObservedVolume(model.wal_volume_name(AID), AID),))
    actions = p.plan(desired(a), world, p.Local(), SETTINGS)
    assert p.EnsureVolume(AID, model.volume_name(AID), PID, specs.fs_size_mb(24)) in actions
    assert not any(
        isinstance(x, p.EnsureVolume) and x.name == model.wal_volume_name(AID) for x in actions
    )
    db = actions[-1]
    assert (
        isinstance(db, p.RunContainer) and ("POSTGRES_INITDB_WALDIR", specs.WAL_DIR) in db.spec.env
    )


@pytest.mark.parametrize("a", [quota_addon("redis"), addon()], ids=["redis", "no-quota"])
def test_redis_and_unquoted_postgres_get_no_wal_volume(a: AddonSpec) -> None:
    actions = p.plan(desired(a), Observed(), p.Local(), WAL_SETTINGS)
    names = [x.name for x in actions if isinstance(x, p.EnsureVolume)]
    assert names == [model.volume_name(AID)]


def test_a_tombstone_removes_the_wal_volume_too() -> None:
    a = quota_addon()
    world = converged_world(a)
    world = replace(
        world, volumes=(*world.volumes, ObservedVolume(model.wal_volume_name(AID), AID))
    )
    actions = p.plan(desired(replace(a, deleted=True)), world, LOCAL, WAL_SETTINGS)
    assert [x for x in actions if isinstance(x, p.RemoveVolume)] == [
        p.RemoveVolume(AID, model.volume_name(AID)),
        p.RemoveVolume(AID, model.wal_volume_name(AID)),
    ]
