"""What the agent observes on the host, as frozen values the planner can compare.

`observe.py` turns Docker's raw dictionaries into these; `plan.py` reads only these.
"""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

Role = Literal["holder", "db", "job", "backup", "app"]
# Docker's container states, as reported by the list endpoint.
ContainerState = Literal["created", "running", "paused", "restarting", "removing", "exited", "dead"]

LABEL_MANAGED = "orkestr.managed"
LABEL_HOST = "orkestr.host"
LABEL_PROJECT = "orkestr.project"
LABEL_ADDON = "orkestr.addon"
LABEL_JOB = "orkestr.job"
LABEL_APP = "orkestr.app"
LABEL_ROLE = "orkestr.role"
LABEL_SPEC_HASH = "orkestr.spec-hash"
# The spec without what changes in place (CPU, memory, secret version): see specs.py.
LABEL_SHAPE_HASH = "orkestr.shape-hash"
LABEL_BACKUP_OP = "orkestr.backup-op"
LABEL_GROUP = "orkestr.group"


class ObservedContainer(Struct, frozen=True):
    id: str
    name: str
    role: Role
    project_id: str
    state: ContainerState
    spec_hash: str = ""
    shape_hash: str = ""  # empty on containers made before in-place changes
    addon_id: str | None = None
    job_id: str | None = None
    # The backup operation a one-shot backup container works for.
    backup_op: str | None = None
    app_id: str | None = None
    # "container:<id>" for a database container that joined its holder's namespace.
    network_mode: str = ""
    # The address on the project network (holders and jobs).
    ip: str | None = None
    # (name, address) of each group network it is attached to.
    groups: tuple[tuple[str, str], ...] = ()

    def on(self, network: str) -> bool:
        return any(name == network for name, _ in self.groups)


class ObservedNetwork(Struct, frozen=True):
    id: str
    name: str
    project_id: str  # "" for a group network
    gateway: str = ""  # the host's address on it: the source of the agent's own traffic
    bridge: str = ""  # the bridge interface on the host
    subnet: str = ""
    group_id: str = ""  # a project group's network (`orkestr-g-<group>`)


class ObservedVolume(Struct, frozen=True):
    name: str
    addon_id: str


class Observed(Struct, frozen=True):
    containers: tuple[ObservedContainer, ...] = ()
    networks: tuple[ObservedNetwork, ...] = ()
    volumes: tuple[ObservedVolume, ...] = ()

    def container(self, name: str) -> ObservedContainer | None:
        return next((c for c in self.containers if c.name == name), None)

    def network(self, name: str) -> ObservedNetwork | None:
        return next((n for n in self.networks if n.name == name), None)

    def volume(self, name: str) -> ObservedVolume | None:
        return next((v for v in self.volumes if v.name == name), None)


def network_name(project_id: str) -> str:
    return f"orkestr-{project_id}"


GROUP_PREFIX = "orkestr-g-"


def group_network_name(group_id: str) -> str:
    return f"{GROUP_PREFIX}{group_id}"


def holder_name(addon_id: str) -> str:
    return f"orkestr-{addon_id}-net"


def db_name(addon_id: str) -> str:
    return f"orkestr-{addon_id}-db"


def volume_name(addon_id: str) -> str:
    return f"orkestr-{addon_id}-data"


def job_container_name(job_id: str) -> str:
    return f"orkestr-job-{job_id}"


def backup_container_name(op_key: str, step: str) -> str:
    return f"orkestr-backup-{op_key}-{step}"


def app_container_name(app_id: str) -> str:
    return f"orkestr-app-{app_id}"
