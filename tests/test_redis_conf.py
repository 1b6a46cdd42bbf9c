"""A Redis add-on enforces its memory quota from its first command after a start.

The quota used to be set only by the upkeep's `CONFIG SET` once it reached a started
Redis, so after every start (each wake from deep sleep is one) the first commands ran
without it: a Redis full at its quota accepted more writes right after a wake. The
agent's redis.conf now carries it; this starts the add-on image's redis-server on a conf
the agent's secret store wrote and asks it before anything else could set it.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

from agent.secrets import SecretStore
from agent.specs import ADMIN_USER, SECRET_MOUNT
from tests.agent_fixtures import IMAGES

AID = "c" * 32
QUOTA = 48 << 20


def test_a_started_redis_enforces_the_quota_in_its_conf(tmp_path: Path) -> None:
    store = SecretStore(tmp_path)
    store.ensure_root()
    store.write(AID, "redis", "tenant-pw", 1, maxmemory=QUOTA)
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    # The server answers its first command on the same start: no CONFIG SET in between.
    script = (
        f"redis-server {SECRET_MOUNT}/redis.conf --port 0 --unixsocket /tmp/s --daemonize yes"
        " && until redis-cli -s /tmp/s PING 2>/dev/null | grep -q NOAUTH; do sleep 0.02; done"
        f" && REDISCLI_AUTH=$(cat {SECRET_MOUNT}/admin_password)"
        f" redis-cli --user {ADMIN_USER} -s /tmp/s CONFIG GET 'maxmemory*'"
        # A value past the quota fills the query buffer past it: refused before it is set.
        f" && head -c {QUOTA + (1 << 20)} /dev/zero"
        " | redis-cli -s /tmp/s -a tenant-pw --no-auth-warning -x SET big"
        # The AOF alone persists: a stop (a deep sleep is one) writes no dump.rdb.
        " && redis-cli -s /tmp/s -a tenant-pw --no-auth-warning SET small v >/dev/null"
        f" && REDISCLI_AUTH=$(cat {SECRET_MOUNT}/admin_password)"
        f" redis-cli --user {ADMIN_USER} -s /tmp/s SHUTDOWN"
        " ; while [ -S /tmp/s ]; do sleep 0.02; done; echo files: $(ls /data)"
    )
    name = f"orkestr-test-{uuid.uuid4().hex[:12]}"
    out = subprocess.run(
        ["docker", "run", "--rm", "--name", name, "--label", "orkestr.test=redis-conf",
         "--network", "none", "--user", "0",
         "-v", f"{tmp_path / AID}:{SECRET_MOUNT}:ro", "-v", f"{data}:/data",
         "--entrypoint", "bash", IMAGES["redis"], "-c", script],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    config, _, refused = out.stdout.partition("OOM")
    lines = config.split()
    got = dict(zip(lines[0::2], lines[1::2], strict=False))
    assert got.get("maxmemory") == str(QUOTA), out.stdout
    assert got.get("maxmemory-policy") == "noeviction", out.stdout
    assert refused.startswith(" command not allowed when used memory"), out.stdout
    files = out.stdout.rsplit("files:", 1)[1].split()
    assert files == ["appendonlydir"], out.stdout
