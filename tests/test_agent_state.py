"""The agent's state directory is private to the agent: job output may hold connection
URLs (real files in a temporary directory, no services)."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from pathlib import Path

from agent.state import StateDir
from schemas.messages import SCHEMA_VERSION, JobResult


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_files_are_private(tmp_path: Path) -> None:
    root = tmp_path / "state"
    root.mkdir(mode=0o755)
    state = StateDir(root)
    state.save_desired(b"{}")
    now = datetime.now(UTC)
    state.save_job_result(
        JobResult(
            version=SCHEMA_VERSION,
            host="h1",
            job_id="a" * 32,
            project_id="b" * 32,
            exit_code=0,
            output="postgresql://app:secret@db:5432/app",
            started_at=now,
            finished_at=now,
        )
    )
    assert mode(root) == mode(root / "jobs") == 0o700
    assert mode(root / "desired.json") == 0o600
    assert mode(root / "jobs" / f"{'a' * 32}.json") == 0o600
    assert list(state.job_results()) == ["a" * 32]
