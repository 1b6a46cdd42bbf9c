"""Log lines as one event name plus key=value pairs (the format is schemas/logs.py).

`log(logger, "addon_created", project=..., addon=...)` writes
`addon_created project=... addon=...`; values with spaces or quotes are quoted. Callers
never pass passwords or tokens.
"""

from __future__ import annotations

import logging
from typing import Any

from schemas import logs
from schemas.logs import Format


def format_event(event: str, fields: dict[str, Any]) -> str:
    return " ".join([event, *(f"{k}={logs.quote(v)}" for k, v in fields.items())])


def log(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, "%s", format_event(event, fields))


def configure(level: str, fmt: Format = "text") -> None:
    logs.configure(level, fmt)
    # paho logs every packet at DEBUG through aiomqtt's logger; keep it quieter.
    logging.getLogger("mqtt").setLevel(max(logging.INFO, logging.getLevelName(level)))
