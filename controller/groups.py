"""Project groups: the operator groups projects; each member's owner shares add-ons in it.

A group's members are placed on one host (until cross-host networking exists, the API
refuses a member placed elsewhere). On that host the agent makes a group network on which
the shared add-ons are reachable from the other members' apps and jobs, and nothing else
(agent/plan.py, agent/firewall.py). The other members get each shared add-on's URL under
the variable name its owner picked (env.compose_env).

Changes lock the group row, so the host check and the name checks see a settled group;
sharing and joining also take one lock for all groups' names, since a project in two
groups receives names from both. One name reaches a member from one add-on only: a share
or a join that would give a member a name it already has (its own add-on's or variable,
or another group's shared add-on) is refused with a 409 naming both.
Leaving a group drops the project's shares with it (a foreign key cascade).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from msgspec import Struct

from controller.db import Connection, Pool, transaction
from controller.env import Credentials, assign, shared_host
from controller.errors import Conflict, NotFound
from controller.sealing import Sealer
from controller.store_rows import hex_of, new_id, uuid_of
from controller.variables import Named
from schemas.credentials import login_role
from schemas.messages import GroupSpec, SharedAddon


class MemberRow(Struct, frozen=True):
    project_id: str
    name: str
    host: str
    joined_at: datetime


class ShareRow(Struct, frozen=True):
    project_id: str
    addon_id: str
    addon_name: str
    kind: str
    env_name: str
    host_name: str  # the add-on's DNS name on the group network


class GroupRow(Struct, frozen=True):
    id: str
    name: str
    created_at: datetime
    members: tuple[MemberRow, ...]
    shares: tuple[ShareRow, ...]

    @property
    def host(self) -> str | None:
        return self.members[0].host if self.members else None


async def _lock_names(conn: Connection) -> None:
    """Serialise the changes that hand out shared names, across groups (they are rare)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('orkestr.groups.names'))")


async def _lock(conn: Connection, group_id: str) -> Mapping[str, Any]:
    row = await conn.fetchrow(
        "SELECT id, name, created_at FROM project_groups WHERE id = $1 FOR UPDATE",
        uuid_of(group_id),
    )
    if row is None:
        raise NotFound(f"group {group_id} does not exist")
    return row  # type: ignore[no-any-return]


async def _load(conn: Connection, row: Mapping[str, Any]) -> GroupRow:
    members = await conn.fetch(
        """SELECT m.project_id, p.name, p.host, m.created_at FROM group_members m
        JOIN projects p ON p.id = m.project_id WHERE m.group_id = $1
        ORDER BY m.created_at, m.project_id""",
        row["id"],
    )
    shares = await conn.fetch(
        """SELECT s.project_id, s.addon_id, a.name, a.kind, s.env_name FROM group_shares s
        JOIN addons a ON a.id = s.addon_id
        WHERE s.group_id = $1 AND a.deleted_at IS NULL ORDER BY s.created_at, s.addon_id""",
        row["id"],
    )
    return GroupRow(
        id=hex_of(row["id"]),
        name=row["name"],
        created_at=row["created_at"],
        members=tuple(MemberRow(hex_of(m[0]), m[1], m[2], m[3]) for m in members),
        shares=tuple(
            ShareRow(hex_of(s[0]), hex_of(s[1]), s[2], s[3], s[4], shared_host(hex_of(s[1])))
            for s in shares
        ),
    )


async def create(pool: Pool, name: str) -> GroupRow:
    try:
        async with transaction(pool) as conn:
            row = await conn.fetchrow(
                """INSERT INTO project_groups (id, name) VALUES ($1, $2)
                RETURNING id, name, created_at""",
                uuid_of(new_id()),
                name,
            )
            return await _load(conn, row)
    except Conflict:
        raise Conflict(f"a group named {name!r} already exists") from None


async def list_all(pool: Pool, member: str | None = None) -> list[GroupRow]:
    """Every group, or with `member` the groups that project belongs to; oldest first."""
    async with transaction(pool) as conn:
        rows = await conn.fetch(
            """SELECT g.id, g.name, g.created_at FROM project_groups g
            WHERE $1::uuid IS NULL OR EXISTS (
                SELECT 1 FROM group_members m WHERE m.group_id = g.id AND m.project_id = $1)
            ORDER BY g.created_at, g.id""",
            uuid_of(member) if member is not None else None,
        )
        return [await _load(conn, r) for r in rows]


async def get(pool: Pool, group_id: str, member: str | None = None) -> GroupRow:
    """One group; with `member`, only if that project belongs to it (else 404)."""
    async with transaction(pool) as conn:
        row = await conn.fetchrow(
            "SELECT id, name, created_at FROM project_groups WHERE id = $1", uuid_of(group_id)
        )
        if row is None:
            raise NotFound(f"group {group_id} does not exist")
        group = await _load(conn, row)
    if member is not None and member not in {m.project_id for m in group.members}:
        raise NotFound(f"group {group_id} does not exist")
    return group


