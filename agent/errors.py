"""The agent's error hierarchy. Foreign exceptions are translated once, in the adapters.

AgentError
├── NotFound        the object does not exist (a delete of it counts as done)
├── Conflict        it already exists (a create of it counts as done)
├── TransientError  retry later with backoff: daemon, broker or controller unreachable
├── PermanentError  retrying will not help: bad image, invalid spec; reported in status
└── NetworkRefused  Docker will not remove a network ("has active endpoints"): recorded,
                    asked again on the planner's schedule (agent/netremoval.py)
"""

from __future__ import annotations


class AgentError(Exception):
    pass


class NotFound(AgentError):
    pass


class Conflict(AgentError):
    pass


class TransientError(AgentError):
    pass


class PermanentError(AgentError):
    pass


class NetworkRefused(TransientError):
    """Docker refused a network's removal: something (or only its own count) is attached.
    `attached`: the container names Docker lists on the network."""

    def __init__(self, message: str, attached: tuple[str, ...]) -> None:
        super().__init__(message)
        self.attached = attached
