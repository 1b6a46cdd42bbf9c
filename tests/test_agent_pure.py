"""Tables for the agent's pure modules: observation, desired-state acceptance, /proc/net/tcp."""

from __future__ import annotations

import errno
import socket
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import loopfs, model, netns, observe, specs
from agent.desired import accept
from agent.model import ObservedContainer, ObservedNetwork, ObservedVolume
from schemas.codec import encode
from schemas.messages import (
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    AddonSpec,
    DesiredState,
    JobSpec,
    ProjectSpec,
    Resources,
    SleepPolicy,
)
from schemas.signed import Signer, Verifier

PID = "e" * 32
KEY = Ed25519PrivateKey.generate()
SIGNER = Signer(KEY)
VERIFIER = Verifier([KEY.public_key()])
AID = "a" * 32
RES = Resources(cpus=0.5, memory_mb=256)

# --- observation ------------------------------------------------------------------------


def raw_container(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "Id": "c1",
        "Names": ["/orkestr-x-net"],
        "State": "running",
        "Labels": {
            model.LABEL_ROLE: "holder",
            model.LABEL_PROJECT: PID,
            model.LABEL_ADDON: AID,
            model.LABEL_SPEC_HASH: "h1",
        },
        "HostConfig": {"NetworkMode": f"orkestr-{PID}"},
        "NetworkSettings": {"Networks": {f"orkestr-{PID}": {"IPAddress": "10.200.0.2"}}},
    }
    raw.update(over)
    return raw


def test_an_app_with_an_anonymous_volume_is_seen_as_on_the_hosts_disk() -> None:
    labels = {model.LABEL_ROLE: "app", model.LABEL_PROJECT: PID, model.LABEL_APP: AID}
    tmpfs_only = raw_container(Labels=labels, Mounts=[])
    on_disk = raw_container(Labels=labels, Mounts=[{"Type": "volume", "Name": "3f9a"}])
    holder = raw_container(Mounts=[{"Type": "volume", "Name": "3f9a"}])  # not an app
    seen = [observe.container(r) for r in (tmpfs_only, on_disk, holder)]
    assert [c.disk_volume if c else None for c in seen] == [False, True, False]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            raw_container(),
            ObservedContainer(
                id="c1",
                name="orkestr-x-net",
                role="holder",
                project_id=PID,
                state="running",
                spec_hash="h1",
                addon_id=AID,
                network_mode=f"orkestr-{PID}",
                ip="10.200.0.2",
            ),
        ),
        # A state Docker may add later is treated as dead: never mistaken for running.
        (raw_container(State="hibernating"), "dead"),
        (raw_container(State="paused"), "paused"),
        # Not ours, or labelled by hand without a project: never touched.
        (raw_container(Labels={model.LABEL_PROJECT: PID}), None),
        (raw_container(Labels={model.LABEL_ROLE: "holder"}), None),
        (raw_container(Labels={model.LABEL_ROLE: "sidecar", model.LABEL_PROJECT: PID}), None),
        (raw_container(Labels=None), None),
        # A database in its holder's namespace has no address of its own.
        (
            raw_container(
                Labels={model.LABEL_ROLE: "db", model.LABEL_PROJECT: PID},
                HostConfig={"NetworkMode": "container:c0"},
                NetworkSettings={"Networks": {}},
            ),
            ("db", "container:c0", None),
        ),
        (raw_container(Names=None, NetworkSettings=None, HostConfig=None), ("?", "", None)),
    ],
)
def test_container(raw: dict[str, Any], expected: Any) -> None:
    got = observe.container(raw)
    if expected is None or isinstance(expected, ObservedContainer):
        assert got == expected
    elif isinstance(expected, str):
        assert got is not None and got.state == expected
    elif expected[0] in ("db",):
        assert got is not None and (got.role, got.network_mode, got.ip) == expected
    else:
        assert got is not None and (got.name, got.network_mode, got.ip) == expected


