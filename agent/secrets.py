"""Add-on secrets on the host's disk, mounted read-only into the add-on's container.

The password reaches the database as a file (POSTGRES_PASSWORD_FILE, or a redis.conf with
`requirepass`), never as an environment variable or a process argument, both of which
`docker inspect` and `ps` show. The secrets root is 0700 root, so on the host only root
can reach the files; inside the container the add-on's own user must read them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def _write(path: Path, data: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class SecretStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def dir(self, addon_id: str) -> Path:
        return self.root / addon_id

    def versions(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if not self.root.is_dir():
            return out
        for d in self.root.iterdir():
            try:
                out[d.name] = int((d / "version").read_text())
            except (OSError, ValueError):
                continue  # half-written: fetched again
        return out

    def has(self, addon_id: str) -> bool:
        return (self.dir(addon_id) / "version").is_file()

    def password(self, addon_id: str) -> str:
        return (self.dir(addon_id) / "password").read_text()

    def write(self, addon_id: str, kind: str, password: str, version: int) -> None:
        d = self.dir(addon_id)
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
        _write(d / "password", password, 0o444)
        if kind == "redis":
            conf = (
                "bind * -::*\n"
                "protected-mode no\n"
                "port 6379\n"
                "dir /data\n"
                "appendonly yes\n"
                f"requirepass {password}\n"
            )
            _write(d / "redis.conf", conf, 0o444)
        # Written last: a directory without it is incomplete and gets fetched again.
        _write(d / "version", str(version), 0o444)

    def remove(self, addon_id: str) -> None:
        shutil.rmtree(self.dir(addon_id), ignore_errors=True)
