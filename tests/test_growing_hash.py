"""GrowingHash: the sha256 of a dump hashed while its writer writes it (agent/backup_store.py).

A real writer thread on a real file: chunks of random sizes with pauses, then, as
redis-cli does for a diskless transfer, its last 40 bytes cut; or the file replaced by
another; or shrunk below what was hashed. The digest and size are always the final file's.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.backup_store import GrowingHash
from agent.backups import FOLLOW_NICE, start_follower


def write_slowly(path: Path, parts: list[int], cut: int, pause: float) -> None:
    with open(path, "wb") as f:
        for n in parts:
            f.write(os.urandom(n))
            f.flush()
            time.sleep(pause)
        f.truncate(max(0, f.tell() - cut))


def hashed_while_written(path: Path, parts: list[int], cut: int, lag: int) -> tuple[str, int]:
    g = GrowingHash(path, lag=lag)
    follower = threading.Thread(target=g.follow)
    follower.start()
    write_slowly(path, parts, cut, 0.005)
    g.stop.set()
    follower.join()
    return g.result()


def expected(path: Path) -> tuple[str, int]:
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), len(data)


@settings(max_examples=25, deadline=None)
@given(
    parts=st.lists(st.integers(0, 3 << 20), min_size=0, max_size=6),
    cut=st.sampled_from([0, 40]),
)
def test_the_digest_is_the_final_files(tmp_path_factory: pytest.TempPathFactory,
                                       parts: list[int], cut: int) -> None:  # fmt: skip
    path = tmp_path_factory.mktemp("g") / "dump.tmp"
    assert hashed_while_written(path, parts, cut, lag=1 << 20) == expected(path)


def test_a_file_shrunk_into_what_was_hashed_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "dump.tmp"
    # A lag smaller than the cut: the follower hashed bytes the writer then removed.
    assert hashed_while_written(path, [4 << 20], cut=2 << 20, lag=0) == expected(path)


def test_a_replaced_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "dump.tmp"
    g = GrowingHash(path, lag=0)
    follower = threading.Thread(target=g.follow)
    follower.start()
    write_slowly(path, [3 << 20], 0, 0.1)
    path.unlink()
    write_slowly(path, [1 << 20], 0, 0)
    g.stop.set()
    follower.join()
    assert g.result() == expected(path)


def test_a_file_never_written_is_read_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "dump.tmp"
    g = GrowingHash(path)
    g.stop.set()
    g.follow()
    path.write_bytes(b"x" * 10)
    assert g.result() == expected(path)


def test_the_follower_hashes_niced_in_a_thread_of_its_own(tmp_path: Path) -> None:
    """The agent's hash of a growing dump must not take CPU from the transfer it follows
    (agent/backups.py FOLLOW_NICE); and the niced thread is not one the loop reuses."""
    path = tmp_path / "dump.tmp"
    base = os.getpriority(os.PRIO_PROCESS, 0)

    def nice_of(prefix: str) -> int:
        (t,) = [t for t in threading.enumerate() if t.name.startswith(prefix)]
        assert t.native_id is not None
        return os.getpriority(os.PRIO_PROCESS, t.native_id)

    async def run() -> tuple[int, int, tuple[str, int]]:
        g = GrowingHash(path, lag=0)
        follower = start_follower(g)
        try:
            write_slowly(path, [1 << 20, 1 << 20], 0, 0.05)
            niced = nice_of("dump-hash")
        finally:
            g.stop.set()  # a failed look must not leave the thread following
            await follower
        pooled = await asyncio.to_thread(os.getpriority, os.PRIO_PROCESS, 0)
        return niced, pooled, g.result()

    niced, pooled, got = asyncio.run(run())
    assert niced > base and niced == min(base + FOLLOW_NICE, 19)
    assert pooled == base
    assert got == expected(path)
