"""The backup routes, project-scoped under /v1/projects/{project_id}/addons/{addon_id}/.

Registered on the API's application by `Api.app()`, so they share its middleware: the
same authorization as every other project route, the same JSON errors and metrics.

    POST  .../backups                      take a manual backup now (202)
    GET   .../backups                      list, newest first
    GET   .../backups/{backup_id}          one backup
    POST  .../backups/{backup_id}/verify   test-restore it again (202)
    POST  .../backups/{backup_id}/restore  restore it into the add-on (202)
    GET   .../restores/{restore_id}        a restore's outcome
    GET   .../backup-schedule              automatic backups: on/off and time of day (UTC)
    PUT / PATCH .../backup-schedule        change them
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, time
from typing import TypeVar

import msgspec
from aiohttp import web
from msgspec import Struct

from controller import backup_queries as q
from controller import backup_rules
from controller.db import Pool
from controller.dirty_hosts import DirtyHosts
from controller.errors import InvalidBody, PlanLimitReached
from controller.logs import log
from controller.metrics import Metrics
from controller.plans import Plans

logger = logging.getLogger(__name__)

PREFIX = "/v1/projects/{project_id}/addons/{addon_id}"
B = TypeVar("B", bound=msgspec.Struct)
PathId = Callable[[web.Request, str], str]
PageOf = Callable[[web.Request], tuple[int, int]]  # (limit, offset), checked
ReadBody = Callable[[web.Request, type[B]], Awaitable[B]]


class BackupView(Struct, frozen=True):
    id: str
    addon_id: str
    kind: str  # manual | automatic
    state: str  # pending | succeeded | failed
    created_at: datetime
    finished_at: datetime | None
    scheduled_for: datetime | None
    size_bytes: int | None  # the dump file's
    # The data it holds, as the add-on's storage quota counts it, at dump time (null:
    # made before this was recorded); a restore must fit the plan's quota.
    data_bytes: int | None
    sha256: str | None
    # null: not verified yet; true: a test restore reproduced the counts; false: it did not
    verified: bool | None
    verify_error: str | None
    verify_seconds: float | None
    verifying: bool
    counts: dict[str, int]
    error: str | None
    # When retention may delete it: its creation plus the longer of the window it was
    # taken under and the plan's current one (the newest verified backup stays past it).
    expires_at: datetime


class PlanBackups(Struct, frozen=True):
    """What the project's plan allows of backups, so a client can say what is possible."""

    name: str
    manual_backups_per_day: int
    backup_retention_days: int  # 0: no automatic backups


class BackupList(Struct, frozen=True):
    backups: tuple[BackupView, ...]
    plan: PlanBackups
    next_offset: int | None  # paginated like every list (null: the last page)


class RestoreView(Struct, frozen=True):
    id: str
    addon_id: str
    backup_id: str
    state: str  # pending | succeeded | failed
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class ScheduleView(Struct, frozen=True):
    enabled: bool
    time_of_day: str  # HH:MM:SS, UTC


class ScheduleBody(Struct, frozen=True, forbid_unknown_fields=True):
    enabled: bool | None = None
    time_of_day: str | None = None


def backup_view(b: q.BackupRow, plans: Plans) -> BackupView:
    plan = plans.get(b.plan)
    plan_days = plan.backup_retention_days if plan is not None else 0
    return BackupView(
        id=b.id,
        addon_id=b.addon_id,
        kind=b.kind,
        state=b.state,
        created_at=b.created_at,
        finished_at=b.finished_at,
        scheduled_for=b.scheduled_for,
        size_bytes=b.size_bytes,
        data_bytes=b.data_bytes,
        sha256=b.sha256,
        verified=b.verified,
        verify_error=b.verify_error,
        verify_seconds=b.verify_seconds,
        verifying=b.verify_requested,
        counts=b.counts,
        error=b.error,
        expires_at=backup_rules.expires_at(b.created_at, b.retention_days, plan_days),
    )


def restore_view(r: q.RestoreRow) -> RestoreView:
    return RestoreView(
        id=r.id,
        addon_id=r.addon_id,
        backup_id=r.backup_id,
        state=r.state,
        error=r.error,
        created_at=r.created_at,
        finished_at=r.finished_at,
    )


def schedule_view(s: q.ScheduleRow) -> ScheduleView:
    return ScheduleView(enabled=s.enabled, time_of_day=s.time_of_day.isoformat())


def _json(value: object, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(value), status=status, content_type="application/json"
    )


