"""GrowingHash: the sha256 of a dump hashed while its writer writes it (agent/backup_store.py).

A real writer thread on a real file: chunks of random sizes with pauses, then, as
redis-cli does for a diskless transfer, its last 40 bytes cut; or the file replaced by
another; or shrunk below what was hashed. The digest and size are always the final file's.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.backup_store import WRITEBACK_EVERY, GrowingHash


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


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]  # fmt: skip


def dirty_pages(path: Path, length: int) -> int:
    """Pages of the file's first `length` bytes still dirty in the page cache
    (cachestat(2), Linux 6.5: syscall 451 on every architecture)."""
    libc = ctypes.CDLL(None, use_errno=True)
    stat = _CacheStat()
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syscall(451, fd, ctypes.byref(_Range(0, length)), ctypes.byref(stat), 0) != 0:
            pytest.skip(f"no cachestat(2) here: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
    return int(stat.nr_dirty)


def filesystem_type(path: Path) -> str:
    best, kind = "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _dev, point, fstype, *_ = line.split()
        if str(path).startswith(point.rstrip("/") + "/") and len(point) > len(best):
            best, kind = point, fstype
    return kind


def test_what_was_hashed_is_being_written_out_before_the_writers_fsync(tmp_path: Path) -> None:
    """The writer's fsync at its end (redis-cli's) waited for the whole dump, which the
    kernel keeps dirty until then (far below its own threshold); the follower starts the
    write-out of what it has hashed, so by then little is left dirty."""
    if filesystem_type(tmp_path) in ("tmpfs", "ramfs", "overlay"):
        pytest.skip(f"{tmp_path} is not on a disk: nothing to write out")
    path = tmp_path / "dump.tmp"
    g = GrowingHash(path, lag=0)
    follower = threading.Thread(target=g.follow)
    follower.start()
    write_slowly(path, [1 << 20] * 40, 0, 0.002)
    time.sleep(0.1)  # two of the follower's rounds: it has caught up with the writer
    g.stop.set()
    follower.join()
    assert g.writeback, "the kernel refused sync_file_range"
    assert g.written_out >= (40 << 20) - WRITEBACK_EVERY
    assert dirty_pages(path, g.written_out) == 0
    assert g.result() == expected(path)
