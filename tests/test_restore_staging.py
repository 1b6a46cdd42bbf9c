"""The Redis restore's staging flushes its copy to disk before it reports `staged`.

Left dirty, the copy's writeback ran during the add-on's downtime: 0.3-0.45 s in Docker's
kill of Redis, or in the swap container's exit (docs/benchmarks.md, "Redis restore: where
the time goes"). The staging script runs on this host's bash against a real ext4 on a loop
device laid out as the add-on's volume; what the loop device has written when `staged`
arrives says whether the copy reached it (the kernel would otherwise keep it dirty for
up to vm.dirty_expire_centisecs, 30 s by default).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from agent import backup_scripts
from agent.loopfs import LoopFs

COPY_MB = 24


async def _sh(*args: str, env: dict[str, str] | None = None) -> int:
    proc = await asyncio.create_subprocess_exec(*args, env=env)
    return await asyncio.wait_for(proc.wait(), 60)


def _sectors_written(device: str) -> int:
    return int(Path(f"/sys/block/{Path(device).name}/stat").read_text().split()[6])


def _line(fd: int) -> str:
    out = b""
    while not out.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        out += chunk
    return out.decode().strip()


async def test_staged_copy_is_on_disk_before_staged_is_reported(tmp_path: Path) -> None:
    fs = LoopFs(tmp_path / "images")
    volume = f"orkestr-test-{os.getpid()}-staging"
    device = await fs.create(volume, 64)
    mnt = tempfile.mkdtemp(prefix="orkestr-test-mnt-")
    assert await _sh("mount", device, mnt) == 0
    backup = tmp_path / "backup"
    backup.mkdir()
    (backup / "b.rdb").write_bytes(os.urandom(COPY_MB << 20))
    for name in ("up", "ctl"):
        os.mkfifo(backup / name)
    # Both ends held read-write here, as the script holds them: no open blocks.
    up = os.open(backup / "up", os.O_RDWR)
    ctl = os.open(backup / "ctl", os.O_RDWR)
    env = {"PATH": "/usr/bin:/bin", "DATA": mnt, "BACKUP": str(backup), "IN": "b.rdb",
           "UP": "up", "CTL": "ctl", "STATE": "s"}  # fmt: skip
    try:
        assert await _sh("sync", "-f", mnt) == 0
        before = _sectors_written(device)
        script = asyncio.create_task(_sh("bash", "-c", backup_scripts.REDIS_RESTORE, env=env))
        assert await asyncio.wait_for(asyncio.to_thread(_line, up), 30) == "staged"
        written = (_sectors_written(device) - before) * 512
        staged = Path(mnt) / ".orkestr-restore" / "appendonlydir" / "appendonly.aof.1.base.rdb"
        assert staged.stat().st_size == COPY_MB << 20
        assert written >= COPY_MB << 20, f"only {written >> 20} MiB on the device at `staged`"
        os.write(ctl, b"abort\n")
        assert await script == 0
        assert not (Path(mnt) / ".orkestr-restore").exists()  # an abort leaves no staging
    finally:
        os.close(up)
        os.close(ctl)
        assert await _sh("umount", mnt) == 0
        os.rmdir(mnt)
        await fs.remove(volume)
