"""The backups of deleted add-ons: the rule (pure) and the store's removal (a real directory)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.backup_store import BackupStore, Sidecar
from agent.deleted_backups import DAY_S, Tombstone, expired, mark

T0 = 1_800_000_000.0


@pytest.mark.parametrize(
    ("tomb", "now", "keep_days", "keep_projects", "gone"),
    [
        (Tombstone(T0), T0, 7, False, False),  # just deleted: kept
        (Tombstone(T0), T0 + 7 * DAY_S - 1, 7, False, False),
        (Tombstone(T0), T0 + 7 * DAY_S, 7, False, True),  # the window is over
        (Tombstone(T0), T0, 0, False, True),  # no window: at once
        (Tombstone(T0, project_deleted=True), T0, 7, False, True),  # the project went
        (Tombstone(T0, project_deleted=True), T0, 7, True, False),  # the operator keeps it
        (Tombstone(T0, project_deleted=True), T0 + 7 * DAY_S, 7, True, True),
    ],
)
def test_expired(
    tomb: Tombstone, now: float, keep_days: float, keep_projects: bool, gone: bool
) -> None:
    assert expired(tomb, now, keep_days, keep_projects) is gone


@given(
    first=st.floats(0, 1e10),
    later=st.floats(0, 1e6),
    project_then=st.booleans(),
    project_now=st.booleans(),
)
def test_the_clock_never_restarts(
    first: float, later: float, project_then: bool, project_now: bool
) -> None:
    tomb = mark(None, first, project_then)
    assert tomb == Tombstone(first, project_then)
    again = mark(tomb, first + later, project_now)
    after = again or tomb
    assert after.seen_at == first  # a later pass or a restarted agent keeps the first time
    assert after.project_deleted == (project_then or project_now)  # never turned off


@given(st.floats(0, 1e10), st.floats(0, 1e6), st.floats(0, 400), st.booleans(), st.booleans())
def test_expired_stays_expired(
    seen: float, wait: float, keep: float, project: bool, keep_projects: bool
) -> None:
    tomb = Tombstone(seen, project)
    if expired(tomb, seen + wait, keep, keep_projects):
        assert expired(tomb, seen + wait + 1, keep, keep_projects)


P1, P2 = "1" * 32, "2" * 32
A1, A2, A3 = "a" * 32, "b" * 32, "c" * 32


def made(store: BackupStore, project: str, addon: str, backup: str = "f" * 32) -> Path:
    final = store.dump(project, addon, backup)
    tmp = store.tmp(final)
    tmp.write_bytes(b"REDIS0011")
    store.finish(tmp, final, Sidecar(backup, "redis", 9, "0" * 64, {}, "now"))
    return final


def test_removal_stays_inside_the_addons_directory(tmp_path: Path) -> None:
    store = BackupStore(tmp_path / "store")
    store.ensure_root()
    gone, sibling, other = made(store, P1, A1), made(store, P1, A2), made(store, P2, A3)
    assert store.tombstone(P1, "d" * 32) is None  # no directory: nothing to mark
    found = store.tombstone(P1, A1)
    assert found is not None and found[1] is None
    store.write_tombstone(found[0], Tombstone(T0))
    assert store.tombstones() == [(P1, A1, Tombstone(T0))]

    store.remove_addon(P1, A1)
    assert not gone.parent.exists()
    assert sibling.exists() and sibling.with_suffix(".json").exists()
    assert other.exists()
    assert (tmp_path / "store" / P1).is_dir()  # the sibling still has backups
    store.remove_addon(P1, A2)
    assert not (tmp_path / "store" / P1).exists()  # the project's directory, once empty
    assert other.exists()
    for bad in ("..", "a" * 31, "../" + "a" * 29):
        with pytest.raises(ValueError):
            store.remove_addon(P2, bad)
        with pytest.raises(ValueError):
            store.tombstone(bad, A3)
    assert other.exists()


def test_an_unreadable_marker_is_not_acted_on(tmp_path: Path) -> None:
    store = BackupStore(tmp_path)
    made(store, P1, A1)
    (tmp_path / P1 / A1 / ".deleted.json").write_text("{not json")
    assert store.tombstones() == []
    found = store.tombstone(P1, A1)
    assert found is not None and found[1] is None  # written again, the clock from now
