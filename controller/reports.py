"""Recording what agents report: host status, presence and job results.

Each function is one transaction and idempotent, because MQTT QoS 1 may deliver a message
twice. A host only ever changes rows of projects placed on it (checked in the SQL).
"""

from __future__ import annotations

import msgspec

from controller import store
from controller.db import Pool, transaction
from controller.store_rows import StatusOutcome, hex_of, json_text, scrub, uuid_of
from schemas.messages import MAX_GENERATION, AppStatus, HostStatus, JobResult, Presence

# A restored database is behind its agents by the generations published since the backup:
# thousands, not billions. A larger jump is a forged or corrupt report.
MAX_GENERATION_STEP = 2**32


async def record_host_status(pool: Pool, status: HostStatus) -> StatusOutcome | None:
    """Store a HostStatus; None for a report older than the one stored.

    The host counts as seen at the report's `sent_at` (capped at now), not at delivery:
    a retained report, or one queued at the broker while the controller was away, may be
    old and must not make a dead host look online. Clocks are assumed synchronised to well
    within `hosts.offline_after_s`.
    """
    async with transaction(pool) as conn:
        host = status.host
        # The operator's ceiling, and what the host claimed before (a row only when the
        # host has a ceiling: the common case costs an index probe).
        ceiling = await conn.fetchrow(
            """SELECT c.cpus, c.memory_mb, h.capacity_cpus AS was_cpus,
                      h.capacity_memory_mb AS was_memory_mb
            FROM host_ceilings c LEFT JOIN hosts h ON h.name = c.name WHERE c.name = $1""",
            host,
        )
        inserted = await conn.fetchval(
            """
            INSERT INTO hosts AS h (name, online, capacity_cpus, capacity_memory_mb, last_seen,
                                    applied_generation, status, status_sent_at)
            VALUES ($1, true, $2, $3, least($4, now()), $5, $6::jsonb, least($4, now()))
            ON CONFLICT (name) DO UPDATE SET
                online = true,
                capacity_cpus = excluded.capacity_cpus,
                capacity_memory_mb = excluded.capacity_memory_mb,
                last_seen = greatest(h.last_seen, excluded.last_seen),
                applied_generation = excluded.applied_generation,
                status = excluded.status,
                status_sent_at = excluded.status_sent_at
            WHERE h.status_sent_at IS NULL OR h.status_sent_at <= excluded.status_sent_at
            RETURNING (xmax = 0) AS inserted
            """,
            host,
            status.capacity.cpus,
            status.capacity.memory_mb,
            status.sent_at,
            status.applied_generation,
            json_text(
                {"sent_at": status.sent_at, "conditions": status.conditions, "apps": status.apps}
            ),
        )
        if inserted is None:
            return None  # older than what we have: out-of-order delivery
        # Generations must keep rising for the agent even if our database was restored,
        # but only by a plausible step: a forged huge generation must not exhaust the
        # sequence (every later snapshot would fail) nor push it past what agents accept.
        behind = await conn.fetchval(
            """SELECT setval('desired_generation', $1) FROM desired_generation
            WHERE $1 >= CASE WHEN is_called THEN last_value + 1 ELSE last_value END
              AND $1 <= last_value + $2 AND $1 <= $3""",
            status.applied_generation,
            MAX_GENERATION_STEP,
            MAX_GENERATION // 2,
        )
        if status.addons:
            await conn.execute(
                """
                UPDATE addons a SET status = s.status::jsonb, observed_generation = s.generation
                FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::bigint[])
                        AS s(id, project_id, status, generation),
                     projects p
                WHERE a.id = s.id AND a.project_id = s.project_id
                  AND p.id = a.project_id AND p.host = $1
                  -- A report repeats most rows unchanged (the heartbeat resends them all):
                  -- rewriting those cost a new row version and its WAL each time.
                  AND (a.status IS DISTINCT FROM s.status::jsonb
                       OR a.observed_generation IS DISTINCT FROM s.generation)
                """,
                host,
                [uuid_of(a.id) for a in status.addons],
                [uuid_of(a.project_id) for a in status.addons],
                [json_text(a) for a in status.addons],
                [a.observed_generation for a in status.addons],
            )
        purged: list[str] = []
        if status.removed:
            rows = await conn.fetch(
                """DELETE FROM addons a USING projects p
                WHERE a.id = ANY($2::uuid[]) AND a.deleted_at IS NOT NULL
                  AND p.id = a.project_id AND p.host = $1
                RETURNING a.id""",
                host,
                [uuid_of(i) for i in status.removed],
            )
            purged = [hex_of(r["id"]) for r in rows]
            # A deleted project's rows go with its last add-on.
            await store.purge_deleted_projects(conn, host)
    over = None
    if ceiling is not None:
        claimed = (status.capacity.cpus, status.capacity.memory_mb)
        was = (ceiling["was_cpus"], ceiling["was_memory_mb"])
        # Said once when a host starts claiming more (or claims a new amount), not per report.
        if claims_over(claimed, (ceiling["cpus"], ceiling["memory_mb"])) and claimed != was:
            over = (claimed, (ceiling["cpus"], ceiling["memory_mb"]))
    return StatusOutcome(
        inserted=inserted, generation_behind=behind is not None, purged=purged, over_ceiling=over
    )


