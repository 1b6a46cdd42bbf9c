"""Live output of running jobs: followed from Docker, sent in bounded, numbered chunks.

Each watched job has one stream. It follows the container's log and, at most once per
`interval_s`, publishes what arrived as one `JobOutput` of at most `chunk_chars`
characters on the job's output topic. Output arriving faster than that waits in a buffer
of `buffer_chunks` chunks; past it the oldest characters are dropped and the next chunk
says how many (`dropped`), so a chatty job costs the broker and the controller a bounded
rate and the agent bounded memory. The job's final result still carries its tail.

The chunker is pure (tests/test_job_output.py); the stream is the thin I/O around it. The
progress (next `seq` and `offset`) is written to the state directory after each publish,
so an agent that restarts mid-job resumes the numbering, re-reads the log and skips what
it had sent. A chunk that cannot be published (broker away) is retried, never renumbered.

After the job exits, `finish` lets the stream send the rest of the log for as long as it
still makes progress: Docker streams a flood of short lines for seconds after the exit,
and a fixed flush cut such a stream short of its end (the lines that say what failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec

from agent.metrics import JOB_OUTPUT_CHARS, JOB_OUTPUT_CHUNKS
from agent.state import StateDir
from schemas import topics
from schemas.codec import encode
from schemas.messages import MAX_OUTPUT_CHUNK_CHARS, SCHEMA_VERSION, JobOutput

log = logging.getLogger("orkestr.agent.joboutput")
# After the job's exit, its stream may go this long without progress (log text read,
# the log's end) before it is cut: the result must not wait on a broker that is away.
FLUSH_QUIET_S = 5.0
# ... and this long in all, whatever it still reads.
FLUSH_MAX_S = 60.0


class Progress(msgspec.Struct, frozen=True):
    """What a job's stream has sent: the next chunk's `seq` and `offset`."""

    seq: int = 0
    offset: int = 0
    done: bool = False  # the log ended and everything in it was sent


class Piece(msgspec.Struct, frozen=True):
    seq: int
    offset: int
    data: str
    dropped: int


class Chunker:
    """Output text in, bounded numbered pieces out (pure)."""

    def __init__(
        self, chunk_chars: int, buffer_chars: int, start: Progress | None = None, skip: int = 0
    ) -> None:
        start = start or Progress()
        if not 0 < chunk_chars <= MAX_OUTPUT_CHUNK_CHARS:
            raise ValueError(f"chunk_chars must be 1..{MAX_OUTPUT_CHUNK_CHARS}")
        self.chunk_chars = chunk_chars
        self.buffer_chars = max(buffer_chars, chunk_chars)
        self.seq = start.seq
        self.offset = start.offset  # characters accounted for: sent or dropped
        self._skip = skip  # characters already sent before a restart
        # The buffer as the pieces that arrived (a deque, not one string: appending a short
        # line to a 64 Ki string and cutting its head copied the whole buffer per line,
        # about 1 s of the event loop for 5 MB of short lines).
        self._parts: deque[str] = deque()
        self._size = 0
        self._dropped = 0

    def feed(self, text: str) -> None:
        if self._skip:
            cut = min(self._skip, len(text))
            text, self._skip = text[cut:], self._skip - cut
        if not text:
            return
        # Postgres text cannot hold NUL: a same-length stand-in keeps offsets true.
        self._parts.append(text.replace("\x00", "\ufffd"))
        self._size += len(text)
        over = self._size - self.buffer_chars
        while over > 0:  # drop the oldest characters
            first = self._parts[0]
            cut = min(over, len(first))
            if cut == len(first):
                self._parts.popleft()
            else:
                self._parts[0] = first[cut:]
            self._size -= cut
            self._dropped += cut
            over -= cut

    @property
    def pending(self) -> bool:
        return self._size > 0 or self._dropped > 0

    def _pop(self, count: int) -> str:
        """The oldest `count` buffered characters (fewer if the buffer holds fewer)."""
        out: list[str] = []
        while count > 0 and self._parts:
            first = self._parts[0]
            if len(first) <= count:
                out.append(self._parts.popleft())
            else:
                out.append(first[:count])
                self._parts[0] = first[count:]
            count -= len(out[-1])
        data = "".join(out)
        self._size -= len(data)
        return data

    def take(self) -> Piece | None:
        """The next piece (the oldest buffered characters), numbered; None if nothing."""
        if not self.pending:
            return None
        data = self._pop(self.chunk_chars)
        piece = Piece(self.seq, self.offset + self._dropped, data, self._dropped)
        self.offset += self._dropped + len(data)
        self.seq += 1
        self._dropped = 0
        return piece

    def progress(self, done: bool = False) -> Progress:
        return Progress(self.seq, self.offset, done and not self.pending)


LogFollower = Callable[[str], AsyncIterator[str]]
Publish = Callable[[str, bytes], Awaitable[bool]]


class JobOutputs:
    """The live output streams of the jobs this agent watches."""

    def __init__(
        self,
        host: str,
        state: StateDir,
        follow_log: LogFollower,
        publish: Publish,
        interval_s: float,
        chunk_chars: int,
        buffer_chunks: int = 4,
        flush_quiet_s: float = FLUSH_QUIET_S,
        flush_max_s: float = FLUSH_MAX_S,
    ) -> None:
        self.host = host
        self.state = state
        self._follow_log = follow_log
        self._publish = publish
        self.interval_s = interval_s
        self.chunk_chars = chunk_chars
        self.buffer_chars = chunk_chars * buffer_chunks
        self.flush_quiet_s = flush_quiet_s
        self.flush_max_s = flush_max_s
        # Per streamed job: when its reader last made progress (monotonic).
        self._progress_at: dict[str, float] = {}

    def sent(self, job_id: str) -> int:
        """How many chunks of the job were published (its result's `output_chunks`)."""
        return self._load(job_id).seq

    def _load(self, job_id: str) -> Progress:
        raw = self.state.load_job_stream(job_id)
        if raw is None:
            return Progress()
        try:
            return msgspec.json.decode(raw, type=Progress)
        except msgspec.DecodeError:
            return Progress()

    async def stream(self, job_id: str, project_id: str, container: str) -> None:
        """Follow the container's log to its end, publishing as it goes. Cancel to stop
        (the progress so far is saved; a later call resumes after it)."""
        start = self._load(job_id)
        if start.done:
            return
        chunker = Chunker(self.chunk_chars, self.buffer_chars, start, skip=start.offset)
        arrived = asyncio.Event()
        ended = asyncio.Event()

        async def read() -> None:
            try:
                async for text in self._follow_log(container):
                    chunker.feed(text)
                    self._progress_at[job_id] = time.monotonic()
                    arrived.set()
            except Exception as exc:  # the container went, the daemon hung up: the log ends
                log.info("job.output_follow_ended job=%s reason=%r", job_id, exc)
            finally:
                self._progress_at[job_id] = time.monotonic()
                ended.set()
                arrived.set()

        self._progress_at[job_id] = time.monotonic()

        reader = asyncio.create_task(read(), name=f"job-output-{job_id}")
        piece: Piece | None = None
        try:
            while True:
                await arrived.wait()
                arrived.clear()
                if piece is None:
                    piece = chunker.take()
                if piece is None:
                    if ended.is_set():
                        break
                    continue
                started = time.monotonic()
                if await self._send(job_id, project_id, piece):
                    sent = Progress(piece.seq + 1, piece.offset + len(piece.data))
                    self.state.save_job_stream(job_id, msgspec.json.encode(sent))
                    piece = None
                # The rate limit: one chunk per interval, whatever arrives meanwhile.
                await asyncio.sleep(max(self.interval_s - (time.monotonic() - started), 0))
                if chunker.pending or piece is not None or ended.is_set():
                    arrived.set()
            self.state.save_job_stream(job_id, msgspec.json.encode(chunker.progress(done=True)))
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._progress_at.pop(job_id, None)

    async def finish(self, job_id: str, stream: asyncio.Task[None]) -> None:
        """Let the stream of an exited job send the rest of its log (it ends with the
        container) while it makes progress; then cut it (its progress is saved)."""
        limit = time.monotonic() + self.flush_max_s
        while not stream.done():
            last = self._progress_at.get(job_id, time.monotonic())
            wait = min(last + self.flush_quiet_s, limit) - time.monotonic()
            if wait <= 0:
                break
            try:
                await asyncio.wait([stream], timeout=wait)
            except asyncio.CancelledError:
                stream.cancel()
                raise
        if not stream.done():
            log.warning("job.output_flush_timed_out job=%s", job_id)
            stream.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await stream
        elif not stream.cancelled() and (exc := stream.exception()) is not None:
            # A failed stream (a full disk, say) must not lose the job's result.
            log.error("job.output_failed job=%s error=%r", job_id, exc)

    async def _send(self, job_id: str, project_id: str, piece: Piece) -> bool:
        message = JobOutput(
            version=SCHEMA_VERSION,
            host=self.host,
            job_id=job_id,
            project_id=project_id,
            seq=piece.seq,
            offset=piece.offset,
            data=piece.data,
            dropped=piece.dropped,
        )
        if not await self._publish(topics.job_output(self.host, job_id), encode(message)):
            JOB_OUTPUT_CHUNKS.labels("unsent").inc()
            return False
        JOB_OUTPUT_CHUNKS.labels("sent").inc()
        JOB_OUTPUT_CHARS.labels("sent").inc(len(piece.data))
        JOB_OUTPUT_CHARS.labels("dropped").inc(piece.dropped)
        return True
