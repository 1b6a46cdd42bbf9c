"""What the agent observes on the host, as frozen values the planner can compare.

`observe.py` turns Docker's raw dictionaries into these; `plan.py` reads only these.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Literal

from msgspec import Struct

# "parked": a holder started ahead of need, on the host's parking network (agent/pool.py).
Role = Literal["holder", "db", "job", "backup", "app", "parked"]
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
    # An app made before its image's VOLUMEs became tmpfs: an anonymous volume on the
    # host's disk that its tenant can fill (agent/specs.py image_scratch).
    disk_volume: bool = False

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


class Observed(Struct, frozen=True, dict=True):
    containers: tuple[ObservedContainer, ...] = ()
    networks: tuple[ObservedNetwork, ...] = ()
    volumes: tuple[ObservedVolume, ...] = ()

    # Looked up by name, built once per observation: the planner and the status look up
    # several objects per add-on, and a scan each made a pass quadratic in the add-ons.
    # (The first of a name wins, as a scan found it.)
    @cached_property
    def _containers(self) -> dict[str, ObservedContainer]:
        return {c.name: c for c in reversed(self.containers)}

    @cached_property
    def _networks(self) -> dict[str, ObservedNetwork]:
        return {n.name: n for n in reversed(self.networks)}

    @cached_property
    def _volumes(self) -> dict[str, ObservedVolume]:
        return {v.name: v for v in reversed(self.volumes)}

    def container(self, name: str) -> ObservedContainer | None:
        return self._containers.get(name)

    def network(self, name: str) -> ObservedNetwork | None:
        return self._networks.get(name)

    def volume(self, name: str) -> ObservedVolume | None:
        return self._volumes.get(name)


def network_name(project_id: str) -> str:
    return f"orkestr-{project_id}"


_PROJECT_NETWORK = re.compile(r"orkestr-([0-9a-f]{32})")
_HOLDER_NAME = re.compile(r"orkestr-([0-9a-f]{32})-net")


def project_of_network(name: str) -> str | None:
    """The project whose network this is, by its name; None for any other network."""
    m = _PROJECT_NETWORK.fullmatch(name)
    return m[1] if m else None


def addon_of_holder(name: str) -> str | None:
    """The add-on whose holder this container name is; None for any other name."""
    m = _HOLDER_NAME.fullmatch(name)
    return m[1] if m else None


def parking_network_name(host: str) -> str:
    """The host's internal network where parked holders wait (agent/pool.py)."""
    return f"orkestr-parking-{host}"


GROUP_PREFIX = "orkestr-g-"


def group_network_name(group_id: str) -> str:
    return f"{GROUP_PREFIX}{group_id}"


def holder_name(addon_id: str) -> str:
    return f"orkestr-{addon_id}-net"


def db_name(addon_id: str) -> str:
    return f"orkestr-{addon_id}-db"


def volume_name(addon_id: str) -> str:
    return f"orkestr-{addon_id}-data"


def wal_volume_name(addon_id: str) -> str:
    """A Postgres add-on's write-ahead log, on a filesystem of its own (specs.wal_fs_size_mb)."""
    return f"orkestr-{addon_id}-wal"


def job_container_name(job_id: str) -> str:
    return f"orkestr-job-{job_id}"


def backup_container_name(op_key: str, step: str) -> str:
    return f"orkestr-backup-{op_key}-{step}"


def app_container_name(app_id: str) -> str:
    return f"orkestr-app-{app_id}"
