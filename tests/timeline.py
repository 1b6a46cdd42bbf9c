"""The run's timeline, for balancing the two workers: with ORKESTR_TEST_TIMELINE=prefix
each worker appends a line per test phase to `<prefix>-<worker>.tsv`:
end time (epoch s), worker, test id, phase (setup/call/teardown), seconds, outcome.
A file's span on its worker, and how long a worker sat idle at the end, follow from it
(`--durations` gives neither: it names no worker and no time of day).
"""

from __future__ import annotations

import os
import time

import pytest


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    prefix = os.environ.get("ORKESTR_TEST_TIMELINE")
    if not prefix:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(f"{prefix}-{worker}.tsv", "a") as out:
        out.write(
            f"{time.time():.2f}\t{worker}\t{report.nodeid}\t{report.when}\t"
            f"{report.duration:.2f}\t{report.outcome}\n"
        )
