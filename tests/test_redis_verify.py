"""A Redis backup verifies only if it loads the way a restore loads it.

The restored add-on loads the backup as the base of a one-file AOF (REDIS_RESTORE); an RDB
load alone stops at the RDB's end, while the AOF loader goes on and reads whatever follows
as commands. A file with bytes after its RDB (what `redis-cli --rdb -` writes to a pipe:
the transfer's 40-byte end mark) passed `redis-check-rdb` and the RDB load, verified, and
then would not load in the restored add-on (crash-looping until the rollback). The
verification script runs here in the toolbox image on a real redis-server.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

from agent import backup_scripts
from tests.agent_fixtures import TOOLBOX

MAKE_RDB = """
redis-server --port 0 --unixsocket /tmp/s --daemonize yes --save '' --dir /backup \
  --dbfilename good.rdb
until redis-cli -s /tmp/s PING 2>/dev/null | grep -q PONG; do sleep 0.05; done
for i in $(seq 50); do echo "SET key:$i value-$i"; done | redis-cli -s /tmp/s >/dev/null
redis-cli -s /tmp/s SAVE >/dev/null
redis-cli -s /tmp/s SHUTDOWN NOSAVE >/dev/null 2>&1 || true
"""


def toolbox(backup: Path, script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    name = f"orkestr-test-{uuid.uuid4().hex[:12]}"
    args = [f"--env={k}={v}" for k, v in env.items()]
    return subprocess.run(
        ["docker", "run", "--rm", "--name", name, "--label", "orkestr.test=redis-verify",
         "--network", "none", "-v", f"{backup}:/backup", *args, "--entrypoint", "bash",
         TOOLBOX, "-c", script],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_backup_the_restore_could_not_load_does_not_verify(tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    backup.mkdir()
    os.chmod(backup, 0o777)
    made = toolbox(backup, MAKE_RDB, {})
    assert made.returncode == 0, made.stderr
    good = (backup / "good.rdb").read_bytes()
    (backup / "trailing.rdb").write_bytes(good + os.urandom(40))

    ok = toolbox(backup, backup_scripts.REDIS_VERIFY, {"IN": "good.rdb", "COUNTS": "good.counts"})
    assert ok.returncode == 0, ok.stderr
    assert (backup / "good.counts").read_text().strip() == "keys|50"

    bad = toolbox(
        backup, backup_scripts.REDIS_VERIFY, {"IN": "trailing.rdb", "COUNTS": "bad.counts"}
    )
    assert bad.returncode != 0, (bad.stdout, bad.stderr)
    assert "did not load" in bad.stderr, bad.stderr
