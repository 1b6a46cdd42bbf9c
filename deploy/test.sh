#!/usr/bin/env bash
# Runs the whole test suite: installs and starts what it needs first (idempotent).
#   bash deploy/test.sh            # everything
#   bash deploy/test.sh -k sleep   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/services.sh
.venv/bin/ruff check schemas httpcommon controller agent cli tests bench
.venv/bin/mypy
.venv/bin/lint-imports
# Native tracebacks: formatting a failure never re-parses source (CPython 3.11.7 can fail
# there after a RecursionError, which aborts the whole run); the slowest tests are listed.
# Two workers, a test file at a time on one of them (tests/conftest.py): most of the suite
# waits on timers and dockerd. ORKESTR_TEST_WORKERS=0 runs it in one process.
exec .venv/bin/pytest -q -p no:cacheprovider --tb=native -rfE --durations=25 \
  -n "${ORKESTR_TEST_WORKERS:-2}" --dist loadfile "$@"
