"""The benchmarks' own readiness checks: a baseline that stops timing early is no baseline."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from backup import info_loaded

# Redis 7.0.15's `INFO persistence` while it loads a data set, and once it has (abridged).
LOADING = (
    b"# Persistence\r\nloading:1\r\nasync_loading:0\r\ncurrent_cow_peak:0\r\n"
    b"loading_start_time:1795847603\r\nloading_loaded_perc:41.32\r\n"
)
LOADED = b"# Persistence\r\nloading:0\r\nasync_loading:0\r\ncurrent_cow_peak:0\r\n"


def test_a_redis_still_loading_is_not_loaded() -> None:
    # Its async_loading:0 holds "loading:0": the by-hand baseline took that for the end.
    assert not info_loaded(LOADING)
    assert info_loaded(LOADED)
    assert not info_loaded(b"")  # no answer (not listening yet)
    assert not info_loaded(b"-LOADING Redis is loading the dataset in memory\r\n")
