"""A session check that nothing the suite created in Docker outlives the suite.

Other test runs may share the dockerd, so only what this run made is counted: every host
name a test gives an agent (or a Docker adapter) comes from `host_name()`, which embeds
this run's token, and every Docker object the platform or a test creates carries its
host in the `orkestr.host` label. Anonymous volumes carry no label: they are tied to this
run through the daemon's event log (which container mounted them).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

RUN = uuid.uuid4().hex[:6]


def host_name(prefix: str = "t") -> str:
    """A unique host name that marks its Docker objects as this run's."""
    return f"{prefix}{RUN}{uuid.uuid4().hex[:6]}"


def _docker(*args: str) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _ours(host: str | None) -> bool:
    return bool(host) and RUN in str(host)


def labelled_objects() -> set[str]:
    """This run's containers, networks and volumes that still exist, as `kind name`."""
    fmt = '{{.Names}}\t{{.Label "orkestr.host"}}'
    found: set[str] = set()
    for line in _docker("ps", "-a", "--filter", "label=orkestr.host", "--format", fmt).splitlines():
        name, _, host = line.partition("\t")
        if _ours(host):
            found.add(f"container {name}")
    for kind in ("network", "volume"):
        lines = _docker(
            kind, "ls", "--filter", "label=orkestr.host", "--format",
            '{{.Name}}\t{{.Label "orkestr.host"}}',
        ).splitlines()  # fmt: skip
        for line in lines:
            name, _, host = line.partition("\t")
            if _ours(host):
                found.add(f"{kind} {name}")
    return found


def anonymous_volumes(since: float) -> set[str]:
    """Volumes that this run's containers mounted since `since` and that still exist."""
    events = _docker(
        "events", "--since", f"{since:.0f}", "--until", f"{time.time():.0f}",
        "--filter", "type=container", "--filter", "event=create",
        "--filter", "type=volume", "--filter", "event=mount", "--format", "{{json .}}",
    )  # fmt: skip
    ours: set[str] = set()
    mounts: list[tuple[str, str]] = []
    for line in events.splitlines():
        event = json.loads(line)
        actor = event.get("Actor") or {}
        attributes = actor.get("Attributes") or {}
        if event.get("Type") == "container" and _ours(attributes.get("orkestr.host")):
            ours.add(actor.get("ID", ""))
        elif event.get("Type") == "volume":
            mounts.append((actor.get("ID", ""), attributes.get("container", "")))
    existing = set(_docker("volume", "ls", "-q").split())
    return {volume for volume, container in mounts if container in ours and volume in existing}


@pytest.fixture(scope="session", autouse=True)
def no_leaked_docker_objects() -> Iterator[None]:
    """Fail the run if a container, network or volume it created is still there."""
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode
    ):
        yield
        return
    started = time.time() - 1
    yield
    leaked = labelled_objects() | {f"volume {v}" for v in anonymous_volumes(started)}
    leaked -= removed_late(leaked)
    assert not leaked, "the test run left Docker objects behind:\n" + "\n".join(sorted(leaked))


def removed_late(leaked: set[str], within_s: float = 30.0) -> set[str]:
    """Empty networks of this run that their test's sweep could not remove: a loaded
    daemon keeps the endpoint of a removed container for a while ("has active
    endpoints"). They are removed now, and said so; containers and volumes never are,
    nor a network that still has a container."""
    networks = {x.partition(" ")[2] for x in leaked if x.startswith("network ")}
    removed: set[str] = set()
    errors: dict[str, str] = {}
    deadline = time.monotonic() + within_s
    while networks - removed and time.monotonic() < deadline:
        for name in sorted(networks - removed):
            attached = subprocess.run(
                ["docker", "network", "inspect", "-f", "{{len .Containers}}", name],
                capture_output=True, text=True,
            )  # fmt: skip
            if attached.returncode != 0:
                removed.add(name)  # gone meanwhile
                continue
            if attached.stdout.strip() != "0":
                errors[name] = "containers still attached"
                continue
            done = subprocess.run(["docker", "network", "rm", name], capture_output=True, text=True)
            if done.returncode == 0:
                removed.add(name)
                print(f"\ndocker_leaks: network {name} removed at the end of the run")
            else:
                errors[name] = done.stderr.strip()
        if networks - removed:
            time.sleep(1)
    for name in sorted(networks - removed):
        print(f"\ndocker_leaks: network {name} not removed: {errors.get(name, '')}")
    return {f"network {n}" for n in removed}