def test_networks_and_volumes_without_our_labels_are_left_out() -> None:
    network = {
        "Id": "0123456789abcdef",
        "Name": f"orkestr-{PID}",
        "Driver": "bridge",
        "Labels": {model.LABEL_PROJECT: PID},
        "IPAM": {"Config": [{"Subnet": "10.200.0.0/24", "Gateway": "10.200.0.1"}]},
    }
    named = {**network, "Id": "f" * 16, "Options": {"com.docker.network.bridge.name": "obr0"}}
    observed = observe.observed(
        [raw_container(), raw_container(Labels={})],
        [network, named, {"Id": "x", "Name": "bridge", "Labels": {}}],
        [
            {"Name": "orkestr-a-data", "Labels": {model.LABEL_ADDON: AID}},
            {"Name": "anon", "Labels": None},
        ],
    )
    assert [c.id for c in observed.containers] == ["c1"]
    assert observed.networks == (
        ObservedNetwork(
            "0123456789abcdef",
            f"orkestr-{PID}",
            PID,
            "10.200.0.1",
            "br-0123456789ab",
            "10.200.0.0/24",
        ),
        ObservedNetwork("f" * 16, f"orkestr-{PID}", PID, "10.200.0.1", "obr0", "10.200.0.0/24"),
    )
    assert observed.volumes == (ObservedVolume("orkestr-a-data", AID),)
    assert observe.ipam({"IPAM": None}, "Gateway") == ""
    assert observe.bridge_name({"Id": "x", "Driver": "macvlan"}) == ""


# --- desired-state acceptance ------------------------------------------------------------


def state(generation: int = 5, host: str = "h1", *projects: ProjectSpec) -> DesiredState:
    return DesiredState(
        version=SCHEMA_VERSION, host=host, generation=generation, projects=tuple(projects)
    )


def addon(aid: str = AID, name: str = "db", **over: Any) -> AddonSpec:
    return AddonSpec(**{"id": aid, "name": name, "kind": "postgres", "resources": RES, **over})


def project(*addons: AddonSpec, pid: str = PID) -> ProjectSpec:
    return ProjectSpec(id=pid, name="p", addons=addons)


CURRENT = state(5, "h1", project(addon()))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "Malformed"),
        (b"x" * (MAX_MESSAGE_BYTES + 1), "TooLarge"),
        (
            msgspec.json.encode({"version": SCHEMA_VERSION + 1, "host": "h1", "generation": 9}),
            "UnsupportedVersion",
        ),
        (encode(state(9, "h2")), "WrongHost"),
        (encode(state(4)), "StaleGeneration"),
        (encode(state(5)), "ConflictingGeneration"),  # same generation, other content
        (encode(state(6, "h1", project(), project())), "Invalid"),
        (encode(state(6, "h1", project(addon()), project(addon(), pid="f" * 32))), "Invalid"),
        (encode(state(6, "h1", project(addon(), addon("b" * 32)))), "Invalid"),
        (
            encode(
                state(
                    6,
                    "h1",
                    project(
                        addon(sleep=SleepPolicy(enabled=True, light_after_s=60, deep_after_s=30))
                    ),
                )
            ),
            "Invalid",
        ),
    ],
)
def test_rejected(raw: bytes, reason: str) -> None:
    new, rejection = accept(CURRENT, SIGNER.seal(raw), "h1", VERIFIER)
    assert new is None and rejection is not None, rejection
    assert rejection.reason == reason, rejection
    assert rejection.message


def test_accepted_and_duplicates() -> None:
    newer = state(6, "h1", project(addon(deleted=True), addon("b" * 32)))  # a name reused
    assert accept(CURRENT, SIGNER.seal(encode(newer)), "h1", VERIFIER) == (newer, None)
    assert accept(None, SIGNER.seal(encode(newer)), "h1", VERIFIER) == (newer, None)
    assert accept(CURRENT, SIGNER.seal(encode(CURRENT)), "h1", VERIFIER) == (None, None)
    unsigned = accept(CURRENT, encode(newer), "h1", VERIFIER)
    assert unsigned[0] is None and unsigned[1] is not None
    assert unsigned[1].reason == "Unsigned"


# --- /proc/net/tcp -------------------------------------------------------------------------

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"


