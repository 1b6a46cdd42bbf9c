"""The backup store on the host: `<root>/<project>/<addon>/<backup>.dump`.

A dump is written as `<backup>.dump.tmp` and renamed to `<backup>.dump` only once it is
complete and its sha256 and size are known, with a `<backup>.json` sidecar describing it;
a `.tmp` file is never listed or restored, and any left by a killed agent are removed at
start. Paths are built only from validated ids (32 hex digits), so nothing here can reach
outside an add-on's own directory. The root may be a mount of shared storage.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import msgspec

from agent.deleted_backups import Tombstone

_ID = re.compile(r"^[0-9a-f]{32}$")
CHUNK = 1024 * 1024
TOMBSTONE = ".deleted.json"  # agent/deleted_backups.py


class Sidecar(msgspec.Struct, frozen=True):
    backup_id: str
    kind: str
    size_bytes: int
    sha256: str
    counts: dict[str, int]
    created_at: str
    # The data the dump holds, as the quota counts it (None: a sidecar written before).
    data_bytes: int | None = None


def _id(value: str) -> str:
    if not _ID.match(value):
        raise ValueError(f"{value!r} is not an id")
    return value


# Written out behind the hash every this many bytes (GrowingHash.follow).
WRITEBACK_EVERY = 8 * CHUNK
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start the write-out, do not wait for it


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):  # not Linux's libc
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_SYNC_RANGE = _sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Start the kernel writing a file's range to disk, without waiting for it
    (sync_file_range(2), which Python's os module lacks). False where it is not there."""
    if _SYNC_RANGE is None:
        return False
    if _SYNC_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return True


