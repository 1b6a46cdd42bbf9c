"""What an app's container is doing, for the status report (pure).

The planner runs an app and otherwise leaves it to Docker's on-failure restart policy
(docs/architecture.md), so its state is Docker's: running or restarting, how often
Docker restarted it, its last exit code and whether the OOM killer ended it. These come
from `docker inspect` of the app's container; `app_status` turns that payload into the
wire's `AppStatus`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, get_args

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


def app_status(project_id: str, app: AppSpec, inspected: Mapping[str, Any] | None) -> AppStatus:
    """The status of `app` from its container's inspect payload (None: no container)."""
    if inspected is None:
        return AppStatus(app.id, project_id, app.name, release=None, state="missing")
    state = inspected.get("State") or {}
    labels = (inspected.get("Config") or {}).get("Labels") or {}
    raw_release = labels.get(RELEASE_LABEL, "")
    release = int(raw_release) if raw_release.isdigit() else None
    status = state.get("Status")
    finished = _time(state.get("FinishedAt"))
    # Docker reports ExitCode 0 for a container that never exited: only a finish counts.
    exit_code = _int(state.get("ExitCode"), -(2**31), 2**31 - 1) if finished else None
    return AppStatus(
        id=app.id,
        project_id=project_id,
        name=app.name,
        release=_int(release, 1, 2**31 - 1),
        state=status if status in _STATES else "dead",
        restart_count=_int(inspected.get("RestartCount"), 0, 2**53 - 1) or 0,
        exit_code=exit_code,
        oom_killed=state.get("OOMKilled") is True,
        started_at=_time(state.get("StartedAt")),
        finished_at=finished,
        error=str(state["Error"])[:1024] if state.get("Error") else None,
    )
