"""Container specifications derived from the desired state: pure, hashable, deterministic.

Each add-on is two containers. The *holder* owns the add-on's network identity: it sits on
the project network under the add-on's name and only sleeps. The *database* container
joins the holder's network namespace (`container:<holder>`), so it can be recreated,
stopped or paused while the address stays put and something (the wake listener) can
answer at it. This is the Kubernetes pause-container pattern.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import msgspec
from msgspec import Struct

from agent import model
from schemas.messages import AddonSpec, JobSpec

SECRET_MOUNT = "/run/orkestr"
PORTS = {"postgres": 5432, "redis": 6379}
DATA_DIRS = {"postgres": "/var/lib/postgresql/data", "redis": "/data"}


class Mount(Struct, frozen=True):
    kind: Literal["volume", "bind"]
    source: str
    target: str
    read_only: bool = False


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
    restart: Literal["no", "unless-stopped"] = "no"
    stop_signal: str | None = None
    addon_id: str | None = None
    job_id: str | None = None
    extra_labels: tuple[tuple[str, str], ...] = ()

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(msgspec.json.encode(self)).hexdigest()[:16]

    def labels(self, host: str) -> dict[str, str]:
        labels = {
            model.LABEL_MANAGED: "1",
            model.LABEL_HOST: host,
            model.LABEL_PROJECT: self.project_id,
            model.LABEL_ROLE: self.role,
            model.LABEL_SPEC_HASH: self.spec_hash,
        }
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
        memory_mb=32,
        cpus=0.1,
        restart="unless-stopped",
        stop_signal="SIGKILL",
    )


def db_spec(project_id: str, addon: AddonSpec, images: Images, secret_dir: str) -> ContainerSpec:
    mounts = (
        Mount("volume", model.volume_name(addon.id), DATA_DIRS[addon.kind]),
        Mount("bind", secret_dir, SECRET_MOUNT, read_only=True),
    )
    if addon.kind == "postgres":
        env: tuple[tuple[str, str], ...] = (
            ("POSTGRES_USER", addon.user),
            ("POSTGRES_DB", addon.database),
            ("POSTGRES_PASSWORD_FILE", f"{SECRET_MOUNT}/password"),
        )
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
        extra_labels=(("orkestr.secret-version", str(addon.secret_version)),),
    )


def job_spec(project_id: str, job: JobSpec, memory_mb: int) -> ContainerSpec:
    return ContainerSpec(
        name=model.job_container_name(job.id),
        role="job",
        project_id=project_id,
        job_id=job.id,
        image=job.image,
        cmd=job.command,
        network=model.network_name(project_id),
        memory_mb=memory_mb,
    )


def create_body(
    spec: ContainerSpec, host: str, env: dict[str, str] | None = None
) -> dict[str, object]:
    """The Docker Engine API body for `POST /containers/create`. No port is ever published."""
    host_config: dict[str, object] = {
        "RestartPolicy": {"Name": spec.restart},
        "Mounts": [
            {"Type": m.kind, "Source": m.source, "Target": m.target, "ReadOnly": m.read_only}
            for m in spec.mounts
        ],
        "PublishAllPorts": False,
        "Init": False,
    }
    if spec.cpus is not None:
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