def sha256_of(path: Path) -> tuple[str, int]:
    """(hex digest, size) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class GrowingHash:
    """The sha256 of a file another process writes from start to end, hashed as it grows,
    so it need not be read again once written (0.3-0.5 s for a 500 MB dump).

    It stays `lag` bytes behind the end: a writer may cut its last bytes (redis-cli
    truncates the transfer's 40-byte end mark when it is done). `follow` runs in a thread
    until `stop` is set; `result` then hashes the rest, or the whole file again if it is not
    the file followed or shrank into what was hashed. Not for a writer that seeks back
    (pg_dump's custom format rewrites its table of contents at the end).

    What it has hashed it also starts writing out to disk, every WRITEBACK_EVERY bytes.
    The writer fsyncs the whole file when it is done (redis-cli does), and a 531 MB
    dump is far below the kernel's own dirty threshold, so all of it waited for that
    fsync, 0.2-0.45 s inside the backup's time; written out behind the hash while the
    transfer runs, little is left for it.
    """

    def __init__(self, path: Path, lag: int = CHUNK) -> None:
        self.path, self.lag = path, lag
        self.stop = threading.Event()
        self._digest = hashlib.sha256()
        self._hashed = 0
        self._file: BinaryIO | None = None
        # When (time.monotonic) the file was first seen holding bytes, and last seen growing:
        # the transfer's first byte and its end, to within one wake-up.
        self.first_byte: float | None = None
        self.last_growth: float | None = None
        self._seen = 0
        self._written_out = 0  # bytes whose write-out was started
        self.writeback = True  # False once the kernel refused it: the fsync does it all

    def follow(self) -> None:
        while not self.stop.is_set():
            if self._file is None:
                with contextlib.suppress(FileNotFoundError):
                    self._file = open(self.path, "rb")  # closed by result/close
            if self._file is not None:
                size = os.fstat(self._file.fileno()).st_size
                if size > self._seen:
                    self.last_growth = time.monotonic()
                    self.first_byte = self.first_byte or self.last_growth
                    self._seen = size
                while self._hashed + CHUNK <= size - self.lag and not self.stop.is_set():
                    self._digest.update(self._file.read(CHUNK))
                    self._hashed += CHUNK
                if self.writeback and self._hashed - self._written_out >= WRITEBACK_EVERY:
                    self._write_out(self._file.fileno())
            self.stop.wait(0.02)

    @property
    def written_out(self) -> int:
        """Bytes from the start whose write-out to disk was started."""
        return self._written_out

    def _write_out(self, fd: int) -> None:
        start, length = self._written_out, self._hashed - self._written_out
        try:
            self.writeback = start_writeback(fd, start, length)
        except OSError:
            self.writeback = False  # an optimisation only: the writer's fsync still runs
        self._written_out = self._hashed

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def result(self) -> tuple[str, int]:
        """(hex digest, size) of the file as it is now; call once the writer is done."""
        f, self._file = self._file, None
        if f is None:
            return sha256_of(self.path)
        with f:
            st, now = os.fstat(f.fileno()), os.stat(self.path)
            if (st.st_ino, st.st_dev) != (now.st_ino, now.st_dev) or st.st_size < self._hashed:
                return sha256_of(self.path)
            while chunk := f.read(CHUNK):
                self._digest.update(chunk)
                self._hashed += len(chunk)
        return self._digest.hexdigest(), self._hashed


class BackupStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # dumps hold tenant data

    def addon_dir(self, project_id: str, addon_id: str) -> Path:
        d = self.root / _id(project_id) / _id(addon_id)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def dump(self, project_id: str, addon_id: str, backup_id: str) -> Path:
        return self.addon_dir(project_id, addon_id) / f"{_id(backup_id)}.dump"

    @staticmethod
    def tmp(path: Path) -> Path:
        return path.with_name(path.name + ".tmp")

    def clean_addon(self, project_id: str, addon_id: str) -> None:
        """Remove what an interrupted operation left: temporary dumps and count files."""
        for p in self.addon_dir(project_id, addon_id).iterdir():
            if p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)

    def clean_all(self) -> list[Path]:
        """At start no operation runs: every temporary file is a leftover."""
        removed = []
        for p in self.root.glob("*/*/*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
        return removed

    def finish(self, tmp: Path, final: Path, sidecar: Sidecar) -> None:
        """Make a complete dump visible: fsync, sidecar, then the rename."""
        self.sync(tmp)
        self.publish(tmp, final, sidecar)

    @staticmethod
    def sync(tmp: Path) -> None:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    def publish(self, tmp: Path, final: Path, sidecar: Sidecar) -> None:
        """The sidecar, then the rename of a dump already synced (`sync`)."""
        side = final.with_suffix(".json")
        side_tmp = self.tmp(side)
        side_tmp.write_bytes(msgspec.json.encode(sidecar))
        os.replace(side_tmp, side)
        os.replace(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- the directories of deleted add-ons (agent/deleted_backups.py) -----------------------
    def tombstone(self, project_id: str, addon_id: str) -> tuple[Path, Tombstone | None] | None:
        """The marker's path and content, or None if the add-on has no directory here."""
        d = self.root / _id(project_id) / _id(addon_id)
        if not d.is_dir():
            return None
        path = d / TOMBSTONE
        try:
            return path, msgspec.json.decode(path.read_bytes(), type=Tombstone)
        except FileNotFoundError:
            return path, None
        except (OSError, msgspec.DecodeError):
            return path, None  # unreadable: written again, with the clock started now

    def write_tombstone(self, path: Path, tomb: Tombstone) -> None:
        tmp = self.tmp(path)
        tmp.write_bytes(msgspec.json.encode(tomb))
        os.replace(tmp, path)

    def tombstones(self) -> list[tuple[str, str, Tombstone]]:
        """(project, add-on, marker) of every marked directory; unreadable ones skipped."""
        found = []
        for path in sorted(self.root.glob(f"*/*/{TOMBSTONE}")):
            project_id, addon_id = path.parent.parent.name, path.parent.name
            if not (_ID.match(project_id) and _ID.match(addon_id)):
                continue
            try:
                found.append(
                    (project_id, addon_id, msgspec.json.decode(path.read_bytes(), type=Tombstone))
                )
            except (OSError, msgspec.DecodeError):
                continue
        return found

    def remove_addon(self, project_id: str, addon_id: str) -> None:
        """Remove one add-on's directory, and its project's once that is empty: nothing
        outside `<root>/<project>/<addon>` (ids validated) is touched."""
        project = self.root / _id(project_id)
        shutil.rmtree(project / _id(addon_id), ignore_errors=False)
        try:
            project.rmdir()
        except OSError:
            pass  # another add-on of the project still has backups

    def delete(self, project_id: str, addon_id: str, backup_id: str) -> None:
        # Not through addon_dir: a directory removed with its deleted add-on stays gone.
        final = self.root / _id(project_id) / _id(addon_id) / f"{_id(backup_id)}.dump"
        for p in (final, final.with_suffix(".json"), self.tmp(final)):
            p.unlink(missing_ok=True)
