"""Live job output: the chunks agents stream while a job runs, stored and followed.

An agent publishes a running job's output in numbered chunks (schemas.messages.JobOutput,
agent/joboutput.py). `record_chunk` keeps a chunk only for a job of a project placed on
the publishing host (anything else is refused), drops a redelivered one (same job and
`seq`), counts the chunks that a later one shows missing, and trims the job's chunks to
the newest `retain_chars` characters, as the job's final output is capped.

`GET /v1/projects/{p}/jobs/{j}/output?after=N&wait=S` is a long poll: it answers at once
when there is output past offset N (or the stream is complete), else when some arrives
within S seconds (an `OutputWatch` wakes it), else empty. `assemble` is the pure part:
chunks in, the text after an offset out, with the characters missing before it counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Literal

from msgspec import Struct

from controller.db import Pool, transaction
from controller.errors import NotFound
from controller.store_rows import JobState, scrub, uuid_of
from schemas.messages import JobOutput

# A finished job's stream counts as complete this long after the job finished even if
# chunks the agent said it sent never came (a broker restart lost them).
GRACE = timedelta(seconds=10)
# At most this many chunks a job keeps, whatever their size (one-character chunks too).
MAX_CHUNKS = 4096
# One answer carries at most this many chunks; the client asks again for the rest.
PAGE_CHUNKS = 512


class Chunk(Struct, frozen=True):
    seq: int
    offset: int
    data: str


class Assembled(Struct, frozen=True):
    text: str
    next_offset: int
    lost: int  # characters between `after` and `next_offset` the text lacks


def assemble(chunks: Sequence[Chunk], after: int) -> Assembled:
    """The output after offset `after` from (possibly overlapping, unordered) chunks."""
    pos, lost, parts = after, 0, []
    for c in sorted(chunks, key=lambda c: (c.offset, c.seq)):
        end = c.offset + len(c.data)
        if end <= pos:
            continue
        if c.offset > pos:
            lost += c.offset - pos
            pos = c.offset
        parts.append(c.data[pos - c.offset :])
        pos = end
    return Assembled("".join(parts), pos, lost)


class JobOutputView(Struct, frozen=True):
    job_id: str
    state: JobState
    exit_code: int | None
    error: str | None
    offset: int  # the `after` asked for
    output: str  # the output from `offset` on, as far as it arrived
    next_offset: int  # pass it as `after` to get what follows
    lost: int  # characters the stream lacks between offset and next_offset
    complete: bool  # the job finished and its whole stream is in: stop following


def is_complete(
    state: JobState,
    chunks_sent: int | None,
    received: int,
    finished_at: datetime | None,
    now: datetime,
    next_offset: int,
    stream_end: int,
) -> bool:
    if state == "pending" or next_offset < stream_end:
        return False
    if state == "cancelled" or chunks_sent is None or received >= chunks_sent:
        return True
    return finished_at is None or now - finished_at > GRACE


class OutputWatch:
    """Wakes long polls when a job's output or result arrives (in this process)."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def event(self, job_id: str) -> asyncio.Event:
        """Take it before reading, wait on it after: nothing arriving between is missed."""
        return self._events.setdefault(job_id, asyncio.Event())

    def changed(self, job_id: str) -> None:
        event = self._events.pop(job_id, None)
        if event is not None:
            event.set()

    async def wait(self, job_id: str, event: asyncio.Event, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(event.wait(), max(timeout_s, 0))
        except TimeoutError:
            # Nobody set it: forget it, so followers gone do not leave events behind
            # (a follower still waiting takes a new one on its next read).
            if self._events.get(job_id) is event:
                del self._events[job_id]


Recorded = Literal["accepted", "duplicate", "unknown", "foreign"]


async def record_chunk(pool: Pool, chunk: JobOutput, retain_chars: int) -> tuple[Recorded, int]:
    """Store one chunk: (outcome, chunks found missing before it)."""
    async with transaction(pool) as conn:
        job = await conn.fetchrow(
            """SELECT j.project_id = $2 AND p.host = $3 AS ours, j.output_next_seq
            FROM jobs j JOIN projects p ON p.id = j.project_id WHERE j.id = $1
            FOR UPDATE OF j""",
            uuid_of(chunk.job_id),
            uuid_of(chunk.project_id),
            chunk.host,
        )
        if job is None:
            return "unknown", 0  # pruned, or its project deleted: nothing to add it to
        if not job["ours"]:
            return "foreign", 0
        inserted = await conn.fetchval(
            """INSERT INTO job_output (job_id, seq, start_offset, data, dropped)
            VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING true""",
            uuid_of(chunk.job_id),
            chunk.seq,
            chunk.offset,
            scrub(chunk.data),
            chunk.dropped,
        )
        if not inserted:
            return "duplicate", 0
        missing = max(chunk.seq - job["output_next_seq"], 0)
        await conn.execute(
            """UPDATE jobs SET output_received = output_received + 1,
                output_next_seq = greatest(output_next_seq, $2 + 1) WHERE id = $1""",
            uuid_of(chunk.job_id),
            chunk.seq,
        )
        # The newest chunks within the caps stay; older ones go.
        await conn.execute(
            """DELETE FROM job_output WHERE job_id = $1 AND seq IN (
                SELECT seq FROM (
                    SELECT seq, sum(length(data)) OVER w AS upto, row_number() OVER w AS n
                    FROM job_output WHERE job_id = $1
                    WINDOW w AS (ORDER BY seq DESC)
                ) t WHERE upto > $2 OR n > $3)""",
            uuid_of(chunk.job_id),
            retain_chars,
            MAX_CHUNKS,
        )
    return "accepted", missing


async def read(pool: Pool, project_id: str, job_id: str, after: int) -> JobOutputView:
    """The job's streamed output after offset `after` (404 for a job not in the project)."""
    async with transaction(pool) as conn:
        job = await conn.fetchrow(
            """SELECT state, exit_code, error, finished_at, output_chunks, output_received,
                clock_timestamp() AS now,
                (SELECT max(start_offset + length(data)) FROM job_output WHERE job_id = $1)
                    AS stream_end
            FROM jobs WHERE id = $1 AND project_id = $2""",
            uuid_of(job_id),
            uuid_of(project_id),
        )
        if job is None:
            raise NotFound(f"job {job_id} does not exist in project {project_id}")
        rows = await conn.fetch(
            """SELECT seq, start_offset, data FROM job_output
            WHERE job_id = $1 AND start_offset + length(data) > $2
            ORDER BY start_offset, seq LIMIT $3""",
            uuid_of(job_id),
            after,
            PAGE_CHUNKS,
        )
    got = assemble([Chunk(r["seq"], r["start_offset"], r["data"]) for r in rows], after)
    stream_end = job["stream_end"] or 0
    return JobOutputView(
        job_id=job_id,
        state=job["state"],
        exit_code=job["exit_code"],
        error=job["error"],
        offset=after,
        output=got.text,
        next_offset=got.next_offset,
        lost=got.lost,
        complete=is_complete(
            job["state"],
            job["output_chunks"],
            job["output_received"],
            job["finished_at"],
            job["now"],
            got.next_offset,
            stream_end,
        ),
    )