@pytest.mark.parametrize(
    ("text", "ipv6", "expected"),
    [
        (
            HEADER
            + "   0: 00000000:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000 999\n"
            + "   1: 0200C80A:1538 0900C80A:9C40 01 00000000:00000000 00:00000000 00000000 999\n",
            False,
            [
                netns.TcpSocket(5432, "0.0.0.0", 0, 10),
                netns.TcpSocket(5432, "10.200.0.9", 40000, netns.ESTABLISHED),
            ],
        ),
        (
            HEADER
            + "   0: 00000000000000000000000000000000:18EB "
            + "0000000000000000FFFF00000900C80A:9C41 01 0 0 0\n"
            + "   1: 00000000000000000000000001000000:18EB "
            + "00000000000000000000000001000000:9C42 06 0 0 0\n",
            True,
            [
                netns.TcpSocket(6379, "10.200.0.9", 40001, 1),  # v4-mapped: shown as v4
                netns.TcpSocket(6379, "::1", 40002, 6),
            ],
        ),
        (HEADER, False, []),
        (HEADER + "   garbage\n", False, []),
    ],
)
def test_parse_tcp_table(text: str, ipv6: bool, expected: list[netns.TcpSocket]) -> None:
    assert netns.parse_tcp_table(text, ipv6) == expected


def test_parse_tcp_table_reads_this_kernels_format() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            with accepted, open("/proc/self/net/tcp") as f:
                table = netns.parse_tcp_table(f.read(), False)
            client_port = client.getsockname()[1]
    assert netns.TcpSocket(port, "127.0.0.1", client_port, netns.ESTABLISHED) in table
    assert any(s.local_port == port and s.state == 10 for s in table)  # the listener


# --- container specs ---------------------------------------------------------------------

