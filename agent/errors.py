"""The agent's error hierarchy. Foreign exceptions are translated once, in the adapters.

AgentError
├── NotFound        the object does not exist (a delete of it counts as done)
├── Conflict        it already exists (a create of it counts as done)
├── TransientError  retry later with backoff: daemon, broker or controller unreachable
└── PermanentError  retrying will not help: bad image, invalid spec; reported in status
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
