"""A refused online grow leaves the volume's image at its old size, so the upkeep's next
round sees the filesystem short of its plan and tries again. Real loop device, real ext4
mounted; the resize ioctl refused as it is for an agent without CAP_SYS_RESOURCE."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest

from agent import loopfs
from agent.errors import AgentError
from agent.loopfs import LoopFs


async def _sh(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(*args)
    assert await proc.wait() == 0, args


def _device_bytes(device: str) -> int:
    return int(Path(f"/sys/block/{Path(device).name}/size").read_text()) * 512


async def test_a_refused_grow_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []

    def refuse(path: str, size_bytes: int) -> None:
        asked.append(size_bytes)
        raise AgentError(f"grow the filesystem at {path}: [Errno 1] Operation not permitted")

    monkeypatch.setattr(loopfs, "_resize_mounted", refuse)
    fs = LoopFs(tmp_path / "images")
    volume = f"orkestr-test-{os.getpid()}-grow"
    device = await fs.create(volume, 32)
    mnt = tempfile.mkdtemp(prefix="orkestr-test-mnt-")
    await _sh("mount", device, mnt)
    try:
        await _sh("dd", "if=/dev/urandom", f"of={mnt}/data", "bs=1M", "count=8", "status=none")
        for attempt in (1, 2):
            with pytest.raises(AgentError, match="Operation not permitted"):
                await fs.grow(volume, device, 48, mnt)
            assert asked == [48 << 20] * attempt  # each round reaches the resize again
            assert fs.size_mb(volume) == 32  # still short of the plan, so retried
            assert await asyncio.to_thread(_device_bytes, device) == 32 << 20
        # The filesystem and its data are untouched by the rollback.
        await _sh("sync")
        assert (await asyncio.to_thread(os.stat, f"{mnt}/data")).st_size == 8 << 20
    finally:
        await _sh("umount", mnt)
        await asyncio.to_thread(os.rmdir, mnt)
        await fs.remove(volume)
    assert await asyncio.to_thread(fs.image(volume).exists) is False
