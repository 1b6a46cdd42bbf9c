"""Add-on secrets on the host's disk, mounted read-only into the add-on's container.

Credentials per add-on:
- the tenant's password (from the controller), which the app's connection variables carry;
- the platform's own (`admin_password`, made here and never leaving this host), for the
  agent's upkeep, rotation and the making of the least roles. Tenants never see it: their
  Postgres role is not a superuser and their Redis user has no admin commands, so neither
  can read server files.
- the least roles' (agent/platform_roles.py: the backup containers' and the readiness
  probe's), made here too, each alone in a directory of its own (`<add-on>/<role>/password`,
  0700 and 0400 root): that directory is all a backup container mounts, so the admin
  password never reaches one; the probe's is read by the agent only. Made again at each rotation
  of the tenant's password; made on first use for an add-on from before these roles.

Passwords reach the database as files (POSTGRES_PASSWORD_FILE, an init script that reads
the file, or a redis.conf), never as environment variables or process arguments, both of
which `docker inspect` and `ps` show. The secrets root is 0700 root, so on the host only
root can reach the files; inside the container the add-on's own user must read them.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from agent import pg_passwords, smallfiles
from agent.platform_roles import PG_USERS, REDIS_USERS, redis_acl_line
from agent.specs import ADMIN_USER, PROBE_USER, SECRET_MOUNT

PLATFORM_USERS = {"postgres": PG_USERS, "redis": REDIS_USERS}

# Sourced by the postgres image's entrypoint (the official one and ours) on the first
# start of an empty volume, connected as the platform's superuser. psql reads the password
# from the file itself (backquotes), so it never appears in a process's arguments.
POSTGRES_INIT = f"""\
# Written by the orkestr agent: the tenant's role owns its database and nothing more.
docker_process_sql --set user="$ORKESTR_TENANT_USER" --set db="$POSTGRES_DB" <<'EOSQL'
\\set pw `cat {SECRET_MOUNT}/password`
CREATE ROLE :"user" LOGIN PASSWORD :'pw'
  NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
ALTER DATABASE :"db" OWNER TO :"user";
REVOKE ALL ON DATABASE postgres, template1 FROM PUBLIC;
EOSQL
"""


def postgres_probe_init(verifier: str) -> str:
    """The init script that makes the probe's role on a new volume (agent/platform_roles.py
    says what it may do), so a new add-on's first probe logs in as it. Its password comes
    as a SCRAM verifier: the file is readable in the container, the password stays on the
    host (and 32 random bytes behind 4096 PBKDF2 rounds are not guessed from it)."""
    return f"""\
# Written by the orkestr agent: the readiness probe's role, LOGIN and CONNECT only.
docker_process_sql --set db="$POSTGRES_DB" <<'EOSQL'
CREATE ROLE {PROBE_USER} LOGIN PASSWORD '{verifier}'
  NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
GRANT CONNECT ON DATABASE :"db" TO {PROBE_USER};
EOSQL
"""


# Commands of @admin/@dangerous that only touch the tenant's own data or connection.
REDIS_TENANT_EXTRA = (
    "+flushall +flushdb +keys +sort +sort_ro +info +swapdb"
    " +client|setname +client|getname +client|id +client|info +client|no-evict"
)


def redis_conf(
    password: str,
    admin_password: str,
    previous: str | None = None,
    maxmemory: int | None = None,
    platform: Mapping[str, str] | None = None,
) -> str:
    """`platform`: the least users' passwords (agent/platform_roles.py), by user."""
    # The tenant is the `default` user, so `redis://:password@host` and a bare AUTH keep
    # working; it loses CONFIG, SHUTDOWN, DEBUG, MODULE, ACL, REPLICAOF and the like.
    # During a rotation's grace period the previous password is accepted too.
    if previous is not None and previous != password:
        password = f"{password} >{previous}"
    return (
        "bind * -::*\n"
        "protected-mode no\n"
        "port 6379\n"
        "dir /data\n"
        "appendonly yes\n"
        # The AOF is the add-on's persistence. Redis's default RDB save points would also
        # fork the whole data set a minute after a burst of writes (twice the memory under
        # the container's limit while pages are copied) and at every stop (a deep sleep),
        # to write a dump.rdb that nothing reads back.
        'save ""\n'
        # The platform's backups are the only replica-style transfers (`redis-cli --rdb`;
        # REPLICAOF is admin-only): the default 5 s wait for more replicas only delays each.
        "repl-diskless-sync-delay 0\n"
        f"user default reset on >{password} ~* &* +@all -@admin -@dangerous"
        f" {REDIS_TENANT_EXTRA}\n"
        f"user {ADMIN_USER} reset on >{admin_password} ~* &* +@all\n"
        + "".join(redis_acl_line(pw, user) for user, pw in (platform or {}).items())
        # The memory quota from the first command after every start (a deep wake is a
        # start), not from the upkeep's first CONFIG SET a moment later.
        + (f"maxmemory {maxmemory}\nmaxmemory-policy noeviction\n" if maxmemory else "")
    )


