"""A filesystem per add-on volume, sized by the plan: the hard backstop behind the quota.

Each data volume is an ext4 image file under `<state_dir>/volumes/` (sparse: it takes
host disk only as it fills), attached to a loop device; the Docker volume is the `local`
driver with `type=ext4, device=/dev/loopN`, so dockerd mounts it wherever its mount
namespace is. Whatever the database does, the add-on cannot write past its image.

Loop devices use direct I/O: the image's blocks bypass the host's page cache, so an
fsync inside (Redis's AOF, Postgres's WAL) is not stuck behind the host's other dirty
pages, and nothing is cached twice. Measured on a 2-core machine with another process
writing 2 GB: 200 synchronous 100 KB writes took 0.9-1.8 s with direct I/O, 4.5-5.8 s on
a buffered loop device and 3.5-8.3 s on a plain volume.

A new Postgres add-on has a second one for its WAL (`specs.wal_fs_size_mb`, the volume
`orkestr-<addon>-wal`), so a full data filesystem never reaches a WAL write.
The data image is larger than the storage quota by WAL headroom (`specs.fs_size_mb`), and the agent
keeps Postgres's WAL below `max_wal_size_mb` (agent/upkeep.py), so the quota refuses
writes well before the filesystem is full and Postgres is never left without room for
its WAL. The one process-level I/O of the agent lives here (losetup, mkfs.ext4,
resize2fs), behind `AgentError`s.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import struct
from pathlib import Path

from agent.errors import AgentError, PermanentError
from agent.specs import fs_size_mb, max_wal_size_mb

__all__ = ["LoopFs", "fs_size_mb", "max_wal_size_mb"]

log = logging.getLogger("orkestr.agent.loopfs")

MIB = 1024 * 1024


async def _run(*argv: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except OSError as exc:
        raise PermanentError(f"{argv[0]}: cannot run: {exc}") from None
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise AgentError(f"{' '.join(argv[:2])}: exit {proc.returncode}: {err.decode().strip()}")
    return out.decode()


# EXT4_IOC_RESIZE_FS = _IOW('f', 16, __u64): grow a mounted ext4 to this many blocks.
EXT4_IOC_RESIZE_FS = 0x40086610


def _resize_mounted(path: str, size_bytes: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        blocks = size_bytes // os.fstatvfs(fd).f_frsize
        fcntl.ioctl(fd, EXT4_IOC_RESIZE_FS, struct.pack("=Q", blocks))
    except OSError as exc:
        raise AgentError(grow_error(path, exc)) from None
    finally:
        os.close(fd)


def grow_error(path: str, exc: OSError) -> str:
    """The GrowFailed message. The kernel answers EPERM without CAP_SYS_RESOURCE (or for
    a filesystem with recorded errors), so the message names the likely fix."""
    message = f"grow the filesystem at {path}: {exc}"
    if exc.errno == errno.EPERM:
        message += (
            " (most likely the agent lacks CAP_SYS_RESOURCE; else the filesystem has"
            " errors: docs/operations.md, Storage)"
        )
    return message


class LoopFs:
    def __init__(self, root: Path) -> None:
        self.root = root

    def image(self, volume: str) -> Path:
        return self.root / f"{volume}.img"

    async def device_of(self, volume: str) -> str | None:
        """The loop device the volume's image is attached to, if any."""
        out = await _run(
            "losetup", "--noheadings", "--output", "NAME", "-j", str(self.image(volume))
        )
        return out.split()[0] if out.split() else None

    async def create(self, volume: str, size_mb: int) -> str:
        """Make (or adopt, after a crash half-way) the image and attach it; the device."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        image = self.image(volume)
        if not image.exists():
            tmp = image.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            await _run("truncate", "-s", f"{size_mb}M", str(tmp))  # sparse
            # No blocks reserved for root: the database is not root.
            await _run("mkfs.ext4", "-q", "-F", "-m", "0", "-L", volume[-16:], str(tmp))
            # initdb refuses a data directory holding anything, lost+found included.
            await _run("debugfs", "-w", "-R", "rmdir lost+found", str(tmp))
            os.replace(tmp, image)
        device = await self.device_of(volume)
        if device is None:
            device = (
                await _run("losetup", "--find", "--show", "--direct-io=on", str(image))
            ).strip()
        log.info("loopfs.attached volume=%s device=%s size_mb=%s", volume, device, size_mb)
        return device

    async def ensure_attached(self, volume: str, device: str) -> None:
        """After a reboot the image is detached: attach it to the device the Docker volume
        names (never another: the volume would mount a different filesystem)."""
        if not self.image(volume).exists():
            return
        current = await self.device_of(volume)
        if current == device:
            return
        if current is not None:
            raise PermanentError(f"volume {volume}: image attached to {current}, not {device}")
        await _run("losetup", "--direct-io=on", device, str(self.image(volume)))
        log.info("loopfs.reattached volume=%s device=%s", volume, device)

    def size_mb(self, volume: str) -> int | None:
        try:
            return self.image(volume).stat().st_size // MIB
        except OSError:
            return None

    async def grow(self, volume: str, device: str, size_mb: int, mounted_at: str) -> None:
        """Grow the image, then the mounted filesystem, online (never shrinking).

        dockerd mounted the filesystem in its own mount namespace, where resize2fs would
        not find it (and would then refuse, wanting an offline e2fsck). The kernel grows a
        mounted ext4 through an ioctl on any file of it: `mounted_at` reaches it through
        the container's root, `/proc/<pid>/root/<data dir>`.
        """
        before = self.size_mb(volume)
        await _run("truncate", "-s", f"{size_mb}M", str(self.image(volume)))
        await _run("losetup", "--set-capacity", device)
        try:
            await asyncio.to_thread(_resize_mounted, mounted_at, size_mb * MIB)
        except AgentError:
            # The filesystem did not grow, so it uses none of the added blocks: the image
            # gets its old size back, and the next round sees it short and tries again.
            if before is not None and before < size_mb:
                await _run("truncate", "-s", f"{before}M", str(self.image(volume)))
                await _run("losetup", "--set-capacity", device)
            raise
        log.info("loopfs.grown volume=%s device=%s size_mb=%s", volume, device, size_mb)

    async def remove(self, volume: str) -> None:
        device = await self.device_of(volume) if self.image(volume).exists() else None
        if device is not None:
            await _run("losetup", "-d", device)
        self.image(volume).unlink(missing_ok=True)
