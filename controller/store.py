"""SQL queries behind the HTTP API: projects, add-ons, jobs, hosts.

Functions take the pool, run in `db.transaction` and return row structs (store_rows.py). Rules
that must hold under concurrency live here, in SQL: the plan limit (project row locked
`FOR UPDATE`), serialised placement, and "an agent only reads what is placed on it".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from controller import request_bodies, variables
from controller.db import Connection, Pool, transaction
from controller.env import Credentials, variable_name
from controller.errors import (
    Conflict,
    DeletionProtected,
    NoHostAvailable,
    NotFound,
    PlanChangeRefused,
    PlanLimitReached,
    TooManyPendingJobs,
)
from controller.plans import Plan, Plans
from controller.sealing import Sealer
from controller.store_rows import (
    AddonRow,
    HostRow,
    JobRow,
    ProjectRow,
    Secret,
    addon_status,
    hex_of,
    new_id,
    uuid_of,
)
from schemas import storage
from schemas.credentials import login_role
from schemas.messages import AddonKind

# Postgres role and database created inside every Postgres add-on.
ADDON_DATABASE = "app"
ADDON_USER = "app"


# --- projects -------------------------------------------------------------------------

_PROJECT_COLUMNS = "p.id, p.name, p.plan, p.host, p.created_at, p.deleted_at"
MIB = 1024 * 1024


def _project(r: Mapping[str, Any]) -> ProjectRow:
    return ProjectRow(
        id=hex_of(r["id"]),
        name=r["name"],
        plan=r["plan"],
        host=r["host"],
        created_at=r["created_at"],
        deleted_at=r["deleted_at"],
    )


async def create_project(pool: Pool, name: str, plan: str, offline_after_s: float) -> ProjectRow:
    """Place a new project on the online host with fewest projects, then most memory: the
    least of what the host reports and the operator's ceiling for it (`host_ceilings`)."""
    try:
        async with transaction(pool) as conn:
            # Serialise placements so "fewest projects" counts the ones being placed now.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('orkestr.placement'))")
            row = await conn.fetchrow(
                f"""
                WITH chosen AS (
                    SELECT h.name FROM hosts h
                    LEFT JOIN host_ceilings c ON c.name = h.name
                    WHERE h.online AND h.last_seen > now() - make_interval(secs => $4)
                    ORDER BY (SELECT count(*) FROM projects q WHERE q.host = h.name),
                             least(h.capacity_memory_mb, c.memory_mb) DESC, h.name
                    LIMIT 1
                )
                INSERT INTO projects AS p (id, name, plan, host)
                SELECT $1, $2, $3, chosen.name FROM chosen
                RETURNING {_PROJECT_COLUMNS}
                """,
                uuid_of(new_id()),
                name,
                plan,
                offline_after_s,
            )
    except Conflict:
        raise Conflict(f"a project named {name!r} already exists") from None
    if row is None:
        raise NoHostAvailable("no host is online to place the project on; try again later")
    return _project(row)


async def get_project(pool: Pool, project_id: str) -> ProjectRow:
    async with transaction(pool) as conn:
        row = await conn.fetchrow(
            f"SELECT {_PROJECT_COLUMNS} FROM projects p WHERE p.id = $1", uuid_of(project_id)
        )
    if row is None:
        raise NotFound(f"project {project_id} does not exist")
    return _project(row)


async def list_projects(pool: Pool, only: str | None = None) -> list[ProjectRow]:
    """Every project, or with `only` that project alone (what a project token sees)."""
    async with transaction(pool) as conn:
        rows = await conn.fetch(
            f"""SELECT {_PROJECT_COLUMNS} FROM projects p
            WHERE $1::uuid IS NULL OR p.id = $1 ORDER BY created_at, id""",
            uuid_of(only) if only is not None else None,
        )
    return [_project(r) for r in rows]


