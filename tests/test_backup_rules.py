"""Pure backup logic: retention with an injected clock, schedule slots, count verdicts,
and the planner's backup operations (one per add-on at a time, leftovers removed)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import backup_checks, model, specs
from agent import plan as p
from agent.specs import Images
from controller.backup_rules import (
    BackupFacts,
    day_window,
    due_slot,
    parse_time_of_day,
    restore_refusal,
    to_prune,
)
from schemas import storage
from schemas.messages import AddonSpec, BackupSpec, DesiredState, ProjectSpec, Resources

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def facts(
    i: int,
    days_ago: float,
    state: str = "succeeded",
    verified: bool | None = True,
    kept: int | None = None,
) -> BackupFacts:
    return BackupFacts(
        id=f"{i:032x}",
        state=state,
        created_at=NOW - timedelta(days=days_ago),
        verified=verified,
        retention_days=kept,
    )


# --- retention -------------------------------------------------------------------------------


def test_retention_prunes_only_past_the_window() -> None:
    items = [facts(1, 9), facts(2, 8), facts(3, 6), facts(4, 1)]
    assert to_prune(items, NOW, 7) == {f"{1:032x}", f"{2:032x}"}


def test_retention_never_deletes_the_newest_verified_backup() -> None:
    # Everything is old, the newest verified one stays; a newer failed one does not count.
    items = [facts(1, 40), facts(2, 30), facts(3, 20, "failed", None), facts(4, 19, verified=False)]
    assert to_prune(items, NOW, 7) == {f"{1:032x}", f"{3:032x}", f"{4:032x}"}


def test_retention_spares_unfinished_and_restoring_backups() -> None:
    pending = facts(1, 30, "pending", None)
    restoring = BackupFacts(
        id=f"{2:032x}",
        state="succeeded",
        created_at=NOW - timedelta(days=30),
        verified=True,
        restore_pending=True,
    )
    newest = facts(3, 20)
    assert to_prune([pending, restoring, newest], NOW, 7) == set()


def test_retention_follows_the_injected_clock() -> None:
    items = [facts(1, 0), facts(2, 0)]
    assert to_prune(items, NOW, 7) == set()
    later = NOW + timedelta(days=8)
    # Both are past the window; the newest verified one (the higher id on a tie) stays.
    assert to_prune(items, later, 7) == {f"{1:032x}"}


def test_a_move_to_a_plan_without_backups_keeps_them_for_their_own_window() -> None:
    # Taken on Pro (7 days), the project now on Starter (0): nothing under 7 days old
    # goes; the older ones go as they would have on Pro; an older row without the figure
    # follows the current plan, as before.
    items = [facts(1, 1, kept=7), facts(2, 6.9, kept=7), facts(3, 8, kept=7), facts(4, 2)]
    assert to_prune(items, NOW, 0) == {f"{3:032x}", f"{4:032x}"}
    # Kept for the longer of the two windows: an upgrade extends, a downgrade never cuts.
    assert to_prune([facts(1, 9, kept=7), facts(2, 0.5)], NOW, 30) == set()


@given(
    st.lists(
        st.tuples(
            st.floats(0, 60),
            st.sampled_from(["pending", "succeeded", "failed", "deleting"]),
            st.sampled_from([None, True, False]),
            st.sampled_from([None, 0, 7, 30]),
        ),
        max_size=12,
    ),
    st.integers(0, 40),
)
def test_retention_properties(
    rows: list[tuple[float, str, bool | None, int | None]], days: int
) -> None:
    items = [
        facts(i, age, state, verified, kept) for i, (age, state, verified, kept) in enumerate(rows)
    ]
    gone = to_prune(items, NOW, days)
    by_id = {b.id: b for b in items}
    verified = [b for b in items if b.state == "succeeded" and b.verified]
    if verified:
        newest = max(verified, key=lambda b: (b.created_at, b.id))
        assert newest.id not in gone
    for i in gone:
        assert by_id[i].state in ("succeeded", "failed")
        assert by_id[i].created_at < NOW - timedelta(days=days)
        # Never before the window it was taken under ran out.
        own = by_id[i].retention_days or 0
        assert by_id[i].created_at < NOW - timedelta(days=own)


# --- schedule slots ----------------------------------------------------------------------------


def test_due_slot_is_the_latest_past_slot_after_enabling() -> None:
    since = NOW - timedelta(days=3)
    assert due_slot(time(3, 0), since, NOW) == datetime(2026, 3, 10, 3, 0, tzinfo=UTC)
    assert due_slot(time(13, 0), since, NOW) == datetime(2026, 3, 9, 13, 0, tzinfo=UTC)


def test_no_slot_before_it_was_enabled() -> None:
    assert due_slot(time(3, 0), NOW - timedelta(hours=1), NOW) is None
    assert due_slot(time(11, 30), NOW - timedelta(hours=1), NOW) == NOW - timedelta(minutes=30)


def test_a_long_outage_owes_one_run() -> None:
    # Down for five days: one slot is owed (the latest), not five.
    slots = {
        due_slot(time(2, 0), NOW - timedelta(days=6), NOW + timedelta(minutes=m))
        for m in range(0, 600, 7)
    }
    assert slots == {datetime(2026, 3, 10, 2, 0, tzinfo=UTC)}


def test_day_window_and_time_parsing() -> None:
    assert day_window(NOW) == (datetime(2026, 3, 10, tzinfo=UTC), datetime(2026, 3, 11, tzinfo=UTC))
    assert parse_time_of_day("03:30") == time(3, 30)
    assert parse_time_of_day("23:59:58") == time(23, 59, 58)
    for bad in ("3:30", "24:00", "03-30", "", "03:30:00:00", "aa:bb"):
        with pytest.raises(ValueError):
            parse_time_of_day(bad)


# --- verdicts ----------------------------------------------------------------------------------


def test_postgres_verdict() -> None:
    dump = {"public.a": 3, "public.b": 0}
    assert backup_checks.postgres_verdict(dump, dict(dump)) is None
    assert "public.a: 3 rows at dump time, 2 restored" in (
        backup_checks.postgres_verdict(dump, {"public.a": 2, "public.b": 0}) or ""
    )
    assert "missing" in (backup_checks.postgres_verdict(dump, {"public.a": 3}) or "")


def test_redis_verdict_allows_writes_between_the_counts() -> None:
    dump = {"keys_before": 10, "keys_after": 12}
    assert backup_checks.redis_verdict(dump, {"keys": 11}) is None
    assert backup_checks.redis_verdict(dump, {"keys": 9}) == "9 keys restored, 10..12 at dump time"
    assert backup_checks.redis_verdict(dump, {}) is not None


def test_parse_counts_rejects_noise() -> None:
    assert backup_checks.parse_counts("public.a|3\npublic.b|c|4\n") == {
        "public.a": 3,
        "public.b|c": 4,
    }
    with pytest.raises(ValueError):
        backup_checks.parse_counts("psql: error: connection refused")


@given(st.text(min_size=1))
def test_a_name_in_hex_comes_back_as_it_was(name: str) -> None:
    # The count script's spelling of a name it cannot put on one line (_PG_COUNTS_SQL).
    line = f"hex:{name.encode('utf-8', 'surrogatepass').hex()}|7\n"
    try:
        name.encode()
    except UnicodeEncodeError:  # not a name Postgres can hold
        with pytest.raises(ValueError):
            backup_checks.parse_counts(line)
        return
    assert backup_checks.parse_counts(line + "public.a|1\n") == {name: 7, "public.a": 1}


def test_a_name_with_a_line_break_or_a_bad_hex_is_not_two_lines() -> None:
    assert backup_checks.parse_counts("public.a\x1cb|2\n") == {"public.a\x1cb": 2}
    with pytest.raises(ValueError, match="unexpected count name"):
        backup_checks.parse_counts("hex:zz|2\n")


def test_the_data_size_is_split_from_the_counts_and_the_last_line_wins() -> None:
    # The script writes the real figure after the tables' counts: a line a table's name
    # smuggled in earlier (a newline in a name) is overwritten, and no count is lost.
    counts = backup_checks.parse_counts("public.a|3\n:data_bytes|5\n:data_bytes|8000000\n")
    assert backup_checks.split_data_bytes(counts) == ({"public.a": 3}, 8_000_000)
    assert backup_checks.split_data_bytes({"keys_before": 1}) == ({"keys_before": 1}, None)


# --- a restore must fit the plan ---------------------------------------------------------------

MIB = storage.MIB


def test_a_restore_bigger_than_the_plan_storage_is_refused_naming_sizes_and_plan() -> None:
    why = restore_refusal("b1", "postgres", 1500 * MIB, 90 * MIB, "starter", 1024, 256)
    assert why == (
        "backup b1 holds 1500.0 MB of data and plan 'starter' allows 1024 MB of storage per "
        "add-on: restored, it would not fit; restore it after a move to a plan with more storage"
    )
    assert restore_refusal("b1", "postgres", 1024 * MIB, 90 * MIB, "starter", 1024, 256) is None
    assert restore_refusal("b1", "postgres", 10**12, 1, "x", None, 256) is None  # no quota


def test_an_older_backup_is_judged_by_its_file_a_lower_bound() -> None:
    assert restore_refusal("b1", "postgres", None, 900 * MIB, "starter", 1024, 256) is None
    why = restore_refusal("b1", "postgres", None, 2000 * MIB, "starter", 1024, 256)
    assert why is not None and "is a file of 2000.0 MB" in why
    assert restore_refusal("b1", "postgres", None, None, "starter", 1024, 256) is None


def test_a_redis_restore_must_fit_its_memory_share() -> None:
    # 75 % of 256 MB is 192 MB, tighter than the 1024 MB of storage.
    why = restore_refusal("b1", "redis", 200 * MIB, MIB, "starter", 1024, 256)
    assert why is not None and "allows 192 MB to a Redis add-on (75 % of its 256 MB" in why
    assert restore_refusal("b1", "redis", 190 * MIB, MIB, "starter", 1024, 256) is None


@given(
    st.sampled_from(["postgres", "redis"]),
    st.integers(0, 2**40) | st.none(),
    st.integers(0, 2**40) | st.none(),
    st.integers(1, 10**6) | st.none(),
    st.integers(32, 10**6),
)
def test_restore_refusal_is_the_quota_rule(
    kind: str, data: int | None, size: int | None, storage_mb: int | None, memory_mb: int
) -> None:
    why = restore_refusal("b1", kind, data, size, "p", storage_mb, memory_mb)
    quota = storage.quota_bytes(kind, storage_mb, memory_mb)
    need = data if data is not None else size
    assert (why is not None) == (quota is not None and need is not None and need > quota)


def test_a_postgres_restore_must_fit_beside_the_live_database() -> None:
    """Issue 9: the copy is built beside the live database; both must fit the quota."""
    why = restore_refusal("b1", "postgres", 600 * MIB, MIB, "pro", 1024, 512, 500 * MIB)
    assert why == (
        "restoring backup b1 needs room for two copies at once: it is built beside the "
        "live database and swapped in only when complete, and its 600.0 MB of data with "
        "the live database's 500.0 MB exceed the 1024 MB plan 'pro' allows per add-on; "
        "free at least 76.0 MB in the live database first (the restore replaces it: DROP "
        "or TRUNCATE its largest tables, after a backup if you want to keep them), or move "
        "to a plan with at least 1100 MB of storage, restore, and move back"
    )
    assert restore_refusal("b1", "postgres", 600 * MIB, MIB, "pro", 1024, 512, 424 * MIB) is None
    # Not measured yet (a sleeping add-on after an agent restart): the agent checks.
    assert restore_refusal("b1", "postgres", 600 * MIB, MIB, "pro", 1024, 512, None) is None
    # Redis stages a file, not a database: judged by the quota alone.
    assert restore_refusal("b1", "redis", 100 * MIB, MIB, "pro", 1024, 512, 300 * MIB) is None


@given(
    st.integers(0, 2**40),
    st.integers(0, 2**40) | st.none(),
    st.integers(1, 10**6) | st.none(),
)
def test_beside_refusal_is_both_copies_under_the_quota(
    data: int, live: int | None, storage_mb: int | None
) -> None:
    why = restore_refusal("b1", "postgres", data, None, "p", storage_mb, 512, live)
    quota = storage.quota_bytes("postgres", storage_mb, 512)
    fits = quota is None or data + (live or 0) <= quota
    assert (why is None) == fits
    if why is not None and data <= (quota or 0):
        assert "needs room for two copies" in why


# --- the planner -------------------------------------------------------------------------------

PROJECT = "a" * 32
ADDON = "b" * 32
SETTINGS = p.Settings(images=Images(), secrets_root="/s")


def _desired(*ops: BackupSpec, deleted: bool = False) -> DesiredState:
    addon = AddonSpec(
        id=ADDON,
        name="db",
        kind="postgres",
        resources=Resources(cpus=1, memory_mb=256),
        deleted=deleted,
    )
    return DesiredState(
        version=1,
        host="h",
        generation=1,
        projects=(ProjectSpec(id=PROJECT, name="p", addons=(addon,), backups=ops),),
    )


def _op(n: int, op: str = "backup") -> BackupSpec:
    return BackupSpec(id=f"{n:032x}", op=op, addon_id=ADDON, backup_id=f"{n:032x}", sha256=None)  # type: ignore[arg-type]


def _running_addon() -> model.Observed:
    holder = model.ObservedContainer(
        id="h1",
        name=model.holder_name(ADDON),
        role="holder",
        project_id=PROJECT,
        state="running",
        addon_id=ADDON,
    )
    return model.Observed(containers=(holder,))


def test_one_operation_per_addon_in_order() -> None:
    local = p.Local(secrets={ADDON: 1})
    actions = p.plan(_desired(_op(1), _op(2)), _running_addon(), local, SETTINGS)
    starts = [a for a in actions if isinstance(a, p.StartBackupOp)]
    assert [a.key for a in starts] == [f"backup-{1:032x}"]
    # While it runs nothing else starts; once done, the next one does.
    busy = p.Local(secrets={ADDON: 1}, backups_running={ADDON: f"backup-{1:032x}"})
    assert not [
        a
        for a in p.plan(_desired(_op(1), _op(2)), _running_addon(), busy, SETTINGS)
        if isinstance(a, p.StartBackupOp)
    ]
    done = p.Local(secrets={ADDON: 1}, backups_done=frozenset({f"backup-{1:032x}"}))
    starts = [
        a
        for a in p.plan(_desired(_op(1), _op(2)), _running_addon(), done, SETTINGS)
        if isinstance(a, p.StartBackupOp)
    ]
    assert [a.key for a in starts] == [f"backup-{2:032x}"]


def test_waits_for_provisioning_but_not_for_a_deleted_addon() -> None:
    no_secret = p.plan(_desired(_op(1)), _running_addon(), p.Local(), SETTINGS)
    assert not [a for a in no_secret if isinstance(a, p.StartBackupOp)]
    gone = p.plan(_desired(_op(1), deleted=True), model.Observed(), p.Local(), SETTINGS)
    assert [a.key for a in gone if isinstance(a, p.StartBackupOp)] == [f"backup-{1:032x}"]


def test_leftover_backup_containers_are_removed_first() -> None:
    leftover = model.ObservedContainer(
        id="x",
        name="orkestr-backup-backup-1-dump",
        role="backup",
        project_id=PROJECT,
        state="running",
        addon_id=ADDON,
        backup_op=f"backup-{1:032x}",
    )
    observed = model.Observed(containers=(*_running_addon().containers, leftover))
    actions = p.plan(_desired(_op(1)), observed, p.Local(secrets={ADDON: 1}), SETTINGS)
    assert isinstance(actions[0], p.RemoveContainer) and actions[0].name == leftover.name
    # Its own operation's container is left alone while it runs.
    mine = p.Local(secrets={ADDON: 1}, backups_running={ADDON: f"backup-{1:032x}"})
    assert not [
        a
        for a in p.plan(_desired(_op(1)), observed, mine, SETTINGS)
        if isinstance(a, p.RemoveContainer) and a.name == leftover.name
    ]


def test_a_running_restore_keeps_the_planner_off_the_database() -> None:
    db = model.ObservedContainer(
        id="d",
        name=model.db_name(ADDON),
        role="db",
        project_id=PROJECT,
        state="exited",
        addon_id=ADDON,
        network_mode="container:h1",
    )
    holder = _running_addon().containers[0]
    local = p.Local(secrets={ADDON: 1}, backups_running={ADDON: f"restore-{9:032x}"})
    desired = _desired()
    want_db = specs.db_spec(PROJECT, desired.projects[0].addons[0], SETTINGS.images, "/s/" + ADDON)
    want_holder = specs.holder_spec(PROJECT, desired.projects[0].addons[0], SETTINGS.images)
    observed = model.Observed(
        containers=(
            msgspec.structs.replace(holder, spec_hash=want_holder.spec_hash),
            msgspec.structs.replace(db, spec_hash=want_db.spec_hash),
        )
    )
    assert not [
        a for a in p.plan(desired, observed, local, SETTINGS) if isinstance(a, p.StartContainer)
    ]
    idle = p.Local(secrets={ADDON: 1})
    assert [a for a in p.plan(desired, observed, idle, SETTINGS) if isinstance(a, p.StartContainer)]
