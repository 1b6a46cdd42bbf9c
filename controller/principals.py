"""Who is calling: a bearer token resolved to a principal, and the tokens kept in the DB.

    operator   the operator token (config): everything but the agent routes
    project    a project token (DB): its own project's routes, nothing else
    metrics    the metrics token (config): GET /metrics only
    agent      an agent token (DB, or the bootstrap file): the agent routes, for its host

Project and agent tokens are made here and shown once; only their sha256 digests are
stored (tokens.py), so they take effect (and stop) at once, without a restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from msgspec import Struct

from controller import tokens
from controller.config import HttpConfig
from controller.db import Pool, transaction
from controller.errors import NotFound
from controller.store_rows import hex_of, new_id, uuid_of

Kind = Literal["operator", "project", "metrics", "agent"]


class Principal(Struct, frozen=True):
    kind: Kind
    project_id: str | None = None  # for kind "project"
    host: str | None = None  # for kind "agent"


class TokenRow(Struct, frozen=True):
    id: str
    owner: str  # the project id or the host name
    name: str
    created_at: datetime


async def resolve(pool: Pool, http: HttpConfig, token: str) -> Principal | None:
    """The principal a bearer token stands for, or None for an unknown token."""
    if not token:
        return None
    found = tokens.digest(token)
    if http.operator.matches(found):
        return Principal("operator")
    if http.metrics is not None and http.metrics.matches(found):
        return Principal("metrics")
    if token.startswith(tokens.PROJECT_PREFIX):
        async with transaction(pool) as conn:
            project = await conn.fetchval(
                "SELECT project_id FROM project_tokens WHERE token_sha256 = $1", found
            )
        return Principal("project", project_id=hex_of(project)) if project else None
    if http.agent_tokens is not None:
        host = http.agent_tokens.host_of(found)
        if host is not None:
            return Principal("agent", host=host)
    async with transaction(pool) as conn:
        host = await conn.fetchval("SELECT host FROM agent_tokens WHERE token_sha256 = $1", found)
    return Principal("agent", host=host) if host else None


def _row(r: Mapping[str, Any], owner: str) -> TokenRow:
    return TokenRow(id=hex_of(r["id"]), owner=owner, name=r["name"], created_at=r["created_at"])


# --- project tokens ---------------------------------------------------------------------


async def create_project_token(pool: Pool, project_id: str, name: str) -> tuple[TokenRow, str]:
    token = tokens.new_token(tokens.PROJECT_PREFIX)
    async with transaction(pool) as conn:
        row = await conn.fetchrow(
            """INSERT INTO project_tokens (id, project_id, name, token_sha256)
            SELECT $1, p.id, $3, $4 FROM projects p WHERE p.id = $2
            RETURNING id, name, created_at""",
            uuid_of(new_id()),
            uuid_of(project_id),
            name,
            tokens.digest(token),
        )
    if row is None:
        raise NotFound(f"project {project_id} does not exist")
    return _row(row, project_id), token


async def list_project_tokens(pool: Pool, project_id: str) -> list[TokenRow]:
    async with transaction(pool) as conn:
        if not await conn.fetchval("SELECT true FROM projects WHERE id = $1", uuid_of(project_id)):
            raise NotFound(f"project {project_id} does not exist")
        rows = await conn.fetch(
            """SELECT id, name, created_at FROM project_tokens WHERE project_id = $1
            ORDER BY created_at, id""",
            uuid_of(project_id),
        )
    return [_row(r, project_id) for r in rows]


async def revoke_project_token(pool: Pool, project_id: str, token_id: str) -> None:
    async with transaction(pool) as conn:
        deleted = await conn.fetchval(
            "DELETE FROM project_tokens WHERE id = $1 AND project_id = $2 RETURNING true",
            uuid_of(token_id),
            uuid_of(project_id),
        )
    if not deleted:
        raise NotFound(f"token {token_id} does not exist in project {project_id}")


# --- agent tokens -----------------------------------------------------------------------


async def create_agent_token(pool: Pool, host: str, name: str) -> tuple[TokenRow, str]:
    token = tokens.new_token(tokens.AGENT_PREFIX)
    async with transaction(pool) as conn:
        row = await conn.fetchrow(
            """INSERT INTO agent_tokens (id, host, name, token_sha256) VALUES ($1, $2, $3, $4)
            RETURNING id, name, created_at""",
            uuid_of(new_id()),
            host,
            name,
            tokens.digest(token),
        )
    return _row(row, host), token


async def list_agent_tokens(pool: Pool, host: str) -> list[TokenRow]:
    async with transaction(pool) as conn:
        rows = await conn.fetch(
            "SELECT id, name, created_at FROM agent_tokens WHERE host = $1 ORDER BY created_at, id",
            host,
        )
    return [_row(r, host) for r in rows]


async def revoke_agent_token(pool: Pool, host: str, token_id: str) -> None:
    async with transaction(pool) as conn:
        deleted = await conn.fetchval(
            "DELETE FROM agent_tokens WHERE id = $1 AND host = $2 RETURNING true",
            uuid_of(token_id),
            host,
        )
    if not deleted:
        raise NotFound(f"agent token {token_id} does not exist for host {host}")