async def change_plan(pool: Pool, project_id: str, plan_name: str, plans: Plans) -> ProjectRow:
    """Move a project to another plan, unless its add-ons would not fit the new one.

    The project row is locked, so no add-on is created meanwhile; a refused change
    leaves everything as it was.
    """
    async with transaction(pool) as conn:
        project = await _lock_project(conn, project_id, for_change=True)
        plan = plans[plan_name]
        rows = await conn.fetch(
            """SELECT a.name, a.kind, a.deleted_at IS NOT NULL AS deleted,
                (a.status->>'usage_bytes')::bigint AS usage,
                EXISTS (SELECT 1 FROM backup_schedules s
                        WHERE s.addon_id = a.id AND s.enabled) AS scheduled
            FROM addons a WHERE a.project_id = $1 ORDER BY a.created_at, a.id""",
            project["id"],
        )
        live = [r for r in rows if not r["deleted"]]
        # ->> and a cast: a status's "usage_bytes": null (not measured yet, a sleeping
        # add-on after an agent restart) is SQL NULL, not the text 'null' int() refused.
        usages = {r["name"]: int(r["usage"]) for r in live if r["usage"] is not None}
        kinds = {r["name"]: str(r["kind"]) for r in live}
        scheduled = [r["name"] for r in live if r["scheduled"]]
        problems = plan_change_problems(
            plan_name, plan, len(rows), usages, kinds, scheduled=scheduled
        )
        if problems:
            raise PlanChangeRefused(
                f"cannot move project to plan {plan_name!r}: " + "; ".join(problems)
            )
        row = await conn.fetchrow(
            f"UPDATE projects p SET plan = $2 WHERE id = $1 RETURNING {_PROJECT_COLUMNS}",
            project["id"],
            plan_name,
        )
    return _project(row)


def plan_change_problems(
    plan_name: str,
    plan: Plan,
    addon_count: int,
    usage_bytes: Mapping[str, int],
    kinds: Mapping[str, str] | None = None,
    *,
    scheduled: Sequence[str] = (),
) -> list[str]:
    """What keeps a project from a plan: too many add-ons, add-ons over their quota under
    it (a Redis's is also capped by the plan's memory), automatic backups (`scheduled`:
    the add-ons with them on) the plan would not make. `kinds`: name -> kind, Postgres
    when left out."""
    problems: list[str] = []
    if addon_count > plan.max_addons:
        problems.append(
            f"plan {plan_name!r} allows {plan.max_addons} add-on(s) and the project has "
            f"{addon_count} (delete some first)"
        )
    for name, used in sorted(usage_bytes.items()):
        kind = (kinds or {}).get(name, "postgres")
        quota = storage.quota_bytes(kind, plan.storage_mb, plan.memory_mb)
        if quota is None or used <= quota:
            continue
        if plan.storage_mb is not None and quota == plan.storage_mb * MIB:
            limit = f"allows {plan.storage_mb} MB per add-on and add-on {name!r}"
        else:  # a Redis's memory is the tighter limit
            limit = (
                f"allows {quota / MIB:g} MB to Redis add-on {name!r} "
                f"({storage.REDIS_MEMORY_SHARE * 100:g} % of its {plan.memory_mb} MB memory) "
                "and it"
            )
        problems.append(
            f"plan {plan_name!r} {limit} uses {used / MIB:.1f} MB (free some space first)"
        )
    if plan.backup_retention_days == 0:
        # The scheduler makes none on such a plan: left on, the schedule would say
        # "daily at ..." and never run.
        problems += [
            f"plan {plan_name!r} makes no automatic backups and add-on {name!r} has them on "
            "(turn them off first)"
            for name in sorted(scheduled)
        ]
    return problems


