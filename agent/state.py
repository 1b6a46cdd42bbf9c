"""What the agent keeps on its own disk so that a restart loses nothing.

- the last good desired state (applied while the broker or controller is away);
- job results not yet acknowledged by the controller (the job left the desired state);
- each add-on's sleep state and counters.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from schemas.codec import MessageRejected, decode
from schemas.messages import DesiredState, JobResult


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    # 0600: job results may hold whatever a job printed, connection URLs included.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StateDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "jobs").mkdir(parents=True, exist_ok=True)
        # Private to the agent (root): secrets, job output and state live below.
        os.chmod(root, 0o700)
        os.chmod(root / "jobs", 0o700)

    def load_desired(self) -> DesiredState | None:
        try:
            return decode((self.root / "desired.json").read_bytes(), DesiredState)
        except FileNotFoundError:
            return None
        except MessageRejected:
            return None  # a state file from another version: wait for the broker's copy

    def save_desired(self, raw: bytes) -> None:
        atomic_write(self.root / "desired.json", raw)

    def save_job_result(self, result: JobResult) -> None:
        atomic_write(self.root / "jobs" / f"{result.job_id}.json", msgspec.json.encode(result))

    def job_results(self) -> dict[str, JobResult]:
        out: dict[str, JobResult] = {}
        for p in (self.root / "jobs").glob("*.json"):
            try:
                out[p.stem] = msgspec.json.decode(p.read_bytes(), type=JobResult)
            except (OSError, msgspec.DecodeError):
                p.unlink(missing_ok=True)
        return out

    def forget_job(self, job_id: str) -> None:
        (self.root / "jobs" / f"{job_id}.json").unlink(missing_ok=True)
        (self.root / "jobs" / f"{job_id}.stream").unlink(missing_ok=True)

    def save_job_stream(self, job_id: str, progress: bytes) -> None:
        """What the job's live output stream has sent (agent/joboutput.py)."""
        atomic_write(self.root / "jobs" / f"{job_id}.stream", progress)

    def job_streams(self) -> set[str]:
        return {p.stem for p in (self.root / "jobs").glob("*.stream")}

    def load_job_stream(self, job_id: str) -> bytes | None:
        try:
            return (self.root / "jobs" / f"{job_id}.stream").read_bytes()
        except OSError:
            return None
