"""Container specifications derived from the desired state: pure, hashable, deterministic.

Each add-on is two containers. The *holder* owns the add-on's network identity: it sits on
the project network under the add-on's name and only sleeps. The *database* container
joins the holder's network namespace (`container:<holder>`), so it can be recreated,
stopped or paused while the address stays put and something (the wake listener) can
answer at it. This is the Kubernetes pause-container pattern.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Literal

import msgspec
from msgspec import Struct

from agent import model
from schemas.images import DEFAULT_JOB_IMAGES
from schemas.messages import AddonSpec, AppSpec, JobSpec, Resources

SECRET_MOUNT = "/run/orkestr"
# The official postgres image runs every script here once, when it initialises the volume.
INITDB_MOUNT = "/docker-entrypoint-initdb.d"
DATA_DIRS = {"postgres": "/var/lib/postgresql/data", "redis": "/data"}
# Where a Postgres add-on's WAL filesystem is mounted; initdb makes `pg_wal` a symlink to it
# (`POSTGRES_INITDB_WALDIR`, the official image's variable). Outside PGDATA, which the
# image declares a VOLUME of its own.
WAL_DIR = "/var/lib/postgresql/wal"
# The platform's own role (Postgres) and ACL user (Redis): upkeep, rotation and the making
# of the least roles below. Tenants never see its password; their own role is neither
# superuser nor Redis admin.
ADMIN_USER = "orkestr_admin"
# The readiness probe's least role (agent/platform_roles.py): it may log in and ask
# whether the server answers (SELECT 1; PING and INFO), nothing more.
PROBE_USER = "orkestr_probe"
# The least roles the backup containers log in as (agent/platform_roles.py): a dump reads
# (Postgres and Redis), a Postgres restore builds a database beside the live one for the
# tenant and swaps it in. Neither is a superuser; their passwords are the only secret
# a backup container gets.
BACKUP_USER = "orkestr_backup"
RESTORE_USER = "orkestr_restore"
# What every platform session into a tenant's database sets when it connects. The tenant
# owns its database, so `ALTER DATABASE ... SET` is its to use, and those settings apply
# to every session, the platform's superuser included: a `search_path` with its own schema
# ahead of pg_catalog would run the tenant's `pg_database_size` (or `=`) as superuser, a
# `role` would run the platform's session as the tenant, a `statement_timeout` or read-only
# default would stop the quota guard. Sent in the startup packet, these outrank them.
PLATFORM_PG_SETTINGS = (
    ("search_path", "pg_catalog,pg_temp"),
    ("role", "none"),
    ("statement_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
    ("default_transaction_read_only", "off"),
)
SECRET_VERSION_LABEL = "orkestr.secret-version"

# Fences every container gets (docs/architecture.md, "Tenant fences").
NO_NEW_PRIVILEGES = "no-new-privileges:true"
LOG_MAX_SIZE = "10m"
LOG_MAX_FILES = "3"
NOBODY = "65534:65534"
# What the databases' entrypoints need as root before they drop to their own user, as the
# official images do: own the data directory (CHOWN, FOWNER, DAC_OVERRIDE) and switch
# user (SETUID, SETGID). The server itself runs unprivileged with no capabilities.
DB_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID")
# Postgres forks a process per connection (max_connections 100 by default) plus its
# background workers; Redis is threads plus a forked child for snapshots.
PIDS_LIMITS = {"postgres": 256, "redis": 64, "holder": 8}
# A holder's CFS period (the longest the kernel allows): its quota then covers its start.
HOLDER_CPU_PERIOD_US = 1_000_000
# Scratch space on a read-only root filesystem.
_TMP = ("/tmp", "rw,nosuid,nodev,size=64m")
DB_TMPFS = {
    "postgres": (_TMP, ("/run/postgresql", "rw,nosuid,nodev,size=1m")),
    "redis": (_TMP,),
}


# --- storage: the filesystem behind each data volume (agent/loopfs.py) -------------------


def max_wal_size_mb(storage_mb: int) -> int:
    """Postgres's WAL ceiling for a quota: an eighth of it, between 32 MB and 1 GB."""
    return max(32, min(1024, storage_mb // 8))


def temp_file_limit_mb(storage_mb: int) -> int:
    """Postgres's `temp_file_limit` for a tenant's session under a quota: the WAL ceiling
    (an eighth of the quota, 32 MB to 1 GB). Temporary files (sorts, hashes, index builds)
    are on the data filesystem but outside `pg_database_size`; `fs_size_mb` keeps two WAL
    ceilings beyond the quota, so one session at this limit fits beside a database at its
    quota and a WAL at its ceiling. It is per process: several sessions together are
    stopped by the filesystem guard (agent/upkeep.py)."""
    return max_wal_size_mb(storage_mb)


def fs_size_mb(storage_mb: int) -> int:
    """The filesystem for a quota: the quota, twice the WAL ceiling (WAL may pass it
    during a checkpoint) and 64 MB for ext4's own metadata and what is written between
    two quota checks."""
    return storage_mb + 2 * max_wal_size_mb(storage_mb) + 64


def wal_fs_size_mb(storage_mb: int) -> int:
    """The WAL's own filesystem: three times the WAL ceiling (`max_wal_size` is a soft
    limit: WAL written while a checkpoint runs comes on top, and recycled segments are kept
    up to it) and 64 MB, four segments, for ext4's metadata and a burst. The data
    filesystem keeps its own size (`fs_size_mb`), so both layouts grow and are guarded
    alike."""
    return 3 * max_wal_size_mb(storage_mb) + 64


class Mount(Struct, frozen=True):
    kind: Literal["volume", "bind", "tmpfs"]
    source: str
    target: str
    read_only: bool = False


@functools.lru_cache(maxsize=4096)
def _digest(spec: ContainerSpec) -> str:
    """Each pass builds every add-on's specs afresh: equal specs are hashed once."""
    return hashlib.sha256(msgspec.json.encode(spec)).hexdigest()[:16]


@functools.lru_cache(maxsize=4096)
def _shape_digest(spec: ContainerSpec) -> str:
    shape = msgspec.structs.replace(
        spec,
        cpus=None,
        memory_mb=None,
        extra_labels=tuple(kv for kv in spec.extra_labels if kv[0] != SECRET_VERSION_LABEL),
    )
    return _digest(shape)


class ContainerSpec(Struct, frozen=True):
    name: str
    role: model.Role
    project_id: str
    image: str
    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()
    mounts: tuple[Mount, ...] = ()
    # Either a network to join under `aliases`, or a holder whose namespace to share.
    network: str | None = None
    aliases: tuple[str, ...] = ()
    netns_of: str | None = None
    cpus: float | None = None
    memory_mb: int | None = None
    restart: Literal["no", "unless-stopped", "on-failure"] = "no"
    stop_signal: str | None = None
    pids_limit: int | None = None
    # None: the image's user. Databases start as root to own their volume, then drop.
    user: str | None = None
    cap_add: tuple[str, ...] = ()
    read_only_rootfs: bool = False
    tmpfs: tuple[tuple[str, str], ...] = ()
    addon_id: str | None = None
    job_id: str | None = None
    extra_labels: tuple[tuple[str, str], ...] = ()

    @property
    def spec_hash(self) -> str:
        return _digest(self)

    @property
    def shape_hash(self) -> str:
        """The hash without what changes in place: CPU and memory (`docker update`) and the
        secret version (rotated inside the database). A container whose shape matches is
        kept; the agent adjusts the rest (agent/upkeep.py). `spec_hash` stays as it was,
        so containers made by an older agent are compared with it and not recreated."""
        return _shape_digest(self)

    @property
    def parked_shape_hash(self) -> str:
        """A holder's shape with nothing of its add-on (name, project, network, alias): the
        shape a parked holder of the same image carries (agent/pool.py)."""
        return _shape_digest(parked(self))

    def drifted(self, have_spec_hash: str, have_shape_hash: str) -> bool:
        if have_shape_hash:
            if self.role == "holder" and have_shape_hash == self.parked_shape_hash:
                return False  # a parked holder claimed for this add-on: the same container
            return have_shape_hash != self.shape_hash
        return have_spec_hash != self.spec_hash

    def labels(self, host: str) -> dict[str, str]:
        labels = {
            model.LABEL_MANAGED: "1",
            model.LABEL_HOST: host,
            model.LABEL_PROJECT: self.project_id,
            model.LABEL_ROLE: self.role,
            model.LABEL_SPEC_HASH: self.spec_hash,
            model.LABEL_SHAPE_HASH: self.shape_hash,
        }
        if self.role == "parked":  # its name and network are not its shape (agent/pool.py)
            labels[model.LABEL_SPEC_HASH] = labels[model.LABEL_SHAPE_HASH] = self.parked_shape_hash
        if self.addon_id:
            labels[model.LABEL_ADDON] = self.addon_id
        if self.job_id:
            labels[model.LABEL_JOB] = self.job_id
        labels.update(self.extra_labels)
        return labels


class Images(Struct, frozen=True, forbid_unknown_fields=True):
    postgres: str = "postgres:15"
    redis: str = "redis:7"
    # The holder only sleeps; any image with `sleep` will do, the add-on's own by default.
    holder_command: tuple[str, ...] = ("sleep", "infinity")
    # Shell-style patterns of the images a job may run, checked again here (the controller
    # checks first), so a forged desired state cannot run any image on the host.
    jobs: tuple[str, ...] = DEFAULT_JOB_IMAGES

    def for_kind(self, kind: str) -> str:
        return self.postgres if kind == "postgres" else self.redis


def holder_spec(project_id: str, addon: AddonSpec, images: Images) -> ContainerSpec:
    return ContainerSpec(
        name=model.holder_name(addon.id),
        role="holder",
        project_id=project_id,
        addon_id=addon.id,
        image=images.for_kind(addon.kind),
        entrypoint=images.holder_command,
        network=model.network_name(project_id),
        aliases=(addon.name,),
        # The image declares its data directory a VOLUME: a tmpfs there keeps Docker from
        # creating an anonymous volume for every holder, which nothing would ever remove.
        mounts=(Mount("tmpfs", "", DATA_DIRS[addon.kind]),),
        memory_mb=32,
        cpus=0.1,
        restart="unless-stopped",
        stop_signal="SIGKILL",
        pids_limit=PIDS_LIMITS["holder"],
        user=NOBODY,
        read_only_rootfs=True,
    )


def parked(holder: ContainerSpec) -> ContainerSpec:
    """The template of a parked holder that can become `holder` (agent/pool.py)."""
    return msgspec.structs.replace(
        holder, name="", role="parked", project_id="", addon_id=None, network=None, aliases=()
    )


def parked_holder_spec(kind: str, images: Images) -> ContainerSpec:
    """The parked holder of an add-on kind's image: a holder's spec, no add-on's."""
    template = AddonSpec(id="0" * 32, name="parked", kind=kind, resources=Resources(0.1, 32))  # type: ignore[arg-type]
    return parked(holder_spec("", template, images))


def db_spec(
    project_id: str, addon: AddonSpec, images: Images, secret_dir: str, wal: bool = False
) -> ContainerSpec:
    """`wal`: a Postgres whose WAL has its own volume (plan.wal_apart); without it the spec
    is what it always was, so an add-on made before WAL volumes is not recreated."""
    mounts: tuple[Mount, ...] = (
        Mount("volume", model.volume_name(addon.id), DATA_DIRS[addon.kind]),
        Mount("bind", secret_dir, SECRET_MOUNT, read_only=True),
    )
    if addon.kind == "postgres":
        # The image's superuser is the platform's role; the tenant's own role, which owns
        # its database and nothing more, is made by the init script (agent/secrets.py).
        env: tuple[tuple[str, str], ...] = (
            ("POSTGRES_USER", ADMIN_USER),
            ("POSTGRES_DB", addon.database),
            ("POSTGRES_PASSWORD_FILE", f"{SECRET_MOUNT}/admin_password"),
            ("ORKESTR_TENANT_USER", addon.user),
        )
        mounts += (Mount("bind", f"{secret_dir}/initdb", INITDB_MOUNT, read_only=True),)
        if wal:
            # initdb puts pg_wal there (a symlink in PGDATA); read only at initialisation.
            env += (("POSTGRES_INITDB_WALDIR", WAL_DIR),)
            mounts += (Mount("volume", model.wal_volume_name(addon.id), WAL_DIR),)
        cmd: tuple[str, ...] = ("postgres",)
        stop_signal = "SIGINT"  # fast shutdown, as the official image does
    else:
        env = ()
        # The password lives in a mounted config file, never in the process arguments.
        cmd = ("redis-server", f"{SECRET_MOUNT}/redis.conf")
        stop_signal = "SIGTERM"
    return ContainerSpec(
        name=model.db_name(addon.id),
        role="db",
        project_id=project_id,
        addon_id=addon.id,
        image=images.for_kind(addon.kind),
        cmd=cmd,
        env=env,
        mounts=mounts,
        netns_of=model.holder_name(addon.id),
        cpus=addon.resources.cpus,
        memory_mb=addon.resources.memory_mb,
        restart="unless-stopped",
        stop_signal=stop_signal,
        pids_limit=PIDS_LIMITS[addon.kind],
        cap_add=DB_CAPABILITIES,
        read_only_rootfs=True,
        tmpfs=DB_TMPFS[addon.kind],
        extra_labels=((SECRET_VERSION_LABEL, str(addon.secret_version)),),
    )


class JobLimits(Struct, frozen=True, forbid_unknown_fields=True):
    """The agent's defaults for jobs whose desired state carries no plan sizing."""

    memory_mb: int = 512
    cpus: float = 1.0
    pids: int = 256
    # Jobs of one project running at once (agent.jobs_per_project; plan.plan).
    per_project: int = 2


# A job's or app's writable directories on its read-only root. Their writable layer was
# the host's disk, shared with every add-on's filesystem image, the agent's state and the
# controller's database: one tenant could fill it. tmpfs pages are charged to the
# container's memory cgroup, so the plan's memory bounds them; the size is only a ceiling
# and stays fixed, so a plan change still resizes the container in place.
SCRATCH_TMPFS = (
    ("/tmp", "rw,nosuid,nodev,size=1024m"),
    ("/var/tmp", "rw,nosuid,nodev,size=1024m"),
)


def image_scratch(volumes: tuple[str, ...]) -> tuple[str, ...]:
    """The paths of a job's or app's image that get a tmpfs: each VOLUME it declares.
    Docker would make an anonymous volume there, on the host's disk, whatever the read-only
    root (the postgres image's data directory is mode 1777: writable as nobody)."""
    return tuple(v for v in volumes if v.startswith("/"))


def job_spec(project_id: str, job: JobSpec, limits: JobLimits) -> ContainerSpec:
    resources = job.resources
    return ContainerSpec(
        name=model.job_container_name(job.id),
        role="job",
        project_id=project_id,
        job_id=job.id,
        image=job.image,
        cmd=job.command,
        network=model.network_name(project_id),
        memory_mb=resources.memory_mb if resources else limits.memory_mb,
        cpus=resources.cpus if resources else limits.cpus,
        pids_limit=limits.pids,
        # A tenant's image runs unprivileged, whatever user it declares.
        user=NOBODY,
        read_only_rootfs=True,
        tmpfs=SCRATCH_TMPFS,
    )


def app_spec(project_id: str, app: AppSpec, limits: JobLimits) -> ContainerSpec:
    """An app container: hardened like a job (nobody, caps dropped, no-new-privileges,
    pids limit, plan CPU/memory, read-only root with tmpfs scratch), on the project
    network under its name, restarted by Docker when it fails. The release is part of the
    spec, so a new release replaces it."""
    resources = app.resources
    return ContainerSpec(
        name=model.app_container_name(app.id),
        role="app",
        project_id=project_id,
        image=app.image,
        cmd=app.command,
        network=model.network_name(project_id),
        aliases=(app.name,),
        memory_mb=resources.memory_mb if resources else limits.memory_mb,
        cpus=resources.cpus if resources else limits.cpus,
        pids_limit=limits.pids,
        user=NOBODY,
        read_only_rootfs=True,
        tmpfs=SCRATCH_TMPFS,
        restart="on-failure",
        extra_labels=((model.LABEL_APP, app.id), ("orkestr.release", str(app.release))),
    )


def create_body(
    spec: ContainerSpec,
    host: str,
    env: dict[str, str] | None = None,
    scratch: tuple[str, ...] = (),
) -> dict[str, object]:
    """The Docker Engine API body for `POST /containers/create`. No port is ever published.

    `scratch`: more paths given a tmpfs as `spec.tmpfs`'s first (the VOLUMEs a job's or
    app's image declares, see `image_scratch`); not part of the spec, so not of its hash."""
    host_config: dict[str, object] = {
        "RestartPolicy": {"Name": spec.restart},
        "Mounts": [_mount(m) for m in spec.mounts],
        "PublishAllPorts": False,
        "Init": False,
        "CapDrop": ["ALL"],
        "CapAdd": list(spec.cap_add) or None,
        "SecurityOpt": [NO_NEW_PRIVILEGES],
        "ReadonlyRootfs": spec.read_only_rootfs,
        "LogConfig": {
            "Type": "json-file",
            "Config": {"max-size": LOG_MAX_SIZE, "max-file": LOG_MAX_FILES},
        },
    }
    if spec.pids_limit is not None:
        host_config["PidsLimit"] = spec.pids_limit
    if spec.tmpfs or scratch:
        tmpfs = dict(spec.tmpfs)
        options = spec.tmpfs[0][1] if spec.tmpfs else SCRATCH_TMPFS[0][1]
        for path in scratch:
            tmpfs.setdefault(path, options)
        host_config["Tmpfs"] = tmpfs
    if spec.cpus is not None and spec.role in ("holder", "parked"):
        # The same tenth of a CPU over a longer period: its start (runc's init in the
        # container's cgroup, ~25 ms of CPU) fits one period's quota, where Docker's
        # 100 ms period held it throttled for ~45-90 ms of every create.
        host_config["CpuPeriod"] = HOLDER_CPU_PERIOD_US
        host_config["CpuQuota"] = int(spec.cpus * HOLDER_CPU_PERIOD_US)
    elif spec.cpus is not None:
        host_config["NanoCpus"] = int(spec.cpus * 1e9)
    if spec.memory_mb is not None:
        host_config["Memory"] = spec.memory_mb * 1024 * 1024
        host_config["MemorySwap"] = spec.memory_mb * 1024 * 1024
    body: dict[str, object] = {
        "Image": spec.image,
        "Cmd": list(spec.cmd) if spec.cmd else None,
        "Env": [f"{k}={v}" for k, v in (*spec.env, *(env or {}).items())],
        "Labels": spec.labels(host),
        "HostConfig": host_config,
    }
    if spec.entrypoint is not None:
        body["Entrypoint"] = list(spec.entrypoint)
    if spec.user is not None:
        body["User"] = spec.user
    if spec.stop_signal:
        body["StopSignal"] = spec.stop_signal
    if spec.netns_of:
        host_config["NetworkMode"] = f"container:{spec.netns_of}"
    elif spec.network:
        host_config["NetworkMode"] = spec.network
        body["NetworkingConfig"] = {
            "EndpointsConfig": {spec.network: {"Aliases": list(spec.aliases)}}
        }
    return body


def _mount(m: Mount) -> dict[str, object]:
    if m.kind == "tmpfs":
        return {"Type": "tmpfs", "Target": m.target, "TmpfsOptions": {"SizeBytes": 1 << 20}}
    return {"Type": m.kind, "Source": m.source, "Target": m.target, "ReadOnly": m.read_only}