async def delete_project(pool: Pool, project_id: str) -> tuple[ProjectRow, bool]:
    """Start deleting a project: tombstone its add-ons and cancel its pending jobs.

    Refused while an add-on is protected. The project's rows go once its host confirms
    that every add-on is gone (`purge_deleted_projects`), at once if it has none; returns
    the project and whether its rows are already gone.
    """
    async with transaction(pool) as conn:
        project = await _lock_project(conn, project_id)
        # FOR UPDATE: a PATCH turning protection on holds the add-on's row; wait for it
        # and read its outcome, not the value from before it (which would delete an
        # add-on its owner was just told is protected).
        live = await conn.fetch(
            """SELECT name, deletion_protection FROM addons
            WHERE project_id = $1 AND deleted_at IS NULL ORDER BY id FOR UPDATE""",
            project["id"],
        )
        protected = sorted(r["name"] for r in live if r["deletion_protection"])
        if protected:
            raise DeletionProtected(
                f"add-on(s) {', '.join(map(repr, protected))} are protected against deletion; "
                "clear deletion_protection first (PATCH the add-on)"
            )
        row = await conn.fetchrow(
            f"""UPDATE projects p SET deleted_at = coalesce(deleted_at, now()) WHERE id = $1
            RETURNING {_PROJECT_COLUMNS}""",
            project["id"],
        )
        await conn.execute(
            "UPDATE addons SET deleted_at = now() WHERE project_id = $1 AND deleted_at IS NULL",
            project["id"],
        )
        await conn.execute(
            """UPDATE jobs SET state = 'cancelled', finished_at = clock_timestamp(),
                error = 'project deleted' WHERE project_id = $1 AND state = 'pending'""",
            project["id"],
        )
        # Backups not started yet never will be; their rows go with the add-ons, and the
        # agent removes the files already made (agent/deleted_backups.py).
        await conn.execute(
            """UPDATE backup_restores SET state = 'failed', finished_at = clock_timestamp(),
                error = 'project deleted' WHERE state = 'pending'
                AND addon_id IN (SELECT id FROM addons WHERE project_id = $1)""",
            project["id"],
        )
        await conn.execute(
            """UPDATE backups SET state = 'failed', finished_at = clock_timestamp(),
                error = 'project deleted', verify_requested = false
            WHERE project_id = $1 AND state = 'pending'""",
            project["id"],
        )
        await conn.execute(
            "UPDATE backups SET verify_requested = false WHERE project_id = $1",
            project["id"],
        )
        gone = bool(await purge_deleted_projects(conn, project["host"], project["id"]))
    return _project(row), gone


async def purge_deleted_projects(conn: Connection, host: str, only: Any | None = None) -> list[str]:
    """Delete the rows of deleted projects on `host` whose add-ons are all gone."""
    rows = await conn.fetch(
        """SELECT p.id FROM projects p WHERE p.host = $1 AND p.deleted_at IS NOT NULL
          AND ($2::uuid IS NULL OR p.id = $2)
          AND NOT EXISTS (SELECT 1 FROM addons a WHERE a.project_id = p.id)
        FOR UPDATE""",
        host,
        only,
    )
    ids = [r["id"] for r in rows]
    if ids:
        for table in ("project_tokens", "jobs"):
            await conn.execute(f"DELETE FROM {table} WHERE project_id = ANY($1::uuid[])", ids)
        await conn.execute("DELETE FROM projects WHERE id = ANY($1::uuid[])", ids)
    return [hex_of(i) for i in ids]


async def plans_outgrown(pool: Pool, plans: Plans) -> list[str]:
    """What live add-ons hold past their project's plan as the plans file now defines it
    (data over a quota or a Redis's memory, automatic backups on a plan that makes none):
    what a PATCH to that plan would refuse, brought about by an edit of the file. Too many
    add-ons is left out: it only stops new ones."""
    async with transaction(pool) as conn:
        rows = await conn.fetch(
            """SELECT p.name AS project, p.plan, a.name, a.kind,
                (a.status->>'usage_bytes')::bigint AS usage,
                EXISTS (SELECT 1 FROM backup_schedules s
                        WHERE s.addon_id = a.id AND s.enabled) AS scheduled
            FROM addons a JOIN projects p ON p.id = a.project_id
            WHERE a.deleted_at IS NULL AND p.deleted_at IS NULL
            ORDER BY p.name, a.created_at, a.id"""
        )
    by_project: dict[str, list[Any]] = {}
    for r in rows:
        by_project.setdefault(r["project"], []).append(r)
    found: list[str] = []
    for project, mine in by_project.items():
        plan_name = str(mine[0]["plan"])
        if plan_name not in plans:
            continue  # the caller's check of plans in use names it
        problems = plan_change_problems(
            plan_name,
            plans[plan_name],
            0,
            {r["name"]: int(r["usage"]) for r in mine if r["usage"] is not None},
            {r["name"]: str(r["kind"]) for r in mine},
            scheduled=[r["name"] for r in mine if r["scheduled"]],
        )
        found += [f"project {project!r}: {problem}" for problem in problems]
    return found


