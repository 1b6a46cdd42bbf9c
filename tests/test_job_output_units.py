"""Live job output, the pure parts: the agent's chunker and the controller's assembly.

Whatever the output and however it is fed, the chunks are numbered without holes, never
exceed the chunk size, and their offsets and `dropped` counts account for every
character; assembling them (in any order, redelivered, overlapping) gives the output back,
with exactly the dropped characters counted as lost.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from agent.joboutput import Chunker, Piece, Progress
from controller.joboutput import Chunk, assemble, is_complete


def drain(chunker: Chunker) -> list[Piece]:
    pieces = []
    while (piece := chunker.take()) is not None:
        pieces.append(piece)
    return pieces


def test_chunks_are_bounded_numbered_and_drop_the_oldest_past_the_buffer() -> None:
    c = Chunker(chunk_chars=4, buffer_chars=8)
    c.feed("abcdef")
    assert c.take() == Piece(0, 0, "abcd", 0)
    c.feed("ghijklmnop")  # buffer "ef" + 10 chars = 12 > 8: "efgh" dropped
    assert drain(c) == [Piece(1, 8, "ijkl", 4), Piece(2, 12, "mnop", 0)]
    assert c.progress(done=True) == Progress(3, 16, True)
    c.feed("\x00")  # Postgres cannot hold NUL: a stand-in of the same length
    assert c.take() == Piece(3, 16, "\ufffd", 0)


def test_a_resumed_chunker_skips_what_was_sent_and_keeps_numbering() -> None:
    c = Chunker(4, 8, Progress(seq=5, offset=6), skip=6)
    c.feed("abc")
    c.feed("defgh")
    assert drain(c) == [Piece(5, 6, "gh", 0)]


@given(
    pieces=st.lists(st.text(max_size=30), max_size=30),
    chunk=st.integers(1, 10),
    buffer=st.integers(1, 40),
    takes=st.lists(st.booleans(), max_size=30),
)
def test_chunks_account_for_every_character(
    pieces: list[str], chunk: int, buffer: int, takes: list[bool]
) -> None:
    c = Chunker(chunk, buffer)
    sent: list[Piece] = []
    for i, text in enumerate(pieces):
        c.feed(text)
        if i < len(takes) and takes[i] and (p := c.take()) is not None:
            sent.append(p)
    sent += drain(c)
    whole = "".join(pieces).replace("\x00", "\ufffd")
    assert [p.seq for p in sent] == list(range(len(sent)))
    assert all(len(p.data) <= chunk for p in sent)
    end = 0
    for p in sent:
        assert p.offset == end + p.dropped
        assert whole[p.offset : p.offset + len(p.data)] == p.data
        end = p.offset + len(p.data)
    assert end == len(whole)
    # Assembled in any order with redeliveries, the output comes back; lost = dropped.
    chunks = [Chunk(p.seq, p.offset, p.data) for p in reversed(sent + sent[:2])]
    got = assemble(chunks, 0)
    assert got.next_offset == end
    assert got.lost == sum(p.dropped for p in sent)
    assert len(got.text) + got.lost == end


@given(
    text=st.text(min_size=1, max_size=60),
    cuts=st.lists(st.integers(0, 60)),
    after=st.integers(0, 70),
)
def test_assembly_after_an_offset(text: str, cuts: list[int], after: int) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    chunks = [Chunk(i, a, text[a:b]) for i, (a, b) in enumerate(itertools.pairwise(bounds))]
    got = assemble(chunks, after)
    assert got.text == text[after:]
    assert got.next_offset == max(after, len(text)) and got.lost == 0
    # Without its first chunk, the output starts later and says how much is missing.
    if len(chunks) > 1 and after < chunks[1].offset:
        partial = assemble(chunks[1:], after)
        assert partial.text == text[chunks[1].offset :]
        assert partial.lost == chunks[1].offset - after


def test_complete_once_finished_and_every_chunk_sent_is_in_or_the_grace_passed() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    assert not is_complete("pending", None, 0, None, t, 0, 0)
    assert is_complete("succeeded", 3, 3, t, t, 10, 10)
    assert not is_complete("succeeded", 3, 3, t, t, 5, 10)  # more to read
    assert not is_complete("failed", 3, 2, t, t + timedelta(seconds=1), 10, 10)
    assert is_complete("failed", 3, 2, t, t + timedelta(seconds=11), 10, 10)
    assert is_complete("succeeded", None, 0, t, t, 0, 0)  # an agent that did not stream
    assert is_complete("cancelled", 4, 0, t, t, 0, 0)
