"""Log lines as one event name plus key=value pairs.

`log(logger, "addon_created", project=..., addon=...)` writes
`addon_created project=... addon=...`; values with spaces or quotes are quoted. Callers
never pass passwords or tokens.
"""

from __future__ import annotations

import logging
import sys
from typing import Any


def _value(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=\\' for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def format_event(event: str, fields: dict[str, Any]) -> str:
    return " ".join([event, *(f"{k}={_value(v)}" for k, v in fields.items())])


def log(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, "%s", format_event(event, fields))


def configure(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # paho logs every packet at DEBUG through aiomqtt's logger; keep it quieter.
    logging.getLogger("mqtt").setLevel(max(logging.INFO, logging.getLevelName(level)))