async def delete(pool: Pool, group_id: str) -> GroupRow:
    """Remove a group, its memberships and shares; returns it as it was."""
    async with transaction(pool) as conn:
        group = await _load(conn, await _lock(conn, group_id))
        await conn.execute("DELETE FROM project_groups WHERE id = $1", uuid_of(group_id))
    return group


async def add_member(pool: Pool, group_id: str, project_id: str) -> tuple[GroupRow, bool]:
    """Make a project a member (idempotent); returns the group and whether it joined now."""
    async with transaction(pool) as conn:
        group = await _load(conn, await _lock(conn, group_id))
        host = await conn.fetchval(
            "SELECT host FROM projects WHERE id = $1 FOR SHARE", uuid_of(project_id)
        )
        if host is None:
            raise NotFound(f"project {project_id} does not exist")
        if project_id in {m.project_id for m in group.members}:
            return group, False
        if group.host is not None and host != group.host:
            raise Conflict(
                f"group {group.name}'s members are placed on host {group.host} and project "
                f"{project_id} on host {host}: members of a group share one host until "
                "cross-host networking exists; create the project in the group's host's "
                "placement, or use another group"
            )
        await _lock_names(conn)
        for s in group.shares:
            why = await _taken(conn, project_id, s.env_name, group.id, s.addon_id)
            if why is not None:
                raise Conflict(
                    f"{s.env_name} names add-on {s.addon_name} shared in group {group.name}, "
                    f"and in project {project_id} it is already {why}; rename one of them "
                    "(PUT the share with another env_name) before joining"
                )
        await conn.execute(
            "INSERT INTO group_members (group_id, project_id) VALUES ($1, $2)",
            uuid_of(group_id),
            uuid_of(project_id),
        )
        return await _load(conn, await _lock(conn, group_id)), True


async def remove_member(pool: Pool, group_id: str, project_id: str) -> GroupRow:
    """A project leaves (its shares go with it); returns the group as it was."""
    async with transaction(pool) as conn:
        group = await _load(conn, await _lock(conn, group_id))
        if project_id not in {m.project_id for m in group.members}:
            raise NotFound(f"project {project_id} is not a member of group {group_id}")
        await conn.execute(
            "DELETE FROM group_members WHERE group_id = $1 AND project_id = $2",
            uuid_of(group_id),
            uuid_of(project_id),
        )
    return group


async def _taken(
    conn: Connection, project_id: str, env_name: str, group_id: str, addon_id: str
) -> str | None:
    """Why a member cannot receive `env_name` for `addon_id` shared in `group_id` (an
    add-on's or own variable, or another group's shared add-on), or None."""
    rows = await conn.fetch(
        """SELECT id, name, kind, created_at, env_name, promoted_at FROM addons
        WHERE project_id = $1 AND deleted_at IS NULL""",
        uuid_of(project_id),
    )
    taken = assign(
        Named(
            id=r["id"].hex,
            name=r["name"],
            kind=r["kind"],
            created_at=r["created_at"],
            env_name=r["env_name"],
            promoted_at=r["promoted_at"],
        )
        for r in rows
    )
    if env_name in taken:
        return f"add-on {taken[env_name].name}'s variable"
    if await conn.fetchval(
        "SELECT true FROM project_variables WHERE project_id = $1 AND name = $2",
        uuid_of(project_id),
        env_name,
    ):
        return "one of its own variables"
    other = await conn.fetchrow(
        """SELECT g.name AS group_name, a.name AS addon_name FROM group_members m
        JOIN group_shares s ON s.group_id = m.group_id AND s.project_id <> m.project_id
        JOIN addons a ON a.id = s.addon_id AND a.deleted_at IS NULL
        JOIN project_groups g ON g.id = s.group_id
        WHERE m.project_id = $1 AND s.env_name = $2 AND s.group_id <> $3 AND s.addon_id <> $4
        ORDER BY s.created_at LIMIT 1""",
        uuid_of(project_id),
        env_name,
        uuid_of(group_id),
        uuid_of(addon_id),
    )
    if other is not None:
        return f"add-on {other['addon_name']} shared in group {other['group_name']}"
    return None


