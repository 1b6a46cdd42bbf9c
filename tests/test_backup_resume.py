"""The Redis restore's swap and rollback scripts, killed after every command, then resumed.

They run on this host's bash against a temporary directory laid out as the add-on's
volume (the scripts only rename and remove files). Whatever command a kill -9 lands
after, and even when the resumed run is killed too, running the swap script again (what
a restarted agent does) ends with one complete data set, the restored one or, once a
rollback has begun, the previous one, never none and never a mix.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent import backup_scripts

OLD, NEW = "previous-data", "restored-data"


def volume(tmp: Path) -> tuple[Path, Path]:
    data, backup = tmp / "data", tmp / "backup"
    (data / "appendonlydir").mkdir(parents=True)
    (data / "appendonlydir" / "appendonly.aof.1.base.rdb").write_text(OLD)
    (data / "dump.rdb").write_text(OLD)
    staged = data / ".orkestr-restore" / "appendonlydir"
    staged.mkdir(parents=True)
    (staged / "appendonly.aof.1.base.rdb").write_text(NEW)
    (data / ".orkestr-restore" / ".complete").touch()
    backup.mkdir()
    return data, backup


def run(script: str, data: Path, backup: Path, kill_after: int | None = None) -> int:
    """The script in bash; with kill_after, SIGKILLed before its (kill_after+1)-th command."""
    prelude = ""
    if kill_after is not None:
        prelude = f"n=0; trap 'n=$((n+1)); if ((n > {kill_after})); then kill -9 $$; fi' DEBUG\n"
    env = {"PATH": "/usr/bin:/bin", "DATA": str(data), "BACKUP": str(backup), "STATE": "s"}
    return subprocess.run(["bash", "-c", prelude + script], env=env, timeout=30).returncode


def live(data: Path) -> str:
    aof = data / "appendonlydir" / "appendonly.aof.1.base.rdb"
    return aof.read_text() if aof.exists() else "NONE"


def settled(data: Path) -> set[str]:
    """What is left beside the live files once a restore is settled: nothing of ours."""
    return {p.name for p in data.iterdir()} - {"appendonlydir", "dump.rdb", ".orkestr-previous"}


def commands(script: str, data: Path, backup: Path) -> int:
    """How many commands a full run takes: kill points beyond it change nothing."""
    k = 0
    while run(script, data, backup, kill_after=k) != 0:
        k += 1
    return k


def test_swap_killed_anywhere_twice_then_resumed_serves_the_restored_data(tmp_path: Path) -> None:
    data, backup = volume(tmp_path / "count")
    total = commands(backup_scripts.REDIS_RESTORE_SWAP, data, backup)
    assert total > 5
    # Every first kill point; the resumed run killed too at a spread of points.
    for first in range(total + 1):
        for second in range(1, total + 1, 7):
            data, backup = volume(tmp_path / f"{first}-{second}")
            run(backup_scripts.REDIS_RESTORE_SWAP, data, backup, kill_after=first)
            run(backup_scripts.REDIS_RESTORE_SWAP, data, backup, kill_after=second)
            assert run(backup_scripts.REDIS_RESTORE_SWAP, data, backup) == 0, (first, second)
            assert (backup / "s").read_text().strip() == "restored"
            assert live(data) == NEW, (first, second)
            previous = data / ".orkestr-previous" / "appendonlydir" / "appendonly.aof.1.base.rdb"
            assert previous.read_text() == OLD, (first, second)  # kept for a rollback
            assert settled(data) == set(), (first, second, settled(data))


@pytest.mark.parametrize("after_swap", ["complete", "half"])
def test_rollback_killed_anywhere_then_resumed_serves_one_whole_data_set(
    tmp_path: Path, after_swap: str
) -> None:
    # A swap that failed halfway is rolled back too: the first kill point at which no
    # live files are left.
    half = 0
    while after_swap == "half":
        data, backup = volume(tmp_path / f"half-{half}")
        run(backup_scripts.REDIS_RESTORE_SWAP, data, backup, kill_after=half)
        if live(data) == "NONE":
            break
        half += 1

    def swapped(where: Path) -> tuple[Path, Path]:
        data, backup = volume(where)
        kill = half if after_swap == "half" else None
        code = run(backup_scripts.REDIS_RESTORE_SWAP, data, backup, kill_after=kill)
        assert (code == 0) == (after_swap == "complete")
        return data, backup

    data, backup = swapped(tmp_path / "count")
    total = commands(backup_scripts.REDIS_RESTORE_ROLLBACK, data, backup)
    for k in range(total + 1):
        data, backup = swapped(tmp_path / str(k))
        run(backup_scripts.REDIS_RESTORE_ROLLBACK, data, backup, kill_after=k)
        # The restarted agent resumes with the swap script: it finishes a rollback once
        # begun, and otherwise finds a finished swap (the agent then checks it answers).
        assert run(backup_scripts.REDIS_RESTORE_SWAP, data, backup) == 0, k
        outcome = (backup / "s").read_text().strip()
        assert live(data) == (OLD if outcome == "previous" else NEW), (k, outcome)
        if outcome == "restored":  # the agent's rollback after a failed readiness check
            assert run(backup_scripts.REDIS_RESTORE_ROLLBACK, data, backup) == 0
            assert live(data) == OLD
        assert settled(data) <= {".orkestr-restore"}, (k, settled(data))
        assert not (data / ".orkestr-previous").exists()
