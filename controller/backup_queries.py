"""SQL behind backups: requests, the agent's results, schedules and retention.

Rules that must hold under concurrency are enforced here with the add-on row locked
`FOR UPDATE`: the per-day limit, and one backup or restore of an add-on at a time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, time
from typing import Any, Literal

from msgspec import Struct

from controller import backup_rules
from controller.db import Connection, Pool, transaction
from controller.errors import Conflict, NotFound, PlanLimitReached
from controller.plans import Plan
from controller.store_rows import hex_of, new_id, scrub, uuid_of
from schemas.messages import BackupResult

BackupKind = Literal["manual", "automatic"]


class BackupRow(Struct, frozen=True):
    id: str
    addon_id: str
    project_id: str
    kind: BackupKind
    state: str
    scheduled_for: datetime | None
    created_at: datetime
    finished_at: datetime | None
    size_bytes: int | None
    data_bytes: int | None
    sha256: str | None
    verified: bool | None
    verify_error: str | None
    verify_seconds: float | None
    counts: dict[str, int]
    error: str | None
    verify_requested: bool
    # The plan's window when it was taken (None: before that was recorded), and the
    # project's plan now: together, how long retention keeps it.
    retention_days: int | None
    plan: str


class RestoreRow(Struct, frozen=True):
    id: str
    addon_id: str
    backup_id: str
    state: str
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class ScheduleRow(Struct, frozen=True):
    enabled: bool
    time_of_day: time
    since: datetime | None


_COLUMNS = """b.id, b.addon_id, b.project_id, b.kind, b.state, b.scheduled_for, b.created_at,
    b.finished_at, b.size_bytes, b.data_bytes, b.sha256, b.verified, b.verify_error,
    b.verify_seconds, b.counts::text AS counts, b.error, b.verify_requested, b.retention_days,
    (SELECT p.plan FROM projects p WHERE p.id = b.project_id) AS plan"""
_RESTORE_COLUMNS = "r.id, r.addon_id, r.backup_id, r.state, r.error, r.created_at, r.finished_at"


def _backup(r: Mapping[str, Any]) -> BackupRow:
    return BackupRow(
        id=hex_of(r["id"]),
        addon_id=hex_of(r["addon_id"]),
        project_id=hex_of(r["project_id"]),
        kind=r["kind"],
        state=r["state"],
        scheduled_for=r["scheduled_for"],
        created_at=r["created_at"],
        finished_at=r["finished_at"],
        size_bytes=r["size_bytes"],
        data_bytes=r["data_bytes"],
        sha256=r["sha256"],
        verified=r["verified"],
        verify_error=r["verify_error"],
        verify_seconds=r["verify_seconds"],
        counts=json.loads(r["counts"]) if r["counts"] else {},
        error=r["error"],
        verify_requested=r["verify_requested"],
        retention_days=r["retention_days"],
        plan=r["plan"],
    )


def _restore(r: Mapping[str, Any]) -> RestoreRow:
    return RestoreRow(
        id=hex_of(r["id"]),
        addon_id=hex_of(r["addon_id"]),
        backup_id=hex_of(r["backup_id"]),
        state=r["state"],
        error=r["error"],
        created_at=r["created_at"],
        finished_at=r["finished_at"],
    )


async def _lock_addon(conn: Connection, project_id: str, addon_id: str) -> Mapping[str, Any]:
    """The add-on's row, locked; its project's FOR SHARE, so the plan read here stays the
    plan until the request's transaction ends (a plan change locks it FOR UPDATE)."""
    row = await conn.fetchrow(
        """SELECT a.id, a.project_id, a.kind, a.deleted_at, p.plan, p.host,
            (a.status->>'usage_bytes')::bigint AS usage FROM addons a
        JOIN projects p ON p.id = a.project_id WHERE a.id = $1 AND a.project_id = $2
        FOR UPDATE OF a FOR SHARE OF p""",
        uuid_of(addon_id),
        uuid_of(project_id),
    )
    if row is None:
        raise NotFound(f"add-on {addon_id} does not exist in project {project_id}")
    if row["deleted_at"] is not None:
        raise Conflict(f"add-on {addon_id} is being deleted")
    result: Mapping[str, Any] = row
    return result


