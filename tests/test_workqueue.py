"""The keyed work queue (agent/workqueue.py) and the planner's grouping into chains."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence

import msgspec
import pytest

from agent import plan as p
from agent import slots, specs
from agent.apply import stages
from agent.model import Observed, ObservedContainer, ObservedNetwork, ObservedVolume
from agent.slots import PrioritySlots
from agent.workqueue import ChainResult, KeyedWorkers, backoff_delay
from schemas.messages import (
    SCHEMA_VERSION,
    AddonSpec,
    BackupSpec,
    DesiredState,
    JobSpec,
    ProjectSpec,
    Resources,
)

RES = Resources(cpus=0.5, memory_mb=256)
NET = ObservedNetwork(
    id="n1", name="orkestr-p1", project_id="p1", bridge="br-1", subnet="10.9.0.0/24"
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Runs:
    """A chain runner whose chains finish when the test says so, recording overlaps."""

    def __init__(self) -> None:
        self.gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.results: dict[str, ChainResult] = {}
        self.running: set[str] = set()
        self.overlap: list[str] = []
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.done = 0

    async def run(self, key: str, chain: Sequence[str]) -> ChainResult:
        if key in self.running:
            self.overlap.append(key)
        self.running.add(key)
        self.calls.append((key, tuple(chain)))
        try:
            gate = self.gates[key]
            await gate.wait()
            gate.clear()
            return self.results.get(key, ChainResult())
        finally:
            self.running.discard(key)

    def finished(self) -> None:
        self.done += 1


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("attempt", "u", "expected"),
    [
        (1, 0.0, 0.4),
        (1, 0.5, 0.5),
        (2, 0.5, 1.0),
        (3, 0.5, 2.0),
        (4, 0.0, 3.2),
        (7, 0.5, 30.0),  # 32 s capped at 30
        (60, 0.999999, 30.0 * 1.199999),
    ],
)
def test_backoff_doubles_per_attempt_caps_and_jitters_within_20_percent(
    attempt: int, u: float, expected: float
) -> None:
    assert backoff_delay(attempt, u, first=0.5, cap=30.0) == pytest.approx(expected)


async def test_one_key_runs_serially_while_other_keys_run_at_once() -> None:
    runs = Runs()
    q: KeyedWorkers[str] = KeyedWorkers(runs.run, runs.finished)
    assert q.submit("a", ["x"])
    assert q.submit("b", ["y"])
    assert not q.submit("a", ["again"]), "a second chain of a busy key must wait"
    await settle()
    assert runs.running == {"a", "b"}
    assert q.in_flight() == 2
    runs.gates["b"].set()  # b finishes while a is still busy: nobody waits for a
    await settle()
    assert runs.running == {"a"} and runs.done == 1
    assert q.submit("b", ["z"])
    runs.gates["a"].set()
    runs.gates["b"].set()
    await q.idle()
    assert runs.overlap == []
    assert runs.calls == [("a", ("x",)), ("b", ("y",)), ("b", ("z",))]
    assert runs.done == 3


async def test_a_plan_older_than_a_keys_last_completion_is_not_submitted_for_it() -> None:
    runs = Runs()
    q: KeyedWorkers[str] = KeyedWorkers(runs.run, runs.finished)
    seen = q.epoch  # the pass observes here ...
    q.submit("a", ["x"])
    runs.gates["a"].set()
    await q.idle()  # ... a's chain finishes after that observation
    assert not q.submit("a", ["x"], seen_epoch=seen), "stale plan for a"
    assert q.submit("b", ["y"], seen_epoch=seen)
    assert q.submit("a", ["x"], seen_epoch=q.epoch)  # the next pass saw the result
    runs.gates["a"].set()
    runs.gates["b"].set()
    await q.idle()


async def test_transient_failure_backs_off_per_key_and_resets_on_success() -> None:
    runs = Runs()
    clock = Clock()
    q: KeyedWorkers[str] = KeyedWorkers(
        runs.run, runs.finished, first_s=1.0, cap_s=8.0, rng=lambda: 0.5, clock=clock
    )
    runs.results["a"] = ChainResult("daemon said 500")
    delays = []
    assert q.submit("a", ["x"])
    for _ in range(5):
        runs.gates["a"].set()
        await q.idle()
        assert q.failed() == {"a": "daemon said 500"} and q.permanent() == {}
        start = clock.now
        assert not q.submit("a", ["x"]), "retried before its backoff elapsed"
        assert q.submit("other", ["y"]), "another key is not held up by a's backoff"
        runs.gates["other"].set()
        await q.idle()
        # The smallest step that lets the next attempt through is the delay.
        step = 0.0
        while not q.submit("a", ["x"]) and step < 100:
            step += 0.25
            clock.now = start + step
        delays.append(step)
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]  # doubling, capped
    runs.results["a"] = ChainResult()
    runs.gates["a"].set()
    await q.idle()
    assert q.failed() == {}
    runs.results["a"] = ChainResult("again")
    assert q.submit("a", ["x"])
    runs.gates["a"].set()
    await q.idle()
    clock.now += 1.0  # the first delay again: success reset the schedule
    assert q.submit("a", ["x"])
    runs.gates["a"].set()
    await q.close()


async def test_transient_failure_asks_for_a_pass_when_its_backoff_ends() -> None:
    runs = Runs()
    q: KeyedWorkers[str] = KeyedWorkers(runs.run, runs.finished, first_s=0.05, rng=lambda: 0.0)
    runs.results["a"] = ChainResult("busy")
    q.submit("a", ["x"])
    runs.gates["a"].set()
    await q.idle()
    assert runs.done == 1  # the completion itself asks for a pass
    await asyncio.sleep(0.1)  # 0.05 * 0.8 = 0.04 s later the timer asks again
    assert runs.done == 2
    await q.close()


async def test_permanent_failure_waits_for_a_new_spec() -> None:
    runs = Runs()
    clock = Clock()
    q: KeyedWorkers[str] = KeyedWorkers(runs.run, runs.finished, clock=clock)
    runs.results["a"] = ChainResult("invalid spec", permanent=True)
    assert q.submit("a", ["x"], fingerprint="spec-1")
    runs.gates["a"].set()
    await q.idle()
    assert q.permanent() == {"a": "invalid spec"}
    clock.now += 3600
    assert not q.submit("a", ["x"], fingerprint="spec-1"), "retried an unchanged spec"
    runs.results["a"] = ChainResult()
    assert q.submit("a", ["x"], fingerprint="spec-2")
    runs.gates["a"].set()
    await q.idle()
    assert q.failed() == {} and q.permanent() == {}


async def test_a_key_with_nothing_planned_is_settled() -> None:
    runs = Runs()
    q: KeyedWorkers[str] = KeyedWorkers(runs.run, runs.finished)
    runs.results["a"] = ChainResult("oops")
    runs.results["b"] = ChainResult("oops")
    q.submit("a", ["x"])
    q.submit("b", ["x"])
    runs.gates["a"].set()
    runs.gates["b"].set()
    await q.idle()
    q.settle({"b"}, q.epoch)
    assert q.failed() == {"b": "oops"}
    await q.close()


async def test_a_crashing_chain_is_a_failure_of_its_key_only() -> None:
    async def run(key: str, chain: Sequence[str]) -> ChainResult:
        if key == "bad":
            raise RuntimeError("bug")
        return ChainResult()

    q: KeyedWorkers[str] = KeyedWorkers(run, lambda: None)
    q.submit("bad", ["x"])
    q.submit("good", ["x"])
    await q.idle()
    assert q.failed() == {"bad": "internal error: RuntimeError('bug')"}
    await q.close()


def _desired() -> DesiredState:
    addon = AddonSpec(id="a1", name="db", kind="postgres", resources=RES)
    old = AddonSpec(id="a0", name="old", kind="redis", resources=RES, deleted=True)
    job = JobSpec(id="j1", image="img:1", command=("true",))
    return DesiredState(
        version=SCHEMA_VERSION,
        host="h",
        generation=1,
        projects=(ProjectSpec(id="p1", name="p1", addons=(addon, old), jobs=(job,)),),
    )


async def test_an_urgent_chain_goes_ahead_of_queued_work_never_beside_the_running_one() -> None:
    runs = Runs()
    q: KeyedWorkers[str] = KeyedWorkers(
        runs.run, runs.finished, first_s=1.0, rng=lambda: 0.5, clock=Clock()
    )
    # Busy: the wake runs right after the running chain, on the same worker.
    assert q.submit("a", ["create"])
    await settle()
    q.urgent("a", ["wake"])
    assert not q.submit("a", ["later"]), "the key is busy"
    runs.gates["a"].set()
    await settle()
    runs.gates["a"].set()
    await q.idle()
    assert runs.calls == [("a", ("create",)), ("a", ("wake",))] and runs.overlap == []
    # Backing off: the wake does not wait for the backoff, and its success leaves the
    # key's failure record (the failed work is still to do, on the key's schedule).
    runs.results["a"] = ChainResult("daemon said 500")
    assert q.submit("a", ["create"])
    runs.gates["a"].set()
    await q.idle()
    assert not q.submit("a", ["create"])
    runs.results["a"] = ChainResult()
    q.urgent("a", ["wake"])
    await settle()
    runs.gates["a"].set()
    await q.idle()
    assert runs.calls[-1] == ("a", ("wake",))
    assert q.failed() == {"a": "daemon said 500"}
    assert runs.done == 3


def test_chains_group_by_key_in_plan_order() -> None:
    actions: tuple[p.Action, ...] = (
        p.RemoveContainer("a0", "orkestr-a0-db", "AddonDeleted"),
        p.EnsureVolume("a1", "orkestr-a1-data", "p1"),
        p.RemoveVolume("a0", "orkestr-a0-data"),
        p.FetchSecret("a1", "p1", "postgres", 1),
    )
    assert p.chains(_desired(), actions) == {
        "a0": (actions[0], actions[2]),
        "a1": (actions[1], actions[3]),
    }


def test_chains_that_start_a_postgres_are_handed_out_first() -> None:
    """Longest first: a Postgres initialises for seconds, a Redis for a tenth of one."""
    rd = [AddonSpec(id=f"r{i}", name=f"r{i}", kind="redis", resources=RES) for i in range(3)]
    pg = [AddonSpec(id=f"g{i}", name=f"g{i}", kind="postgres", resources=RES) for i in range(2)]
    project = ProjectSpec(id="p1", name="p1", addons=(rd[0], pg[0], rd[1], rd[2], pg[1]))
    desired = DesiredState(version=SCHEMA_VERSION, host="h", generation=1, projects=(project,))
    settings = p.Settings(images=specs.Images(postgres="pg", redis="rd"), secrets_root="/s")
    plan = p.plan(desired, Observed(networks=(NET,)), p.Local(), settings)
    assert list(p.chains(desired, plan)) == ["g0", "g1", "r0", "r1", "r2"]
    slow = {k for k, chain in p.chains(desired, plan).items() if p.starts_slow(desired, k, chain)}
    assert slow == {"g0", "g1"}
    # Only a chain that starts one: a Postgres volume alone keeps its place.
    volumes = tuple(a for a in plan if isinstance(a, p.EnsureVolume))
    assert list(p.chains(desired, volumes)) == ["r0", "g0", "r1", "r2", "g1"]


def test_a_new_addons_volume_secret_and_holder_are_one_step() -> None:
    """Independent: side by side; the database waits for all three; the rest in order."""
    rd = AddonSpec(id="r0", name="r0", kind="redis", resources=RES)
    project = ProjectSpec(id="p1", name="p1", addons=(rd,))
    desired = DesiredState(version=SCHEMA_VERSION, host="h", generation=1, projects=(project,))
    settings = p.Settings(images=specs.Images(postgres="pg", redis="rd"), secrets_root="/s")
    chain = p.chains(desired, p.plan(desired, Observed(networks=(NET,)), p.Local(), settings))["r0"]
    kinds = [[type(a).__name__ for a in step] for step in p.steps(chain)]
    assert kinds == [["EnsureVolume", "FetchSecret", "RunContainer"], ["RunContainer"]]
    assert [a.spec.role for a in p.steps(chain)[1] if isinstance(a, p.RunContainer)] == ["db"]
    removal = (
        p.FetchSecret("r0", "p1", "redis", 2),
        p.RemoveContainer("r0", "orkestr-r0-db", "HolderReplaced"),
        p.RemoveContainer("r0", "orkestr-r0-net", "Drifted"),
        *chain[2:],
    )
    assert [len(step) for step in p.steps(removal)] == [1, 1, 1, 1, 1]
    assert [a for step in p.steps(removal) for a in step] == list(removal)
    # A tombstone: the database first (its volume and secret are mounted), then the rest.
    observed = Observed(
        networks=(NET,),
        containers=(
            ObservedContainer(id="d", name="orkestr-r0-db", role="db", project_id="p1",
                              state="running", addon_id="r0"),
            ObservedContainer(id="h", name="orkestr-r0-net", role="holder", project_id="p1",
                              state="running", addon_id="r0"),
        ),
        volumes=(ObservedVolume(name="orkestr-r0-data", addon_id="r0"),),
    )  # fmt: skip
    gone = msgspec.structs.replace(rd, deleted=True)
    tomb = msgspec.structs.replace(
        desired, projects=(ProjectSpec(id="p1", name="p1", addons=(gone,)),)
    )
    local = p.Local(secrets={"r0": 1})
    kinds = [[type(a).__name__ for a in step]
             for step in p.steps(p.chains(tomb, p.plan(tomb, observed, local, settings))["r0"])]  # fmt: skip
    assert kinds == [["RemoveContainer"], ["RemoveContainer", "RemoveVolume", "RemoveSecret"]]


def test_a_new_holder_starts_while_its_database_is_created() -> None:
    """The holder created in its step, then started beside the database's creation, then
    the database started; a failure in a stage stops the chain before the next (apply)."""
    rd = AddonSpec(id="r0", name="r0", kind="redis", resources=RES)
    project = ProjectSpec(id="p1", name="p1", addons=(rd,))
    desired = DesiredState(version=SCHEMA_VERSION, host="h", generation=1, projects=(project,))
    settings = p.Settings(images=specs.Images(postgres="pg", redis="rd"), secrets_root="/s")
    chain = p.chains(desired, p.plan(desired, Observed(networks=(NET,)), p.Local(), settings))["r0"]

    def what(action: p.Action) -> str:
        role = f"({action.spec.role})" if isinstance(action, p.RunContainer) else ""
        return type(action).__name__ + role

    def shape(chain: Sequence[p.Action]) -> list[list[tuple[str, str, bool]]]:
        async def whole(action: p.Action) -> None:
            pass

        async def create(action: p.RunContainer) -> None:
            pass

        async def start(action: p.RunContainer) -> None:
            pass

        out = []
        for stage in stages(p.steps(tuple(chain)), whole, create, start):
            out.append([(what(a), w.func.__name__, last) for a, w, last in stage])  # type: ignore[attr-defined]
        return out

    assert shape(chain) == [
        [("EnsureVolume", "whole", True), ("FetchSecret", "whole", True),
         ("RunContainer(holder)", "create", False)],
        [("RunContainer(holder)", "start", True), ("RunContainer(db)", "create", False)],
        [("RunContainer(db)", "start", True)],
    ]  # fmt: skip
    # A replaced holder: removals first, one at a time, then the same overlap.
    replaced = (
        p.RemoveContainer("r0", "orkestr-r0-db", "HolderReplaced"),
        p.RemoveContainer("r0", "orkestr-r0-net", "Drifted"),
        *chain[2:],
    )
    assert [[w for _, w, _ in stage] for stage in shape(replaced)] == [
        ["whole"],
        ["whole"],
        ["create"],
        ["start", "create"],
        ["start"],
    ]
    # A database alone (its holder runs): one action, whole.
    assert shape(chain[3:]) == [[("RunContainer(db)", "whole", True)]]


def test_chains_that_need_a_network_still_being_created_wait_for_it() -> None:
    desired = _desired()
    job = desired.projects[0].jobs[0]
    actions: tuple[p.Action, ...] = (
        p.EnsureNetwork("p1", "orkestr-p1"),
        p.RemoveContainer("a0", "orkestr-a0-db", "AddonDeleted"),
        p.EnsureVolume("a1", "orkestr-a1-data", "p1"),
        p.StartJob("j1", "p1", job),
        p.StartContainer("a1", "orkestr-a1-db"),
    )
    chains = p.chains(desired, actions)
    # The network first; removals need no network; a1 and the job wait for a later pass.
    assert chains == {"p1": (actions[0],), "a0": (actions[1],)}
    # Once the network is observed the plan has no EnsureNetwork: they go.
    assert set(p.chains(desired, actions[1:])) == {"a0", "a1", "j1"}


def test_a_backup_operation_runs_on_its_own_key_after_its_leftover_is_removed() -> None:
    """A killed agent's backup container goes before the operation starts again: one chain."""
    desired = _desired()
    addon = desired.projects[0].addons[0]
    spec = BackupSpec(id="d" * 32, op="backup", addon_id=addon.id, backup_id="d" * 32)
    key = p.op_key(spec)
    actions: tuple[p.Action, ...] = (
        p.RemoveContainer(key, "orkestr-backup-x", "BackupOrphaned"),
        p.StartContainer("a1", "orkestr-a1-db"),
        p.StartBackupOp(key, "p1", spec, addon),
    )
    assert p.chains(desired, actions) == {key: (actions[0], actions[2]), "a1": (actions[1],)}


