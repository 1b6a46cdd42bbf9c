"""What becomes of the backups of a deleted add-on: kept a while, then removed.

A backup is the user's data, so it must not outlive the user's wish to delete it for
long, yet an add-on deleted by mistake is what a backup is for. Like Heroku, which
keeps a destroyed database's backups for a short time, the agent keeps a deleted
add-on's directory of the store for the operator's window (`backups.deleted_addon_days`),
for an operator to recover from on request, then removes it. A deleted project's
backups go at once (the owner asked for everything to go), unless the operator keeps
them for the same window (`backups.keep_deleted_projects`).

The clock starts when the agent first sees the add-on's tombstone in its desired state:
it writes a marker (`Tombstone`) into the add-on's directory then. Only directories
with a marker are ever removed, so a store shared by several hosts loses nothing that
another host's agent still owns, and nothing missing from a desired state is taken for
deleted. `expired` is the rule, pure; `BackupStore` does the file work.
"""

from __future__ import annotations

import msgspec

DAY_S = 86400.0


class Tombstone(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Written into `<store>/<project>/<addon>/` when the add-on's deletion is first seen."""

    seen_at: float  # epoch seconds
    project_deleted: bool = False


def expired(tomb: Tombstone, now: float, keep_days: float, keep_deleted_projects: bool) -> bool:
    """Whether the directory of an add-on with this tombstone is removed now."""
    if tomb.project_deleted and not keep_deleted_projects:
        return True
    return now >= tomb.seen_at + keep_days * DAY_S


def mark(old: Tombstone | None, now: float, project_deleted: bool) -> Tombstone | None:
    """The marker to write for a tombstone seen now; None if the one on disk stands.

    The clock never restarts (a later pass, or a restarted agent, keeps the first time);
    a project deleted after its add-on only turns `project_deleted` on.
    """
    if old is None:
        return Tombstone(seen_at=now, project_deleted=project_deleted)
    if project_deleted and not old.project_deleted:
        return Tombstone(seen_at=old.seen_at, project_deleted=True)
    return None
