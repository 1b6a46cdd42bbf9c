"""A project network Docker refuses to remove: when to ask again, what to tell the operator.

Docker refuses a network's removal with "has active endpoints" while a container is
attached to it. The planner asks for the removal only once no container of the project
is left, so a refusal means either a container the platform does not know was attached
(an operator's debug container) or Docker's own endpoint count leaked with no container
attached at all (moby#42119), which only a dockerd restart clears. Retrying every pass
would be a Docker call and a warning a second, for ever. So the refusal is recorded
(`refused`), the planner asks again on a doubling schedule capped at RETRY_CAP_S (`due`),
and after STUCK_AFTER refusals a host condition says which network, why, and what to do.
Nothing else waits on it: a network holds no data, and a new add-on of the project simply
uses the network that is still there.

Pure: the agent's records, the clock and the observation in, decisions and text out.
"""

from __future__ import annotations

from collections.abc import Mapping

from msgspec import Struct

from schemas.messages import ConditionStatus

RETRY_FIRST_S = 2.0
RETRY_CAP_S = 300.0
# Refusals before the host condition and the metric say so: a container being removed
# may leave its endpoint for a moment, a leak stays.
STUCK_AFTER = 3
CONDITION = "NetworksRemovable"
LEAK = "moby#42119"


class Refusal(Struct, frozen=True):
    attempts: int  # refusals in a row
    last_at: float  # epoch seconds of the last one
    # Containers Docker lists on the network at the refusal; none: a leaked endpoint count.
    attached: tuple[str, ...] = ()


def refused(previous: Refusal | None, attached: tuple[str, ...], now: float) -> Refusal:
    return Refusal((previous.attempts if previous else 0) + 1, now, tuple(sorted(attached)))


def retry_in(attempts: int, first: float = RETRY_FIRST_S, cap: float = RETRY_CAP_S) -> float:
    """Seconds after the `attempts`-th refusal before the next removal is asked for."""
    return float(min(cap, first * 2.0 ** min(max(attempts - 1, 0), 32)))


def due(refusal: Refusal | None, now: float) -> bool:
    return refusal is None or now >= refusal.last_at + retry_in(refusal.attempts)


def keep(refusals: Mapping[str, Refusal], unwanted: set[str]) -> dict[str, Refusal]:
    """The records still meaningful: of networks that exist and that no add-on, job or
    app wants any more. One the project wants again (a new add-on reuses it) or that is
    gone (removed, or by hand) starts afresh."""
    return {name: r for name, r in refusals.items() if name in unwanted}


def stuck(refusals: Mapping[str, Refusal]) -> dict[str, Refusal]:
    return {name: r for name, r in refusals.items() if r.attempts >= STUCK_AFTER}


def condition(refusals: Mapping[str, Refusal]) -> tuple[ConditionStatus, str, str]:
    """(status, reason, message) of the host's NetworksRemovable condition."""
    found = stuck(refusals)
    if not found:
        return "True", "Removed", "every network no longer wanted was removed"
    leaked = sorted(n for n, r in found.items() if not r.attached)
    held = sorted(n for n, r in found.items() if r.attached)
    parts: list[str] = []
    if leaked:
        parts.append(
            f'Docker refuses to remove {_names(leaked)} ("has active endpoints") with no '
            f"container attached: its endpoint count leaked ({LEAK}). Restart dockerd to "
            'clear it (docs/operations.md, "Failure modes"); running '
            "add-ons keep running"
        )
    if held:
        parts.append(
            "containers the platform does not manage are attached to "
            + "; ".join(f"{n} ({_names(list(found[n].attached))})" for n in held)
            + ": disconnect them (docker network disconnect)"
        )
    most = max(r.attempts for r in found.values())
    parts.append(
        f"asked again in {retry_in(most):.0f} s, then at most every {RETRY_CAP_S:.0f} s; new "
        "add-ons of these projects use the network as it is"
    )
    return "False", "RemovalRefused", "; ".join(parts)


def _names(names: list[str]) -> str:
    """At most five names, and how many more: a network may hold hundreds."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