async def _refuse_if_busy(conn: Connection, addon_uuid: Any) -> None:
    busy = await conn.fetchval(
        """SELECT CASE
            WHEN EXISTS (SELECT 1 FROM backup_restores WHERE addon_id = $1 AND state = 'pending')
              THEN 'a restore'
            WHEN EXISTS (SELECT 1 FROM backups WHERE addon_id = $1
                         AND (state = 'pending' OR verify_requested))
              THEN 'a backup' END""",
        addon_uuid,
    )
    if busy is not None:
        raise Conflict(f"{busy} of this add-on is in progress; try again when it has finished")


async def create_manual(
    pool: Pool, project_id: str, addon_id: str, plans: Mapping[str, Plan]
) -> tuple[BackupRow, str]:
    """A pending manual backup and the host to run it, within the plan's per-day limit."""
    async with transaction(pool) as conn:
        addon = await _lock_addon(conn, project_id, addon_id)
        plan = plans[addon["plan"]]
        limit = plan.manual_backups_per_day
        if limit == 0:
            # Name the plans of this controller's plans file that do: an operator's
            # plans need not be called Pro and Team, nor include backups at all.
            offering = [repr(n) for n, p in sorted(plans.items()) if p.manual_backups_per_day]
            raise PlanLimitReached(
                f"plan {addon['plan']!r} includes no manual backups "
                "(manual_backups_per_day = 0); "
                + (f"plan(s) {', '.join(offering)} do" if offering else "no plan here does")
            )
        start, end = backup_rules.day_window(await conn.fetchval("SELECT now()"))
        used = await conn.fetchval(
            """SELECT count(*) FROM backups WHERE addon_id = $1 AND kind = 'manual'
            AND state <> 'failed' AND created_at >= $2 AND created_at < $3""",
            addon["id"],
            start,
            end,
        )
        if used >= limit:
            raise PlanLimitReached(
                f"plan {addon['plan']!r} allows {limit} manual backup(s) per add-on per day "
                f"(UTC); {used} taken today, the next one is possible after {end.isoformat()}"
            )
        await _refuse_if_busy(conn, addon["id"])
        row = await conn.fetchrow(
            f"""INSERT INTO backups AS b (id, addon_id, project_id, kind, retention_days)
            VALUES ($1, $2, $3, 'manual', $4) RETURNING {_COLUMNS}""",
            uuid_of(new_id()),
            addon["id"],
            addon["project_id"],
            plan.backup_retention_days,
        )
    return _backup(row), addon["host"]


async def list_backups(pool: Pool, project_id: str, addon_id: str) -> tuple[str, list[BackupRow]]:
    """The project's plan and the add-on's backups, newest first."""
    async with transaction(pool) as conn:
        plan = await conn.fetchval(
            """SELECT p.plan FROM addons a JOIN projects p ON p.id = a.project_id
            WHERE a.id = $1 AND a.project_id = $2""",
            uuid_of(addon_id),
            uuid_of(project_id),
        )
        if plan is None:
            raise NotFound(f"add-on {addon_id} does not exist in project {project_id}")
        rows = await conn.fetch(
            f"""SELECT {_COLUMNS} FROM backups b WHERE b.addon_id = $1 AND b.project_id = $2
            AND b.state <> 'deleting' ORDER BY b.created_at DESC, b.id""",
            uuid_of(addon_id),
            uuid_of(project_id),
        )
    return str(plan), [_backup(r) for r in rows]


async def get_backup(pool: Pool, project_id: str, addon_id: str, backup_id: str) -> BackupRow:
    async with transaction(pool) as conn:
        row = await conn.fetchrow(
            f"""SELECT {_COLUMNS} FROM backups b
            WHERE b.id = $1 AND b.addon_id = $2 AND b.project_id = $3""",
            uuid_of(backup_id),
            uuid_of(addon_id),
            uuid_of(project_id),
        )
    if row is None:
        raise NotFound(f"backup {backup_id} does not exist for add-on {addon_id}")
    return _backup(row)


