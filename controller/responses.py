"""What the HTTP API returns: response structs built from store rows (pure).

`phase` is derived for display from the agent's conditions, never stored: the source of
truth is the conditions list and observed_generation, shown alongside.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Literal

from msgspec import Struct

from controller.env import variable_name
from controller.plans import Plan
from controller.principals import TokenRow
from controller.releases import AppDef, ReleaseRow, app_id, pending
from controller.store_rows import AddonRow, HostRow, JobRow, JobState, ProjectRow
from schemas.messages import (
    PORTS,
    AddonKind,
    AddonStatus,
    AppState,
    AppStatus,
    Capacity,
    ClientConnection,
    Condition,
    Resources,
    SleepState,
)

Phase = Literal["deleting", "sleeping", "ready", "failed", "provisioning"]
FAILURE_SUFFIXES = ("Failed", "Error")


def phase(deleted: bool, status: AddonStatus | None) -> Phase:
    """deleting > sleeping > ready > failed > provisioning.

    Sleeping is checked before Ready so it shows whether or not the agent keeps Ready
    True while an add-on sleeps. Failed: Ready is not True and some condition is False
    with a reason ending in Failed or Error (e.g. PullFailed, StartError).
    """
    if deleted:
        return "deleting"
    if status is None:
        return "provisioning"
    if status.sleep_state != "awake":
        return "sleeping"
    ready = next((c for c in status.conditions if c.type == "Ready"), None)
    if ready is not None and ready.status == "True":
        return "ready"
    if any(c.status == "False" and c.reason.endswith(FAILURE_SUFFIXES) for c in status.conditions):
        return "failed"
    return "provisioning"


class ErrorView(Struct, frozen=True):
    error: str
    message: str


class ProjectView(Struct, frozen=True):
    id: str
    name: str
    plan: str
    host: str
    created_at: datetime
    deleted_at: datetime | None  # being deleted: its add-ons go first, then its rows


class AddonView(Struct, frozen=True):
    id: str
    project_id: str
    name: str
    kind: AddonKind
    resources: Resources
    created_at: datetime
    deleted_at: datetime | None
    hostname: str
    port: int
    env_var: str
    env_name: str | None
    primary: bool
    variables: tuple[str, ...]
    phase: Phase
    conditions: tuple[Condition, ...]
    observed_generation: int | None
    sleep_state: SleepState | None
    last_activity: datetime | None
    clients: tuple[ClientConnection, ...]
    sleeps: int
    wakes: int
    last_wake_ms: tuple[float, ...]
    deletion_protection: bool
    secret_version: int
    rotated_at: datetime | None
    usage_bytes: int | None
    quota_bytes: int | None


class JobView(Struct, frozen=True):
    id: str
    project_id: str
    image: str
    command: tuple[str, ...]
    timeout_s: float
    state: JobState
    exit_code: int | None
    output: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class HostCeiling(Struct, frozen=True):
    """The operator's ceiling on a host's capacity; None: no ceiling on that dimension."""

    cpus: float | None
    memory_mb: int | None


class HostView(Struct, frozen=True):
    name: str
    online: bool
    # What placement counts: the least of the reported capacity and the ceiling.
    capacity: Capacity
    applied_generation: int
    last_seen: datetime | None
    projects: int
    # What the host itself reports (its word, not trusted beyond the ceiling).
    reported_capacity: Capacity
    ceiling: HostCeiling | None


class ProjectList(Struct, frozen=True):
    projects: tuple[ProjectView, ...]
    next_offset: int | None = None  # the `offset` of the next page; None on the last


class AddonList(Struct, frozen=True):
    addons: tuple[AddonView, ...]
    next_offset: int | None = None  # the `offset` of the next page; None on the last


class JobList(Struct, frozen=True):
    jobs: tuple[JobView, ...]
    next_offset: int | None = None  # the `offset` of the next page; None on the last


class TokenView(Struct, frozen=True):
    id: str
    name: str
    created_at: datetime


class NewTokenView(Struct, frozen=True):
    id: str
    name: str
    created_at: datetime
    token: str  # shown this once; the controller keeps only its digest


class TokenList(Struct, frozen=True):
    tokens: tuple[TokenView, ...]
    next_offset: int | None = None  # the `offset` of the next page; None on the last


class HostList(Struct, frozen=True):
    hosts: tuple[HostView, ...]
    next_offset: int | None = None  # the `offset` of the next page; None on the last


class EnvView(Struct, frozen=True):
    env: dict[str, str]


def project_view(p: ProjectRow) -> ProjectView:
    return ProjectView(
        id=p.id,
        name=p.name,
        plan=p.plan,
        host=p.host,
        created_at=p.created_at,
        deleted_at=p.deleted_at,
    )


def addon_view(
    a: AddonRow,
    plans: Mapping[str, Plan],
    names: Mapping[str, tuple[str, ...]] | None = None,
    primary: frozenset[str] | set[str] = frozenset(),
) -> AddonView:
    """`names` and `primary` come from env.names_of / env.primaries over the project's
    live add-ons (a deleted add-on gives none)."""
    s = a.status
    return AddonView(
        id=a.id,
        project_id=a.project_id,
        name=a.name,
        kind=a.kind,
        resources=plans[a.plan].resources,
        created_at=a.created_at,
        deleted_at=a.deleted_at,
        hostname=a.name,
        port=PORTS[a.kind],
        env_var=variable_name(a.name),
        env_name=a.env_name,
        primary=a.id in primary,
        variables=(names or {}).get(a.id, ()),
        phase=phase(a.deleted_at is not None, s),
        conditions=s.conditions if s else (),
        observed_generation=a.observed_generation,
        sleep_state=s.sleep_state if s else None,
        last_activity=s.last_activity if s else None,
        clients=s.clients if s else (),
        sleeps=s.sleeps if s else 0,
        wakes=s.wakes if s else 0,
        last_wake_ms=s.last_wake_ms if s else (),
        deletion_protection=a.deletion_protection,
        secret_version=a.secret_version,
        rotated_at=a.rotated_at,
        usage_bytes=s.usage_bytes if s else None,
        quota_bytes=s.quota_bytes if s else None,
    )


def job_view(j: JobRow) -> JobView:
    return JobView(
        id=j.id,
        project_id=j.project_id,
        image=j.image,
        command=j.command,
        timeout_s=j.timeout_s,
        state=j.state,
        exit_code=j.exit_code,
        output=j.output,
        error=j.error,
        created_at=j.created_at,
        started_at=j.started_at,
        finished_at=j.finished_at,
    )


def host_view(h: HostRow) -> HostView:
    reported = Capacity(cpus=h.capacity_cpus, memory_mb=h.capacity_memory_mb)
    ceiling = None
    if h.ceiling_cpus is not None or h.ceiling_memory_mb is not None:
        ceiling = HostCeiling(cpus=h.ceiling_cpus, memory_mb=h.ceiling_memory_mb)
    return HostView(
        name=h.name,
        online=h.online,
        capacity=capped(reported, ceiling),
        applied_generation=h.applied_generation,
        last_seen=h.last_seen,
        projects=h.projects,
        reported_capacity=reported,
        ceiling=ceiling,
    )


def capped(reported: Capacity, ceiling: HostCeiling | None) -> Capacity:
    """The capacity placement counts: each dimension at most its ceiling."""
    if ceiling is None:
        return reported
    return Capacity(
        cpus=reported.cpus if ceiling.cpus is None else min(reported.cpus, ceiling.cpus),
        memory_mb=reported.memory_mb
        if ceiling.memory_mb is None
        else min(reported.memory_mb, ceiling.memory_mb),
    )


def token_view(t: TokenRow) -> TokenView:
    return TokenView(id=t.id, name=t.name, created_at=t.created_at)


def new_token_view(t: TokenRow, token: str) -> NewTokenView:
    return NewTokenView(id=t.id, name=t.name, created_at=t.created_at, token=token)


class ReleaseView(Struct, frozen=True):
    number: int
    description: str
    created_at: datetime
    apps: tuple[AppDef, ...]
    variables: tuple[str, ...]  # names only: the values are the variables' own


class ReleaseList(Struct, frozen=True):
    releases: tuple[ReleaseView, ...]
    next_offset: int | None = None


class AppView(Struct, frozen=True):
    id: str
    name: str
    image: str
    command: tuple[str, ...]
    release: int
    pending_variables: tuple[str, ...]
    message: str | None
    # Its container as the host last reported it (state None: no report yet).
    state: AppState | None = None
    running_release: int | None = None  # the release the container runs
    restart_count: int = 0
    last_exit_code: int | None = None
    oom_killed: bool = False  # its last exit was the kernel's OOM killer
    started_at: datetime | None = None
    finished_at: datetime | None = None


class AppList(Struct, frozen=True):
    apps: tuple[AppView, ...]


def release_view(r: ReleaseRow) -> ReleaseView:
    return ReleaseView(
        number=r.number,
        description=r.description,
        created_at=r.created_at,
        apps=r.apps,
        variables=tuple(sorted(r.env)),
    )


def app_views(
    r: ReleaseRow,
    current_env: Mapping[str, str],
    statuses: Mapping[str, AppStatus] | None = None,
) -> tuple[AppView, ...]:
    waiting = pending(current_env, r.env)
    message = f"pending variables: redeploy ({', '.join(waiting)})" if waiting else None
    views = []
    for a in r.apps:
        aid = app_id(r.project_id, a.name)
        s = (statuses or {}).get(aid)
        views.append(
            AppView(
                id=aid,
                name=a.name,
                image=a.image,
                command=a.command,
                release=r.number,
                pending_variables=waiting,
                message=message,
                state=s.state if s else None,
                running_release=s.release if s else None,
                restart_count=s.restart_count if s else 0,
                last_exit_code=s.exit_code if s else None,
                oom_killed=s.oom_killed if s else False,
                started_at=s.started_at if s else None,
                finished_at=s.finished_at if s else None,
            )
        )
    return tuple(views)
