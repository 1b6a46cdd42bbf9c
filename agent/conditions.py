"""Kubernetes-style conditions whose last_transition_time only moves when the status flips."""

from __future__ import annotations

from datetime import datetime

from schemas.messages import Condition, ConditionStatus


class ConditionBook:
    """Conditions by owner (an add-on, a job, the host) and type.

    Kept per owner: a status report reads every owner's conditions each pass, and a scan
    of the whole book per owner made that quadratic in the add-ons on the host.
    """

    def __init__(self) -> None:
        self._by_owner: dict[str, dict[str, Condition]] = {}

    def set(
        self,
        owner: str,
        type_: str,
        status: ConditionStatus,
        reason: str,
        message: str,
        now: datetime,
    ) -> Condition:
        conditions = self._by_owner.setdefault(owner, {})
        old = conditions.get(type_)
        since = old.last_transition_time if old is not None and old.status == status else now
        cond = Condition(type_, status, reason, message, since)
        conditions[type_] = cond
        return cond

    def of(self, owner: str) -> tuple[Condition, ...]:
        """An owner's conditions, by type."""
        conditions = self._by_owner.get(owner, {})
        return tuple(conditions[t] for t in sorted(conditions))

    def flips(self, owner: str) -> dict[str, tuple[ConditionStatus, str]]:
        """An owner's conditions without their messages and times, type -> (status,
        reason): what changes when a condition flipped, not when a usage figure moved."""
        return {t: (c.status, c.reason) for t, c in self._by_owner.get(owner, {}).items()}

    def get(self, owner: str, type_: str) -> Condition | None:
        return self._by_owner.get(owner, {}).get(type_)

    def forget(self, owner: str) -> None:
        self._by_owner.pop(owner, None)
