"""Pure verdicts on backups: parsing the scripts' counts and comparing them.

A backup is verified only if its test restore reproduced what was counted at dump time:
every table with the same number of rows (Postgres), or the key count within what the
live server held just before and just after the snapshot (Redis; writes may land between
the two counts and the snapshot).
"""

from __future__ import annotations


def parse_counts(text: str) -> dict[str, int]:
    """`name|number` lines; a line that is not one is a script failure, not data. A name
    the script could not put on one line comes as `hex:` and its UTF-8 in hex."""
    counts: dict[str, int] = {}
    for line in text.split("\n"):  # not splitlines(): a name may hold \x1c, \x85, ...
        if not line.strip():
            continue
        name, sep, number = line.rpartition("|")
        if not sep or not number.strip().isdigit():
            raise ValueError(f"unexpected count line {line[:200]!r}")
        counts[_unhex(name)] = int(number)
    return counts


def _unhex(name: str) -> str:
    if not name.startswith("hex:"):
        return name
    try:
        return bytes.fromhex(name[4:]).decode()
    except ValueError:
        raise ValueError(f"unexpected count name {name[:200]!r}") from None


# The dump scripts report the data's size as one more count line under this name: no
# table's count can take it (theirs are `schema.table`, with a dot).
DATA_BYTES = ":data_bytes"


def split_data_bytes(counts: dict[str, int]) -> tuple[dict[str, int], int | None]:
    """(the counts proper, the data size the script reported, if any)."""
    rest = {k: v for k, v in counts.items() if k != DATA_BYTES}
    return rest, counts.get(DATA_BYTES)


def postgres_verdict(at_dump: dict[str, int], restored: dict[str, int]) -> str | None:
    """None if the restore has the same tables with the same row counts; else why not."""
    missing = sorted(set(at_dump) - set(restored))
    extra = sorted(set(restored) - set(at_dump))
    differ = sorted(t for t in set(at_dump) & set(restored) if at_dump[t] != restored[t])
    problems = []
    if missing:
        problems.append(f"tables missing after restore: {', '.join(missing[:5])}")
    if extra:
        problems.append(f"unexpected tables after restore: {', '.join(extra[:5])}")
    for t in differ[:5]:
        problems.append(f"{t}: {at_dump[t]} rows at dump time, {restored[t]} restored")
    return "; ".join(problems) or None


def redis_verdict(at_dump: dict[str, int], restored: dict[str, int]) -> str | None:
    low = min(at_dump.get("keys_before", 0), at_dump.get("keys_after", 0))
    high = max(at_dump.get("keys_before", 0), at_dump.get("keys_after", 0))
    keys = restored.get("keys")
    if keys is None:
        return "the test restore reported no key count"
    if not low <= keys <= high:
        expect = str(low) if low == high else f"{low}..{high}"
        return f"{keys} keys restored, {expect} at dump time"
    return None


def verdict(kind: str, at_dump: dict[str, int], restored: dict[str, int]) -> str | None:
    if kind == "postgres":
        return postgres_verdict(at_dump, restored)
    return redis_verdict(at_dump, restored)


def dump_counts(kind: str, counts: dict[str, int]) -> dict[str, int]:
    """What is reported for a backup: rows per table, or the key count at dump time."""
    if kind == "postgres":
        return counts
    return {"keys": max(counts.get("keys_before", 0), counts.get("keys_after", 0))}
