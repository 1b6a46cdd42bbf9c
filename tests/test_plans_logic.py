"""Plans that hold, the pure parts: downgrade checks, quota states, login roles, in-place
drift, and the secret files of a rotation. No I/O beyond a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from msgspec.structs import replace

from agent import model, specs, upkeep
from agent import plan as p
from agent.model import Observed, ObservedContainer, ObservedNetwork, ObservedVolume
from agent.secrets import SecretStore
from controller.plans import Plan
from controller.store import plan_change_problems
from schemas.credentials import login_role
from schemas.messages import AddonSpec, DesiredState, ProjectSpec, Resources

MIB = 1024 * 1024
PID = "a" * 32
AID = "b" * 32
SETTINGS = p.Settings(images=specs.Images(), secrets_root="/secrets")
SMALL = Plan(max_addons=1, cpus=0.5, memory_mb=256, storage_mb=100)


def test_plan_change_problems_name_the_count_and_every_addon_over_the_quota() -> None:
    assert plan_change_problems("small", SMALL, 1, {"db": 99 * MIB}) == []
    problems = plan_change_problems("small", SMALL, 3, {"db": 150 * MIB, "ok": 1, "c": 101 * MIB})
    assert problems == [
        "plan 'small' allows 1 add-on(s) and the project has 3 (delete some first)",
        "plan 'small' allows 100 MB per add-on and add-on 'c' uses 101.0 MB (free some space first)",
        "plan 'small' allows 100 MB per add-on and add-on 'db' uses 150.0 MB "
        "(free some space first)",
    ]
    # No storage limit in the plan: usage never refuses a change.
    assert plan_change_problems("free", replace(SMALL, storage_mb=None), 1, {"db": 10**12}) == []


def test_a_redis_must_fit_the_new_plans_memory_too() -> None:
    # 256 MB of memory: a Redis holds at most 192 MB, whatever the 1000 MB storage quota.
    roomy = replace(SMALL, storage_mb=1000)
    kinds = {"cache": "redis", "db": "postgres"}
    assert (
        plan_change_problems("small", roomy, 1, {"cache": 192 * MIB, "db": 500 * MIB}, kinds) == []
    )
    assert plan_change_problems(
        "small", roomy, 1, {"cache": 193 * MIB, "db": 500 * MIB}, kinds
    ) == [
        "plan 'small' allows 192 MB to Redis add-on 'cache' (75 % of its 256 MB memory) "
        "and it uses 193.0 MB (free some space first)"
    ]
    # Without a storage quota the memory still holds it; with a smaller one, that one.
    assert plan_change_problems(
        "free", replace(SMALL, storage_mb=None), 1, {"cache": 200 * MIB}, kinds
    )
    assert plan_change_problems("small", SMALL, 1, {"cache": 101 * MIB}, kinds) == [
        "plan 'small' allows 100 MB per add-on and add-on 'cache' uses 101.0 MB "
        "(free some space first)"
    ]


def test_a_plan_without_automatic_backups_refuses_a_project_that_has_them_on() -> None:
    assert plan_change_problems("small", SMALL, 1, {}, scheduled=["db"]) == [
        "plan 'small' makes no automatic backups and add-on 'db' has them on (turn them off first)"
    ]
    kept = replace(SMALL, backup_retention_days=7)
    assert plan_change_problems("small", kept, 1, {}, scheduled=["db"]) == []


@pytest.mark.parametrize(
    ("usage", "state"),
    [(0, "ok"), (89, "ok"), (90, "warning"), (99, "warning"), (100, "exceeded"), (500, "exceeded")],
)
def test_quota_state_warns_at_ninety_percent_and_refuses_at_the_quota(
    usage: int, state: str
) -> None:
    assert upkeep.quota_state(usage, 100) == state


def addon(kind: str = "postgres", storage_mb: int | None = 100, memory_mb: int = 256) -> AddonSpec:
    return AddonSpec(
        id=AID,
        name="db",
        kind=kind,  # type: ignore[arg-type]
        resources=Resources(cpus=0.5, memory_mb=memory_mb),
        plan="small",
        storage_mb=storage_mb,
    )


def test_quota_bytes_postgres_is_the_plan_redis_is_capped_by_its_memory() -> None:
    assert upkeep.quota_bytes(addon()) == 100 * MIB
    assert upkeep.quota_bytes(addon(storage_mb=None)) is None
    assert upkeep.quota_bytes(addon("redis", storage_mb=10)) == 10 * MIB
    assert upkeep.quota_bytes(addon("redis", storage_mb=1000)) == 192 * MIB
    assert upkeep.quota_bytes(addon("redis", storage_mb=None)) == 192 * MIB


def test_refusal_names_the_plan_and_the_way_back() -> None:
    text = upkeep.refusal(addon(), 120 * MIB, 100 * MIB)
    assert text.startswith("storage quota exceeded: plan 'small' allows 100 MB")
    assert "120.0 MB" in text and "the plan grows" in text


def test_a_filesystem_short_of_its_wal_reserve_refuses_writes_even_under_the_quota() -> None:
    reserve = upkeep.RESERVE_BYTES
    assert upkeep.pg_quota_state(10, 100, None) == "ok"
    assert upkeep.pg_quota_state(10, 100, reserve) == "ok"
    assert upkeep.pg_quota_state(10, 100, reserve - 1) == "exceeded"
    assert upkeep.pg_quota_state(95, 100, 10 * reserve) == "warning"
    assert upkeep.pg_quota_state(100, 100, 10 * reserve) == "exceeded"
    text = upkeep.refusal(addon(), 10 * MIB, 100 * MIB, 20 * MIB)
    assert "its filesystem has 20 MB left for the write-ahead log" in text


@given(st.integers(min_value=1, max_value=10**6))
def test_the_filesystem_holds_quota_wal_a_guard_step_and_the_reserve(storage_mb: int) -> None:
    step = upkeep.guard_step(addon(storage_mb=storage_mb))
    assert upkeep.GUARD_MIN <= step <= upkeep.GUARD_MAX
    # A filler is seen at the latest one step past the quota, with the WAL at its ceiling,
    # and the reserve is still free: the guard acts before the reserve is touched.
    needed = (storage_mb + specs.max_wal_size_mb(storage_mb)) * MIB + step + upkeep.RESERVE_BYTES
    assert specs.fs_size_mb(storage_mb) * MIB >= needed


@given(st.integers(min_value=1, max_value=10**6))
def test_the_wal_filesystem_holds_twice_the_ceiling_and_the_reserve(storage_mb: int) -> None:
    # WAL at twice max_wal_size (a checkpoint's overrun) still leaves the guard's reserve,
    # and a larger plan never gets a smaller WAL filesystem (they only grow).
    wal = specs.max_wal_size_mb(storage_mb)
    assert specs.wal_fs_size_mb(storage_mb) * MIB >= 2 * wal * MIB + upkeep.RESERVE_BYTES
    assert specs.wal_fs_size_mb(storage_mb + 1) >= specs.wal_fs_size_mb(storage_mb)
    assert specs.wal_fs_size_mb(24) == 160 and specs.wal_fs_size_mb(10_240) == 3136


def test_limits_differ_compares_cpu_and_memory() -> None:
    a = addon()
    assert not upkeep.limits_differ({"NanoCpus": 500_000_000, "Memory": 256 * MIB}, a)
    assert upkeep.limits_differ({"NanoCpus": 1_000_000_000, "Memory": 256 * MIB}, a)
    assert upkeep.limits_differ({"NanoCpus": 500_000_000, "Memory": 512 * MIB}, a)
    assert upkeep.limits_differ({}, a)


@given(st.integers(min_value=1, max_value=10**6))
def test_consecutive_versions_log_in_as_different_roles(version: int) -> None:
    assert login_role("app", version) != login_role("app", version + 1)
    assert login_role("app", version) == login_role("app", version + 2)
    assert login_role("app", 1) == "app"


# --- the planner: CPU, memory and the secret version change in place ---------------------


def world(spec_of: AddonSpec, with_shape: bool) -> Observed:
    holder = specs.holder_spec(PID, spec_of, SETTINGS.images)
    db = specs.db_spec(PID, spec_of, SETTINGS.images, SETTINGS.secret_dir(AID))

    def seen(s: specs.ContainerSpec, cid: str, mode: str) -> ObservedContainer:
        return ObservedContainer(
            id=cid,
            name=s.name,
            role=s.role,
            project_id=PID,
            state="running",
            spec_hash=s.spec_hash,
            shape_hash=s.shape_hash if with_shape else "",
            addon_id=AID,
            network_mode=mode,
            ip="172.30.0.2" if s.role == "holder" else None,
        )

    return Observed(
        containers=(seen(holder, "h1", "net"), seen(db, "d1", "container:h1")),
        networks=(ObservedNetwork("n1", model.network_name(PID), PID),),
        volumes=(ObservedVolume(model.volume_name(AID), AID),),
    )


def desired(a: AddonSpec) -> DesiredState:
    return DesiredState(
        version=1, host="h", generation=1, projects=(ProjectSpec(id=PID, name="p", addons=(a,)),)
    )


def test_new_plan_sizing_or_password_keeps_the_containers() -> None:
    before = addon()
    after = replace(before, resources=Resources(cpus=2.0, memory_mb=1024), secret_version=2)
    local = p.Local(secrets={AID: 2})
    assert p.plan(desired(after), world(before, with_shape=True), local, SETTINGS) == ()


def test_containers_of_an_older_agent_are_kept_until_their_spec_changes() -> None:
    before = addon()
    local = p.Local(secrets={AID: 1})
    assert p.plan(desired(before), world(before, with_shape=False), local, SETTINGS) == ()
    after = replace(before, resources=Resources(cpus=2.0, memory_mb=1024))
    actions = p.plan(desired(after), world(before, with_shape=False), local, SETTINGS)
    assert [type(a).__name__ for a in actions] == ["RemoveContainer", "RunContainer"]


def test_a_changed_image_still_recreates() -> None:
    before = addon()
    other = replace(SETTINGS, images=specs.Images(postgres="postgres:16"))
    actions = p.plan(
        desired(before), world(before, with_shape=True), p.Local(secrets={AID: 1}), other
    )
    assert "RemoveContainer" in [type(a).__name__ for a in actions]


# --- the secret files of a rotation -------------------------------------------------------


def test_rotation_keeps_the_previous_password_until_the_grace_ends(tmp_path: Path) -> None:
    store = SecretStore(tmp_path)
    store.ensure_root()
    store.write(AID, "redis", "one", 1)
    assert store.previous(AID) is None
    conf = (tmp_path / AID / "redis.conf").read_text()
    assert ">one " in conf and ">two" not in conf
    store.write(AID, "redis", "two", 2, previous_valid_until=1234.5)
    assert store.previous(AID) == ("one", 1234.5)
    conf = (tmp_path / AID / "redis.conf").read_text()
    assert "user default reset on >two >one " in conf
    store.forget_previous(AID, "redis")
    assert store.previous(AID) is None
    conf = (tmp_path / AID / "redis.conf").read_text()
    assert ">two " in conf and ">one" not in conf
    assert store.applied(AID) == 0
    store.mark_applied(AID, 2)
    assert store.applied(AID) == 2


def test_the_ballast_is_made_once_allocated_and_released_only_where_the_wal_is_apart(
    tmp_path: Path,
) -> None:
    path = tmp_path / upkeep.BALLAST
    upkeep._make_ballast(str(path))
    st_ = path.stat()
    assert st_.st_size == upkeep.BALLAST_BYTES and st_.st_blocks * 512 >= upkeep.BALLAST_BYTES
    assert st_.st_mode & 0o777 == 0o600 and not (tmp_path / f"{upkeep.BALLAST}.tmp").exists()
    upkeep._make_ballast(str(path))  # there already: left as it is
    assert path.stat().st_ino == st_.st_ino

    keeper = upkeep.Upkeep(None, None, None)  # type: ignore[arg-type]
    dev = tmp_path.stat().st_dev
    keeper._fs[AID] = ("db", str(tmp_path), dev, 0)
    assert not keeper._release_ballast(AID)  # WAL inside PGDATA: never released
    keeper._wal_fs[AID] = (str(tmp_path), dev + 1)
    assert keeper._release_ballast(AID) and not path.exists()
    assert not keeper._release_ballast(AID)  # nothing left to free


# --- Redis's memory quota in its redis.conf ----------------------------------------------


def test_a_new_redis_gets_its_quota_with_its_secret() -> None:
    a = addon("redis", storage_mb=None, memory_mb=128)
    fetch = [
        x
        for x in p.plan(desired(a), Observed(), p.Local(), SETTINGS)
        if isinstance(x, p.FetchSecret)
    ]
    assert [x.maxmemory for x in fetch] == [upkeep.quota_bytes(a)]
    pg = addon("postgres")
    fetch = [
        x
        for x in p.plan(desired(pg), Observed(), p.Local(), SETTINGS)
        if isinstance(x, p.FetchSecret)
    ]
    assert [x.maxmemory for x in fetch] == [None]


def test_the_quota_in_redis_conf_follows_the_plan_and_survives_rotations(tmp_path: Path) -> None:
    store = SecretStore(tmp_path)
    store.ensure_root()
    store.write(AID, "redis", "one", 1, maxmemory=100 << 20)
    conf = (tmp_path / AID / "redis.conf").read_text()
    assert f"\nmaxmemory {100 << 20}\nmaxmemory-policy noeviction\n" in conf
    assert store.redis_maxmemory(AID) == 100 << 20
    assert not store.limit_redis(AID, 100 << 20)  # unchanged: not rewritten
    assert store.limit_redis(AID, 200 << 20)  # a plan change
    store.write(AID, "redis", "two", 2, previous_valid_until=1.0, maxmemory=200 << 20)
    store.forget_previous(AID, "redis")  # the rotation's grace ends: the quota stays
    conf = (tmp_path / AID / "redis.conf").read_text()
    assert ">two " in conf and ">one" not in conf and store.redis_maxmemory(AID) == 200 << 20
    # A conf written before it carried the quota gets it from the upkeep.
    (tmp_path / AID / "redis.conf").chmod(0o644)
    (tmp_path / AID / "redis.conf").write_text(conf.split("maxmemory")[0])
    assert store.redis_maxmemory(AID) is None
    assert store.limit_redis(AID, 200 << 20) and store.redis_maxmemory(AID) == 200 << 20