async def test_daemon_slots_go_to_the_oldest_chain_first() -> None:
    """Chains each making several calls through two slots: earlier chains finish first
    (with a first-come queue every chain's first call went before any chain's second)."""
    gate = PrioritySlots(2)
    calls: list[tuple[str, int]] = []

    async def run(key: str, chain: Sequence[int]) -> ChainResult:
        for step in chain:
            async with gate.slot():
                calls.append((key, step))
                await asyncio.sleep(0)
        return ChainResult()

    workers: KeyedWorkers[int] = KeyedWorkers(run, lambda: None)
    for key in "abcd":
        workers.submit(key, (1, 2, 3))
    await workers.idle()
    finished = {key: max(i for i, (k, _) in enumerate(calls) if k == key) for key in "abcd"}
    assert sorted(finished, key=finished.__getitem__) == list("abcd")
    assert finished["a"] < [k for k, _ in calls].index("d"), calls  # a done before d began


async def test_a_chain_handed_out_first_overtakes_the_queued_ones() -> None:
    gate = PrioritySlots(1)
    calls: list[str] = []

    async def run(key: str, chain: Sequence[int]) -> ChainResult:
        for _ in chain:
            async with gate.slot():
                calls.append(key)
                await asyncio.sleep(0)
        return ChainResult()

    workers: KeyedWorkers[int] = KeyedWorkers(run, lambda: None)
    for key in "abc":
        workers.submit(key, (1, 2))
    await asyncio.sleep(0)
    workers.submit("pg", (1, 2), first=True)  # arrives later, a Postgres: served next
    await workers.idle()
    last_pg = max(i for i, k in enumerate(calls) if k == "pg")
    # Ahead of c, queued before it; a and b only get in while pg's next call is not queued.
    assert last_pg < calls.index("c") and calls.count("a") == 2, calls


async def test_daemon_slots_serve_by_order_then_arrival_and_survive_cancels() -> None:
    gate = PrioritySlots(1)
    granted: list[str] = []
    hold = asyncio.Event()

    async def call(name: str, order: int) -> None:
        slots.ORDER.set(order)
        async with gate.slot():
            granted.append(name)
            if name == "first":
                await hold.wait()

    first = asyncio.create_task(call("first", 5))
    await asyncio.sleep(0)
    waiters = {n: asyncio.create_task(call(n, o)) for n, o in
               (("late", 3), ("pass", 0), ("early", 1), ("gone", 0), ("late2", 3))}  # fmt: skip
    await asyncio.sleep(0)
    waiters["gone"].cancel()
    hold.set()
    await asyncio.gather(first, *waiters.values(), return_exceptions=True)
    assert granted == ["first", "pass", "early", "late", "late2"]
    async with gate.slot():  # the cancelled waiter left no slot taken
        assert gate.waiting == 0
