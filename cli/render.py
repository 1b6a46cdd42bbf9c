"""Output: Rich tables for people, plain JSON (`--json`) for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

out = Console(soft_wrap=True)
err = Console(stderr=True)


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def table(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], empty: str = "nothing yet"
) -> None:
    # Text, not markup: values like "[x]" from the API are shown as they are.
    listed = [tuple(Text("" if v is None else str(v)) for v in row) for row in rows]
    if not listed:
        out.print(f"[dim]{empty}[/dim]")
        return
    t = Table(*columns, box=None, header_style="bold", pad_edge=False)
    for row in listed:
        t.add_row(*row)
    out.print(t)


def lines(
    columns: Sequence[str], rows: Iterable[Sequence[str]], empty: str = "nothing yet"
) -> None:
    """A table whose last column is never wrapped or cut, whatever the terminal's width:
    for values that are copied whole (a DATABASE_URL with its password)."""
    listed = [tuple(row) for row in rows]
    if not listed:
        out.print(f"[dim]{empty}[/dim]")
        return
    widths = [max(len(r[i]) for r in [tuple(columns), *listed]) for i in range(len(columns) - 1)]
    for row in [tuple(columns), *listed]:
        head = "".join(v.ljust(w + 2) for v, w in zip(row, widths, strict=False))
        sys.stdout.write(head + row[-1] + "\n")


def fields(pairs: Sequence[tuple[str, Any]]) -> None:
    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for key, value in pairs:
        t.add_row(key, Text("" if value is None else str(value)))
    out.print(t)
