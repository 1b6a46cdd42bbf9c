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
    assert not leaked, "the test run left Docker objects behind:\n" + "\n".join(sorted(leaked))