IMAGES = specs.Images(postgres="pg:15", redis="rd:7")
JOB = JobSpec(id="c" * 32, image="toolbox:1", command=("sh", "-c", "true"))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            specs.holder_spec(PID, addon(), IMAGES),
            {
                "Image": "pg:15",
                "Entrypoint": ["sleep", "infinity"],
                "User": specs.NOBODY,
                "StopSignal": "SIGKILL",
                "NetworkMode": f"orkestr-{PID}",
                "Aliases": ["db"],
                "Memory": 32 << 20,
                # A tenth of a CPU over a 1 s period: its ~25 ms start fits the quota.
                "Cpus": (0.1, specs.HOLDER_CPU_PERIOD_US),
                "Mounts": [("tmpfs", "/var/lib/postgresql/data")],
                "ReadonlyRootfs": True,
                "CapAdd": None,
            },
        ),
        (
            specs.db_spec(PID, addon(), IMAGES, "/s/a"),
            {
                "Image": "pg:15",
                "Cmd": ["postgres"],
                "StopSignal": "SIGINT",
                "NetworkMode": f"container:orkestr-{AID}-net",
                "Aliases": None,
                "Memory": 256 << 20,
                "Mounts": [
                    ("volume", "/var/lib/postgresql/data"),
                    ("bind", specs.SECRET_MOUNT),
                    ("bind", specs.INITDB_MOUNT),
                ],
                "ReadonlyRootfs": True,
                "CapAdd": list(specs.DB_CAPABILITIES),
            },
        ),
        (
            specs.db_spec(
                PID,
                AddonSpec(id=AID, name="c", kind="redis", resources=Resources(1.0, 128)),
                IMAGES,
                "/s/a",
            ),
            {
                "Image": "rd:7",
                "Cmd": ["redis-server", f"{specs.SECRET_MOUNT}/redis.conf"],
                "StopSignal": "SIGTERM",
                "NetworkMode": f"container:orkestr-{AID}-net",
                "Aliases": None,
                "Memory": 128 << 20,
                "Cpus": (1.0, None),
                "Mounts": [("volume", "/data"), ("bind", specs.SECRET_MOUNT)],
                "ReadonlyRootfs": True,
                "CapAdd": list(specs.DB_CAPABILITIES),
            },
        ),
        (
            specs.job_spec(PID, JOB, specs.JobLimits(memory_mb=64)),
            {
                "Image": "toolbox:1",
                "Cmd": ["sh", "-c", "true"],
                "User": specs.NOBODY,
                "NetworkMode": f"orkestr-{PID}",
                "Aliases": [],
                "Memory": 64 << 20,
                "Mounts": [],
                "ReadonlyRootfs": True,
                "Tmpfs": dict(specs.SCRATCH_TMPFS),
                "CapAdd": None,
            },
        ),
    ],
)
def test_create_body(spec: specs.ContainerSpec, expected: dict[str, Any]) -> None:
    body = specs.create_body(spec, "h1", {"EXTRA": "1"})
    hc: dict[str, Any] = body["HostConfig"]  # type: ignore[assignment]
    networking: dict[str, Any] = body.get("NetworkingConfig") or {}  # type: ignore[assignment]
    endpoints: dict[str, Any] = networking.get("EndpointsConfig", {})
    got = {
        "Image": body["Image"],
        "Cmd": body.get("Cmd"),
        "Entrypoint": body.get("Entrypoint"),
        "User": body.get("User"),
        "StopSignal": body.get("StopSignal"),
        "NetworkMode": hc["NetworkMode"],
        "Aliases": next(e["Aliases"] for e in endpoints.values()) if endpoints else None,
        "Memory": hc["Memory"],
        # (share of a CPU, CFS period if not Docker's 100 ms); never both ways at once.
        "Cpus": (hc["CpuQuota"] / hc["CpuPeriod"], hc["CpuPeriod"])
        if "CpuPeriod" in hc
        else (hc.get("NanoCpus", 0) / 1e9, None),
        "Mounts": [(m["Type"], m["Target"]) for m in hc["Mounts"]],
        "ReadonlyRootfs": hc["ReadonlyRootfs"],
        "Tmpfs": hc.get("Tmpfs"),
        "CapAdd": hc["CapAdd"],
    }
    assert {k: v for k, v in got.items() if k in expected} == expected
    # Every container: no published port, all capabilities dropped, no new privileges,
    # capped logs, labelled for this host with its spec hash, the extra env appended.
    assert hc["PublishAllPorts"] is False and "PortBindings" not in hc
    assert hc["CapDrop"] == ["ALL"] and hc["SecurityOpt"] == [specs.NO_NEW_PRIVILEGES]
    assert hc["LogConfig"]["Config"]["max-size"] == specs.LOG_MAX_SIZE
    assert hc["MemorySwap"] == hc["Memory"] and hc["PidsLimit"] == spec.pids_limit
    assert not ("NanoCpus" in hc and "CpuPeriod" in hc)  # Docker refuses both
    labels = body["Labels"]
    assert labels[model.LABEL_HOST] == "h1" and labels[model.LABEL_SPEC_HASH] == spec.spec_hash  # type: ignore[index]
    assert body["Env"][-1] == "EXTRA=1"  # type: ignore[index]


def test_an_images_volumes_are_scratch_outside_the_spec() -> None:
    """The VOLUMEs a job's or app's image declares get a tmpfs like /tmp's (Docker would
    put an anonymous volume on the host's disk there); the spec, and so its hash, is the
    same with or without them."""
    spec = specs.job_spec(PID, JOB, specs.JobLimits(memory_mb=64))
    scratch = specs.image_scratch(("/var/lib/postgresql/data", "/tmp", "relative"))
    assert scratch == ("/var/lib/postgresql/data", "/tmp")
    body = specs.create_body(spec, "h1", None, scratch)
    plain = specs.create_body(spec, "h1")
    hc: dict[str, Any] = body["HostConfig"]  # type: ignore[assignment]
    assert hc["Tmpfs"] == {
        **dict(specs.SCRATCH_TMPFS),
        "/var/lib/postgresql/data": specs.SCRATCH_TMPFS[0][1],
    }
    assert body["Labels"] == plain["Labels"]


