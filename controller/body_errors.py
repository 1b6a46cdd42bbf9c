"""Name the mapping key a request body's validation error is about; find a key given twice.

msgspec says where an error is, but not which key of a mapping: a bad value is "at
`$.set[...]`" and a bad key "at `key` in `$.set`". Run only on a refused body: each entry
of that mapping alone is converted again, and the one that gives the same error is it.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from controller.config import describe

_AT = re.compile(r"(.*) - at (`key` in )?`\$(.*)`", re.DOTALL)
_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+)\]|(\[\.\.\.\])")
_KEY_SHOWN = 64  # characters of a key quoted in a message


def describe_body(exc: msgspec.ValidationError, data: Any, kind: type) -> str:
    """`describe(exc)`, with the keys msgspec leaves as `[...]` or "a key" named."""
    text = str(exc)
    match = _AT.fullmatch(text)
    if match is None or not (match[2] or "[...]" in match[3]):
        return describe(exc)
    message, bad_key, path = match[1], bool(match[2]), match[3]
    steps = [(m[1], m[2], m[3]) for m in _SEGMENT.finditer(path)]
    if "".join(m[0] for m in _SEGMENT.finditer(path)) != path:
        return describe(exc)  # a path this parser does not follow
    where, node = "", data
    for field, index, unknown in steps + ([("", "", "key")] if bad_key else []):
        if field:
            if not isinstance(node, dict) or field not in node:
                return describe(exc)
            where, node = f"{where}.{field}" if where else field, node[field]
        elif index:
            if not isinstance(node, list) or int(index) >= len(node):
                return describe(exc)
            where, node = f"{where}[{index}]", node[int(index)]
        else:
            key = _offender(node, data, kind, text)
            if key is None:
                return describe(exc)
            if unknown == "key":
                return f"{where or 'top level'}: key {shown_key(key)} is invalid: {message}"
            where, node = f"{where}[{shown_key(key)}]", node[key]
    return f"{where or 'top level'}: {message}"


def _offender(mapping: Any, data: Any, kind: type, text: str) -> str | None:
    """The key of `mapping` (a dict inside `data`) that alone still gives the error `text`."""
    if not isinstance(mapping, dict):
        return None
    entries = dict(mapping)
    try:
        for key, value in entries.items():
            mapping.clear()
            mapping[key] = value
            try:
                msgspec.convert(data, kind)
            except msgspec.ValidationError as exc:
                if str(exc) == text:
                    return str(key)
        return None
    finally:
        mapping.clear()
        mapping.update(entries)


def shown_key(key: str) -> str:
    quoted = msgspec.json.encode(key[:_KEY_SHOWN]).decode()
    return quoted if len(key) <= _KEY_SHOWN else f'{quoted[:-1]}..."'


class _Twice(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Twice(key)
            seen.add(key)
    return found


def duplicate_key(raw: bytes) -> str | None:
    """The first key given twice in one object of `raw` (valid JSON), or None.

    msgspec keeps the last of them silently. A body with fewer than two `:` has fewer than
    two keys, so only one with more is parsed again (by the stdlib's C scanner: ~8 us for a
    small body, ~2-6 ms at the 1 MiB limit).
    """
    if raw.count(b":") < 2:
        return None
    try:
        json.loads(raw, object_pairs_hook=_pairs)
    except _Twice as twice:
        return twice.key
    # What msgspec took and the stdlib does not (an integer of over 4300 digits; nesting
    # deeper than this stack allows): no struct of ours takes such a body anyway.
    except (ValueError, RecursionError):
        return None
    return None
