"""A network Docker refuses to remove (agent/netremoval.py and the planner's use of it).

Pure: no Docker. The refusal against the real daemon is in tests/test_network_refused.py.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent import model, netremoval, specs
from agent import plan as p
from agent.model import Observed, ObservedNetwork
from schemas.messages import AddonSpec, DesiredState, ProjectSpec, Resources

PID = "a" * 32
AID = "b" * 32
NET = ObservedNetwork("n1", model.network_name(PID), PID)
SETTINGS = p.Settings(images=specs.Images(), secrets_root="/secrets")


def state(*addons: AddonSpec) -> DesiredState:
    return DesiredState(
        version=1, host="h1", generation=1, projects=(ProjectSpec(id=PID, name="p", addons=addons),)
    )


def redis(deleted: bool = False) -> AddonSpec:
    return AddonSpec(
        id=AID, name="cache", kind="redis", resources=Resources(cpus=0.25, memory_mb=128),
        deleted=deleted,
    )  # fmt: skip


def test_the_retry_doubles_up_to_its_cap() -> None:
    waits = [netremoval.retry_in(n) for n in range(1, 12)]
    assert waits[:4] == [2.0, 4.0, 8.0, 16.0]
    assert waits[-1] == netremoval.RETRY_CAP_S
    assert waits == sorted(waits)


@given(st.integers(1, 10_000), st.floats(0, 1e9))
def test_a_refused_removal_is_due_again_only_after_its_wait(attempts: int, at: float) -> None:
    refusal = netremoval.Refusal(attempts, at)
    wait = netremoval.retry_in(attempts)
    assert 0 < wait <= netremoval.RETRY_CAP_S
    assert not netremoval.due(refusal, at + wait * 0.99)
    assert netremoval.due(refusal, at + wait)
    assert netremoval.due(None, at)


def test_the_planner_asks_again_on_the_schedule_not_every_pass() -> None:
    gone = state(redis(deleted=True))
    world = Observed(networks=(NET,))
    refusal = netremoval.Refusal(attempts=4, last_at=1000.0)
    early = p.Local(now=1000.0 + netremoval.retry_in(4) - 1, refused_networks={NET.name: refusal})
    late = p.Local(now=1000.0 + netremoval.retry_in(4), refused_networks={NET.name: refusal})
    assert p.plan(gone, world, early, SETTINGS) == ()
    assert p.plan(gone, world, late, SETTINGS) == (p.RemoveNetwork(PID, NET.name),)
    # Never refused: at once, as before.
    assert p.plan(gone, world, p.Local(now=1000.0), SETTINGS) == (p.RemoveNetwork(PID, NET.name),)


def test_a_new_addon_of_the_project_uses_the_network_and_clears_the_record() -> None:
    refusal = netremoval.Refusal(attempts=9, last_at=1000.0)
    refusals = {NET.name: refusal}
    world = Observed(networks=(NET,))
    again = state(redis())
    local = p.Local(now=1001.0, refused_networks=refusals)
    actions = p.plan(again, world, local, SETTINGS)
    # The add-on is made on the network that is there: no network created, none removed.
    assert not any(isinstance(a, p.EnsureNetwork | p.RemoveNetwork) for a in actions)
    assert any(isinstance(a, p.RunContainer) for a in actions)
    assert p.unwanted_networks(again, world) == set()
    assert netremoval.keep(refusals, p.unwanted_networks(again, world)) == {}
    # Still unwanted: kept; gone from Docker: dropped.
    gone = state(redis(deleted=True))
    assert netremoval.keep(refusals, p.unwanted_networks(gone, world)) == refusals
    assert netremoval.keep(refusals, p.unwanted_networks(gone, Observed())) == {}


def test_the_condition_names_the_network_the_cause_and_what_to_do() -> None:
    assert netremoval.condition({})[0] == "True"
    one = {"n1": netremoval.Refusal(netremoval.STUCK_AFTER - 1, 0.0)}
    assert netremoval.condition(one)[0] == "True"  # not stuck yet
    leaked = {"n1": netremoval.Refusal(netremoval.STUCK_AFTER, 0.0)}
    status, reason, message = netremoval.condition(leaked)
    assert (status, reason) == ("False", "RemovalRefused")
    assert "n1" in message and "moby#42119" in message and "restart dockerd" in message.lower()
    held = {"n2": netremoval.Refusal(netremoval.STUCK_AFTER, 0.0, ("debug-box",))}
    status, _, message = netremoval.condition(held)
    assert status == "False" and "n2 (debug-box)" in message and "disconnect" in message
    assert "moby" not in message
    assert netremoval.stuck({**one, **held}) == held


def test_a_refusal_counts_up_and_records_what_is_attached() -> None:
    first = netremoval.refused(None, ("b", "a"), 10.0)
    assert first == netremoval.Refusal(1, 10.0, ("a", "b"))
    assert netremoval.refused(first, (), 20.0) == netremoval.Refusal(2, 20.0, ())


def test_the_condition_names_at_most_five_containers() -> None:
    many = tuple(f"box{i}" for i in range(120))
    message = netremoval.condition({"n3": netremoval.Refusal(netremoval.STUCK_AFTER, 0.0, many)})[2]
    assert "box4" in message and "box5," not in message and "and 115 more" in message
