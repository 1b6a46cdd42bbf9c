"""agent/logmark.py: reading a container's log again from where a read got to repeats
nothing and loses nothing, wherever Docker cut the earlier read."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.logmark import LogMark


def stamp(second: int, nanos: int) -> str:
    return f"2026-11-28T03:09:{second:02d}.{nanos:09d}Z"


def test_since_is_the_last_timestamp_in_unix_seconds_and_nanoseconds() -> None:
    mark = LogMark()
    assert mark.reread() == "0"  # the first read: the whole log
    assert mark.admit(f"{stamp(6, 284123456)} hello\n") == "hello\n"
    assert mark.reread() == "1795835346.284123456"
    offset = LogMark()
    offset.admit("2026-11-28T04:09:06.000000010+01:00 x")
    assert offset.reread() == "1795835346.000000010"


def test_a_message_without_a_timestamp_passes_as_it_is() -> None:
    mark = LogMark()
    assert mark.admit("no stamp here") == "no stamp here"
    assert mark.admit("2026-11-28 short") == "2026-11-28 short"
    assert mark.reread() == "0"


messages = st.lists(st.tuples(st.integers(0, 5), st.text(max_size=3)), min_size=0, max_size=40).map(
    lambda raw: [(stamp(1, n), f"{i}:{t}") for i, (n, t) in enumerate(sorted(raw))]
)


@given(messages, st.lists(st.integers(0, 40), max_size=5))
def test_reads_cut_anywhere_give_every_message_once_in_order(
    log: list[tuple[str, str]], cuts: list[int]
) -> None:
    mark = LogMark()
    got: list[str] = []
    # Each read is what Docker sends `since` the mark (inclusive), cut short at a point
    # (the end of a rotated file); the last read runs to the end.
    for cut in [*cuts, len(log)]:
        mark.reread()
        since = mark.last
        sent = [(s, t) for s, t in log if s >= since]
        for s, t in sent[:cut]:
            if (text := mark.admit(f"{s} {t}")) is not None:
                got.append(text)
    assert got == [t for _, t in log]