async def plans_in_use(pool: Pool) -> set[str]:
    async with transaction(pool) as conn:
        return {r["plan"] for r in await conn.fetch("SELECT DISTINCT plan FROM projects")}


# --- add-ons --------------------------------------------------------------------------

_ADDON_COLUMNS = """
    a.id, a.project_id, p.plan, p.host, a.name, a.kind, a.secret_version, a.created_at,
    a.deleted_at, a.status::text AS status, a.observed_generation, a.env_name, a.promoted_at,
    a.deletion_protection, a.rotated_at
"""


def _addon(r: Mapping[str, Any]) -> AddonRow:
    return AddonRow(
        id=hex_of(r["id"]),
        project_id=hex_of(r["project_id"]),
        plan=r["plan"],
        host=r["host"],
        name=r["name"],
        kind=r["kind"],
        secret_version=r["secret_version"],
        created_at=r["created_at"],
        deleted_at=r["deleted_at"],
        status=addon_status(r["status"]),
        observed_generation=r["observed_generation"],
        env_name=r["env_name"],
        promoted_at=r["promoted_at"],
        deletion_protection=r["deletion_protection"],
        rotated_at=r["rotated_at"],
    )


async def _lock_project(
    conn: Connection, project_id: str, for_change: bool = False
) -> Mapping[str, Any]:
    """Lock a project's row; with `for_change`, refuse one that is being deleted."""
    row = await conn.fetchrow(
        "SELECT id, plan, host, deleted_at FROM projects WHERE id = $1 FOR UPDATE",
        uuid_of(project_id),
    )
    if row is None:
        raise NotFound(f"project {project_id} does not exist")
    if for_change and row["deleted_at"] is not None:
        raise _ProjectDeleting(f"project {project_id} is being deleted")
    result: Mapping[str, Any] = row
    return result


class _AddressTaken(Conflict):
    """A name another container of the project answers to on its network."""


class _VariableShared(Conflict):
    """An add-on whose variable is a name a group share gives the project."""


class _ProjectDeleting(Conflict):
    """A change refused because the project is being deleted (not a name clash)."""


# An app of the newest release by that name: apps and add-ons share the project network's
# names, and one name with two addresses sends clients to either (controller/releases.py).
_APP_NAMED = """SELECT true FROM releases r, jsonb_array_elements(r.apps) app
WHERE r.project_id = $1 AND app->>'name' = $2
  AND r.number = (SELECT max(number) FROM releases WHERE project_id = $1)"""


async def create_addon(
    pool: Pool,
    project_id: str,
    addon_id: str,
    name: str,
    kind: AddonKind,
    plans: Mapping[str, Plan],
    password_sealed: bytes,
    deletion_protection: bool = False,
) -> AddonRow:
    """Insert an add-on unless the project's plan limit is reached.

    The project row is locked for the rest of the transaction, so concurrent creates for
    one project count one after another. Tombstoned add-ons count until their host
    confirms removal: their container and volume still use the host's resources.
    """
    try:
        async with transaction(pool) as conn:
            project = await _lock_project(conn, project_id, for_change=True)
            plan = plans[project["plan"]]
            used = await conn.fetchval(
                "SELECT count(*) FROM addons WHERE project_id = $1", project["id"]
            )
            if used >= plan.max_addons:
                deleting = await conn.fetchval(
                    "SELECT count(*) FROM addons WHERE project_id = $1 AND deleted_at IS NOT NULL",
                    project["id"],
                )
                note = f" ({deleting} still being deleted)" if deleting else ""
                raise PlanLimitReached(
                    f"plan {project['plan']!r} allows {plan.max_addons} add-on(s) per project; "
                    f"this project has {used}{note}"
                )
            app = await conn.fetchval(_APP_NAMED, project["id"], name)
            if app:
                raise _AddressTaken(
                    f"an app of the project's current release is named {name!r}: on the "
                    "project network that name is the app's address; deploy the app under "
                    "another name, or give the add-on another"
                )
            try:
                # Its own add-on would win the clash (controller/env.py) and cut a share of
                # that name off from the project without a word.
                await variables.refuse_shared_names(conn, project_id, [variable_name(name)])
            except Conflict as exc:
                raise _VariableShared(str(exc)) from None
            row = await conn.fetchrow(
                f"""
                WITH a AS (
                    INSERT INTO addons
                        (id, project_id, name, kind, database, "user", password_sealed,
                         deletion_protection)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                    RETURNING *
                )
                SELECT {_ADDON_COLUMNS} FROM a JOIN projects p ON p.id = a.project_id
                """,
                uuid_of(addon_id),
                project["id"],
                name,
                kind,
                ADDON_DATABASE,
                ADDON_USER,
                password_sealed,
                deletion_protection,
            )
    except (_AddressTaken, _ProjectDeleting, _VariableShared):
        raise
    except Conflict:  # the unique index on a live add-on's name
        raise Conflict(f"an add-on named {name!r} already exists in this project") from None
    return _addon(row)