async def _finished_backup(conn: Connection, addon_uuid: Any, backup_id: str) -> Mapping[str, Any]:
    row = await conn.fetchrow(
        """SELECT id, state, verified, sha256, size_bytes, data_bytes FROM backups
        WHERE id = $1 AND addon_id = $2""",
        uuid_of(backup_id),
        addon_uuid,
    )
    if row is None or row["state"] == "deleting":
        raise NotFound(f"backup {backup_id} does not exist for this add-on")
    if row["state"] != "succeeded":
        raise Conflict(f"backup {backup_id} is {row['state']}, not a finished backup")
    result: Mapping[str, Any] = row
    return result


async def request_verify(
    pool: Pool, project_id: str, addon_id: str, backup_id: str
) -> tuple[BackupRow, str]:
    async with transaction(pool) as conn:
        addon = await _lock_addon(conn, project_id, addon_id)
        await _finished_backup(conn, addon["id"], backup_id)
        await _refuse_if_busy(conn, addon["id"])
        row = await conn.fetchrow(
            f"""UPDATE backups b SET verify_requested = true WHERE b.id = $1
            RETURNING {_COLUMNS}""",
            uuid_of(backup_id),
        )
    return _backup(row), addon["host"]


async def create_restore(
    pool: Pool, project_id: str, addon_id: str, backup_id: str, plans: Mapping[str, Plan]
) -> tuple[RestoreRow, str]:
    async with transaction(pool) as conn:
        addon = await _lock_addon(conn, project_id, addon_id)
        backup = await _finished_backup(conn, addon["id"], backup_id)
        if not backup["verified"]:
            why = "failed its verification" if backup["verified"] is False else "is not verified"
            raise Conflict(f"backup {backup_id} {why}; only a verified backup is restored")
        # The project row is held FOR SHARE (`_lock_addon`): a plan change waits for this
        # transaction, so the plan checked is the one the restore is accepted under.
        plan = plans[addon["plan"]]
        refusal = backup_rules.restore_refusal(
            hex_of(backup["id"]),
            addon["kind"],
            backup["data_bytes"],
            backup["size_bytes"],
            addon["plan"],
            plan.storage_mb,
            plan.memory_mb,
            addon["usage"],
        )
        if refusal is not None:
            raise PlanLimitReached(refusal)
        await _refuse_if_busy(conn, addon["id"])
        row = await conn.fetchrow(
            f"""INSERT INTO backup_restores AS r (id, addon_id, backup_id) VALUES ($1, $2, $3)
            RETURNING {_RESTORE_COLUMNS}""",
            uuid_of(new_id()),
            addon["id"],
            backup["id"],
        )
    return _restore(row), addon["host"]


async def get_restore(pool: Pool, project_id: str, addon_id: str, restore_id: str) -> RestoreRow:
    async with transaction(pool) as conn:
        row = await conn.fetchrow(
            f"""SELECT {_RESTORE_COLUMNS} FROM backup_restores r JOIN addons a ON a.id = r.addon_id
            WHERE r.id = $1 AND r.addon_id = $2 AND a.project_id = $3""",
            uuid_of(restore_id),
            uuid_of(addon_id),
            uuid_of(project_id),
        )
    if row is None:
        raise NotFound(f"restore {restore_id} does not exist for add-on {addon_id}")
    return _restore(row)


async def get_schedule(pool: Pool, project_id: str, addon_id: str) -> ScheduleRow:
    async with transaction(pool) as conn:
        found = await conn.fetchval(
            "SELECT true FROM addons WHERE id = $1 AND project_id = $2",
            uuid_of(addon_id),
            uuid_of(project_id),
        )
        if not found:
            raise NotFound(f"add-on {addon_id} does not exist in project {project_id}")
        row = await conn.fetchrow(
            "SELECT enabled, time_of_day, since FROM backup_schedules WHERE addon_id = $1",
            uuid_of(addon_id),
        )
    if row is None:
        return ScheduleRow(enabled=False, time_of_day=time(3, 0), since=None)
    return ScheduleRow(enabled=row["enabled"], time_of_day=row["time_of_day"], since=row["since"])


