"""Backup rules as pure functions of their inputs and an injected `now`.

- `due_slot`: the schedule slot an automatic backup is owed for, if any. Only the latest
  slot is owed, so a controller that was down for days runs one backup on return, not one
  per missed day; the (add-on, slot) unique key makes that run happen once.
- `to_prune`: what retention deletes. Never the newest verified backup (the one a restore
  would use), never one a pending restore reads, never an unfinished one, never one
  younger than the window it was taken under (a move to a plan keeping backups for less
  time, or none, loses nothing that was promised: `kept_days`).
- `day_window`: the UTC day the manual per-day limit counts in.
- `restore_refusal`: why a backup's data would not fit the add-on's plan, if it would not.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, time, timedelta

from msgspec import Struct

from schemas import storage


class BackupFacts(Struct, frozen=True):
    id: str
    state: str  # pending, succeeded, failed, deleting
    created_at: datetime
    verified: bool | None
    restore_pending: bool = False
    # The plan's window when it was taken (None: made before that was recorded).
    retention_days: int | None = None


def kept_days(own: int | None, plan_days: int) -> int:
    """Days a backup is kept: the longer of its own window and its plan's current one."""
    return max(own or 0, plan_days)


def expires_at(created_at: datetime, own: int | None, plan_days: int) -> datetime:
    return created_at + timedelta(days=kept_days(own, plan_days))


def due_slot(time_of_day: time, since: datetime, now: datetime) -> datetime | None:
    """The latest daily slot at `time_of_day` (UTC) in (since, now], else None."""
    today = datetime.combine(now.astimezone(UTC).date(), time_of_day, tzinfo=UTC)
    slot = today if today <= now else today - timedelta(days=1)
    return slot if slot > since else None


def to_prune(backups: Iterable[BackupFacts], now: datetime, retention_days: int) -> set[str]:
    items = list(backups)
    keep: set[str] = set()
    verified = [b for b in items if b.state == "succeeded" and b.verified]
    if verified:
        keep.add(max(verified, key=lambda b: (b.created_at, b.id)).id)
    return {
        b.id
        for b in items
        if b.state in ("succeeded", "failed")
        and expires_at(b.created_at, b.retention_days, retention_days) < now
        and b.id not in keep
        and not b.restore_pending
    }


def day_window(now: datetime) -> tuple[datetime, datetime]:
    start = datetime.combine(now.astimezone(UTC).date(), time(0), tzinfo=UTC)
    return start, start + timedelta(days=1)


def parse_time_of_day(text: str) -> time:
    """ "HH:MM" or "HH:MM:SS" (UTC); ValueError with a readable message otherwise."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() and len(p) == 2 for p in parts):
        raise ValueError(f"time_of_day must be HH:MM or HH:MM:SS (UTC), got {text!r}")
    try:
        hour, minute, second = (int(p) for p in (*parts, "00")[:3])
        return time(hour, minute, second)
    except ValueError:
        raise ValueError(f"time_of_day {text!r} is not a time of day") from None


def restore_refusal(
    backup_id: str,
    kind: str,
    data_bytes: int | None,
    size_bytes: int | None,
    plan_name: str,
    storage_mb: int | None,
    memory_mb: int,
    live_bytes: int | None = None,
) -> str | None:
    """Why restoring this backup would not fit the add-on's quota under its plan, or None.

    The data is measured at dump time as the quota measures it (`data_bytes`); a backup
    made before that figure was recorded is judged by its file's size, a lower bound (the
    dumps are compressed), so only a restore sure not to fit is refused. A Postgres
    restore is built beside the live database (`live_bytes`, its last measured size), so
    both must fit (`storage.beside_refusal`); the agent checks that again when it starts,
    with the sizes of that moment."""
    quota = storage.quota_bytes(kind, storage_mb, memory_mb)
    need = data_bytes if data_bytes is not None else size_bytes
    if quota is None or need is None:
        return None
    if need <= quota:
        if kind != "postgres" or live_bytes is None:
            return None
        return storage.beside_refusal(backup_id, need, live_bytes, quota, plan_name)
    what = "holds" if data_bytes is not None else "is a file of"
    if kind == "redis" and (storage_mb is None or quota < storage_mb * storage.MIB):
        allows = (
            f"allows {quota / storage.MIB:g} MB to a Redis add-on "
            f"({storage.REDIS_MEMORY_SHARE * 100:g} % of its {memory_mb} MB memory)"
        )
    else:
        allows = f"allows {storage_mb} MB of storage per add-on"
    return (
        f"backup {backup_id} {what} {need / storage.MIB:.1f} MB of data and plan "
        f"{plan_name!r} {allows}: restored, it would not fit; restore it after a move "
        "to a plan with more storage"
    )