async def list_addons(pool: Pool, project_id: str) -> list[AddonRow]:
    async with transaction(pool) as conn:
        if not await conn.fetchval("SELECT true FROM projects WHERE id = $1", uuid_of(project_id)):
            raise NotFound(f"project {project_id} does not exist")
        rows = await conn.fetch(
            f"""SELECT {_ADDON_COLUMNS} FROM addons a JOIN projects p ON p.id = a.project_id
            WHERE a.project_id = $1 ORDER BY a.created_at, a.id""",
            uuid_of(project_id),
        )
    return [_addon(r) for r in rows]


async def get_addon(pool: Pool, project_id: str, addon_id: str) -> AddonRow:
    async with transaction(pool) as conn:
        row = await conn.fetchrow(
            f"""SELECT {_ADDON_COLUMNS} FROM addons a JOIN projects p ON p.id = a.project_id
            WHERE a.id = $1 AND a.project_id = $2""",
            uuid_of(addon_id),
            uuid_of(project_id),
        )
    if row is None:
        raise NotFound(f"add-on {addon_id} does not exist in project {project_id}")
    return _addon(row)


async def tombstone_addon(pool: Pool, project_id: str, addon_id: str) -> AddonRow:
    """Mark an add-on deleted (idempotent); the row goes when its host confirms removal."""
    async with transaction(pool) as conn:
        if await conn.fetchval(  # FOR UPDATE: see delete_project
            """SELECT deletion_protection FROM addons
            WHERE id = $1 AND project_id = $2 AND deleted_at IS NULL FOR UPDATE""",
            uuid_of(addon_id),
            uuid_of(project_id),
        ):
            raise DeletionProtected(
                f"add-on {addon_id} is protected against deletion; "
                "clear deletion_protection first (PATCH the add-on)"
            )
        await conn.execute(
            "UPDATE addons SET deleted_at = now() "
            "WHERE id = $1 AND project_id = $2 AND deleted_at IS NULL",
            uuid_of(addon_id),
            uuid_of(project_id),
        )
    return await get_addon(pool, project_id, addon_id)


async def set_deletion_protection(
    pool: Pool, project_id: str, addon_id: str, protected: bool
) -> AddonRow:
    async with transaction(pool) as conn:
        changed = await conn.fetchval(
            """UPDATE addons SET deletion_protection = $3
            WHERE id = $1 AND project_id = $2 AND deleted_at IS NULL RETURNING true""",
            uuid_of(addon_id),
            uuid_of(project_id),
            protected,
        )
    if not changed:
        addon = await get_addon(pool, project_id, addon_id)  # NotFound if missing
        raise Conflict(f"add-on {addon.id} is being deleted")
    return await get_addon(pool, project_id, addon_id)


