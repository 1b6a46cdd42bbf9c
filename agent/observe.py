"""Turn the Docker Engine's raw list payloads into `model.Observed` (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

from agent import model
from agent.model import (
    ContainerState,
    Observed,
    ObservedContainer,
    ObservedNetwork,
    ObservedVolume,
    Role,
)

_ROLES: frozenset[str] = frozenset({"holder", "db", "job", "backup", "app"})
_STATES: frozenset[str] = frozenset(
    {"created", "running", "paused", "restarting", "removing", "exited", "dead"}
)


def container(raw: Mapping[str, Any]) -> ObservedContainer | None:
    labels = raw.get("Labels") or {}
    role = labels.get(model.LABEL_ROLE)
    project = labels.get(model.LABEL_PROJECT)
    name = (raw.get("Names") or ["/?"])[0].lstrip("/")
    networks = (raw.get("NetworkSettings") or {}).get("Networks") or {}
    addon_id = labels.get(model.LABEL_ADDON)
    if role == "parked":
        # A claimed parked holder (agent/pool.py): its labels cannot change, so its add-on
        # is its name and its project the network it joined. One still parked, or cut off
        # mid-claim, is the pool's alone.
        addon_id = model.addon_of_holder(name)
        projects = {p for n in networks if (p := model.project_of_network(n)) is not None}
        if addon_id is None or len(projects) != 1:
            return None
        role, project = "holder", projects.pop()
    if role not in _ROLES or not project:
        return None  # not ours, or labelled by hand: never touched
    state = raw.get("State", "dead")
    ip = networks.get(model.network_name(project), {}).get("IPAddress") or None
    groups = tuple(
        sorted(
            (name, str((n or {}).get("IPAddress") or ""))
            for name, n in networks.items()
            if name.startswith(model.GROUP_PREFIX)
        )
    )
    return ObservedContainer(
        id=raw["Id"],
        name=name,
        role=cast(Role, role),
        project_id=project,
        state=cast(ContainerState, state if state in _STATES else "dead"),
        spec_hash=labels.get(model.LABEL_SPEC_HASH, ""),
        shape_hash=labels.get(model.LABEL_SHAPE_HASH, ""),
        addon_id=addon_id,
        job_id=labels.get(model.LABEL_JOB),
        backup_op=labels.get(model.LABEL_BACKUP_OP),
        app_id=labels.get(model.LABEL_APP),
        network_mode=(raw.get("HostConfig") or {}).get("NetworkMode", ""),
        ip=ip,
        groups=groups,
        disk_volume=role == "app"
        and any(m.get("Type") == "volume" for m in raw.get("Mounts") or ()),
    )


def ipam(network: Mapping[str, Any], key: str) -> str:
    for config in (network.get("IPAM") or {}).get("Config") or []:
        if config.get(key):
            return str(config[key])
    return ""


def bridge_name(network: Mapping[str, Any]) -> str:
    """Docker names a bridge `br-<12 hex of the id>` unless told otherwise at creation."""
    if network.get("Driver", "bridge") != "bridge":
        return ""
    named = (network.get("Options") or {}).get("com.docker.network.bridge.name")
    return str(named or f"br-{network['Id'][:12]}")


def observed(
    containers: Iterable[Mapping[str, Any]],
    networks: Iterable[Mapping[str, Any]],
    volumes: Iterable[Mapping[str, Any]],
) -> Observed:
    cs = tuple(c for c in (container(raw) for raw in containers) if c is not None)
    ns = tuple(
        ObservedNetwork(
            id=n["Id"],
            name=n["Name"],
            project_id=n["Labels"].get(model.LABEL_PROJECT, ""),
            gateway=ipam(n, "Gateway"),
            bridge=bridge_name(n),
            subnet=ipam(n, "Subnet"),
            group_id=n["Labels"].get(model.LABEL_GROUP, ""),
        )
        for n in networks
        if (n.get("Labels") or {}).get(model.LABEL_PROJECT)
        or (n.get("Labels") or {}).get(model.LABEL_GROUP)
    )
    vs = tuple(
        ObservedVolume(name=v["Name"], addon_id=v["Labels"][model.LABEL_ADDON])
        for v in volumes
        if (v.get("Labels") or {}).get(model.LABEL_ADDON)
    )
    return Observed(containers=cs, networks=ns, volumes=vs)
