"""The flush of an exited job's live output (`JobOutputs.finish`), with the log follower
and the publisher injected: how long the stream may go on after the job's exit is logic,
timed here on a short scale (the real stream against Docker is tests/test_job_output.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec

from agent.joboutput import JobOutputs
from agent.state import StateDir
from schemas.messages import JobOutput

QUIET_S = 0.3
JOB, PROJECT = "a" * 32, "b" * 32


def outputs(
    tmp_path: Path, log: AsyncIterator[str], sent: list[str], broker_up: bool = True
) -> JobOutputs:
    def follow(_container: str) -> AsyncIterator[str]:
        return log

    async def publish(_topic: str, payload: bytes) -> bool:
        if broker_up:
            sent.append(msgspec.json.decode(payload, type=JobOutput).data)
        return broker_up

    return JobOutputs(
        "h1",
        StateDir(tmp_path),
        follow,
        publish,
        interval_s=0.05,
        chunk_chars=4096,
        buffer_chunks=64,
        flush_quiet_s=QUIET_S,
        flush_max_s=3.0,
    )


async def trickle(lines: int, every_s: float, end: bool = True) -> AsyncIterator[str]:
    """Docker streaming a flood's log after the container exited: it keeps coming."""
    for i in range(lines):
        await asyncio.sleep(every_s)
        yield f"line {i}\n"
    if end:
        yield "END\n"
    else:
        await asyncio.Event().wait()  # a follower that never ends


async def test_the_end_arrives_while_the_log_still_comes_longer_than_the_quiet_window(
    tmp_path: Path,
) -> None:
    # 1.5 s of log after the exit, five times the quiet window: a fixed flush of that
    # window cut it (the old `STREAM_FLUSH_S`); progress keeps the stream going.
    sent: list[str] = []
    out = outputs(tmp_path, trickle(15, 0.1), sent)
    stream = asyncio.create_task(out.stream(JOB, PROJECT, "c1"))
    await out.finish(JOB, stream)
    assert stream.done() and not stream.cancelled()
    text = "".join(sent)
    assert text.endswith("line 14\nEND\n"), text[-40:]
    assert out.sent(JOB) == len(sent)


async def test_a_stream_that_stops_progressing_is_cut_after_the_quiet_window(
    tmp_path: Path,
) -> None:
    # The log has ended but the broker is away: nothing is published, so nothing more
    # can happen: the result does not wait past the quiet window.
    sent: list[str] = []
    out = outputs(tmp_path, trickle(2, 0.01), sent, broker_up=False)
    stream = asyncio.create_task(out.stream(JOB, PROJECT, "c1"))
    started = time.monotonic()
    await out.finish(JOB, stream)
    took = time.monotonic() - started
    assert stream.cancelled()
    assert QUIET_S <= took < QUIET_S + 1.0, took
    assert sent == []


async def test_a_log_that_never_ends_is_cut_at_the_hard_bound(tmp_path: Path) -> None:
    sent: list[str] = []
    out = outputs(tmp_path, trickle(10_000, 0.05, end=False), sent)
    stream = asyncio.create_task(out.stream(JOB, PROJECT, "c1"))
    started = time.monotonic()
    await out.finish(JOB, stream)
    took = time.monotonic() - started
    assert stream.cancelled()
    assert 3.0 <= took < 4.0, took
    # What was sent is kept: a later stream resumes after it.
    assert out.sent(JOB) == len(sent) > 0