async def rotate_password(
    pool: Pool, project_id: str, addon_id: str, password_sealed: bytes
) -> AddonRow:
    """A new password and secret_version; the agent applies it, the previous one keeps
    working for the controller's grace period."""
    async with transaction(pool) as conn:
        changed = await conn.fetchval(
            """UPDATE addons SET password_sealed = $3, secret_version = secret_version + 1,
                rotated_at = clock_timestamp()
            WHERE id = $1 AND project_id = $2 AND deleted_at IS NULL RETURNING true""",
            uuid_of(addon_id),
            uuid_of(project_id),
            password_sealed,
        )
    if not changed:
        addon = await get_addon(pool, project_id, addon_id)
        raise Conflict(f"add-on {addon.id} is being deleted")
    return await get_addon(pool, project_id, addon_id)


async def credentials(
    pool: Pool, sealer: Sealer, project_id: str, host: str | None = None
) -> list[Credentials]:
    """The live add-ons' connection details; with `host`, only if placed on that host."""
    async with transaction(pool) as conn:
        placed = await conn.fetchval("SELECT host FROM projects WHERE id = $1", uuid_of(project_id))
        if placed is None or (host is not None and placed != host):
            raise NotFound(
                f"project {project_id} does not exist" + (f" on host {host}" if host else "")
            )
        rows = await conn.fetch(
            """SELECT id, name, kind, database, "user", secret_version, password_sealed,
                created_at, env_name, promoted_at
            FROM addons WHERE project_id = $1 AND deleted_at IS NULL""",
            uuid_of(project_id),
        )
    return [
        Credentials(
            id=hex_of(r["id"]),
            name=r["name"],
            kind=r["kind"],
            database=r["database"],
            user=login_role(r["user"], r["secret_version"]),
            password=sealer.open(r["password_sealed"], hex_of(r["id"]).encode()),
            created_at=r["created_at"],
            env_name=r["env_name"],
            promoted_at=r["promoted_at"],
        )
        for r in rows
    ]


async def addon_secret(
    pool: Pool, sealer: Sealer, host: str, addon_id: str, grace_s: float = 0.0
) -> Secret:
    """An add-on's password, only for the host its project is placed on, and until when
    the password before the last rotation keeps working.

    Tombstoned add-ons still answer until purged: an agent may be mid-provision.
    """
    async with transaction(pool) as conn:
        row = await conn.fetchrow(
            """SELECT a.password_sealed, a.secret_version,
                a.rotated_at + make_interval(secs => $3) AS valid_until FROM addons a
            JOIN projects p ON p.id = a.project_id WHERE a.id = $1 AND p.host = $2""",
            uuid_of(addon_id),
            host,
            grace_s,
        )
    if row is None:
        raise NotFound(f"add-on {addon_id} is not placed on host {host}")
    password = sealer.open(row["password_sealed"], addon_id.encode())
    return Secret(
        password=password,
        secret_version=row["secret_version"],
        previous_valid_until=row["valid_until"],
    )


async def seal_plaintext_passwords(pool: Pool, sealer: Sealer) -> int:
    """Seal the passwords an older controller stored in plaintext; returns how many."""
    async with transaction(pool) as conn:
        rows = await conn.fetch(
            "SELECT id, password FROM addons WHERE password IS NOT NULL FOR UPDATE"
        )
        for r in rows:
            await conn.execute(
                "UPDATE addons SET password_sealed = $2, password = NULL WHERE id = $1",
                r["id"],
                sealer.seal(r["password"], hex_of(r["id"]).encode()),
            )
    return len(rows)


# --- jobs -----------------------------------------------------------------------------

_JOB_COLUMNS = """id, project_id, image, command, timeout_s, state, exit_code, output, error,
    created_at, started_at, finished_at"""


