"""When an idle add-on should sleep (pure).

Two stages: *light* pauses the container (cgroup freezer: CPU freed, memory kept, wakes in
milliseconds); *deep* stops it (memory freed, wakes in a database start-up). Idle means
no client connection for the whole period; the platform's own connections (probes,
relays' upstream legs) are never counted as activity by the caller.
"""

from __future__ import annotations

from schemas.messages import SleepPolicy, SleepState


def target(
    policy: SleepPolicy, current: SleepState, idle_s: float, has_clients: bool
) -> SleepState:
    """The sleep state an add-on should be in after `idle_s` seconds without clients.

    Only deepens: waking is `goal`'s, on a client's wake request.
    """
    if not policy.enabled or has_clients:
        return current
    if idle_s >= policy.deep_after_s:
        return "deep"
    if idle_s >= policy.light_after_s and current == "awake":
        return "light"
    return current


def goal(
    policy: SleepPolicy,
    current: SleepState,
    idle_s: float,
    *,
    has_clients: bool,
    ready: bool,
    held: bool,
    wake_requested: bool,
) -> SleepState:
    """The state the planner drives an add-on to; the one rule for sleeping and waking.

    Never asleep while a client holds a connection or waits at the wake listener, nor
    while a platform operation (a backup) holds it, nor once its plan stops allowing sleep
    (a sleeping add-on then wakes); a database that has not answered a client yet (initdb)
    is never paused or stopped.
    """
    if wake_requested or held or not policy.enabled:
        return "awake"
    if current == "awake" and not ready:
        return "awake"
    return target(policy, current, idle_s, has_clients)
