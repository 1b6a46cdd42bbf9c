"""Status derivation (agent/status.py) as tables, and the condition book it feeds."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import model
from agent import status as s
from agent.conditions import ConditionBook
from agent.model import Observed, ObservedContainer, ObservedVolume
from schemas.messages import (
    AddonSpec,
    ClientConnection,
    DesiredState,
    ProjectSpec,
    Resources,
    SleepPolicy,
)

PID = "p" * 32
AID = "a" * 32
RES = Resources(cpus=0.5, memory_mb=256)
SLEEPY = SleepPolicy(enabled=True, light_after_s=30, deep_after_s=300)
NEVER = SleepPolicy()


def addon(deleted: bool = False, sleep: SleepPolicy = NEVER) -> AddonSpec:
    return AddonSpec(
        id=AID, name="db", kind="postgres", resources=RES, sleep=sleep, deleted=deleted
    )


def desired(a: AddonSpec) -> DesiredState:
    return DesiredState(
        version=1, host="h", generation=7, projects=(ProjectSpec(id=PID, name="p", addons=(a,)),)
    )


def container(
    role: model.Role, state: model.ContainerState = "running", ip: str | None = None
) -> ObservedContainer:
    name = model.holder_name(AID) if role == "holder" else model.db_name(AID)
    return ObservedContainer(
        id=f"id-{role}",
        name=name,
        role=role,
        project_id=PID,
        state=state,
        addon_id=AID,
        ip=ip,
    )


HOLDER = container("holder", ip="10.200.0.2")
DB = container("db")
VOLUME = ObservedVolume(model.volume_name(AID), AID)
RUNNING = Observed(containers=(HOLDER, DB), volumes=(VOLUME,))
OK = s.Probe(True, "ClientConnected", "asyncpg connected")
REFUSED = s.Probe(False, "Unreachable", "connection refused")


def conditions(derived: s.Derived) -> dict[str, tuple[str, str, str]]:
    return {u.type: (u.status, u.reason, u.message) for u in derived.updates if u.owner == AID}


@pytest.mark.parametrize(
    ("observed", "failed", "permanent", "expected"),
    [
        (Observed(), {}, {}, ("False", "Creating", "containers are being created")),
        (
            RUNNING,
            {},
            {},
            ("True", "ContainersCreated", f"holder {HOLDER.name} and database {DB.name} exist"),
        ),
        (
            Observed(containers=(container("holder", "exited"), DB)),
            {},
            {},
            ("False", "Creating", "containers are being created"),
        ),
        (Observed(), {AID: "daemon 500"}, {}, ("False", "Retrying", "daemon 500")),
        (RUNNING, {AID: "bad spec"}, {AID: "bad spec"}, ("False", "ProvisionFailed", "bad spec")),
    ],
)
def test_provisioned(
    observed: Observed,
    failed: dict[str, str],
    permanent: dict[str, str],
    expected: tuple[str, str, str],
) -> None:
    derived = s.derive(desired(addon()), observed, failed, permanent, {}, {})
    assert conditions(derived)["Provisioned"] == expected


@pytest.mark.parametrize(
    ("observed", "probes", "sleep", "expected"),
    [
        (RUNNING, {AID: OK}, {}, ("True", "ClientConnected", "asyncpg connected")),
        (RUNNING, {AID: REFUSED}, {}, ("False", "Unreachable", "connection refused")),
        (
            Observed(containers=(HOLDER,)),
            {},
            {},
            ("False", "NotRunning", "database container is missing"),
        ),
        (
            Observed(containers=(HOLDER, container("db", "exited"))),
            {},
            {},
            ("False", "NotRunning", "database container is exited"),
        ),
        # Asleep: never probed, whatever a stale probe said.
        (
            RUNNING,
            {AID: OK},
            {AID: s.SleepView(state="light")},
            ("False", "Sleeping", "in light sleep; wakes when a client connects"),
        ),
    ],
)
def test_ready(
    observed: Observed,
    probes: dict[str, s.Probe],
    sleep: dict[str, s.SleepView],
    expected: tuple[str, str, str],
) -> None:
    derived = s.derive(desired(addon(sleep=SLEEPY)), observed, {}, {}, probes, sleep)
    assert conditions(derived)["Ready"] == expected
    assert derived.ready == {AID: expected[0] == "True"}


@pytest.mark.parametrize(
    ("policy", "stage", "expected"),
    [
        (SleepPolicy(), "awake", ("False", "Disabled", "the plan keeps it awake")),
        (SleepPolicy(), "deep", ("False", "Disabled", "the plan keeps it awake")),
        (SLEEPY, "awake", ("False", "Awake", "serving clients directly")),
        (SLEEPY, "light", ("True", "Light", "light sleep after 30s idle")),
        (SLEEPY, "deep", ("True", "Deep", "deep sleep after 300s idle")),
    ],
)
def test_sleeping(policy: SleepPolicy, stage: str, expected: tuple[str, str, str]) -> None:
    view = {AID: s.SleepView(state=stage)}  # type: ignore[arg-type]
    derived = s.derive(desired(addon(sleep=policy)), RUNNING, {}, {}, {}, view)
    assert conditions(derived)["Sleeping"] == expected


@pytest.mark.parametrize(
    ("observed", "failed", "removed"),
    [
        (Observed(), {}, (AID,)),
        (Observed(volumes=(VOLUME,)), {}, ()),  # the volume still goes
        (Observed(volumes=(ObservedVolume(model.wal_volume_name(AID), AID),)), {}, ()),  # WAL's
        (Observed(containers=(HOLDER,)), {}, ()),
        (Observed(), {AID: "remove failed"}, ()),  # not reported gone while failing
    ],
)
def test_tombstone_is_removed_once_everything_is_gone(
    observed: Observed, failed: dict[str, str], removed: tuple[str, ...]
) -> None:
    derived = s.derive(desired(addon(deleted=True)), observed, failed, {}, {}, {})
    assert derived.removed == removed
    assert derived.updates == ()  # a tombstone has no conditions


def test_probe_targets_only_awake_addons_with_running_holder_and_database() -> None:
    d = desired(addon(sleep=SLEEPY))
    assert s.probe_targets(d, RUNNING, {}) == (
        s.Target(PID, d.projects[0].addons[0], "10.200.0.2", DB.id),
    )
    assert s.probe_targets(d, RUNNING, {AID: s.SleepView(state="deep")}) == ()
    assert s.probe_targets(d, Observed(containers=(HOLDER, container("db", "paused"))), {}) == ()
    no_ip = Observed(containers=(container("holder"), DB))
    assert s.probe_targets(d, no_ip, {}) == ()
    assert s.probe_targets(desired(addon(deleted=True)), RUNNING, {}) == ()
    assert s.probe_targets(None, RUNNING, {}) == ()


def test_addon_status_carries_the_sleep_view() -> None:
    client = ClientConnection(source="10.200.0.9:40000", via="activator")
    view = s.SleepView("light", 1_700_000_000.0, (client,), sleeps=3, wakes=2, last_wake_ms=(1.5,))
    st = s.addon_status(PID, addon(), 7, (), view)
    assert (st.id, st.project_id, st.observed_generation) == (AID, PID, 7)
    assert st.sleep_state == "light" and st.clients == (client,)
    assert st.last_activity == datetime.fromtimestamp(1_700_000_000.0, UTC)
    assert (st.sleeps, st.wakes, st.last_wake_ms) == (3, 2, (1.5,))
    assert s.addon_status(PID, addon(), 7, (), s.SleepView()).last_activity is None


def test_condition_book_moves_transition_time_only_on_a_flip() -> None:
    book = ConditionBook()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    first = book.set(AID, "Ready", "False", "NotRunning", "db missing", t0)
    assert first.last_transition_time == t0
    same = book.set(AID, "Ready", "False", "Unreachable", "refused", t0 + timedelta(seconds=5))
    assert same.last_transition_time == t0 and same.reason == "Unreachable"
    flip = book.set(AID, "Ready", "True", "ClientConnected", "ok", t0 + timedelta(seconds=9))
    assert flip.last_transition_time == t0 + timedelta(seconds=9)
    book.set(AID, "Provisioned", "True", "ContainersCreated", "", t0)
    book.set("other", "Ready", "True", "ClientConnected", "", t0)
    assert [c.type for c in book.of(AID)] == ["Provisioned", "Ready"]
    book.forget(AID)
    assert book.of(AID) == () and book.get("other", "Ready") is not None


def poll_attempts(until: float) -> list[float]:
    """When a readiness poll's attempts go out (from its start; attempts take no time)."""
    t, delay, out = s.POLL_FIRST_S, s.POLL_FIRST_S, []
    while t <= until:
        out.append(t)
        delay = s.next_poll_delay(delay, t)
        t += delay
    return out


@given(st.floats(min_value=0.0, max_value=115.0))
def test_a_readiness_poll_sees_an_answer_at_most_a_tenth_later(answer_at: float) -> None:
    """Against an attempt every 250 ms: later by at most a tenth of the wait, and 1 s."""
    first = next(t for t in poll_attempts(answer_at + 2) if t >= answer_at)
    assert first - answer_at <= max(s.POLL_STEADY_S, min(s.POLL_MAX_S, s.POLL_SHARE * answer_at))


def test_a_readiness_poll_tries_less_the_longer_it_waits() -> None:
    attempts = poll_attempts(40.0)  # a Postgres initdb on a busy host
    assert attempts[:4] == pytest.approx([0.05, 0.125, 0.2375, 0.4063], abs=1e-3)
    assert len(attempts) <= 60  # an attempt every 250 ms: 160
    assert max(b - a for a, b in itertools.pairwise(attempts)) == s.POLL_MAX_S
