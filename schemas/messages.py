"""Messages exchanged over MQTT.

Every top-level message carries `version` (the schema version) and is decoded with
`forbid_unknown_fields`, so a sender from another schema version is rejected loudly
instead of being half-understood. Secrets never appear here: retained messages are
written to the broker's disk, so passwords travel over the controller's authenticated
HTTP API instead (see docs/architecture.md).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

SCHEMA_VERSION = 1
# A desired state for a busy host is a few hundred KiB at most; anything larger is a bug
# or an attack, and is refused before decoding.
MAX_MESSAGE_BYTES = 1024 * 1024
# Every number a peer reports is bounded (the message size bounds the rest), so no value
# can overflow a column or a sequence of the controller; generations stay integers that
# JSON and float64 carry exactly.
MAX_GENERATION = 2**53 - 1
MAX_COUNT = 2**53 - 1
# Live job output travels in chunks of at most this many characters; a chunk message is
# refused above MAX_OUTPUT_MESSAGE_BYTES (the characters JSON-escaped, plus the envelope).
MAX_OUTPUT_CHUNK_CHARS = 16384
MAX_OUTPUT_MESSAGE_BYTES = 6 * MAX_OUTPUT_CHUNK_CHARS + 4096

AddonKind = Literal["postgres", "redis"]
# The port each kind serves on, inside the project network: for the agent and the controller.
PORTS: dict[AddonKind, int] = {"postgres": 5432, "redis": 6379}
ConditionStatus = Literal["True", "False", "Unknown"]
SleepState = Literal["awake", "light", "deep"]

Id = Annotated[str, Meta(pattern=r"^[0-9a-f]{32}$", description="uuid4 hex")]
HostName = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
# A DNS label: the add-on is reachable under this name on its project network.
DnsName = Annotated[str, Meta(pattern=r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")]
PgIdent = Annotated[str, Meta(pattern=r"^[a-z_][a-z0-9_]{0,62}$")]
Generation = Annotated[int, Meta(ge=0, le=MAX_GENERATION)]
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
Int32 = Annotated[int, Meta(ge=-(2**31), le=2**31 - 1)]


class Resources(Struct, frozen=True, forbid_unknown_fields=True):
    cpus: Annotated[float, Meta(gt=0, le=256)]
    memory_mb: Annotated[int, Meta(ge=32, le=1024 * 1024)]


class SleepPolicy(Struct, frozen=True, forbid_unknown_fields=True):
    """When an idle add-on is paused (light) and stopped (deep). Disabled: never sleeps."""

    enabled: bool = False
    light_after_s: Annotated[float, Meta(gt=0)] = 300.0
    deep_after_s: Annotated[float, Meta(gt=0)] = 1800.0


class AddonSpec(Struct, frozen=True, forbid_unknown_fields=True):
    id: Id
    name: DnsName
    kind: AddonKind
    resources: Resources
    # Postgres database and role; unused for Redis.
    database: PgIdent = "app"
    user: PgIdent = "app"
    sleep: SleepPolicy = SleepPolicy()
    # Bumped when the controller rotates the password: the agent refetches it.
    secret_version: Annotated[int, Meta(ge=1)] = 1
    # A tombstone: only this, never a missing entry, makes the agent delete data.
    deleted: bool = False
    # The project's plan and its storage quota: past it the add-on refuses writes.
    plan: Annotated[str, Meta(max_length=32)] = ""
    storage_mb: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None = None


class JobSpec(Struct, frozen=True, forbid_unknown_fields=True):
    id: Id
    image: Annotated[str, Meta(min_length=1, max_length=512)]
    command: tuple[str, ...]
    timeout_s: Annotated[float, Meta(gt=0, le=86400)] = 600.0
    # The project's plan sizing; None: the agent's configured defaults.
    resources: Resources | None = None


BackupOp = Literal["backup", "verify", "restore", "delete"]
Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]


class BackupSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """One backup-store operation the agent should carry out once, for one add-on.

    `backup`: dump the add-on into `<store>/<project>/<addon>/<backup_id>.dump` and verify
    it. `verify`: check `sha256` and test-restore it again. `restore`: check `sha256`, then
    restore that file into the add-on. `delete`: remove that file (retention); only this,
    never a missing entry, deletes a backup.
    """

    id: Id  # the operation: the backup's id for `backup` and `delete`, the restore's id
    op: BackupOp
    addon_id: Id
    backup_id: Id
    sha256: Sha256 | None = None  # required for `restore`


class AppSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """A long-running container of the project's current release: one replica, restarted
    on failure, reachable as `name` on the project network. Its environment is the
    release's snapshot, fetched from the controller (never carried here)."""

    id: Id
    name: DnsName
    image: Annotated[str, Meta(min_length=1, max_length=512)]
    command: tuple[str, ...] = ()
    release: Annotated[int, Meta(ge=1)] = 1
    resources: Resources | None = None