def _job(r: Mapping[str, Any]) -> JobRow:
    return JobRow(
        id=hex_of(r["id"]),
        project_id=hex_of(r["project_id"]),
        image=r["image"],
        command=tuple(r["command"]),
        timeout_s=r["timeout_s"],
        state=r["state"],
        exit_code=r["exit_code"],
        output=r["output"],
        error=r["error"],
        created_at=r["created_at"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
    )


async def create_job(
    pool: Pool,
    project_id: str,
    image: str,
    command: Sequence[str],
    timeout_s: float,
    spec_bytes: int,
) -> tuple[JobRow, str]:
    """A pending job and the host to run it, within the pending-job budgets (request_bodies.py)
    of its project and of its host, so no tenant can grow a host's desired state past
    what the agent accepts."""
    async with transaction(pool) as conn:
        project = await _lock_project(conn, project_id, for_change=True)
        # Serialise job creation per host, so the host's budget is counted exactly.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('orkestr.jobs.' || $1))", project["host"]
        )
        used = await conn.fetchrow(
            """SELECT count(*) FILTER (WHERE j.project_id = $1) AS pending,
                coalesce(sum(j.spec_bytes) FILTER (WHERE j.project_id = $1), 0) AS project_bytes,
                coalesce(sum(j.spec_bytes), 0) AS host_bytes
            FROM jobs j JOIN projects p ON p.id = j.project_id
            WHERE p.host = $2 AND j.state = 'pending'""",
            project["id"],
            project["host"],
        )
        _check_job_budgets(used["pending"], used["project_bytes"], used["host_bytes"], spec_bytes)
        row = await conn.fetchrow(
            f"""INSERT INTO jobs (id, project_id, image, command, timeout_s, spec_bytes)
            VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_JOB_COLUMNS}""",
            uuid_of(new_id()),
            project["id"],
            image,
            list(command),
            timeout_s,
            spec_bytes,
        )
    return _job(row), project["host"]


def _check_job_budgets(pending: int, project_bytes: int, host_bytes: int, size: int) -> None:
    if pending >= request_bodies.MAX_PENDING_JOBS:
        raise TooManyPendingJobs(
            f"this project already has {pending} pending jobs (at most "
            f"{request_bodies.MAX_PENDING_JOBS}); wait for one to finish or cancel one"
        )
    if project_bytes + size > request_bodies.MAX_PROJECT_JOB_BYTES:
        raise TooManyPendingJobs(
            f"this job needs {size} bytes and the project's pending jobs hold {project_bytes}; "
            f"at most {request_bodies.MAX_PROJECT_JOB_BYTES} bytes of pending jobs per project: "
            "wait for one to finish or cancel one"
        )
    if host_bytes + size > request_bodies.MAX_HOST_JOB_BYTES:
        raise TooManyPendingJobs(
            f"this job needs {size} bytes and the pending jobs on this project's host hold "
            f"{host_bytes}; at most {request_bodies.MAX_HOST_JOB_BYTES} bytes per host: retry later"
        )


async def list_jobs(pool: Pool, project_id: str, limit: int, offset: int = 0) -> list[JobRow]:
    """The project's newest jobs first, `limit` of them after skipping `offset`."""
    async with transaction(pool) as conn:
        if not await conn.fetchval("SELECT true FROM projects WHERE id = $1", uuid_of(project_id)):
            raise NotFound(f"project {project_id} does not exist")
        rows = await conn.fetch(
            f"""SELECT {_JOB_COLUMNS} FROM jobs WHERE project_id = $1
            ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3""",
            uuid_of(project_id),
            limit,
            offset,
        )
    return [_job(r) for r in rows]


async def cancel_job(pool: Pool, project_id: str, job_id: str) -> tuple[JobRow, str, bool]:
    """Cancel a pending job: (the job, its host, whether this call cancelled it)."""
    async with transaction(pool) as conn:
        changed = await conn.fetchval(
            """UPDATE jobs SET state = 'cancelled', finished_at = clock_timestamp(),
                error = 'cancelled by the API'
            WHERE id = $1 AND project_id = $2 AND state = 'pending' RETURNING true""",
            uuid_of(job_id),
            uuid_of(project_id),
        )
        host = await conn.fetchval("SELECT host FROM projects WHERE id = $1", uuid_of(project_id))
    job = await get_job(pool, project_id, job_id)
    return job, host, bool(changed)