def test_spec_hash_moves_with_the_spec_and_only_then() -> None:
    a = specs.db_spec(PID, addon(), IMAGES, "/s/a")
    assert a.spec_hash == specs.db_spec(PID, addon(), IMAGES, "/s/a").spec_hash
    bigger = addon(resources=Resources(cpus=0.5, memory_mb=512))
    assert a.spec_hash != specs.db_spec(PID, bigger, IMAGES, "/s/a").spec_hash
    rotated = addon(secret_version=2)
    assert a.spec_hash != specs.db_spec(PID, rotated, IMAGES, "/s/a").spec_hash
    # The holder does not depend on the plan's sizing: a resize keeps the namespace.
    assert specs.holder_spec(PID, addon(), IMAGES) == specs.holder_spec(PID, bigger, IMAGES)


def test_a_refused_filesystem_grow_names_the_capability() -> None:
    denied = OSError(errno.EPERM, "Operation not permitted")
    message = loopfs.grow_error("/proc/1/root/data", denied)
    assert message.startswith("grow the filesystem at /proc/1/root/data: [Errno 1]")
    assert "CAP_SYS_RESOURCE" in message and "docs/operations.md" in message
    other = loopfs.grow_error("/d", OSError(errno.ENOTTY, "Inappropriate ioctl for device"))
    assert "CAP_SYS_RESOURCE" not in other and other.endswith("Inappropriate ioctl for device")


# --- parked holders (agent/pool.py) -----------------------------------------------------


def parked_raw(name: str, networks: list[str]) -> dict[str, Any]:
    shape = specs.parked_holder_spec("redis", IMAGES).shape_hash
    return raw_container(
        Names=[f"/{name}"],
        Labels={
            model.LABEL_ROLE: "parked",
            model.LABEL_PROJECT: "",
            model.LABEL_SPEC_HASH: shape,
            model.LABEL_SHAPE_HASH: shape,
        },
        NetworkSettings={"Networks": {n: {"IPAddress": "10.200.0.9"} for n in networks}},
    )


def test_a_claimed_parked_holder_is_its_addons_holder_by_name_and_network() -> None:
    parking = model.parking_network_name("h1")
    holder = model.holder_name(AID)
    claimed = observe.container(parked_raw(holder, [f"orkestr-{PID}"]))
    assert claimed is not None
    assert (claimed.role, claimed.addon_id, claimed.project_id, claimed.ip) == (
        "holder",
        AID,
        PID,
        "10.200.0.9",
    )
    # Still parked, cut off mid-claim (pool-named, or on two networks), or on no project
    # network: the pool's alone, never the planner's.
    assert observe.container(parked_raw("orkestr-pool-0123456789ab", [parking])) is None
    assert observe.container(parked_raw("orkestr-pool-0123456789ab", [f"orkestr-{PID}"])) is None
    assert observe.container(parked_raw(holder, [parking])) is None
    assert observe.container(parked_raw(holder, [f"orkestr-{PID}", f"orkestr-{'f' * 32}"])) is None


def test_a_holder_accepts_a_parked_holder_of_its_image_only() -> None:
    redis = AddonSpec(id=AID, name="cache", kind="redis", resources=RES)
    want = specs.holder_spec(PID, redis, IMAGES)
    parked_redis = specs.parked_holder_spec("redis", IMAGES)
    parked_pg = specs.parked_holder_spec("postgres", IMAGES)
    assert not want.drifted(parked_redis.spec_hash, parked_redis.shape_hash)
    assert want.drifted(parked_pg.spec_hash, parked_pg.shape_hash)
    # A parked holder's labels name its template whatever its own name and network.
    named = msgspec.structs.replace(parked_redis, name="orkestr-pool-x", network="park")
    assert named.labels("h1")[model.LABEL_SHAPE_HASH] == parked_redis.shape_hash
    # A newer holder image makes every parked holder of the old one a drift.
    newer = specs.holder_spec(PID, redis, specs.Images(postgres="pg:15", redis="rd:8"))
    assert newer.drifted(parked_redis.spec_hash, parked_redis.shape_hash)
    # Never for a database.
    db = specs.db_spec(PID, redis, IMAGES, "/s/a")
    assert db.drifted(parked_redis.spec_hash, parked_redis.shape_hash)
