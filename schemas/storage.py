"""An add-on's storage quota under a plan: one rule for the agent, which enforces it, and
the controller, which refuses a plan change the add-ons' data would not fit."""

from __future__ import annotations

MIB = 1024 * 1024
# Redis holds its data in memory: past this share of the container's memory it refuses
# writes instead of being OOM-killed, whatever the storage quota says.
REDIS_MEMORY_SHARE = 0.75


def quota_bytes(kind: str, storage_mb: int | None, memory_mb: int) -> int | None:
    """Bytes of data the add-on may hold (None: no limit)."""
    if kind == "redis":
        ceiling = int(memory_mb * MIB * REDIS_MEMORY_SHARE)
        return min(storage_mb * MIB, ceiling) if storage_mb else ceiling
    return storage_mb * MIB if storage_mb else None


def beside_refusal(
    backup_id: str, need: int, live: int, quota: int, plan_name: str | None
) -> str | None:
    """Why a Postgres restore of `need` bytes of data cannot be built beside a live
    database of `live` bytes under a quota of `quota` bytes, or None if both fit.

    A restore is built beside the live database and swapped in only when complete, so
    for a while both copies are on the add-on's filesystem. Both must fit the quota: the
    filesystem's room past it is the WAL's headroom and the guard's reserve, and a copy
    eating into it makes the guard refuse the tenant's writes (or fills the disk)."""
    if need + live <= quota:
        return None
    plan = f"plan {plan_name!r}" if plan_name else "the plan"
    return (
        f"restoring backup {backup_id} needs room for two copies at once: it is built "
        f"beside the live database and swapped in only when complete, and its "
        f"{need / MIB:.1f} MB of data with the live database's {live / MIB:.1f} MB exceed "
        f"the {quota / MIB:g} MB {plan} allows per add-on; free at least "
        f"{(need + live - quota) / MIB:.1f} MB in the live database first (the restore "
        "replaces it: DROP or TRUNCATE its largest tables, after a backup if you want to "
        f"keep them), or move to a plan with at least {(need + live) / MIB:.0f} MB of "
        "storage, restore, and move back"
    )
