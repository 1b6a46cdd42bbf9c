"""The log line format both services write: one event per line, text or JSON lines.

A message is an event name and `key=value` pairs (`action.done action=RunContainer
key=...`); values with spaces or quotes are double-quoted. In "text" format a line is
`<time> <LEVEL> <logger> <message>`; in "json" format it is one JSON object per line with
`ts`, `level`, `logger`, `event`, the pairs as keys, `msg` (the whole message) and, for
an exception, `exc` (its traceback as one string). Stdlib only: both services import it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

Format = Literal["text", "json"]
TEXT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# key=value, the value bare or double-quoted with backslash escapes.
_PAIR = re.compile(r'([A-Za-z_][\w.-]*)=("(?:[^"\\]|\\.)*"|[^"\s]*)(?=\s|$)')
_RESERVED = frozenset({"ts", "level", "logger", "event", "msg", "exc"})


def quote(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=\\' for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], raw[1:-1])
    return raw


def parse(message: str) -> tuple[str, dict[str, str]] | None:
    """(event, pairs) of a well-formed message; None for free text."""
    event, _, rest = message.partition(" ")
    if not event or "=" in event:
        return None
    pairs: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        found = _PAIR.match(rest, pos)
        if found is None:
            return None
        pairs[found[1]] = _unquote(found[2])
        pos = found.end()
        while pos < len(rest) and rest[pos] == " ":
            pos += 1
    return event, pairs


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        parsed = parse(message)
        if parsed is not None:
            line["event"] = parsed[0]
            line.update({k: v for k, v in parsed[1].items() if k not in _RESERVED})
        line["msg"] = message
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(level: str, fmt: Format = "text", stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers with one that writes `fmt` to `stream` (stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
