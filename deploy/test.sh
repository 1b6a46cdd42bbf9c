#!/usr/bin/env bash
# Runs the whole test suite: installs and starts what it needs first (idempotent).
#   bash deploy/test.sh            # everything
#   bash deploy/test.sh -k sleep   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/services.sh
.venv/bin/ruff check schemas controller agent cli tests bench
.venv/bin/mypy
.venv/bin/lint-imports
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
