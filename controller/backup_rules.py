"""Backup rules as pure functions of their inputs and an injected `now`.

- `due_slot`: the schedule slot an automatic backup is owed for, if any. Only the latest
  slot is owed, so a controller that was down for days runs one backup on return, not one
  per missed day; the (add-on, slot) unique key makes that run happen once.
- `to_prune`: what retention deletes. Never the newest verified backup (the one a restore
  would use), never one a pending restore reads, never an unfinished one.
- `day_window`: the UTC day the manual per-day limit counts in.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, time, timedelta

from msgspec import Struct


class BackupFacts(Struct, frozen=True):
    id: str
    state: str  # pending, succeeded, failed, deleting
    created_at: datetime
    verified: bool | None
    restore_pending: bool = False


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
    cutoff = now - timedelta(days=retention_days)
    return {
        b.id
        for b in items
        if b.state in ("succeeded", "failed")
        and b.created_at < cutoff
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
