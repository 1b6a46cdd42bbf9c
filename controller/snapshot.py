"""The desired state of one host, built from the database as a full snapshot.

Read in one REPEATABLE READ transaction so the snapshot is consistent, with a generation
from the `desired_generation` sequence taken in the same transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from controller.db import Pool, transaction
from controller.groups import specs_on
from controller.plans import Plan
from controller.releases import AppDef, app_id
from controller.store_rows import hex_of
from schemas.messages import (
    SCHEMA_VERSION,
    AddonSpec,
    AppSpec,
    BackupSpec,
    DesiredState,
    JobSpec,
    ProjectSpec,
)


async def desired_state(pool: Pool, host: str, plans: Mapping[str, Plan]) -> DesiredState:
    """A consistent snapshot of everything placed on `host`, with a fresh generation."""
    async with transaction(pool, isolation="repeatable_read") as conn:
        projects = await conn.fetch(
            """SELECT id, name, plan, deleted_at IS NOT NULL AS deleted FROM projects
            WHERE host = $1 ORDER BY created_at, id""",
            host,
        )
        addons = await conn.fetch(
            """SELECT a.id, a.project_id, a.name, a.kind, a.database, a."user",
                a.secret_version, a.deleted_at IS NOT NULL AS deleted
            FROM addons a JOIN projects p ON p.id = a.project_id
            WHERE p.host = $1 ORDER BY a.created_at, a.id""",
            host,
        )
        jobs = await conn.fetch(
            """SELECT j.id, j.project_id, j.image, j.command, j.timeout_s
            FROM jobs j JOIN projects p ON p.id = j.project_id
            WHERE p.host = $1 AND j.state = 'pending' ORDER BY j.created_at, j.id""",
            host,
        )
        # Open backup-store operations, oldest first: the agent runs them in this order.
        backups = await conn.fetch(
            """SELECT o.id, o.op, o.addon_id, o.backup_id, o.sha256, o.project_id FROM (
                SELECT b.id, 'backup' AS op, b.addon_id, b.id AS backup_id, NULL AS sha256,
                       b.project_id, b.created_at
                FROM backups b WHERE b.state = 'pending'
                UNION ALL
                SELECT b.id, 'verify', b.addon_id, b.id, b.sha256, b.project_id, b.created_at
                FROM backups b WHERE b.verify_requested AND b.state = 'succeeded'
                UNION ALL
                SELECT b.id, 'delete', b.addon_id, b.id, NULL, b.project_id, b.created_at
                FROM backups b WHERE b.state = 'deleting'
                UNION ALL
                SELECT r.id, 'restore', r.addon_id, r.backup_id, b.sha256, b.project_id,
                       r.created_at
                FROM backup_restores r JOIN backups b ON b.id = r.backup_id
                WHERE r.state = 'pending'
            ) o JOIN projects p ON p.id = o.project_id
            WHERE p.host = $1 ORDER BY o.created_at, o.id""",
            host,
        )
        # Each project's newest release: its apps are what the host runs.
        released = await conn.fetch(
            """SELECT DISTINCT ON (r.project_id) r.project_id, r.number, r.apps::text AS apps
            FROM releases r JOIN projects p ON p.id = r.project_id
            WHERE p.host = $1 ORDER BY r.project_id, r.number DESC""",
            host,
        )
        groups = await specs_on(conn, host)
        generation = await conn.fetchval("SELECT nextval('desired_generation')")
    plan_of = {r["id"]: plans[r["plan"]] for r in projects}
    plan_name = {r["id"]: r["plan"] for r in projects}
    addons_of = _by_project(addons)
    jobs_of = _by_project(jobs)
    backups_of = _by_project(backups)
    apps_of = {
        r["project_id"]: (r["number"], msgspec.json.decode(r["apps"], type=tuple[AppDef, ...]))
        for r in released
    }
    return DesiredState(
        version=SCHEMA_VERSION,
        host=host,
        generation=generation,
        projects=tuple(
            ProjectSpec(
                id=hex_of(p["id"]),
                name=p["name"],
                addons=tuple(
                    _addon_spec(a, plan_name[p["id"]], plan_of[p["id"]])
                    for a in addons_of.get(p["id"], ())
                ),
                jobs=tuple(
                    JobSpec(
                        id=hex_of(j["id"]),
                        image=j["image"],
                        command=tuple(j["command"]),
                        timeout_s=j["timeout_s"],
                        resources=plan_of[p["id"]].resources,
                    )
                    for j in jobs_of.get(p["id"], ())
                ),
                backups=tuple(
                    BackupSpec(
                        id=hex_of(b["id"]),
                        op=b["op"],
                        addon_id=hex_of(b["addon_id"]),
                        backup_id=hex_of(b["backup_id"]),
                        sha256=b["sha256"],
                    )
                    for b in backups_of.get(p["id"], ())
                ),
                apps=tuple(
                    AppSpec(
                        id=app_id(hex_of(p["id"]), a.name),
                        name=a.name,
                        image=a.image,
                        command=a.command,
                        release=apps_of[p["id"]][0],
                        resources=plan_of[p["id"]].resources,
                    )
                    # A project being deleted runs no apps: they leave before its network.
                    for a in apps_of.get(p["id"], (0, ()))[1]
                    if not p["deleted"]
                ),
                deleted=p["deleted"],
            )
            for p in projects
        ),
        groups=groups,
    )


def _by_project(rows: Iterable[Mapping[str, Any]]) -> dict[uuid.UUID, list[Mapping[str, Any]]]:
    grouped: dict[uuid.UUID, list[Mapping[str, Any]]] = {}
    for r in rows:
        grouped.setdefault(r["project_id"], []).append(r)
    return grouped


def _addon_spec(r: Mapping[str, Any], plan_name: str, plan: Plan) -> AddonSpec:
    return AddonSpec(
        id=hex_of(r["id"]),
        name=r["name"],
        kind=r["kind"],
        resources=plan.resources,
        database=r["database"],
        user=r["user"],
        sleep=plan.sleep,
        secret_version=r["secret_version"],
        deleted=r["deleted"],
        plan=plan_name,
        storage_mb=plan.storage_mb,
    )
