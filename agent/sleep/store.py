"""Each add-on's sleep state and wake figures, persisted so a restarted agent keeps
sleeping add-ons asleep (and never mistakes one for a crashed database)."""

from __future__ import annotations

from pathlib import Path

import msgspec

from agent.state import atomic_write
from schemas.messages import SleepState


class Persisted(msgspec.Struct):
    state: SleepState = "awake"
    last_activity: float = 0.0  # epoch seconds
    sleeps: int = 0
    wakes: int = 0
    last_wake_ms: list[float] = []


class SleepStore:
    """Sleep states on disk, so a restarted agent knows which add-ons sleep on purpose."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Persisted]:
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=dict[str, Persisted])
        except (OSError, msgspec.DecodeError):
            return {}

    _last: bytes = b""

    def save(self, states: dict[str, Persisted]) -> None:
        data = msgspec.json.encode(states)
        if data != self._last:  # an fsync per pass would stall the loop for nothing
            atomic_write(self.path, data)
            self._last = data
