"""An add-on's reported status, derived (pure: no I/O, no clock) from what the agent knows.

Inputs: the desired state, the observation, the keys' action outcomes (failed, permanent),
the probe results and the sleep view; `now` is passed in. `runtime.py` runs the probes,
records the conditions in the `ConditionBook` (which moves `last_transition_time` only on
a flip) and publishes. Tests are tables: tests/test_status.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from msgspec import Struct

from agent import model
from schemas.messages import (
    AddonSpec,
    AddonStatus,
    ClientConnection,
    Condition,
    ConditionStatus,
    DesiredState,
    SleepState,
)

# A starting add-on's readiness poll (agent/runtime.py `_await_readiness`): quick at first
# (a Redis answers within ~100 ms), then every 250 ms, then a tenth of the time it has
# waited, at most a second apart. A Postgres's initdb takes 3-50 s, and ten of them
# polled four times a second through it were an eighth of the agent's CPU in a
# 60-add-on burst (docs/benchmarks.md, `converge6`); the answer is seen at most 10 %
# (and 1 s) later than a poll every 250 ms would.
POLL_FIRST_S = 0.05
POLL_STEADY_S = 0.25
POLL_SHARE = 0.1
POLL_MAX_S = 1.0


def next_poll_delay(previous: float, waited: float) -> float:
    """The wait before the readiness poll's next attempt, after one `previous` seconds
    after the last, `waited` seconds into the poll."""
    return min(max(min(previous * 1.5, POLL_STEADY_S), waited * POLL_SHARE), POLL_MAX_S)


class SleepView(Struct, frozen=True):
    """One add-on's sleep facts, as the sleep manager holds them."""

    state: SleepState = "awake"
    last_activity: float = 0.0  # epoch seconds; 0: never
    clients: tuple[ClientConnection, ...] = ()
    sleeps: int = 0
    wakes: int = 0
    last_wake_ms: tuple[float, ...] = ()


class Probe(Struct, frozen=True):
    ok: bool
    reason: str
    message: str


class Target(Struct, frozen=True):
    """An add-on to probe with a real client: awake, holder and database running."""

    project_id: str
    addon: AddonSpec
    ip: str
    db_id: str  # a new database container is probed afresh


class Update(Struct, frozen=True):
    owner: str
    type: str
    status: ConditionStatus
    reason: str
    message: str


class Derived(Struct, frozen=True):
    updates: tuple[Update, ...]
    removed: tuple[str, ...]  # tombstoned add-ons whose containers and volume are gone
    ready: Mapping[str, bool]  # add-on id -> Ready=True


def probe_targets(
    desired: DesiredState | None, observed: model.Observed, sleep: Mapping[str, SleepView]
) -> tuple[Target, ...]:
    targets: list[Target] = []
    for project in desired.projects if desired is not None else ():
        for addon in project.addons:
            if addon.deleted or sleep.get(addon.id, SleepView()).state != "awake":
                continue
            holder = observed.container(model.holder_name(addon.id))
            db = observed.container(model.db_name(addon.id))
            if holder is not None and holder.ip and db is not None and db.state == "running":
                targets.append(Target(project.id, addon, holder.ip, db.id))
    return tuple(targets)


def derive(
    desired: DesiredState | None,
    observed: model.Observed,
    failed: Mapping[str, str],
    permanent: Mapping[str, str],
    probes: Mapping[str, Probe],
    sleep: Mapping[str, SleepView],
) -> Derived:
    updates: list[Update] = []
    removed: list[str] = []
    ready: dict[str, bool] = {}
    for project in desired.projects if desired is not None else ():
        for addon in project.addons:
            holder = observed.container(model.holder_name(addon.id))
            db = observed.container(model.db_name(addon.id))
            if addon.deleted:
                gone = holder is None and db is None
                if (
                    gone
                    and observed.volume(model.volume_name(addon.id)) is None
                    and observed.volume(model.wal_volume_name(addon.id)) is None
                ):
                    if addon.id not in failed:
                        removed.append(addon.id)
                continue
            view = sleep.get(addon.id, SleepView())
            updates.append(_provisioned(addon.id, holder, db, failed, permanent))
            ready_update = _ready(addon.id, db, probes.get(addon.id), view.state)
            updates.append(ready_update)
            ready[addon.id] = ready_update.status == "True"
            updates.append(_sleeping(addon, view.state))
    return Derived(tuple(updates), tuple(removed), ready)


def _provisioned(
    aid: str,
    holder: model.ObservedContainer | None,
    db: model.ObservedContainer | None,
    failed: Mapping[str, str],
    permanent: Mapping[str, str],
) -> Update:
    if aid in permanent:
        return Update(aid, "Provisioned", "False", "ProvisionFailed", permanent[aid])
    if aid in failed:
        return Update(aid, "Provisioned", "False", "Retrying", failed[aid])
    if holder is not None and db is not None and holder.state == "running":
        message = f"holder {holder.name} and database {db.name} exist"
        return Update(aid, "Provisioned", "True", "ContainersCreated", message)
    return Update(aid, "Provisioned", "False", "Creating", "containers are being created")


def _ready(
    aid: str, db: model.ObservedContainer | None, probe: Probe | None, stage: SleepState
) -> Update:
    if stage != "awake":
        message = f"in {stage} sleep; wakes when a client connects"
        return Update(aid, "Ready", "False", "Sleeping", message)
    if probe is not None:
        return Update(aid, "Ready", "True" if probe.ok else "False", probe.reason, probe.message)
    state = db.state if db is not None else "missing"
    return Update(aid, "Ready", "False", "NotRunning", f"database container is {state}")


def _sleeping(addon: AddonSpec, stage: SleepState) -> Update:
    if not addon.sleep.enabled:
        return Update(addon.id, "Sleeping", "False", "Disabled", "the plan keeps it awake")
    if stage != "awake":
        # Both stages count from the last activity (agent/plan.py's sleep timers).
        after = addon.sleep.deep_after_s if stage == "deep" else addon.sleep.light_after_s
        message = f"{stage} sleep after {after:g}s idle"
        return Update(addon.id, "Sleeping", "True", stage.capitalize(), message)
    return Update(addon.id, "Sleeping", "False", "Awake", "serving clients directly")


def addon_status(
    project_id: str,
    addon: AddonSpec,
    generation: int,
    conditions: tuple[Condition, ...],
    view: SleepView,
    usage_bytes: int | None = None,
    quota_bytes: int | None = None,
) -> AddonStatus:
    return AddonStatus(
        id=addon.id,
        project_id=project_id,
        observed_generation=generation,
        conditions=conditions,
        sleep_state=view.state,
        last_activity=(
            datetime.fromtimestamp(view.last_activity, UTC) if view.last_activity else None
        ),
        clients=view.clients,
        sleeps=view.sleeps,
        wakes=view.wakes,
        last_wake_ms=view.last_wake_ms,
        usage_bytes=usage_bytes,
        quota_bytes=quota_bytes,
    )
