"""Capped exponential backoff with jitter, for reconnect and retry loops (pure)."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays first, 2*first, ... up to cap, each drawn from [d/2, d] so peers spread out."""

    def __init__(
        self, first: float = 0.5, cap: float = 10.0, rng: Callable[[], float] = random.random
    ) -> None:
        self._first = first
        self._cap = cap
        self._rng = rng
        self._attempt = 0

    def next(self) -> float:
        delay = min(self._cap, self._first * 2.0**self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        return delay / 2 + self._rng() * delay / 2

    def reset(self) -> None:
        self._attempt = 0
