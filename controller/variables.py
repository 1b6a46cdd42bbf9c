"""A project's own variables, and the names its add-ons' variables go by (custom names,
promotion to primary). Composition itself is pure and lives in env.py.

Each change locks the project row, so checks against the add-ons' names and the count
limit see a settled state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from msgspec import Struct

from controller.db import Connection, Pool, transaction
from controller.env import assign, default_name_refusal
from controller.errors import Conflict, InvalidBody, NotFound
from controller.sealing import Sealer
from controller.store_rows import uuid_of
from schemas.messages import AddonKind

MAX_VARIABLES = 100  # a project's own variables


class Named(Struct, frozen=True):
    """A live add-on, as far as naming goes (env.EnvSource)."""

    id: str
    name: str
    kind: AddonKind
    created_at: datetime
    env_name: str | None
    promoted_at: datetime | None


def _context(project_id: str, name: str) -> bytes:
    # Binds a sealed value to its row: a value copied to another project or name won't open.
    return f"variable/{project_id}/{name}".encode()


async def _lock(conn: Connection, project_id: str) -> None:
    deleting = await conn.fetchval(
        "SELECT deleted_at IS NOT NULL FROM projects WHERE id = $1 FOR UPDATE",
        uuid_of(project_id),
    )
    if deleting is None:
        raise NotFound(f"project {project_id} does not exist")
    if deleting:
        raise Conflict(f"project {project_id} is being deleted")


async def _live(conn: Connection, project_id: str) -> list[Named]:
    rows = await conn.fetch(
        """SELECT id, name, kind, created_at, env_name, promoted_at FROM addons
        WHERE project_id = $1 AND deleted_at IS NULL""",
        uuid_of(project_id),
    )
    return [_named(r) for r in rows]


def _named(r: Mapping[str, Any]) -> Named:
    return Named(
        id=r["id"].hex,
        name=r["name"],
        kind=r["kind"],
        created_at=r["created_at"],
        env_name=r["env_name"],
        promoted_at=r["promoted_at"],
    )


async def user_variables(pool: Pool, sealer: Sealer, project_id: str) -> dict[str, str]:
    async with transaction(pool) as conn:
        rows = await conn.fetch(
            "SELECT name, value_sealed FROM project_variables WHERE project_id = $1",
            uuid_of(project_id),
        )
    return {
        r["name"]: sealer.open(r["value_sealed"], _context(project_id, r["name"])) for r in rows
    }


async def update(
    pool: Pool, sealer: Sealer, project_id: str, set_: Mapping[str, str], unset: Sequence[str]
) -> None:
    """Unset, then set, a project's own variables at once; add-on variables are refused."""
    async with transaction(pool) as conn:
        await _lock(conn, project_id)
        taken = assign(await _live(conn, project_id))
        for name in sorted(set_):
            if name in taken:
                raise Conflict(
                    f"{name} is add-on {taken[name].name}'s variable; add-on variables cannot "
                    "be overwritten (give the add-on another name with PATCH .../addons/{id} "
                    '{"env_name": ...}, or use another name)'
                )
        if set_:
            await refuse_shared_names(conn, project_id, sorted(set_))
        pid = uuid_of(project_id)
        if unset:
            await conn.execute(
                "DELETE FROM project_variables WHERE project_id = $1 AND name = ANY($2::text[])",
                pid,
                list(unset),
            )
        for name, value in set_.items():
            await conn.execute(
                """INSERT INTO project_variables (project_id, name, value_sealed)
                VALUES ($1, $2, $3) ON CONFLICT (project_id, name)
                DO UPDATE SET value_sealed = EXCLUDED.value_sealed,
                    updated_at = clock_timestamp()""",
                pid,
                name,
                sealer.seal(value, _context(project_id, name)),
            )
        count = await conn.fetchval(
            "SELECT count(*) FROM project_variables WHERE project_id = $1", pid
        )
        if count > MAX_VARIABLES:  # raising rolls the whole change back
            raise Conflict(
                f"a project has at most {MAX_VARIABLES} variables of its own; this change "
                f"would make {count}: unset some first"
            )


async def refuse_shared_names(conn: Connection, project_id: str, names: Sequence[str]) -> None:
    """Refuse a name an add-on shared with the project in a group gives it. Under the lock
    groups hand shared names out with (groups._lock_names, taken after the project's, as a
    join does): a share committed meanwhile is seen, never shadowed by a 200'd variable."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('orkestr.groups.names'))")
    name = await conn.fetchval(
        """SELECT s.env_name FROM group_members m
        JOIN group_shares s ON s.group_id = m.group_id AND s.project_id <> m.project_id
        JOIN addons a ON a.id = s.addon_id AND a.deleted_at IS NULL
        WHERE m.project_id = $1 AND s.env_name = ANY($2::text[]) ORDER BY s.env_name LIMIT 1""",
        uuid_of(project_id),
        list(names),
    )
    if name is not None:
        raise Conflict(
            f"{name} is an add-on shared with this project in a group; add-on variables "
            "cannot be overwritten: use another name"
        )


async def _live_addon(conn: Connection, project_id: str, addon_id: str) -> Named:
    row = await conn.fetchrow(
        """SELECT id, name, kind, created_at, env_name, promoted_at, deleted_at FROM addons
        WHERE id = $1 AND project_id = $2""",
        uuid_of(addon_id),
        uuid_of(project_id),
    )
    if row is None:
        raise NotFound(f"add-on {addon_id} does not exist in project {project_id}")
    if row["deleted_at"] is not None:
        raise Conflict(f"add-on {row['name']} is being deleted")
    return _named(row)


async def set_env_name(pool: Pool, project_id: str, addon_id: str, env_name: str | None) -> None:
    """Give an add-on an exact custom variable name (None: none), unless it is taken."""
    async with transaction(pool) as conn:
        await _lock(conn, project_id)
        addon = await _live_addon(conn, project_id, addon_id)
        refusal = None if env_name is None else default_name_refusal(env_name, addon.kind)
        if refusal is not None:
            raise InvalidBody(refusal)
        if env_name is not None and env_name != addon.env_name:
            others = [a for a in await _live(conn, project_id) if a.id != addon.id]
            taken = assign(others)
            if env_name in taken:
                raise Conflict(f"{env_name} is add-on {taken[env_name].name}'s variable")
            if await conn.fetchval(
                "SELECT true FROM project_variables WHERE project_id = $1 AND name = $2",
                uuid_of(project_id),
                env_name,
            ):
                raise Conflict(f"{env_name} is one of the project's own variables; unset it first")
            # The project's own add-ons win a clash with a share (controller/env.py):
            # taking a shared name would silently cut the share off from this project.
            await refuse_shared_names(conn, project_id, [env_name])
        await conn.execute(
            "UPDATE addons SET env_name = $1 WHERE id = $2", env_name, uuid_of(addon_id)
        )


async def promote(pool: Pool, project_id: str, addon_id: str) -> None:
    """Make an add-on its kind's primary (DATABASE_URL / REDIS_URL)."""
    async with transaction(pool) as conn:
        await _lock(conn, project_id)
        await _live_addon(conn, project_id, addon_id)
        await conn.execute(
            "UPDATE addons SET promoted_at = clock_timestamp() WHERE id = $1", uuid_of(addon_id)
        )