async def set_schedule(
    pool: Pool,
    project_id: str,
    addon_id: str,
    plans: Mapping[str, Plan],
    enabled: bool | None,
    time_of_day: time | None,
) -> ScheduleRow:
    async with transaction(pool) as conn:
        addon = await _lock_addon(conn, project_id, addon_id)
        if enabled and plans[addon["plan"]].backup_retention_days == 0:
            raise PlanLimitReached(
                f"plan {addon['plan']!r} keeps no backups (backup_retention_days = 0); "
                "automatic backups need Pro or Team"
            )
        row = await conn.fetchrow(
            """INSERT INTO backup_schedules AS s (addon_id, enabled, time_of_day)
            VALUES ($1, coalesce($2, false), coalesce($3, '03:00'::time))
            ON CONFLICT (addon_id) DO UPDATE SET
                enabled = coalesce($2, s.enabled),
                time_of_day = coalesce($3, s.time_of_day),
                since = CASE WHEN coalesce($2, s.enabled) AND NOT s.enabled THEN now()
                             ELSE s.since END
            RETURNING enabled, time_of_day, since""",
            addon["id"],
            enabled,
            time_of_day,
        )
    return ScheduleRow(enabled=row["enabled"], time_of_day=row["time_of_day"], since=row["since"])


# --- the scheduler's work -------------------------------------------------------------------


async def run_due(pool: Pool, plans: Mapping[str, Plan]) -> list[str]:
    """Insert the owed automatic backups; the hosts that got one."""
    hosts: list[str] = []
    async with transaction(pool) as conn:
        now = await conn.fetchval("SELECT now()")
        rows = await conn.fetch(
            """SELECT s.addon_id, s.time_of_day, s.since, a.project_id, p.plan, p.host
            FROM backup_schedules s JOIN addons a ON a.id = s.addon_id
            JOIN projects p ON p.id = a.project_id
            WHERE s.enabled AND a.deleted_at IS NULL"""
        )
        for r in rows:
            if plans[r["plan"]].backup_retention_days == 0:
                continue
            slot = backup_rules.due_slot(r["time_of_day"], r["since"], now)
            if slot is None:
                continue
            inserted = await conn.fetchval(
                """INSERT INTO backups (id, addon_id, project_id, kind, scheduled_for,
                    retention_days)
                VALUES ($1, $2, $3, 'automatic', $4, $5)
                ON CONFLICT (addon_id, scheduled_for) DO NOTHING RETURNING true""",
                uuid_of(new_id()),
                r["addon_id"],
                r["project_id"],
                slot,
                plans[r["plan"]].backup_retention_days,
            )
            if inserted:
                hosts.append(r["host"])
    return hosts


async def prune(pool: Pool, plans: Mapping[str, Plan]) -> list[str]:
    """Mark backups past their plan's retention for deletion; the hosts to tell."""
    async with transaction(pool) as conn:
        now = await conn.fetchval("SELECT now()")
        rows = await conn.fetch(
            """SELECT b.id, b.addon_id, b.state, b.created_at, b.verified, b.retention_days,
                p.plan, p.host,
                EXISTS (SELECT 1 FROM backup_restores r
                        WHERE r.backup_id = b.id AND r.state = 'pending') AS restore_pending
            FROM backups b JOIN projects p ON p.id = b.project_id"""
        )
        by_addon: dict[Any, list[Mapping[str, Any]]] = {}
        for r in rows:
            by_addon.setdefault(r["addon_id"], []).append(r)
        doomed: list[Any] = []
        hosts: set[str] = set()
        for items in by_addon.values():
            plan = plans[items[0]["plan"]]
            facts = [
                backup_rules.BackupFacts(
                    id=hex_of(r["id"]),
                    state=r["state"],
                    created_at=r["created_at"],
                    verified=r["verified"],
                    restore_pending=r["restore_pending"],
                    retention_days=r["retention_days"],
                )
                for r in items
            ]
            gone = backup_rules.to_prune(facts, now, plan.backup_retention_days)
            if gone:
                doomed += [uuid_of(i) for i in gone]
                hosts.add(items[0]["host"])
        if doomed:
            await conn.execute(
                "UPDATE backups SET state = 'deleting' WHERE id = ANY($1::uuid[])", doomed
            )
    return sorted(hosts)