class ProjectSpec(Struct, frozen=True, forbid_unknown_fields=True):
    id: Id
    name: Annotated[str, Meta(min_length=1, max_length=63)]
    addons: tuple[AddonSpec, ...] = ()
    jobs: tuple[JobSpec, ...] = ()
    # In order: the agent runs one operation per add-on at a time, the first pending first.
    backups: tuple[BackupSpec, ...] = ()
    apps: tuple[AppSpec, ...] = ()
    # Being deleted (its add-ons are tombstoned too): their backups follow the operator's
    # policy for deleted projects (agent/deleted_backups.py).
    deleted: bool = False


class SharedAddon(Struct, frozen=True, forbid_unknown_fields=True):
    """An add-on its project's owner shares in a group: its holder joins the group network
    under `alias`, the host name in the URL the other members get."""

    addon_id: Id
    project_id: Id
    alias: DnsName


class GroupSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """A project group, as far as this host goes: its members placed here and the add-ons
    shared in it. Members' apps and jobs join the group network and reach the shared
    add-ons' ports there, and nothing else (the agent's firewall)."""

    id: Id
    members: tuple[Id, ...] = ()
    shared: tuple[SharedAddon, ...] = ()


class DesiredState(Struct, frozen=True, forbid_unknown_fields=True):
    """A full snapshot of what one host should run. Newer generations replace older ones."""

    version: int
    host: HostName
    generation: Generation
    projects: tuple[ProjectSpec, ...] = ()
    groups: tuple[GroupSpec, ...] = ()


class Condition(Struct, frozen=True, forbid_unknown_fields=True):
    type: str
    status: ConditionStatus
    reason: str
    message: str
    last_transition_time: datetime


class ClientConnection(Struct, frozen=True, forbid_unknown_fields=True):
    source: str  # "ip:port" of the client, as seen by the add-on
    via: Literal["direct", "activator"] = "direct"


class AddonStatus(Struct, frozen=True, forbid_unknown_fields=True):
    id: Id
    project_id: Id
    observed_generation: Generation
    conditions: tuple[Condition, ...] = ()
    sleep_state: SleepState = "awake"
    last_activity: datetime | None = None
    clients: tuple[ClientConnection, ...] = ()
    sleeps: Count = 0
    wakes: Count = 0
    last_wake_ms: tuple[float, ...] = ()
    # Bytes the add-on's data takes, as the database itself counts them (None: not
    # measured yet), and the quota they are held to.
    usage_bytes: Count | None = None
    quota_bytes: Count | None = None


AppState = Literal["running", "restarting", "created", "paused", "exited", "dead", "missing"]


