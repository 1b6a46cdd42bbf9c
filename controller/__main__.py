"""`python -m controller --config controller.toml` (or env ORKESTR_CONTROLLER_CONFIG).

Also the operator's token commands, against the same database:

    python -m controller --config ... hosts add-token HOST [--name NAME]  # prints it once
    python -m controller --config ... hosts list-tokens HOST
    python -m controller --config ... hosts revoke-token HOST TOKEN_ID
    python -m controller --config ... hosts set-ceiling HOST [--cpus N] [--memory-mb N]

Exit codes: 0 after a graceful stop, 2 for a bad configuration (one line on stderr),
1 when the controller cannot run (database unreachable, a loop died).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from pathlib import Path

from controller import db, principals, store
from controller.app import run
from controller.config import Config, load_config
from controller.errors import ConfigError, DatabaseUnavailable, NotFound
from controller.logs import configure, log
from controller.plans import load_plans

logger = logging.getLogger("controller")
HOST_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
TOKEN_ID = re.compile(r"^[0-9a-f]{32}$")  # as list-tokens prints them


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controller",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keep the examples' lines
    )
    parser.add_argument(
        "--config",
        default=os.environ.get("ORKESTR_CONTROLLER_CONFIG"),
        help="path to controller.toml (default: $ORKESTR_CONTROLLER_CONFIG)",
    )
    sub = parser.add_subparsers(dest="command")
    hosts = sub.add_parser("hosts", help="agent tokens and capacity ceiling of a host")
    host_sub = hosts.add_subparsers(dest="action", required=True)
    add = host_sub.add_parser("add-token", help="make a token for HOST's agent; printed once")
    add.add_argument("host")
    add.add_argument("--name", default="cli")
    listing = host_sub.add_parser("list-tokens", help="HOST's agent tokens (ids, no secrets)")
    listing.add_argument("host")
    revoke = host_sub.add_parser("revoke-token", help="revoke one of HOST's agent tokens")
    revoke.add_argument("host")
    revoke.add_argument("token_id")
    ceiling = host_sub.add_parser(
        "set-ceiling",
        help="the most CPUs and memory placement counts for HOST, whatever it reports"
        " (neither option: no ceiling)",
    )
    ceiling.add_argument("host")
    ceiling.add_argument("--cpus", type=float)
    ceiling.add_argument("--memory-mb", type=int)
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
    if args.command == "hosts":
        return _hosts_command(config, args)
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


def _hosts_command(config: Config, args: argparse.Namespace) -> int:
    if not HOST_NAME.match(args.host):
        print(f"orkestr-controller: {args.host!r} is not a host name", file=sys.stderr)
        return 2
    if args.action == "revoke-token" and not TOKEN_ID.match(args.token_id):
        # uuid's own complaint was "badly formed hexadecimal UUID string".
        print(
            f"orkestr-controller: {args.token_id!r} is not a token id (32 hex digits,"
            f" as `hosts list-tokens {args.host}` shows)",
            file=sys.stderr,
        )
        return 2

    async def act() -> None:
        db_ = config.database
        async with db.open_pool(db_.url, 1, 1) as pool:
            await db.migrate(pool)
            if args.action == "add-token":
                row, token = await principals.create_agent_token(pool, args.host, args.name)
                print(f"# agent token {row.id} for host {args.host}; shown once", file=sys.stderr)
                print(token)
            elif args.action == "list-tokens":
                rows = await principals.list_agent_tokens(pool, args.host)
                for row in rows:
                    print(f"{row.id}\t{row.name}\t{row.created_at.isoformat()}")
                if not rows:  # up.sh's own host has its token in the bootstrap file only
                    print(
                        f"no agent tokens of {args.host} in the database (tokens in"
                        " http.agent_tokens_file are not listed here)",
                        file=sys.stderr,
                    )
            elif args.action == "set-ceiling":
                for value in (args.cpus, args.memory_mb):
                    if value is not None and not 0 <= value < 2**31:
                        raise ValueError(f"a ceiling must be between 0 and 2^31, not {value}")
                await store.set_host_ceiling(pool, args.host, args.cpus, args.memory_mb)
                print(f"# ceiling of {args.host}: cpus={args.cpus} memory_mb={args.memory_mb}")
            else:
                await principals.revoke_agent_token(pool, args.host, args.token_id)

    try:
        asyncio.run(act())
    except (DatabaseUnavailable, NotFound, ValueError) as exc:
        print(f"orkestr-controller: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
