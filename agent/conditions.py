"""Kubernetes-style conditions whose last_transition_time only moves when the status flips."""

from __future__ import annotations

from datetime import datetime

from schemas.messages import Condition, ConditionStatus


class ConditionBook:
    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], Condition] = {}

    def set(
        self,
        owner: str,
        type_: str,
        status: ConditionStatus,
        reason: str,
        message: str,
        now: datetime,
    ) -> Condition:
        old = self._by_key.get((owner, type_))
        since = old.last_transition_time if old is not None and old.status == status else now
        cond = Condition(type_, status, reason, message, since)
        self._by_key[(owner, type_)] = cond
        return cond

    def of(self, owner: str) -> tuple[Condition, ...]:
        return tuple(c for (o, _), c in sorted(self._by_key.items()) if o == owner)

    def get(self, owner: str, type_: str) -> Condition | None:
        return self._by_key.get((owner, type_))

    def forget(self, owner: str) -> None:
        for key in [k for k in self._by_key if k[0] == owner]:
            del self._by_key[key]