async def share(
    pool: Pool, project_id: str, group_id: str, addon_id: str, env_name: str
) -> GroupRow:
    """Share (or rename the share of) a live add-on of a member project in its group."""
    async with transaction(pool) as conn:
        group = await _load(conn, await _lock(conn, group_id))
        if project_id not in {m.project_id for m in group.members}:
            raise NotFound(f"group {group_id} does not exist")
        addon = await conn.fetchrow(
            "SELECT name, deleted_at FROM addons WHERE id = $1 AND project_id = $2",
            uuid_of(addon_id),
            uuid_of(project_id),
        )
        if addon is None:
            raise NotFound(f"add-on {addon_id} does not exist in project {project_id}")
        if addon["deleted_at"] is not None:
            raise Conflict(f"add-on {addon['name']} is being deleted")
        for s in group.shares:
            if s.env_name == env_name and s.addon_id != addon_id:
                raise Conflict(
                    f"{env_name} already names add-on {s.addon_name} shared in group "
                    f"{group.name}; pick another name"
                )
        await _lock_names(conn)
        for m in group.members:
            if m.project_id == project_id:
                continue
            why = await _taken(conn, m.project_id, env_name, group_id, addon_id)
            if why is not None:
                raise Conflict(f"{env_name} is {why} in member project {m.name}; pick another name")
        await conn.execute(
            """INSERT INTO group_shares (group_id, project_id, addon_id, env_name)
            VALUES ($1, $2, $3, $4) ON CONFLICT (group_id, addon_id)
            DO UPDATE SET env_name = EXCLUDED.env_name""",
            uuid_of(group_id),
            uuid_of(project_id),
            uuid_of(addon_id),
            env_name,
        )
        return await _load(conn, await _lock(conn, group_id))


async def unshare(pool: Pool, project_id: str, group_id: str, addon_id: str) -> GroupRow:
    async with transaction(pool) as conn:
        group = await _load(conn, await _lock(conn, group_id))
        if project_id not in {m.project_id for m in group.members}:
            raise NotFound(f"group {group_id} does not exist")
        done = await conn.fetchval(
            """DELETE FROM group_shares WHERE group_id = $1 AND addon_id = $2
            AND project_id = $3 RETURNING true""",
            uuid_of(group_id),
            uuid_of(addon_id),
            uuid_of(project_id),
        )
        if not done:
            raise NotFound(f"add-on {addon_id} is not shared in group {group_id}")
    return group


async def shared_with(pool: Pool, sealer: Sealer, project_id: str) -> list[tuple[str, Credentials]]:
    """(variable name, credentials) of the live add-ons other members share with a project."""
    async with transaction(pool) as conn:
        rows = await conn.fetch(
            """SELECT DISTINCT s.env_name, a.id, a.name, a.kind, a.database, a."user",
                a.secret_version, a.password_sealed, a.created_at
            FROM group_members m
            JOIN group_shares s ON s.group_id = m.group_id AND s.project_id <> m.project_id
            JOIN addons a ON a.id = s.addon_id AND a.deleted_at IS NULL
            WHERE m.project_id = $1""",
            uuid_of(project_id),
        )
    return [
        (
            r["env_name"],
            Credentials(
                id=hex_of(r["id"]),
                name=r["name"],
                kind=r["kind"],
                database=r["database"],
                # The role the current password belongs to, as for the owner's own URL:
                # after a rotation `app` with the new password fails to log in.
                user=login_role(r["user"], r["secret_version"]),
                password=sealer.open(r["password_sealed"], hex_of(r["id"]).encode()),
                created_at=r["created_at"],
            ),
        )
        for r in rows
    ]


async def specs_on(conn: Connection, host: str) -> tuple[GroupSpec, ...]:
    """The groups with a member on `host`, for its desired state (inside the snapshot's
    transaction). Shares of members elsewhere are left out: they cannot be reached."""
    members = await conn.fetch(
        """SELECT m.group_id, m.project_id FROM group_members m
        JOIN projects p ON p.id = m.project_id WHERE p.host = $1
        ORDER BY m.group_id, m.created_at, m.project_id""",
        host,
    )
    shares = await conn.fetch(
        """SELECT s.group_id, s.project_id, s.addon_id FROM group_shares s
        JOIN projects p ON p.id = s.project_id
        JOIN addons a ON a.id = s.addon_id AND a.deleted_at IS NULL
        WHERE p.host = $1 ORDER BY s.group_id, s.created_at, s.addon_id""",
        host,
    )
    by_group: dict[str, tuple[list[str], list[SharedAddon]]] = {}
    for m in members:
        by_group.setdefault(hex_of(m["group_id"]), ([], []))[0].append(hex_of(m["project_id"]))
    for s in shares:
        addon_id = hex_of(s["addon_id"])
        by_group.setdefault(hex_of(s["group_id"]), ([], []))[1].append(
            SharedAddon(addon_id, hex_of(s["project_id"]), shared_host(addon_id))
        )
    return tuple(
        GroupSpec(id=g, members=tuple(ms), shared=tuple(ss))
        for g, (ms, ss) in sorted(by_group.items())
    )