def claims_over(claimed: tuple[float, int], ceiling: tuple[float | None, int | None]) -> bool:
    """Whether a host claims more CPUs or memory than the operator's ceiling allows."""
    return any(c is not None and v > c for v, c in zip(claimed, ceiling, strict=True))


async def record_presence(pool: Pool, presence: Presence) -> bool:
    """Store the agent's online flag; True if this is the first we hear of the host.

    Only a HostStatus sets last_seen: a host counts as online (and can get projects) once
    it has reported its capacity, not merely connected.
    """
    async with transaction(pool) as conn:
        inserted: bool = await conn.fetchval(
            """
            INSERT INTO hosts AS h (name, online) VALUES ($1, $2)
            ON CONFLICT (name) DO UPDATE SET online = excluded.online
            RETURNING (xmax = 0) AS inserted
            """,
            presence.host,
            presence.online,
        )
    return inserted


async def record_job_result(pool: Pool, result: JobResult) -> bool:
    """Finish a pending job of a project on the reporting host; False if nothing changed."""
    failed = result.exit_code != 0 or result.error is not None
    async with transaction(pool) as conn:
        updated = await conn.fetchval(
            """UPDATE jobs j SET state = $3, exit_code = $4, output = $5, error = $6,
                started_at = $7, finished_at = $8, output_chunks = $10
            FROM projects p
            WHERE j.id = $1 AND j.project_id = $2 AND j.state = 'pending'
              AND p.id = j.project_id AND p.host = $9
            RETURNING true""",
            uuid_of(result.job_id),
            uuid_of(result.project_id),
            "failed" if failed else "succeeded",
            result.exit_code,
            scrub(result.output),
            scrub(result.error),
            result.started_at,
            result.finished_at,
            result.host,
            result.output_chunks,
        )
    return bool(updated)


async def app_statuses(pool: Pool, project_id: str) -> dict[str, AppStatus]:
    """App id -> its last reported status, as the project's own host reported it (a host
    speaks only for the projects placed on it: another host's report is never read)."""
    async with transaction(pool) as conn:
        raw = await conn.fetchval(
            """SELECT (h.status->'apps')::text FROM projects p JOIN hosts h ON h.name = p.host
            WHERE p.id = $1""",
            uuid_of(project_id),
        )
    if not raw:
        return {}
    try:
        found = msgspec.json.decode(raw, type=list[AppStatus])
    except msgspec.ValidationError:
        return {}  # written by another schema version: no status until the next report
    return {a.id: a for a in found if a.project_id == project_id}