class AppStatus(Struct, frozen=True, forbid_unknown_fields=True):
    """An app's container as Docker last showed it: for the API's app view and the CLI."""

    id: Id
    project_id: Id
    name: DnsName
    # The release its container runs (None: no container).
    release: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None
    state: AppState
    # Docker's restarts of the container (the on-failure policy) since it was created.
    restart_count: Count = 0
    exit_code: Int32 | None = None  # of its last exit (None: never exited)
    oom_killed: bool = False  # the last exit was the kernel's OOM killer
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: Annotated[str, Meta(max_length=1024)] | None = None


class Capacity(Struct, frozen=True, forbid_unknown_fields=True):
    cpus: Annotated[float, Meta(ge=0, le=65536)]
    memory_mb: Annotated[int, Meta(ge=0, le=2**31 - 1)]


class HostStatus(Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    host: HostName
    sent_at: datetime
    applied_generation: Generation
    capacity: Capacity
    conditions: tuple[Condition, ...] = ()
    addons: tuple[AddonStatus, ...] = ()
    # Add-ons whose tombstone was applied: container and volume are gone.
    removed: tuple[Id, ...] = ()
    # The apps of the newest releases of the projects placed here.
    apps: tuple[AppStatus, ...] = ()


class Presence(Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    host: HostName
    online: bool
    at: datetime


class JobResult(Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    host: HostName
    job_id: Id
    project_id: Id
    exit_code: Int32 | None
    output: str
    started_at: datetime | None
    finished_at: datetime
    error: str | None = None
    # Chunks of live output sent for this job (`JobOutput.seq` 0 .. n-1), so the
    # controller knows when it has them all; None: the agent did not stream it.
    output_chunks: Count | None = None


class JobOutput(Struct, frozen=True, forbid_unknown_fields=True):
    """A piece of a running job's output, sent while it runs (QoS 1, not retained).

    `seq` numbers a job's chunks from 0 without holes, so the controller orders them,
    drops a redelivered one and sees one that never came. `offset` is where `data`
    starts in the job's output, in characters, counting the `dropped` characters the
    agent's rate limit left out just before it.
    """

    version: int
    host: HostName
    job_id: Id
    project_id: Id
    seq: Annotated[int, Meta(ge=0, le=2**31 - 1)]
    offset: Count
    data: Annotated[str, Meta(max_length=MAX_OUTPUT_CHUNK_CHARS)]
    dropped: Count = 0


class SignedDesiredState(Struct, frozen=True, forbid_unknown_fields=True):
    """What travels on the desired topic: an encoded `DesiredState` and the controller's
    Ed25519 signature over it (see schemas/signed.py). Bytes are base64 in JSON."""

    version: int
    key_id: Annotated[str, Meta(pattern=r"^[0-9a-f]{16}$")]
    payload: bytes
    signature: Annotated[bytes, Meta(min_length=64, max_length=64)]


class BackupResult(Struct, frozen=True, forbid_unknown_fields=True):
    """The outcome of one BackupSpec, sent until the operation leaves the desired state."""

    version: int
    host: HostName
    id: Id
    op: BackupOp
    project_id: Id
    addon_id: Id
    backup_id: Id
    ok: bool
    started_at: datetime
    finished_at: datetime
    error: str | None = None
    # backup only: the finished file's size and checksum, and the test restore's verdict.
    # Every number bounded: the controller stores and serves what a host reports.
    size_bytes: Count | None = None
    # The data the dump holds, as the add-on's quota counts it (Postgres:
    # pg_database_size; Redis: used_memory) at dump time: what a restore needs room for.
    data_bytes: Count | None = None
    sha256: Sha256 | None = None
    verified: bool | None = None
    verify_error: str | None = None
    # Postgres: rows per table at dump time; Redis: {"keys": n}.
    counts: dict[Annotated[str, Meta(max_length=256)], Count] = {}
    verify_seconds: Annotated[float, Meta(ge=0, le=86400 * 366)] | None = None


Message = (
    DesiredState | SignedDesiredState | HostStatus | Presence | JobResult | JobOutput | BackupResult
)

encoder = msgspec.json.Encoder()