def conf_maxmemory(conf: str) -> int | None:
    """The `maxmemory` a redis.conf sets (None: none)."""
    for line in conf.splitlines():
        key, _, value = line.partition(" ")
        if key == "maxmemory" and value.isdigit():
            return int(value)
    return None


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
        # add-on id -> the maxmemory of its redis.conf (0: none; None: no redis.conf).
        # Only this store writes the files, so each is read once per process.
        self._conf_quota: dict[str, int | None] = {}

    def ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def dir(self, addon_id: str) -> Path:
        return self.root / addon_id

    def _file(self, addon_id: str, name: str) -> str:
        # A plain string path: these are read at every re-probe of every add-on
        # (agent/smallfiles.py), where pathlib's objects were most of the cost.
        return f"{self.root}/{addon_id}/{name}"

    def versions(self) -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            names = os.listdir(self.root)
        except OSError:
            return out
        for name in names:
            if (version := self._version(name)) is not None:
                out[name] = version
        return out

    def version(self, addon_id: str) -> int:
        """One add-on's entry of `versions()` (0: none), without reading every add-on's."""
        return self._version(addon_id) or 0

    def _version(self, addon_id: str) -> int | None:
        if not smallfiles.is_file(self._file(addon_id, "admin_password")):
            return None  # written by an agent before platform roles: written again
        try:
            return int(smallfiles.read_text(self._file(addon_id, "version")))
        except (OSError, ValueError):
            return None  # half-written: fetched again

    def complete(self, addon_id: str) -> bool:
        """Whether `versions()` has this add-on, reading only its own files (a database's
        creation asked `versions()`, every add-on's, sixty times in a burst of sixty)."""
        return self._version(addon_id) is not None

    def has(self, addon_id: str) -> bool:
        return smallfiles.is_file(self._file(addon_id, "version"))

    def password(self, addon_id: str) -> str:
        return smallfiles.read_text(self._file(addon_id, "password"))

    def admin_password(self, addon_id: str) -> str:
        return smallfiles.read_text(self._file(addon_id, "admin_password"))

    def platform_dir(self, addon_id: str, user: str) -> Path:
        """The directory a backup container mounts for `user`: its password alone."""
        return self.dir(addon_id) / user

    def platform_password(self, addon_id: str, user: str) -> str:
        """The password of one of the least roles, made now if missing (an add-on from
        before them, or a rotation that made it anew)."""
        try:
            return smallfiles.read_text(self._file(addon_id, f"{user}/password"))
        except OSError:
            return self._new_platform_password(addon_id, user)

    def _new_platform_password(self, addon_id: str, user: str) -> str:
        d = self.platform_dir(addon_id, user)
        d.mkdir(mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
        password = secrets.token_urlsafe(32)
        _write(d / "password", password, 0o400)
        return password

    def redis_conf_has_platform_users(self, addon_id: str) -> bool:
        try:
            conf = smallfiles.read_text(self._file(addon_id, "redis.conf"))
        except OSError:
            return False
        return all(f"\nuser {user} " in conf for user in REDIS_USERS)

    def write_redis_conf(self, addon_id: str) -> None:
        """redis.conf again, as it is now plus the least users (a conf made before them)."""
        prev = self.previous(addon_id)
        self._write_redis_conf(addon_id, self.redis_maxmemory(addon_id), prev[0] if prev else None)

    def previous(self, addon_id: str) -> tuple[str, float] | None:
        """The password before the last rotation and when it stops working (epoch s)."""
        try:
            return (
                smallfiles.read_text(self._file(addon_id, "previous_password")),
                float(smallfiles.read_text(self._file(addon_id, "retire_at"))),
            )
        except (OSError, ValueError):
            return None

    def applied(self, addon_id: str) -> int:
        """The secret version the database itself was last changed to (0: never)."""
        try:
            return int(smallfiles.read_text(self._file(addon_id, "applied")))
        except (OSError, ValueError):
            return 0

    def mark_applied(self, addon_id: str, version: int) -> None:
        _write(self.dir(addon_id) / "applied", str(version), 0o444)

    def forget_previous(self, addon_id: str, kind: str) -> None:
        """The grace period is over: only the current password remains."""
        d = self.dir(addon_id)
        if kind == "redis":
            self._write_redis_conf(addon_id, self.redis_maxmemory(addon_id), previous=None)
        for name in ("previous_password", "retire_at"):
            (d / name).unlink(missing_ok=True)

    def write(
        self,
        addon_id: str,
        kind: str,
        password: str,
        version: int,
        previous_valid_until: float | None = None,
        maxmemory: int | None = None,
    ) -> None:
        d = self.dir(addon_id)
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
        old = d / "password"
        if old.is_file() and old.read_text() != password:
            # A rotation: the least roles' passwords are made anew with the tenant's (the
            # upkeep sets them on the server); no grace: only the agent's containers use them.
            for user in PLATFORM_USERS.get(kind, ()):
                self._new_platform_password(addon_id, user)
            if previous_valid_until is not None:
                # The password in use so far keeps working until the grace ends.
                _write(d / "previous_password", old.read_text(), 0o400)
                _write(d / "retire_at", repr(previous_valid_until), 0o400)
        _write(d / "password", password, 0o444)
        # Made once and kept across tenant rotations: the data volume already knows it.
        admin = d / "admin_password"
        if not admin.is_file():
            _write(admin, secrets.token_urlsafe(32), 0o444)
        if kind == "postgres":
            (d / "initdb").mkdir(exist_ok=True)
            os.chmod(d / "initdb", 0o755)
            _write(d / "initdb" / "10-orkestr-tenant.sh", POSTGRES_INIT, 0o444)
            verifier = pg_passwords.scram_verifier(
                self.platform_password(addon_id, PROBE_USER),
                secrets.token_bytes(16),
                pg_passwords.MAX_ITERATIONS,
            )
            _write(d / "initdb" / "20-orkestr-probe.sh", postgres_probe_init(verifier), 0o444)
        else:
            prev = self.previous(addon_id)
            self._write_redis_conf(addon_id, maxmemory, prev[0] if prev else None)
        # Written last: a directory without it is incomplete and gets fetched again.
        _write(d / "version", str(version), 0o444)

    def redis_maxmemory(self, addon_id: str) -> int | None:
        try:
            return conf_maxmemory(smallfiles.read_text(self._file(addon_id, "redis.conf")))
        except OSError:
            return None

    def redis_conf_quotas(self, addon_ids: Iterable[str]) -> dict[str, int]:
        """The planner's `Local.redis_conf_quota` for these add-ons (with complete secrets)."""
        out: dict[str, int] = {}
        for addon_id in addon_ids:
            if addon_id not in self._conf_quota:
                conf = self._file(addon_id, "redis.conf")
                self._conf_quota[addon_id] = (
                    (self.redis_maxmemory(addon_id) or 0) if smallfiles.is_file(conf) else None
                )
            quota = self._conf_quota[addon_id]
            if quota is not None:
                out[addon_id] = quota
        return out

    def limit_redis(self, addon_id: str, maxmemory: int) -> bool:
        """Make the add-on's redis.conf carry its current quota (a plan change, or a conf
        written before it carried one); True if the file changed."""
        if self.redis_maxmemory(addon_id) == maxmemory:
            return False
        prev = self.previous(addon_id)
        self._write_redis_conf(addon_id, maxmemory, prev[0] if prev else None)
        return True

    def _write_redis_conf(self, addon_id: str, maxmemory: int | None, previous: str | None) -> None:
        conf = redis_conf(
            self.password(addon_id),
            self.admin_password(addon_id),
            previous,
            maxmemory,
            {user: self.platform_password(addon_id, user) for user in REDIS_USERS},
        )
        _write(self.dir(addon_id) / "redis.conf", conf, 0o444)
        self._conf_quota[addon_id] = maxmemory or 0

    def remove(self, addon_id: str) -> None:
        shutil.rmtree(self.dir(addon_id), ignore_errors=True)
        self._conf_quota.pop(addon_id, None)

    async def discard(self, addon_id: str) -> None:
        """`remove`, with the files' deletion in a thread: sixty at once, beside the
        daemon deleting their volumes, held the event loop ~20 ms each (a quarter of the
        agent's samples in a burst of deletes) while every other chain waited."""
        await asyncio.to_thread(shutil.rmtree, self.dir(addon_id), ignore_errors=True)
        self._conf_quota.pop(addon_id, None)
