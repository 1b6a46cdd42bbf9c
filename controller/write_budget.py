"""A budget for a project token's writes, and one for its reads: a token bucket per project.

Each write a tenant makes may republish its host's whole desired state (every project
placed there, signed) and cost that host's agent a reconcile pass: a loop of
`rotate-credentials` from one project token made about 45 generations a second, each a
pass over every add-on of the host, for every other tenant there. The operator's
requests are not counted. Reads (controller/api.py keeps a second budget, larger) keep
the controller's one process busy for everyone, agents' fetches included. Pure: the
caller passes the clock.
"""

from __future__ import annotations


class WriteBudget:
    def __init__(self, per_s: float, burst: int) -> None:
        self.per_s = per_s  # 0: no budget
        self.burst = burst
        # project id -> (tokens left, when they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}

    def wait(self, project_id: str, now: float) -> float:
        """The seconds until the project may spend again (0.0: now); nothing spent."""
        if self.per_s <= 0 or project_id not in self._buckets:
            return 0.0
        tokens, then = self._buckets[project_id]
        tokens = min(float(self.burst), tokens + (now - then) * self.per_s)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.per_s

    def take(self, project_id: str, now: float) -> float:
        """Spend one write of the project's budget: 0.0 if it may go on, else the seconds
        until it may write again (nothing spent)."""
        if self.per_s <= 0:
            return 0.0
        tokens, then = self._buckets.get(project_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.per_s)
        if tokens < 1.0:
            self._buckets[project_id] = (tokens, now)
            return (1.0 - tokens) / self.per_s
        self._buckets[project_id] = (tokens - 1.0, now)
        return 0.0
