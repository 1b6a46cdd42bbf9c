"""Backups and sleep interleaved (pure decisions): never asleep while a backup holds the
add-on, no wake lost, and the backup is not activity, so the add-on sleeps again after.

The decision code is the real one (`Sleeper._goal`, `agent.sleep.target`); the effects of
maybe_sleep / wake / hold (SleepManager.hold) are mirrored step by step, without Docker.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.activator import Persisted, Sleeper
from schemas.messages import AddonSpec, Resources, SleepPolicy

POLICY = SleepPolicy(enabled=True, light_after_s=3, deep_after_s=8)


def sleeper() -> Sleeper:
    s = Sleeper.__new__(Sleeper)
    s.addon = AddonSpec(
        id="a" * 32,
        name="db",
        kind="postgres",
        resources=Resources(cpus=1, memory_mb=256),
        sleep=POLICY,
    )
    s.saved = Persisted(last_activity=0.0)
    s.held = 0
    s.ready = True
    return s


Event = st.one_of(
    st.tuples(st.just("tick"), st.floats(0.1, 5)),
    st.tuples(st.just("client"), st.just(0.0)),
    st.tuples(st.just("backup_start"), st.just(0.0)),
    st.tuples(st.just("backup_end"), st.just(0.0)),
)


@given(st.lists(Event, max_size=60))
def test_never_asleep_during_a_backup_and_backups_are_not_activity(
    events: list[tuple[str, float]],
) -> None:
    s = sleeper()
    now = 0.0
    holds: list[float] = []  # idle clocks saved by each running backup
    client_at = 0.0  # the last real client activity
    for kind, dt in events:
        if kind == "tick":
            now += dt
            if not s.held:  # maybe_sleep skips held add-ons entirely
                goal = s._goal(now, False)
                if goal != s.state:
                    s.saved.state = goal
        elif kind == "client":
            if s.state != "awake":  # a client's connection wakes it (the activator)
                s.saved.state = "awake"
            if not s.held:
                # While held, activity is not measured (a backup's connections would
                # count); a client that comes and goes inside a backup window is not seen.
                s.saved.last_activity = now
                client_at = now
        elif kind == "backup_start":
            s.held += 1
            holds.append(s.saved.last_activity)
            if s.state != "awake":
                s.saved.state = "awake"  # hold() wakes it
        elif kind == "backup_end" and holds:
            s.held -= 1
            s.saved.last_activity = holds.pop()
            if holds:
                holds[-1] = max(holds[-1], s.saved.last_activity)
        if s.held:
            assert s.state == "awake", "asleep in the middle of a backup"
            assert s._goal(now + 1e6, False) == "awake"
        if not s.held:
            # A backup never moves the idle clock: only clients do.
            assert s.saved.last_activity == client_at
    # Once every backup is over, the idle timer alone decides: long idle means deep sleep.
    while holds:
        s.held -= 1
        s.saved.last_activity = holds.pop()
    assert s.held == 0
    later = max(now, client_at) + POLICY.deep_after_s + 1
    assert s._goal(later, False) == "deep"