async def last_verified(pool: Pool) -> list[tuple[str, str, float]]:
    """(add-on, project, epoch of its newest verified backup) for scheduled add-ons."""
    async with transaction(pool) as conn:
        rows = await conn.fetch(
            """SELECT s.addon_id, a.project_id,
                (SELECT max(b.finished_at) FROM backups b
                 WHERE b.addon_id = s.addon_id AND b.state = 'succeeded' AND b.verified)
                    AS last
            FROM backup_schedules s JOIN addons a ON a.id = s.addon_id
            WHERE s.enabled AND a.deleted_at IS NULL"""
        )
    return [
        (
            hex_of(r["addon_id"]),
            hex_of(r["project_id"]),
            r["last"].timestamp() if r["last"] else 0.0,
        )
        for r in rows
    ]


# --- the agent's results --------------------------------------------------------------------


async def record_result(pool: Pool, result: BackupResult) -> bool:
    """Apply one BackupResult of a project on the reporting host; False if nothing changed."""
    ids = (uuid_of(result.backup_id), uuid_of(result.addon_id), uuid_of(result.project_id))
    on_host = "AND b.project_id IN (SELECT id FROM projects WHERE host = $4)"
    async with transaction(pool) as conn:
        if result.op == "backup":
            done = await conn.fetchval(
                f"""UPDATE backups b SET state = $5, finished_at = $6, size_bytes = $7,
                    sha256 = $8, verified = $9, verify_error = $10, verify_seconds = $11,
                    counts = $12::jsonb, error = $13, data_bytes = $14
                WHERE b.id = $1 AND b.addon_id = $2 AND b.project_id = $3
                  AND b.state = 'pending' {on_host} RETURNING true""",
                *ids,
                result.host,
                "succeeded" if result.ok else "failed",
                result.finished_at,
                result.size_bytes,
                result.sha256,
                result.verified,
                scrub(result.verify_error),
                result.verify_seconds,
                json.dumps(result.counts),
                scrub(result.error),
                result.data_bytes,
            )
        elif result.op == "verify":
            done = await conn.fetchval(
                f"""UPDATE backups b SET verify_requested = false,
                    verified = coalesce($5, false), verify_error = coalesce($6, $7),
                    verify_seconds = $8
                WHERE b.id = $1 AND b.addon_id = $2 AND b.project_id = $3
                  AND b.verify_requested {on_host} RETURNING true""",
                *ids,
                result.host,
                result.verified,
                scrub(result.verify_error),
                scrub(result.error),
                result.verify_seconds,
            )
        elif result.op == "delete":
            done = await conn.fetchval(
                f"""DELETE FROM backups b WHERE b.id = $1 AND b.addon_id = $2
                AND b.project_id = $3 AND b.state = 'deleting' {on_host} RETURNING true""",
                *ids,
                result.host,
            )
        else:
            done = await conn.fetchval(
                """UPDATE backup_restores r SET state = $5, error = $6, finished_at = $7
                FROM addons a, projects p
                WHERE r.id = $8 AND r.backup_id = $1 AND r.addon_id = $2 AND a.id = r.addon_id
                  AND a.project_id = $3 AND p.id = a.project_id AND p.host = $4
                  AND r.state = 'pending' RETURNING true""",
                *ids,
                result.host,
                "succeeded" if result.ok else "failed",
                scrub(result.error),
                result.finished_at,
                uuid_of(result.id),
            )
    return bool(done)