async def prune_jobs(pool: Pool, retention_s: float, keep_per_project: int) -> int:
    """Delete finished jobs (with their output) older than the retention, and those past
    the newest `keep_per_project` of their project; returns how many."""
    async with transaction(pool) as conn:
        deleted = await conn.fetch(
            """DELETE FROM jobs WHERE state <> 'pending'
              AND finished_at < now() - make_interval(secs => $1) RETURNING id""",
            retention_s,
        )
        over = await conn.fetch(
            """DELETE FROM jobs WHERE id IN (
                 SELECT id FROM (
                   SELECT id, row_number() OVER (
                            PARTITION BY project_id ORDER BY finished_at DESC, id) AS n
                   FROM jobs WHERE state <> 'pending') ranked
                 WHERE n > $1)
               RETURNING id""",
            keep_per_project,
        )
    return len(deleted) + len(over)


async def get_job(pool: Pool, project_id: str, job_id: str) -> JobRow:
    async with transaction(pool) as conn:
        row = await conn.fetchrow(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1 AND project_id = $2",
            uuid_of(job_id),
            uuid_of(project_id),
        )
    if row is None:
        raise NotFound(f"job {job_id} does not exist in project {project_id}")
    return _job(row)


# --- hosts -------------------------------------------------------------------------


async def list_hosts(pool: Pool, offline_after_s: float) -> list[HostRow]:
    async with transaction(pool) as conn:
        rows = await conn.fetch(
            """SELECT h.name, h.capacity_cpus, h.capacity_memory_mb, h.applied_generation,
                h.last_seen, c.cpus AS ceiling_cpus, c.memory_mb AS ceiling_memory_mb,
                h.online AND coalesce(h.last_seen > now() - make_interval(secs => $1), false)
                    AS online,
                (SELECT count(*) FROM projects p WHERE p.host = h.name) AS projects
            FROM hosts h LEFT JOIN host_ceilings c ON c.name = h.name ORDER BY h.name""",
            offline_after_s,
        )
    return [
        HostRow(
            name=r["name"],
            online=r["online"],
            capacity_cpus=r["capacity_cpus"],
            capacity_memory_mb=r["capacity_memory_mb"],
            applied_generation=r["applied_generation"],
            last_seen=r["last_seen"],
            projects=r["projects"],
            ceiling_cpus=r["ceiling_cpus"],
            ceiling_memory_mb=r["ceiling_memory_mb"],
        )
        for r in rows
    ]


async def set_host_ceiling(
    pool: Pool, host: str, cpus: float | None, memory_mb: int | None
) -> None:
    """The operator's ceiling on what `host` may claim (None: that dimension unbounded;
    both None: no ceiling). The host need not have reported yet."""
    async with transaction(pool) as conn:
        if cpus is None and memory_mb is None:
            await conn.execute("DELETE FROM host_ceilings WHERE name = $1", host)
            return
        await conn.execute(
            """INSERT INTO host_ceilings (name, cpus, memory_mb) VALUES ($1, $2, $3)
            ON CONFLICT (name) DO UPDATE SET cpus = excluded.cpus,
                memory_mb = excluded.memory_mb, updated_at = now()""",
            host,
            cpus,
            memory_mb,
        )


async def get_host_ceiling(pool: Pool, host: str) -> tuple[float | None, int | None]:
    async with transaction(pool) as conn:
        row = await conn.fetchrow("SELECT cpus, memory_mb FROM host_ceilings WHERE name = $1", host)
    return (None, None) if row is None else (row["cpus"], row["memory_mb"])


async def host_known(pool: Pool, host: str) -> bool:
    """Whether the controller has heard of `host`: it reported, or has a ceiling or an
    agent token in the database (both may come before its first report)."""
    async with transaction(pool) as conn:
        return bool(
            await conn.fetchval(
                """SELECT EXISTS (SELECT 1 FROM hosts WHERE name = $1)
                OR EXISTS (SELECT 1 FROM host_ceilings WHERE name = $1)
                OR EXISTS (SELECT 1 FROM agent_tokens WHERE host = $1)""",
                host,
            )
        )


async def host_names(pool: Pool) -> list[str]:
    async with transaction(pool) as conn:
        return [r["name"] for r in await conn.fetch("SELECT name FROM hosts ORDER BY name")]
