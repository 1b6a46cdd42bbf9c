"""The gate a Postgres restore's container waits at while the agent checks the backup's
sha256 (`_GATE` in agent/backup_scripts.py): nothing after it runs until the agent says
`go` on the control FIFO (agent/control_pipe.py), and an `abort` ends the script there.
Real bash and real FIFOs; what follows the gate here only leaves a mark."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from agent import backup_scripts
from agent.control_pipe import ControlPipe


async def _gated(tmp_path: Path, command: str) -> tuple[int, bool, bool]:
    """(exit code, whether the mark was there before the command, after it)."""
    mark = tmp_path / "ran"
    with ControlPipe(tmp_path / "up.tmp", tmp_path / "ctl.tmp") as pipe:
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", "set -euo pipefail\n" + backup_scripts._GATE + f'touch "{mark}"\n',
            env={**os.environ, "BACKUP": str(tmp_path), "CTL": pipe.ctl.name},
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await asyncio.sleep(0.5)  # a script that did not wait would have run by now
        before = mark.exists()
        assert proc.returncode is None, "the script ended without being told"
        pipe.send(command)
        code = await asyncio.wait_for(proc.wait(), 10)
    return code, before, mark.exists()


async def test_the_script_waits_at_the_gate_and_goes_on_go(tmp_path: Path) -> None:
    assert await _gated(tmp_path, "go") == (0, False, True)


@pytest.mark.parametrize("command", ["abort", "", "go on"])
async def test_anything_but_go_ends_the_script_at_the_gate(tmp_path: Path, command: str) -> None:
    code, before, after = await _gated(tmp_path, command)
    assert code != 0 and not before and not after


def test_the_postgres_restore_starts_at_the_gate() -> None:
    # Nothing of the restore (not even its connection's set-up) comes before the gate.
    prelude_end = backup_scripts.PG_RESTORE.index(backup_scripts._GATE)
    assert "psql" not in backup_scripts.PG_RESTORE[:prelude_end]
    assert backup_scripts.PG_RESTORE.startswith(backup_scripts._PRELUDE + backup_scripts._GATE)
