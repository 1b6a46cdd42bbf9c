"""Rows: what the store returns, as frozen structs with ids in wire form (32-char hex).

Also the small conversions every query module shares: ids between hex and uuid, and the
NUL scrubbing PostgreSQL needs for text that came from an agent.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

import msgspec
from msgspec import Struct

from schemas.messages import AddonKind, AddonStatus

JobState = Literal["pending", "succeeded", "failed", "cancelled"]


class HostRow(Struct, frozen=True):
    name: str
    online: bool  # effective: the agent says so and was seen within offline_after_s
    capacity_cpus: float
    capacity_memory_mb: int
    applied_generation: int
    last_seen: datetime | None
    projects: int
    # The operator's ceiling (host_ceilings); None: none on that dimension.
    ceiling_cpus: float | None = None
    ceiling_memory_mb: int | None = None


class ProjectRow(Struct, frozen=True):
    id: str
    name: str
    plan: str
    host: str
    created_at: datetime
    deleted_at: datetime | None = None


class AddonRow(Struct, frozen=True):
    id: str
    project_id: str
    plan: str
    host: str
    name: str
    kind: AddonKind
    secret_version: int
    created_at: datetime
    deleted_at: datetime | None
    status: AddonStatus | None
    observed_generation: int | None
    env_name: str | None = None  # an exact custom variable name, besides <NAME>_URL
    promoted_at: datetime | None = None  # the newest promotion is its kind's primary
    deletion_protection: bool = False
    rotated_at: datetime | None = None


class JobRow(Struct, frozen=True):
    id: str
    project_id: str
    image: str
    command: tuple[str, ...]
    timeout_s: float
    state: JobState
    exit_code: int | None
    output: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class StatusOutcome(Struct, frozen=True):
    inserted: bool  # the first report of a new host
    generation_behind: bool  # the host applied a generation our sequence had not reached
    purged: list[str]
    # ((cpus, memory_mb) claimed, (cpus, memory_mb) ceiling) when a host newly claims more
    # than the operator's ceiling; placement counts the ceiling.
    over_ceiling: tuple[tuple[float, int], tuple[float | None, int | None]] | None = None


class Secret(Struct, frozen=True):
    password: str
    secret_version: int
    # Until then the password before the last rotation still works (None: no grace).
    previous_valid_until: datetime | None = None


def new_id() -> str:
    return uuid.uuid4().hex


def uuid_of(hex_id: str) -> uuid.UUID:
    return uuid.UUID(hex=hex_id)


def hex_of(value: uuid.UUID) -> str:
    return value.hex


def scrub(value: Any) -> Any:
    """Postgres text and jsonb cannot hold NUL; agents' free text might."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    return value


def json_text(value: Any) -> str:
    return msgspec.json.encode(scrub(msgspec.to_builtins(value))).decode()


def addon_status(text: str | None) -> AddonStatus | None:
    if text is None:
        return None
    try:
        return msgspec.json.decode(text, type=AddonStatus)
    except msgspec.DecodeError:
        return None  # written by an older schema; the next report replaces it
