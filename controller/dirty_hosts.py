"""Protocols that let modules depend on a role instead of on each other."""

from __future__ import annotations

from typing import Protocol


class DirtyHosts(Protocol):
    """Where a change reports hosts whose desired state is now different (the publisher)."""

    def mark(self, *hosts: str) -> None: ...
