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
