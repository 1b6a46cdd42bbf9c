"""`python -m controller --config controller.toml` (or env ORKESTR_CONTROLLER_CONFIG).

Exit codes: 0 after a graceful stop, 2 for a bad configuration (one line on stderr),
1 when the controller cannot run (database unreachable, a loop died).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from controller.app import run
from controller.config import load_config
from controller.errors import ConfigError, DatabaseUnavailable
from controller.logs import configure, log
from controller.plans import load_plans

logger = logging.getLogger("controller")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller", description=__doc__)
    parser.add_argument(
        "--config",
        default=os.environ.get("ORKESTR_CONTROLLER_CONFIG"),
        help="path to controller.toml (default: $ORKESTR_CONTROLLER_CONFIG)",
    )
    args = parser.parse_args(argv)
    if not args.config:
        print(
            "orkestr-controller: no config: pass --config or set ORKESTR_CONTROLLER_CONFIG",
            file=sys.stderr,
        )
        return 2
    try:
        config = load_config(Path(args.config))
        plans = load_plans(config.plans_file)
    except ConfigError as exc:
        print(f"orkestr-controller: {exc}", file=sys.stderr)
        return 2
    configure(config.log.level, config.log.format)
    try:
        asyncio.run(run(config, plans))
    except ConfigError as exc:
        print(f"orkestr-controller: {exc}", file=sys.stderr)
        return 2
    except DatabaseUnavailable as exc:
        log(logger, "controller_failed", logging.ERROR, reason=exc)
        return 1
    except BaseExceptionGroup as group:
        logger.error("controller_failed reason=a loop died", exc_info=group)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
