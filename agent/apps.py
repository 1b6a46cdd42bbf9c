"""What an app's container is doing, for the status report (pure).

The planner runs an app and otherwise leaves it to Docker's on-failure restart policy
(docs/architecture.md), so its state is Docker's: running or restarting, how often
Docker restarted it, its last exit code and whether the OOM killer ended it. These come
from `docker inspect` of the app's container, except the last exit once Docker has
restarted it (it then shows exit code 0): that one the agent takes from Docker's `die`
and `oom` events. `app_status` turns both into the wire's `AppStatus`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, get_args

from msgspec import Struct

from schemas.messages import AppSpec, AppState, AppStatus

_STATES: frozenset[str] = frozenset(get_args(AppState))
RELEASE_LABEL = "orkestr.release"


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value or value.startswith("0001-"):
        return None
    # Docker gives nanoseconds; Python parses microseconds.
    head, _, frac = value.rstrip("Z").partition(".")
    try:
        return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}").replace(tzinfo=UTC)
    except ValueError:
        return None


def _int(value: Any, low: int, high: int) -> int | None:
    return value if isinstance(value, int) and low <= value <= high else None


class LastExit(Struct, frozen=True):
    """How an app's container last ended: Docker's `die` event (with an `oom` event just
    before it for the OOM killer), or an inspect while it is down."""

    exit_code: int
    oom_killed: bool = False


# While up, Docker shows ExitCode 0 and OOMKilled false, whatever the last exit was.
_UP = frozenset({"running", "paused", "created"})


def last_exit(inspected: Mapping[str, Any]) -> LastExit | None:
    """The last exit an inspect payload shows: only while the container is down."""
    state = inspected.get("State") or {}
    code = _int(state.get("ExitCode"), -(2**31), 2**31 - 1)
    if state.get("Status") in _UP or code is None or _time(state.get("FinishedAt")) is None:
        return None
    return LastExit(code, state.get("OOMKilled") is True)


def app_status(
    project_id: str,
    app: AppSpec,
    inspected: Mapping[str, Any] | None,
    exited: LastExit | None = None,
) -> AppStatus:
    """The status of `app` from its container's inspect payload (None: no container) and
    its last exit as the agent saw it (`exited`), which a restarted container hides."""
    if inspected is None:
        return AppStatus(app.id, project_id, app.name, release=None, state="missing")
    exited = last_exit(inspected) or exited
    state = inspected.get("State") or {}
    labels = (inspected.get("Config") or {}).get("Labels") or {}
    raw_release = labels.get(RELEASE_LABEL, "")
    release = int(raw_release) if raw_release.isdigit() else None
    status = state.get("Status")
    return AppStatus(
        id=app.id,
        project_id=project_id,
        name=app.name,
        release=_int(release, 1, 2**31 - 1),
        state=status if status in _STATES else "dead",
        restart_count=_int(inspected.get("RestartCount"), 0, 2**53 - 1) or 0,
        exit_code=exited.exit_code if exited else None,
        oom_killed=exited.oom_killed if exited else False,
        started_at=_time(state.get("StartedAt")),
        finished_at=_time(state.get("FinishedAt")),
        error=str(state["Error"])[:1024] if state.get("Error") else None,
    )