class BackupsApi:
    def __init__(
        self,
        pool: Pool,
        plans: Plans,
        dirty: DirtyHosts,
        metrics: Metrics,
        path_id: PathId,
        read_body: Callable[[web.Request, type[ScheduleBody]], Awaitable[ScheduleBody]],
        page_of: PageOf,
    ) -> None:
        self._pool = pool
        self._plans = plans
        self._dirty = dirty
        self._metrics = metrics
        self._path_id = path_id
        self._read_body = read_body
        self._page_of = page_of

    def register(self, r: web.UrlDispatcher) -> None:
        r.add_post(f"{PREFIX}/backups", self.create)
        r.add_get(f"{PREFIX}/backups", self.list)
        r.add_get(f"{PREFIX}/backups/{{backup_id}}", self.show)
        r.add_post(f"{PREFIX}/backups/{{backup_id}}/verify", self.verify)
        r.add_post(f"{PREFIX}/backups/{{backup_id}}/restore", self.restore)
        r.add_get(f"{PREFIX}/restores/{{restore_id}}", self.show_restore)
        r.add_get(f"{PREFIX}/backup-schedule", self.show_schedule)
        r.add_put(f"{PREFIX}/backup-schedule", self.set_schedule)
        r.add_patch(f"{PREFIX}/backup-schedule", self.set_schedule)

    def _ids(self, request: web.Request) -> tuple[str, str]:
        return self._path_id(request, "project_id"), self._path_id(request, "addon_id")

    async def create(self, request: web.Request) -> web.Response:
        project_id, addon_id = self._ids(request)
        try:
            backup, host = await q.create_manual(self._pool, project_id, addon_id, self._plans)
        except PlanLimitReached:
            self._metrics.backup_requests.labels("manual", "refused").inc()
            raise
        self._metrics.backup_requests.labels("manual", "accepted").inc()
        self._dirty.mark(host)
        log(logger, "backup_requested", project=project_id, addon=addon_id, backup=backup.id)
        return _json(backup_view(backup, self._plans), 202)

    async def list(self, request: web.Request) -> web.Response:
        project_id, addon_id = self._ids(request)
        limit, offset = self._page_of(request)
        plan_name, rows = await q.list_backups(self._pool, project_id, addon_id)
        plan = self._plans[plan_name]
        end = offset + limit
        return _json(
            BackupList(
                backups=tuple(backup_view(b, self._plans) for b in rows[offset:end]),
                next_offset=end if end < len(rows) else None,
                plan=PlanBackups(
                    name=plan_name,
                    manual_backups_per_day=plan.manual_backups_per_day,
                    backup_retention_days=plan.backup_retention_days,
                ),
            )
        )

    async def show(self, request: web.Request) -> web.Response:
        project_id, addon_id = self._ids(request)
        backup_id = self._path_id(request, "backup_id")
        return _json(
            backup_view(
                await q.get_backup(self._pool, project_id, addon_id, backup_id), self._plans
            )
        )

    async def verify(self, request: web.Request) -> web.Response:
        project_id, addon_id = self._ids(request)
        backup_id = self._path_id(request, "backup_id")
        backup, host = await q.request_verify(self._pool, project_id, addon_id, backup_id)
        self._dirty.mark(host)
        log(logger, "backup_verify_requested", addon=addon_id, backup=backup_id)
        return _json(backup_view(backup, self._plans), 202)

    async def restore(self, request: web.Request) -> web.Response:
        project_id, addon_id = self._ids(request)
        backup_id = self._path_id(request, "backup_id")
        restore, host = await q.create_restore(
            self._pool, project_id, addon_id, backup_id, self._plans
        )
        self._metrics.backup_requests.labels("restore", "accepted").inc()
        self._dirty.mark(host)
        log(logger, "restore_requested", addon=addon_id, backup=backup_id, restore=restore.id)
        return _json(restore_view(restore), 202)

    async def show_restore(self, request: web.Request) -> web.Response:
        project_id, addon_id = self._ids(request)
        restore_id = self._path_id(request, "restore_id")
        return _json(
            restore_view(await q.get_restore(self._pool, project_id, addon_id, restore_id))
        )

    async def show_schedule(self, request: web.Request) -> web.Response:
        project_id, addon_id = self._ids(request)
        return _json(schedule_view(await q.get_schedule(self._pool, project_id, addon_id)))

    async def set_schedule(self, request: web.Request) -> web.Response:
        project_id, addon_id = self._ids(request)
        body = await self._read_body(request, ScheduleBody)
        if request.method == "PUT" and (body.enabled is None or body.time_of_day is None):
            raise InvalidBody("PUT needs both enabled and time_of_day; PATCH changes one")
        at: time | None = None
        if body.time_of_day is not None:
            try:
                at = backup_rules.parse_time_of_day(body.time_of_day)
            except ValueError as exc:
                raise InvalidBody(str(exc)) from None
        schedule = await q.set_schedule(
            self._pool, project_id, addon_id, self._plans, body.enabled, at
        )
        log(
            logger,
            "backup_schedule_set",
            addon=addon_id,
            enabled=schedule.enabled,
            time_of_day=schedule.time_of_day.isoformat(),
        )
        return _json(schedule_view(schedule))
