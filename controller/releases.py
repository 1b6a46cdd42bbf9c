"""Releases and apps: a deploy snapshots the project's variables (its own and its
add-ons') into an immutable numbered release with the apps to run; the host runs the
newest release's apps with that release's variables, and jobs run with them too.

This is deliberately the simplest app runner that keeps the promise "variables reach
the app on the next deploy": one container per app, one replica, restarted on failure.
It is the place where the platform's own deployer plugs in: it creates releases here
(POST .../releases) and reads `GET .../apps` for the variables still pending.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from controller.db import Pool, transaction
from controller.errors import Conflict, NotFound
from controller.request_bodies import ImageRef
from controller.sealing import Sealer
from controller.store_rows import uuid_of
from schemas.messages import DnsName

# Apps travel in the host's desired state: small bounds keep a project's apps within
# ~50 KiB even at 6 bytes a character (4 x 8 x 256 x 6).
MAX_APPS = 4
MAX_APP_ARGUMENTS = 8
AppArgument = Annotated[str, Meta(max_length=256, pattern="^[^\\x00]*$")]
_APP_NAMESPACE = uuid.UUID("6f1d4a52-8c1e-4f5e-9a57-2f3c1d0b7e11")


class AppDef(Struct, frozen=True, forbid_unknown_fields=True):
    name: DnsName
    image: ImageRef
    command: Annotated[tuple[AppArgument, ...], Meta(max_length=MAX_APP_ARGUMENTS)] = ()


class AppBody(Struct, frozen=True, forbid_unknown_fields=True):
    image: ImageRef
    command: Annotated[tuple[AppArgument, ...], Meta(max_length=MAX_APP_ARGUMENTS)] = ()


class ReleaseCreate(Struct, frozen=True, forbid_unknown_fields=True):
    # By name (distinct by construction). None: the newest release's apps again (a
    # redeploy with fresh variables).
    apps: Annotated[dict[DnsName, AppBody], Meta(max_length=MAX_APPS)] | None = None
    description: Annotated[str, Meta(max_length=200, pattern="^[^\\x00]*$")] = ""


class ReleaseRow(Struct, frozen=True):
    project_id: str
    number: int
    apps: tuple[AppDef, ...]
    description: str
    created_at: datetime
    env: dict[str, str]


def app_id(project_id: str, name: str) -> str:
    """An app keeps its id across releases (its container is replaced, not renamed)."""
    return uuid.uuid5(_APP_NAMESPACE, f"{project_id}/{name}").hex


def _context(project_id: str, number: int) -> bytes:
    return f"release/{project_id}/{number}".encode()


def _row(r: Mapping[str, Any], sealer: Sealer) -> ReleaseRow:
    project_id = r["project_id"].hex
    env = msgspec.json.decode(
        sealer.open(r["env_sealed"], _context(project_id, r["number"])), type=dict[str, str]
    )
    return ReleaseRow(
        project_id=project_id,
        number=r["number"],
        apps=msgspec.json.decode(r["apps"], type=tuple[AppDef, ...]),
        description=r["description"],
        created_at=r["created_at"],
        env=env,
    )


_COLUMNS = "project_id, number, env_sealed, apps::text AS apps, description, created_at"


async def _insert(
    conn: Any,
    sealer: Sealer,
    project_id: str,
    env: Mapping[str, str],
    apps: Sequence[AppDef],
    description: str,
) -> ReleaseRow:
    deleting = await conn.fetchval(
        "SELECT deleted_at IS NOT NULL FROM projects WHERE id = $1 FOR UPDATE",
        uuid_of(project_id),
    )
    if deleting is None:
        raise NotFound(f"project {project_id} does not exist")
    if deleting:
        raise Conflict(f"project {project_id} is being deleted")
    # Apps and add-ons share the project network's names: an app named like an add-on
    # would answer at the add-on's name, to clients of the project (and of the platform).
    clash = await conn.fetchval(
        """SELECT name FROM addons WHERE project_id = $1 AND deleted_at IS NULL
        AND name = ANY($2::text[]) ORDER BY name LIMIT 1""",
        uuid_of(project_id),
        [a.name for a in apps],
    )
    if clash is not None:
        raise Conflict(
            f"app {clash!r} is named like the project's add-on {clash!r}: on the project "
            "network that name is the add-on's address; give the app another name"
        )
    number = 1 + await conn.fetchval(
        "SELECT coalesce(max(number), 0) FROM releases WHERE project_id = $1", uuid_of(project_id)
    )
    row = await conn.fetchrow(
        f"""INSERT INTO releases (project_id, number, env_sealed, apps, description)
        VALUES ($1, $2, $3, $4::jsonb, $5) RETURNING {_COLUMNS}""",
        uuid_of(project_id),
        number,
        sealer.seal(msgspec.json.encode(dict(env)).decode(), _context(project_id, number)),
        msgspec.json.encode(tuple(apps)).decode(),
        description or f"deploy v{number}",
    )
    return _row(row, sealer)


async def latest(pool: Pool, sealer: Sealer, project_id: str) -> ReleaseRow | None:
    async with transaction(pool) as conn:
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM releases WHERE project_id = $1 ORDER BY number DESC LIMIT 1",
            uuid_of(project_id),
        )
    return None if row is None else _row(row, sealer)


async def create(
    pool: Pool,
    sealer: Sealer,
    project_id: str,
    env: Mapping[str, str],
    apps: Sequence[AppDef] | None,
    description: str,
) -> ReleaseRow:
    async with transaction(pool) as conn:
        if apps is None:
            previous = await conn.fetchval(
                """SELECT apps::text FROM releases WHERE project_id = $1
                ORDER BY number DESC LIMIT 1""",
                uuid_of(project_id),
            )
            apps = msgspec.json.decode(previous, type=tuple[AppDef, ...]) if previous else ()
        return await _insert(conn, sealer, project_id, env, apps, description)


async def get(pool: Pool, sealer: Sealer, project_id: str, number: int) -> ReleaseRow:
    async with transaction(pool) as conn:
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM releases WHERE project_id = $1 AND number = $2",
            uuid_of(project_id),
            number,
        )
        if row is None:
            raise NotFound(f"release {number} does not exist in project {project_id}")
    return _row(row, sealer)


async def rollback(pool: Pool, sealer: Sealer, project_id: str, number: int) -> ReleaseRow:
    """A new release with the variables and apps of release `number`."""
    old = await get(pool, sealer, project_id, number)
    async with transaction(pool) as conn:
        return await _insert(
            conn, sealer, project_id, old.env, old.apps, f"rollback to v{old.number}"
        )


async def list_all(pool: Pool, sealer: Sealer, project_id: str) -> list[ReleaseRow]:
    """Newest first."""
    async with transaction(pool) as conn:
        if not await conn.fetchval("SELECT true FROM projects WHERE id = $1", uuid_of(project_id)):
            raise NotFound(f"project {project_id} does not exist")
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM releases WHERE project_id = $1 ORDER BY number DESC",
            uuid_of(project_id),
        )
    return [_row(r, sealer) for r in rows]


async def placed_on(pool: Pool, project_id: str, host: str) -> bool:
    async with transaction(pool) as conn:
        placed = await conn.fetchval("SELECT host FROM projects WHERE id = $1", uuid_of(project_id))
    return bool(placed == host)


def pending(current: Mapping[str, str], released: Mapping[str, str]) -> tuple[str, ...]:
    """Variable names whose value the running release lacks or holds differently."""
    names = set(current) | set(released)
    return tuple(sorted(n for n in names if current.get(n) != released.get(n)))
