"""Upkeep of a running add-on: plan sizing in place, password rotation, storage quota.

Runs after each successful readiness probe, under the same guard (never against a
sleeping database, never counted as a client's connection). Postgres: as the platform's
admin role, each round (quota triggers, ALTER ROLE and ALTER DATABASE need a superuser).
Redis: on the probe's connection (the probe's least user: INFO is all a quiet round
sends), with a connection as the admin opened only for a step that changes something
(`_AdminLink`: a rotation, a setting, the least users after a server start). Each
step reads what Docker or the database says, compares it with the desired state and
changes only the difference, so it is level-triggered like the reconcile: a step that
fails is simply done again after the next probe.

- Limits: `docker update` when the container's CPU or memory differ from the plan's, or
  its cores from its home cores (agent/placement.py).
- Credentials: a new secret version is applied inside the database (`ALTER ROLE` on the
  version's login role, schemas/credentials.py; `ACL SETUSER default >new` on Redis, which
  keeps the old password as a second one); once the grace period has passed the old one is
  cleared (`PASSWORD NULL` / `ACL SETUSER default <old`). Neither cuts open connections.
  A password the tenant set on its own Postgres role (any role may) is put back each full
  round, and the retired login role's cleared again (agent/pg_passwords.py).
- The least roles the backup containers and the probe log in as (agent/platform_roles.py):
  made right once per agent and password (Redis: per server start, its `run_id`), again,
  forced, before each backup or restore step (`platform_roles`), and whenever the server
  refuses the probe its login (`probe_role`).
- Quota: usage is measured in bytes; at WARNING_RATIO a condition says so; at the quota
  Postgres refuses INSERT, UPDATE and DDL with a message naming the plan (statement
  triggers and an event trigger; DELETE, TRUNCATE and DROP still work, so a tenant can
  free space), Redis gets `maxmemory` with `noeviction`. Both are lifted by the same check
  once usage is under the quota again, or the plan grew.
- Postgres's WAL headroom: a statement trigger refuses only the statements that start
  after it, and one `INSERT ... SELECT` can write a hundred MB in a few seconds, faster
  than a round a resync interval. So the round that restricts writes also cancels the
  tenant's statements already running, the agent's filesystem guard (`guard_due`, driven
  by `Agent.quota_guard_loop`) starts a round as soon as the volume's filesystem grew by
  a step, and writes are also refused while the filesystem has less than RESERVE_BYTES
  free, whatever the database's size: a WAL write that finds the disk full is a PANIC.
  `wal_init_zero = off` lets crash recovery start even on a full filesystem. An add-on
  whose WAL has a filesystem of its own (specs.wal_fs_size_mb) has both looked at: the
  reserve counts on each, and a plan change grows both.
- Temporary files: `temp_file_limit` from the plan on the tenant's login roles
  (`_pg_temp_files`); they are outside `pg_database_size`, so the quota alone let one
  sort fill the filesystem.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg

from agent import model, pg_passwords, placement, platform_roles, probe, resp, smallfiles
from agent.conditions import ConditionBook
from agent.docker import Docker
from agent.errors import AgentError
from agent.loopfs import LoopFs
from agent.metrics import ADDON_QUOTA_BYTES, ADDON_USAGE_BYTES
from agent.secrets import SecretStore
from agent.specs import (
    ADMIN_USER,
    BACKUP_USER,
    DATA_DIRS,
    PLATFORM_PG_SETTINGS,
    WAL_DIR,
    fs_size_mb,
    max_wal_size_mb,
    temp_file_limit_mb,
    wal_fs_size_mb,
)
from schemas import storage
from schemas.credentials import ROTATION_SUFFIX, login_role
from schemas.messages import PORTS, AddonSpec

log = logging.getLogger("orkestr.agent.upkeep")

MIB = 1024 * 1024
WARNING_RATIO = 0.9
# Redis refuses the write that would cross `maxmemory`, so a full Redis sits just under it.
REDIS_FULL_RATIO = 0.97
QUOTA_OBJECT = "orkestr_quota"
# Free space a Postgres filesystem keeps, whatever the database holds: new WAL segments
# (16 MB each), a checkpoint's, and the guard's reaction time at a fast filler's rate
# (30-60 MB/s of rows and WAL on a small machine).
RESERVE_BYTES = 48 * MIB
# A file the agent keeps in the data directory of a Postgres whose WAL has its own
# filesystem, and deletes when installing the refusal finds the data filesystem full: its
# catalog rows (functions, triggers) need new blocks, and nothing else would free one (with
# the WAL beside the data, recycled WAL segments did). Made again once there is room.
BALLAST = "orkestr-reserve"
BALLAST_BYTES = 8 * MIB
# A guard round once the filesystem grew by an eighth of the quota, within these bounds
# (WAL grows with the data: 16 MB on the filesystem is about 8 MB of rows).
GUARD_SHARE = 8
GUARD_MIN = 4 * MIB
GUARD_MAX = 16 * MIB
# Installing the refusal: how long to wait for the tenant's table locks, how many times.
RESTRICT_LOCK_MS = 300
RESTRICT_ATTEMPTS = 5
QuotaState = Literal["ok", "warning", "exceeded"]
# Where the kernel counts OOM kills of a container's cgroup: v1 (cgroupfs), v2 (cgroupfs,
# then systemd driver). A database's backend killed at the limit leaves the container up
# (Postgres restarts its backends), so Docker's State.OOMKilled alone would miss it.
OOM_FILES = (
    "/sys/fs/cgroup/memory/docker/{id}/memory.oom_control",
    "/sys/fs/cgroup/docker/{id}/memory.events",
    "/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.events",
)


def oom_kills(container_id: str) -> int | None:
    for pattern in OOM_FILES:
        try:
            # Read at every round of every add-on: one open, read and close.
            text = smallfiles.read_bytes(pattern.format(id=container_id))
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(b" ")
            if key == b"oom_kill" and value.strip().isdigit():
                return int(value)
    return None


def quota_state(usage: int, quota: int, full_ratio: float = 1.0) -> QuotaState:
    if usage >= quota * full_ratio:
        return "exceeded"
    if usage >= quota * WARNING_RATIO:
        return "warning"
    return "ok"


def quota_bytes(addon: AddonSpec) -> int | None:
    return storage.quota_bytes(addon.kind, addon.storage_mb, addon.resources.memory_mb)


def guard_step(addon: AddonSpec) -> int:
    """Growth of the volume's filesystem that earns an upkeep round before the next pass."""
    return min(GUARD_MAX, max(GUARD_MIN, (addon.storage_mb or 0) * MIB // GUARD_SHARE))


def pg_quota_state(usage: int, quota: int, free: int | None) -> QuotaState:
    """The database's size against its quota; a filesystem short of its WAL reserve
    refuses writes too, even under the quota (a bloated WAL, temporary files)."""
    if free is not None and free < RESERVE_BYTES:
        return "exceeded"
    return quota_state(usage, quota)


def limits_differ(host_config: Mapping[str, Any], addon: AddonSpec, cores: str = "") -> bool:
    """`cores`: the add-on's home cores, "" for none wanted (then any set is left alone)."""
    return (
        int(host_config.get("NanoCpus") or 0) != int(addon.resources.cpus * 1e9)
        or int(host_config.get("Memory") or 0) != addon.resources.memory_mb * MIB
        or (cores != "" and (host_config.get("CpusetCpus") or "") != cores)
    )


def refusal(addon: AddonSpec, usage: int, quota: int, free: int | None = None) -> str:
    plan = f"plan {addon.plan!r}" if addon.plan else "the plan"
    low = (
        f" and its filesystem has {free / MIB:.0f} MB left for the write-ahead log"
        if free is not None and free < RESERVE_BYTES
        else ""
    )
    return (
        f"storage quota exceeded: {plan} allows {quota // MIB} MB and this database uses "
        f"{usage / MIB:.1f} MB{low}; writes are refused until usage is under the quota "
        "(DELETE then VACUUM, TRUNCATE or DROP TABLE free space) or the plan grows"
    )


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# Large objects live in pg_largeobject, a catalog no trigger can watch, and PUBLIC may
# create and write them by default (`SELECT lo_from_bytea(0, ...)`): past the quota the
# functions that create, write or extend one are revoked from PUBLIC (this database's own
# ACL), and granted back with the writes. Reading and `lo_unlink` (which frees) stay.
LARGE_OBJECT_WRITERS = (
    "lo_creat(integer)",
    "lo_create(oid)",
    "lo_from_bytea(oid, bytea)",
    "lo_put(oid, bigint, bytea)",
    "lowrite(integer, bytea)",
    "lo_truncate(integer, integer)",
    "lo_truncate64(integer, bigint)",
)
_LO_FUNCTIONS = ", ".join(f"pg_catalog.{f}" for f in LARGE_OBJECT_WRITERS)

# Statement triggers refuse INSERT/UPDATE/COPY; the event trigger refuses DDL but DROP
# (and our own statements: the platform role is exempt). DROP TRIGGER is DDL too: the
# tenant owns its tables, so it could drop ours and write on (DROP TABLE, which frees
# space, takes the table's triggers with it under its own tag).
# The tenant owns its database, so it could make a schema `orkestr` first, with functions
# of these names that then stay its own (CREATE OR REPLACE keeps the owner) or clash (a
# different return type fails every round: no refusal ever). One not ours is renamed
# aside, never dropped: it may hold the tenant's data.
_RESTRICT_SQL = """
DO $s$ BEGIN
  IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'orkestr'
             AND nspowner <> (SELECT oid FROM pg_roles WHERE rolname = {admin_literal})) THEN
    EXECUTE format('ALTER SCHEMA orkestr RENAME TO %I',
                   'orkestr_renamed_' || to_char(clock_timestamp(), 'YYYYMMDDHH24MISSUS'));
  END IF;
END $s$;
CREATE SCHEMA IF NOT EXISTS orkestr AUTHORIZATION {admin};
REVOKE ALL ON SCHEMA orkestr FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION {lo_functions} FROM PUBLIC;
CREATE OR REPLACE FUNCTION orkestr.quota_refuse() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  RAISE EXCEPTION USING ERRCODE = 'disk_full', MESSAGE = {message};
END $f$;
CREATE OR REPLACE FUNCTION orkestr.quota_refuse_ddl() RETURNS event_trigger
LANGUAGE plpgsql AS $f$
BEGIN
  IF session_user <> {admin_literal}
     AND (tg_tag NOT LIKE 'DROP %' OR tg_tag = 'DROP TRIGGER') THEN
    RAISE EXCEPTION USING ERRCODE = 'disk_full', MESSAGE = {message};
  END IF;
END $f$;
DO $d$
DECLARE t record;
BEGIN
  -- A trigger of the tenant's by our name would stand for ours and exempt its table:
  -- renamed aside (never dropped, it is the tenant's), like a squatted schema.
  FOR t IN SELECT g.tgrelid::regclass AS rel FROM pg_trigger g
      WHERE g.tgname = '{name}' AND g.tgfoid <> 'orkestr.quota_refuse()'::regprocedure
  LOOP
    EXECUTE format('ALTER TRIGGER {name} ON %s RENAME TO %I', t.rel,
                   '{name}_renamed_' || to_char(clock_timestamp(), 'YYYYMMDDHH24MISSUS'));
  END LOOP;
  FOR t IN SELECT c.oid::regclass AS rel FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
        AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname <> 'orkestr'
        AND NOT EXISTS (SELECT 1 FROM pg_trigger g
                        WHERE g.tgrelid = c.oid AND g.tgname = '{name}')
  LOOP
    EXECUTE format('CREATE TRIGGER {name} BEFORE INSERT OR UPDATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION orkestr.quota_refuse()', t.rel);
  END LOOP;
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = '{name}') THEN
    CREATE EVENT TRIGGER {name} ON ddl_command_start
      EXECUTE FUNCTION orkestr.quota_refuse_ddl();
  END IF;
END $d$;
"""

# The tenant's writing statements already running when writes are refused (the triggers
# only see statements that start after them): those with a transaction id or a table's
# write lock. Reads are never cancelled, but ($3) while the filesystem is short of its
# reserve: then those with temporary files too (`pgsql_tmp<pid>.<n>`, a parallel query's
# `....fileset` named after its leader; a worker's own files stop with its leader), as
# `temp_file_limit` is per process and many sessions or workers add up. $2: spare those
# holding a table's exclusive lock (TRUNCATE, DROP, VACUUM FULL: how the tenant frees
# space), when a full data filesystem cannot reach the WAL (its own filesystem) and is
# only an error for the statement.
_CANCEL_SQL = """
WITH tmp AS (
  SELECT substring(f FROM '^pgsql_tmp([0-9]+)[.]')::int AS pid
  FROM pg_ls_dir('base/pgsql_tmp', true, false) f WHERE $3
), spilling AS (
  SELECT pid FROM tmp
  UNION SELECT w.leader_pid FROM pg_stat_activity w JOIN tmp ON tmp.pid = w.pid
)
SELECT count(*) FILTER (WHERE pg_cancel_backend(a.pid)) FROM pg_stat_activity a
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
  AND a.backend_type = 'client backend' AND a.usename <> $1 AND a.state = 'active'
  AND (a.backend_xid IS NOT NULL OR EXISTS (
        SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'relation'
          AND l.mode = 'RowExclusiveLock' AND l.granted)
       OR a.pid IN (SELECT pid FROM spilling))
  AND NOT ($2 AND EXISTS (
        SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'relation'
          AND l.mode = 'AccessExclusiveLock' AND l.granted))
"""

# The settings of the tenant's database that could shut the tenant out (_pg_database).
# `connect` is NULL while the tenant's role does not exist yet (never "revoked").
_DATABASE_SQL = """
SELECT d.datconnlimit AS connlimit, d.datallowconn AS allowconn, d.datistemplate AS istemplate,
       CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)
            THEN has_database_privilege($1, d.oid, 'CONNECT') END AS connect
FROM pg_database d WHERE d.datname = current_database()
"""
# The tenant's login roles that exist, with their own `temp_file_limit` (NULL: none).
_TEMP_LIMIT_SQL = """
SELECT r.rolname, (SELECT substr(c, length('temp_file_limit=') + 1) FROM unnest(s.setconfig) c
                   WHERE c LIKE 'temp_file_limit=%') AS value
FROM pg_roles r LEFT JOIN pg_db_role_setting s ON s.setrole = r.oid AND s.setdatabase = 0
WHERE r.rolname = ANY($1::text[])
"""
# The platform sets no per-database connection limit: max_connections bounds them all.
DATABASE_CONNECTION_LIMIT = -1

_REINSTATE_SQL = """
DROP EVENT TRIGGER IF EXISTS {name};
GRANT EXECUTE ON FUNCTION {lo_functions} TO PUBLIC;
DO $d$
DECLARE t record;
BEGIN
  FOR t IN SELECT g.tgrelid::regclass AS rel FROM pg_trigger g WHERE g.tgname = '{name}'
  LOOP
    EXECUTE format('DROP TRIGGER IF EXISTS {name} ON %s', t.rel);
  END LOOP;
END $d$;
"""
_REINSTATE = _REINSTATE_SQL.format(name=QUOTA_OBJECT, lo_functions=_LO_FUNCTIONS)


class Upkeep:
    def __init__(
        self,
        docker: Docker,
        secrets: SecretStore,
        book: ConditionBook,
        loopfs: LoopFs | None = None,
    ) -> None:
        self.docker = docker
        self.loopfs = loopfs
        self.secrets = secrets
        self.book = book
        self.usage: dict[str, int] = {}
        self.quota: dict[str, int] = {}
        # add-on id -> its home cores (agent/placement.py), set with each desired state.
        self.homes: dict[str, str] = {}
        # add-on id -> since when (monotonic) its move to its home cores waits; and whether
        # add-ons other than the one given are starting on the host (the agent's answer).
        self._move_waits: dict[str, float] = {}
        self.others_starting: Callable[[str], bool] = lambda _addon_id: False
        # add-on id -> (the sizes it was inspected for, its database's inspection)
        self._inspected: dict[str, tuple[tuple[Any, ...], Mapping[str, Any]]] = {}
        # One round at a time per add-on: the pass, a readiness poll and the guard may all
        # want one, and two rounds' ALTER ROLEs collide ("tuple concurrently updated").
        self._rounds: dict[str, asyncio.Lock] = {}
        # add-on id -> (database container id, its data directory through its root, the
        # directory's device, the filesystem's used bytes) as the last round saw them.
        self._fs: dict[str, tuple[str, str, int, int]] = {}
        # add-on id -> (server, quota) whose settings were checked (a server: its run_id)
        self._redis_config: dict[str, tuple[str, int]] = {}
        # add-on id -> (its WAL directory through its root, that directory's device), for
        # an add-on whose WAL has its own filesystem.
        self._wal_fs: dict[str, tuple[str, int]] = {}
        # add-on id -> (login role, its verifier) last found to hold the platform's password
        self._password_checked: dict[str, tuple[str, str | None]] = {}
        # add-on id -> what its least roles were last made right for (agent/platform_roles.py)
        self._roles_made: dict[str, tuple[object, ...]] = {}

    def busy(self, addon_id: str) -> bool:
        lock = self._rounds.get(addon_id)
        return lock is not None and lock.locked()

    async def tend(
        self,
        project_id: str,
        addon: AddonSpec,
        ip: str,
        timeout_s: float,
        redis: resp.Connection | None = None,
        *,
        quota_only: bool = False,
        info: resp.Reply = None,
    ) -> None:
        """One round for one add-on; errors are logged and retried after the next probe.

        A round already running for the add-on makes this one unnecessary: it does the same.
        The guard's rounds (`quota_only`) measure and enforce the quota, nothing else: no
        Docker call, as soon as possible. `redis`: the probe's open connection to a Redis
        add-on, used instead of a new one; `info`: its reply to `INFO memory`, if the probe
        asked for it in the same write as its PING (None: asked here).
        """
        lock = self._rounds.setdefault(addon.id, asyncio.Lock())
        if lock.locked():
            return
        async with lock:
            await self._round(project_id, addon, ip, timeout_s, quota_only, redis, info)

    async def _round(
        self,
        project_id: str,
        addon: AddonSpec,
        ip: str,
        timeout_s: float,
        quota_only: bool,
        redis: resp.Connection | None = None,
        redis_info: resp.Reply = None,
    ) -> None:
        try:
            if quota_only:
                if addon.kind == "postgres":
                    await self._postgres(addon, ip, timeout_s, self._remeasure_fs(addon), True)
            else:
                info = await self._limits(addon)
                if addon.kind == "postgres":
                    free = self._measure_fs(addon, info)
                    await self._postgres(addon, ip, timeout_s, free)
                elif redis is not None:
                    async with _AdminLink(lambda: self._redis_connect(addon, ip, timeout_s)) as a:
                        await self._redis(addon, redis, a, redis_info)
                else:
                    async with await self._redis_connect(addon, ip, timeout_s) as conn:
                        await self._redis(addon, conn, _AdminLink(None, conn))
        except (
            AgentError,
            OSError,
            TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            # A deletion's stop ending the connection mid-round (see probe.QUERY_ERRORS).
            asyncpg.InternalClientError,
            resp.RespError,
        ) as exc:
            log.warning("upkeep.failed addon=%s error=%s", addon.id, exc)
            return
        usage, quota = self.usage.get(addon.id), self.quota.get(addon.id)
        if usage is not None:
            ADDON_USAGE_BYTES.labels(addon.id, project_id, addon.kind).set(usage)
        if quota is not None:
            ADDON_QUOTA_BYTES.labels(addon.id, project_id, addon.kind).set(quota)

    def forget(self, addon_id: str) -> None:
        self.usage.pop(addon_id, None)
        self.quota.pop(addon_id, None)
        self._inspected.pop(addon_id, None)
        self._fs.pop(addon_id, None)
        self._redis_config.pop(addon_id, None)
        self._wal_fs.pop(addon_id, None)
        self._password_checked.pop(addon_id, None)
        self._roles_made.pop(addon_id, None)
        self._move_waits.pop(addon_id, None)
        lock = self._rounds.get(addon_id)
        if lock is not None and not lock.locked():
            del self._rounds[addon_id]

    def container_changed(self, container_id: str | None = None) -> None:
        """A Docker event for a container (None: events may have been missed): its
        inspection is read afresh at the next round."""
        if container_id is None:
            self._inspected.clear()
            return
        for aid in [
            a for a, (_k, info) in self._inspected.items() if info.get("Id") == container_id
        ]:
            del self._inspected[aid]

    # --- the filesystem guard -------------------------------------------------------
    def _measure_fs(self, addon: AddonSpec, info: Mapping[str, Any]) -> int | None:
        """Free bytes of the volume's own filesystem, or of the WAL's if it has less
        (None: a plain volume, or unseen)."""
        if self.loopfs is None or not addon.storage_mb:
            return None
        if self.loopfs.size_mb(model.volume_name(addon.id)) is None:
            return None
        pid = (info.get("State") or {}).get("Pid")
        if not pid:
            return None
        path = f"/proc/{pid}/root{DATA_DIRS[addon.kind]}"
        try:
            dev = os.stat(path).st_dev
            used, free = _usage(path)
        except OSError:
            return None
        self._fs[addon.id] = (str(info.get("Id", "")), path, dev, used)
        self._wal_fs.pop(addon.id, None)
        if self.loopfs.size_mb(model.wal_volume_name(addon.id)) is not None:
            wal_path = f"/proc/{pid}/root{WAL_DIR}"
            try:
                wal_dev = os.stat(wal_path).st_dev
                if wal_dev != dev:  # its own filesystem, mounted
                    self._wal_fs[addon.id] = (wal_path, wal_dev)
                    if free >= RESERVE_BYTES + BALLAST_BYTES:
                        _make_ballast(f"{path}/{BALLAST}")
            except OSError as exc:
                log.warning("upkeep.ballast_failed addon=%s error=%s", addon.id, exc)
        return _least(free, self._wal_free(addon.id))

    def _release_ballast(self, addon_id: str) -> bool:
        """Delete the add-on's ballast file: whether that freed anything."""
        seen = self._fs.get(addon_id)
        if seen is None or addon_id not in self._wal_fs:
            return False
        _, path, dev, _ = seen
        try:
            if os.stat(path).st_dev != dev:
                return False
            os.unlink(f"{path}/{BALLAST}")
        except OSError:
            return False
        log.warning("upkeep.ballast_released addon=%s bytes=%s", addon_id, BALLAST_BYTES)
        return True

    def _wal_free(self, addon_id: str) -> int | None:
        """Free bytes of the WAL's own filesystem, as the last full round located it."""
        seen = self._wal_fs.get(addon_id)
        if seen is None:
            return None
        path, dev = seen
        try:
            if os.stat(path).st_dev != dev:
                return None
            return _usage(path)[1]
        except OSError:
            return None

    def _remeasure_fs(self, addon: AddonSpec) -> int | None:
        """Free bytes, through what the last full round found (its used bytes updated)."""
        seen = self._fs.get(addon.id)
        if seen is None:
            return None
        db_id, path, dev, _ = seen
        try:
            if os.stat(path).st_dev != dev:
                return None
            used, free = _usage(path)
        except OSError:
            return None
        self._fs[addon.id] = (db_id, path, dev, used)
        return _least(free, self._wal_free(addon.id))

    def guard_due(self, addon: AddonSpec, db_id: str) -> bool:
        """Whether the add-on's filesystem grew by a step since the last round, or is
        short of its reserve: one statfs, no connection. Only for a container a round
        has seen (its process and device are known and checked, never guessed)."""
        seen = self._fs.get(addon.id)
        if seen is None or seen[0] != db_id or self.busy(addon.id):
            return False
        _, path, dev, used_then = seen
        try:
            if os.stat(path).st_dev != dev:
                return False  # another process now has that pid: the next round looks again
            used, free = _usage(path)
        except OSError:
            return False
        free = _least(free, self._wal_free(addon.id))
        return free < RESERVE_BYTES or used - used_then >= guard_step(addon)

    # --- limits ---------------------------------------------------------------------
    async def _inspection(self, addon: AddonSpec) -> Mapping[str, Any]:
        # The inspection is kept while the container has no event and the plan's sizes
        # stay: a round per add-on per resync interval, a hundred add-ons on a host. The
        # kernel's OOM-kill counter is read every round all the same.
        key = (addon.resources, addon.storage_mb, self.homes.get(addon.id, ""))
        cached = self._inspected.get(addon.id)
        if cached is not None and cached[0] == key:
            return cached[1]
        info = await self.docker.inspect(model.db_name(addon.id))
        self._inspected[addon.id] = (key, info)
        return info

    async def stale_cores(self, addon: AddonSpec) -> str:
        """The home cores a sleeping add-on's database is not on ("": it is, or none are
        wanted). No connection: only its inspection, kept between events."""
        cores = self.homes.get(addon.id, "")
        if not cores or self.busy(addon.id):
            return ""
        info = await self._inspection(addon)
        return "" if ((info.get("HostConfig") or {}).get("CpusetCpus") or "") == cores else cores

    async def move_asleep(self, addon: AddonSpec, cores: str) -> None:
        """Put a paused or stopped database on its home cores now (`docker update` takes
        either), not at the first round after its wake: that round's move landed in the
        first seconds of the clients that woke it, on cores they had just been put on
        (issue 12's pool rows). Only the cores: a smaller memory limit can be refused
        while the pages are frozen, and the plan's sizes wait for the next round."""
        self._inspected.pop(addon.id, None)
        try:
            await self.docker.update_cores(model.db_name(addon.id), cores)
        except AgentError as exc:
            log.warning("upkeep.limits_failed addon=%s cores=%s error=%s", addon.id, cores, exc)
            return
        log.info("upkeep.limits_updated addon=%s cores=%s asleep=yes", addon.id, cores)

    def _cores_now(self, addon: AddonSpec, host_config: Mapping[str, Any]) -> str:
        """The home cores to apply in this round: "" (leave them) while the move waits for
        the other add-ons starting on the host (placement.move_now)."""
        cores = self.homes.get(addon.id, "")
        if not cores or (host_config.get("CpusetCpus") or "") == cores:
            self._move_waits.pop(addon.id, None)
            return cores
        now = time.monotonic()
        since = self._move_waits.get(addon.id)
        if placement.move_now(self.others_starting(addon.id), since, now):
            self._move_waits.pop(addon.id, None)
            return cores
        if since is None:
            self._move_waits[addon.id] = now
            log.debug("upkeep.move_waits addon=%s cores=%s", addon.id, cores)
        return ""

    async def _limits(self, addon: AddonSpec) -> Mapping[str, Any]:
        name = model.db_name(addon.id)
        info = await self._inspection(addon)
        cores = self._cores_now(addon, info.get("HostConfig") or {})
        self._memory_condition(addon, info)
        await self._grow(addon, info)
        if limits_differ(info.get("HostConfig") or {}, addon, cores):
            self._inspected.pop(addon.id, None)
            try:
                await self.docker.update_limits(
                    name, addon.resources.cpus, addon.resources.memory_mb, cores
                )
            except AgentError as exc:
                # Tried again next round; the quota and the credentials must not wait on
                # it (a cpuset Docker refuses, say, after a CPU went offline).
                log.warning("upkeep.limits_failed addon=%s cores=%s error=%s", addon.id, cores, exc)
                return info
            log.info(
                "upkeep.limits_updated addon=%s cpus=%s memory_mb=%s cores=%s",
                addon.id,
                addon.resources.cpus,
                addon.resources.memory_mb,
                cores or "any",
            )
        return info

    async def _grow(self, addon: AddonSpec, info: Mapping[str, Any]) -> None:
        """A larger plan grows the volume's filesystem online (it never shrinks), and the
        WAL's, for an add-on that has one."""
        if self.loopfs is None or not addon.storage_mb:
            return
        volumes = [
            (model.volume_name(addon.id), fs_size_mb(addon.storage_mb), DATA_DIRS[addon.kind])
        ]
        if addon.kind == "postgres":
            wal = model.wal_volume_name(addon.id)
            volumes.append((wal, wal_fs_size_mb(addon.storage_mb), WAL_DIR))
        sizes: list[int] = []
        now = datetime.now(UTC)
        for volume, want, target in volumes:
            have = self.loopfs.size_mb(volume)
            if have is None:
                continue  # a plain volume (made before filesystems), or no WAL volume
            if have < want:
                device = await self.docker.volume_device(volume)
                pid = (info.get("State") or {}).get("Pid")
                if device is None or not pid:
                    return
                try:
                    await self.loopfs.grow(volume, device, want, f"/proc/{pid}/root{target}")
                except AgentError as exc:
                    # EPERM: the agent lacks CAP_SYS_RESOURCE; the quota still grew, so the
                    # tenant can write up to what the filesystem's headroom allows.
                    before = self.book.get(addon.id, "Filesystem")
                    self.book.set(addon.id, "Filesystem", "False", "GrowFailed", str(exc), now)
                    # Retried every round; logged once per new error (the condition has it):
                    # a host without the capability logged it every few seconds per add-on.
                    if before is None or (before.reason, before.message) != (
                        "GrowFailed",
                        str(exc),
                    ):
                        log.warning("upkeep.grow_failed addon=%s error=%s", addon.id, exc)
                    return  # the rest of the upkeep (the quota above all) goes on
                have = want
            sizes.append(have)
        if not sizes:
            return
        wal = f" and its WAL's own {sizes[1]} MB" if len(sizes) > 1 else ""
        self.book.set(
            addon.id,
            "Filesystem",
            "True",
            "Sized",
            f"its own {sizes[0]} MB filesystem for a {addon.storage_mb} MB quota{wal}",
            now,
        )

    # --- Postgres -------------------------------------------------------------------
    async def _postgres(
        self,
        addon: AddonSpec,
        ip: str,
        timeout_s: float,
        free: int | None,
        quota_only: bool = False,
    ) -> None:
        conn = await self._pg_connect(addon, ip, timeout_s)
        try:
            if not quota_only:
                await self._pg_database(conn, addon)
                await self._pg_credentials(conn, addon)
                await self._pg_roles(conn, addon)
                await self._pg_wal(conn, addon)
                await self._pg_temp_files(conn, addon)
            await self._pg_quota(conn, addon, free)
        finally:
            await conn.close(timeout=timeout_s)

    async def _pg_connect(
        self, addon: AddonSpec, ip: str, timeout_s: float, database: str = ""
    ) -> asyncpg.Connection:
        return await asyncpg.connect(
            host=ip,
            port=PORTS["postgres"],
            user=ADMIN_USER,
            database=database or addon.database,
            password=self.secrets.admin_password(addon.id),
            timeout=timeout_s,
            # Every statement bounded, and never queued for long behind a tenant's locks:
            # upkeep runs in the pass, so a stuck query would hold every add-on's status.
            command_timeout=timeout_s,
            ssl=False,
            server_settings={
                **dict(PLATFORM_PG_SETTINGS),
                "application_name": "orkestr-upkeep",
                "lock_timeout": str(max(1, int(timeout_s * 1000))),
            },
        )

    async def _redis_connect(self, addon: AddonSpec, ip: str, timeout_s: float) -> resp.Connection:
        return await resp.Connection.open(
            ip,
            PORTS["redis"],
            ADMIN_USER,
            self.secrets.admin_password(addon.id),
            timeout_s,
            "orkestr-upkeep",
        )

    # --- the least roles (agent/platform_roles.py) ------------------------------------
    async def platform_roles(
        self, addon: AddonSpec, ip: str, timeout_s: float, role: str = BACKUP_USER
    ) -> None:
        """Make the backup (and restore) roles right on the live server now, whatever an
        earlier round found: run before each step of a backup or restore that logs in as
        `role`, so one asked for right after an upgrade, or after the tenant revoked what
        the roles need, works. Waits for a running round.

        Postgres: before a dump (`BACKUP_USER`), in the tenant's database, where the
        backup role is also granted every large object; before a restore's steps, in
        `postgres`: the tenant's database may be closed, or renamed, by a restore an
        agent killed mid-swap (the restore's script opens it again)."""
        dump = role == BACKUP_USER
        async with self._rounds.setdefault(addon.id, asyncio.Lock()):
            if addon.kind == "postgres":
                conn = await self._pg_connect(addon, ip, timeout_s, "" if dump else "postgres")
                try:
                    await self._pg_roles(conn, addon, force=True, large_objects=dump)
                finally:
                    await conn.close(timeout=timeout_s)
            else:
                async with await self._redis_connect(addon, ip, timeout_s) as conn:
                    await self._redis_make_roles(addon, conn)

    async def probe_role(self, addon: AddonSpec, ip: str, timeout_s: float, refusal: str) -> None:
        """Mend what made the server refuse the probe's login (`refusal`, its message), as
        the admin, and say so: a server from before the probe's role, a rotated password,
        or a tenant's REVOKE CONNECT or CONNECTION LIMIT 0 on its database (which the
        admin, a superuser, is exempt from: the rounds would mend it, but they run only
        after a probe that answered). A volume from before the platform's admin role is
        adopted first (probe.admin_login). Waits for a running round."""
        async with self._rounds.setdefault(addon.id, asyncio.Lock()):
            if addon.kind == "postgres":
                conn = await probe.admin_login(
                    ip,
                    addon.database,
                    self.secrets.admin_password(addon.id),
                    timeout_s,
                    (addon.user, self.secrets.password(addon.id)),
                )
                try:
                    await self._pg_database(conn, addon)
                    await self._pg_roles(conn, addon, force=True)
                finally:
                    await conn.close(timeout=timeout_s)
            else:
                async with await self._redis_connect(addon, ip, timeout_s) as conn:
                    await self._redis_make_roles(addon, conn)
        log.warning("probe.role_mended addon=%s refused=%r", addon.id, refusal)

    async def _pg_roles(
        self,
        conn: asyncpg.Connection,
        addon: AddonSpec,
        force: bool = False,
        large_objects: bool = False,
    ) -> None:
        """Once per agent and passwords in the rounds; every time when `force`d."""
        users = platform_roles.PG_USERS
        passwords = {u: self.secrets.platform_password(addon.id, u) for u in users}
        made = (addon.user, addon.database, *passwords.values())
        if not force and self._roles_made.get(addon.id) == made:
            return
        try:
            fixes = await platform_roles.ensure_postgres(
                conn, addon.user, addon.database, passwords, large_objects=large_objects
            )
        except asyncpg.PostgresError as exc:
            if force:
                raise
            # The rest of the round (the quota above all) must not wait on it.
            log.warning("upkeep.platform_roles_failed addon=%s error=%s", addon.id, exc)
            return
        if fixes:
            log.info("upkeep.platform_roles addon=%s fixes=%r", addon.id, fixes)
        self._roles_made[addon.id] = made

    async def _redis_roles(self, addon: AddonSpec, server: str, admin: _AdminLink) -> None:
        """Once per server start and passwords: only the admin may change a Redis user."""
        made = (server, *self._redis_passwords(addon).values())
        if self._roles_made.get(addon.id) == made:
            return
        await self._redis_make_roles(addon, await admin.get())
        self._roles_made[addon.id] = made

    def _redis_passwords(self, addon: AddonSpec) -> dict[str, str]:
        return {u: self.secrets.platform_password(addon.id, u) for u in platform_roles.REDIS_USERS}

    async def _redis_make_roles(self, addon: AddonSpec, conn: resp.Connection) -> None:
        """The least users on the live server (`conn`: the admin's), and in its redis.conf."""
        if not self.secrets.redis_conf_has_platform_users(addon.id):
            self.secrets.write_redis_conf(addon.id)  # for the next start of a conf made before
        await platform_roles.ensure_redis(conn, self._redis_passwords(addon))

    async def _pg_database(self, conn: asyncpg.Connection, addon: AddonSpec) -> None:
        """Undo what the tenant, as its database's owner, can set to shut itself out.

        `CONNECTION LIMIT 0` and `REVOKE CONNECT` (from PUBLIC and its own role) stop every
        new session of the tenant but not ours (a superuser is exempt from both), and it
        cannot connect to undo them; `IS_TEMPLATE true` makes the database undroppable.
        `ALLOW_CONNECTIONS false` is refused from the database itself, the only one the
        tenant reaches, but is checked all the same. Each is put back every round.
        """
        row = await conn.fetchrow(_DATABASE_SQL, addon.user)
        if row is None:
            return
        db = _ident(addon.database)
        fixes: list[tuple[str, str]] = []
        if row["connlimit"] != DATABASE_CONNECTION_LIMIT:
            fixes.append(
                (
                    f"connection_limit={row['connlimit']}",
                    f"ALTER DATABASE {db} CONNECTION LIMIT {DATABASE_CONNECTION_LIMIT}",
                )
            )
        if not row["allowconn"]:
            fixes.append(("allow_connections=false", f"ALTER DATABASE {db} ALLOW_CONNECTIONS true"))
        if row["istemplate"]:
            fixes.append(("is_template=true", f"ALTER DATABASE {db} IS_TEMPLATE false"))
        if row["connect"] is False:
            # Its login roles (agent/secrets.py) are members of it, so they connect again too.
            fixes.append(
                ("connect=revoked", f"GRANT CONNECT ON DATABASE {db} TO {_ident(addon.user)}")
            )
        for found, sql in fixes:
            await conn.execute(sql)
            log.warning(
                "upkeep.database_setting_restored addon=%s found=%s sql=%r", addon.id, found, sql
            )

    async def _pg_credentials(self, conn: asyncpg.Connection, addon: AddonSpec) -> None:
        version = self._secret_version(addon.id)
        if version and self.secrets.applied(addon.id) != version:
            role = login_role(addon.user, version)
            if role != addon.user:
                # A login role that acts as the tenant's: member of it, and every session
                # switches to it, so what it creates is owned by the tenant's role.
                await conn.execute(
                    f"""DO $d$ BEGIN
                      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {_literal(role)}) THEN
                        CREATE ROLE {_ident(role)} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
                          NOREPLICATION NOBYPASSRLS;
                      END IF; END $d$;
                    GRANT {_ident(addon.user)} TO {_ident(role)};
                    ALTER ROLE {_ident(role)} SET role = {_literal(addon.user)};"""
                )
            password = self.secrets.password(addon.id)
            await conn.execute(f"ALTER ROLE {_ident(role)} LOGIN PASSWORD {_literal(password)}")
            # In a thread: its fsync would hold the event loop (a burst applies sixty).
            await asyncio.to_thread(self.secrets.mark_applied, addon.id, version)
            log.info("upkeep.password_applied addon=%s version=%s role=%s", addon.id, version, role)
        previous = self.secrets.previous(addon.id)
        if version and previous is not None and previous[1] <= time.time():
            old_role = login_role(addon.user, version - 1)
            # New logins with the old password fail from now on; open sessions go on.
            await conn.execute(f"ALTER ROLE {_ident(old_role)} PASSWORD NULL")
            self.secrets.forget_previous(addon.id, addon.kind)
            log.info("upkeep.password_retired addon=%s role=%s", addon.id, old_role)
        if version and self.secrets.applied(addon.id) == version:
            await self._pg_passwords_kept(conn, addon, version)

    async def _pg_passwords_kept(
        self, conn: asyncpg.Connection, addon: AddonSpec, version: int
    ) -> None:
        """Put back the platform's passwords a tenant changed.

        A role may set its own password without any privilege, and a session can `RESET
        ROLE` to its login role: the credentials the API shows would stop working, and a
        session kept open past a rotation could give the retired role a password of its
        own choosing, a login the rotation was meant to end. Each full round reads both
        login roles' verifiers (pg_authid, one query); the current one must hold the
        platform's password, the other none once no grace period runs. A verifier already
        found right is not hashed again.
        """
        role = login_role(addon.user, version)
        other = login_role(addon.user, version + 1)
        rows = await conn.fetch(
            "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY($1::text[])",
            [role, other],
        )
        found = {r["rolname"]: r["rolpassword"] for r in rows}
        current = found.get(role)
        if role in found and self._password_checked.get(addon.id) != (role, current):
            password = self.secrets.password(addon.id)
            if not pg_passwords.verifier_matches(current, password, role):
                await conn.execute(f"ALTER ROLE {_ident(role)} PASSWORD {_literal(password)}")
                log.warning("upkeep.password_restored addon=%s role=%s", addon.id, role)
                current = await conn.fetchval(
                    "SELECT rolpassword FROM pg_authid WHERE rolname = $1", role
                )
            self._password_checked[addon.id] = (role, current)
        if found.get(other) is not None and self.secrets.previous(addon.id) is None:
            await conn.execute(f"ALTER ROLE {_ident(other)} PASSWORD NULL")
            log.warning("upkeep.retired_password_cleared addon=%s role=%s", addon.id, other)

    async def _pg_wal(self, conn: asyncpg.Connection, addon: AddonSpec) -> None:
        """Keep WAL within the headroom its filesystem has beyond the quota, and let crash
        recovery start on a full filesystem.

        With `wal_init_zero` on (Postgres's default) a new WAL segment is written full of
        zeroes first: 16 MB that crash recovery needs free, and a filesystem filled while
        the agent was away (or faster than the guard) then fails every restart with
        `could not write to file "pg_wal/xlogtemp"`, a crash loop. Off, the segment is
        created sparse (its last byte written) and recovery needs only the blocks it
        really writes: measured on a 100 % full filesystem, recovery failed with it on
        and completed with it off (docs/architecture.md).
        """
        if not addon.storage_mb:
            return
        want = max_wal_size_mb(addon.storage_mb)
        have = await conn.fetchrow(
            "SELECT (SELECT setting::int FROM pg_settings WHERE name = 'max_wal_size') AS size,"
            " (SELECT setting FROM pg_settings WHERE name = 'wal_init_zero') AS zero"
        )
        if have is None or (have["size"], have["zero"]) != (want, "off"):
            await conn.execute(f"ALTER SYSTEM SET max_wal_size = '{want}MB'")
            await conn.execute(f"ALTER SYSTEM SET min_wal_size = '{max(32, want // 2)}MB'")
            await conn.execute("ALTER SYSTEM SET wal_init_zero = off")
            await conn.execute("SELECT pg_reload_conf()")
            log.info(
                "upkeep.wal_bounded addon=%s max_wal_size_mb=%s wal_init_zero=off", addon.id, want
            )

    async def _pg_temp_files(self, conn: asyncpg.Connection, addon: AddonSpec) -> None:
        """Bound the temporary files of the tenant's sessions by the plan (specs.
        temp_file_limit_mb): `ALTER ROLE ... SET` on both its login roles (a role's settings
        are the login role's, not those of the role it switches to). `temp_file_limit` is
        superuser-only, so the tenant can neither set it in a session nor reset it on its
        role; the platform's own sessions (restores build indexes) are not bounded. New
        sessions get it, and a plan change updates it; no restart."""
        want = f"{temp_file_limit_mb(addon.storage_mb)}MB" if addon.storage_mb else None
        roles = [addon.user, addon.user + ROTATION_SUFFIX]
        rows = await conn.fetch(_TEMP_LIMIT_SQL, roles)
        for row in rows:
            if row["value"] == want:
                continue
            role = _ident(row["rolname"])
            sql = (
                f"ALTER ROLE {role} SET temp_file_limit = {_literal(want)}"
                if want
                else f"ALTER ROLE {role} RESET temp_file_limit"
            )
            await conn.execute(sql)
            log.info(
                "upkeep.temp_files_bounded addon=%s role=%s temp_file_limit=%s was=%s",
                addon.id, row["rolname"], want, row["value"],
            )  # fmt: skip

    async def _pg_quota(self, conn: asyncpg.Connection, addon: AddonSpec, free: int | None) -> None:
        usage = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
        self.usage[addon.id] = usage
        quota = quota_bytes(addon)
        restricted = bool(
            await conn.fetchval(
                "SELECT true FROM pg_event_trigger WHERE evtname = $1", QUOTA_OBJECT
            )
        )
        if quota is None:
            self.quota.pop(addon.id, None)
            if restricted:
                await conn.execute(_REINSTATE)
            return
        self.quota[addon.id] = quota
        state = pg_quota_state(usage, quota, free)
        if state == "exceeded":
            low = free is not None and free < RESERVE_BYTES
            # Every round while exceeded: a message naming a new plan, any new table. The
            # writes running when writes are first refused (and any, short of the reserve)
            # are cancelled: triggers stop only statements that start after them.
            sql = _RESTRICT_SQL.format(
                admin=_ident(ADMIN_USER),
                admin_literal=_literal(ADMIN_USER),
                message=_literal(refusal(addon, usage, quota, free)),
                name=QUOTA_OBJECT,
                lo_functions=_LO_FUNCTIONS,
            )
            spare = addon.id in self._wal_fs
            try:
                cancelled = await self._restrict(
                    conn, sql, cancel=not restricted or low, spare_freeing=spare, low=low
                )
            except asyncpg.DiskFullError:
                # The data filesystem is full to its last block (filled while the agent
                # was away): the refusal's own catalog rows need room, which the ballast
                # gives back. Without one, the round fails and the next tries again.
                if not self._release_ballast(addon.id):
                    raise
                cancelled = await self._restrict(
                    conn, sql, cancel=True, spare_freeing=spare, low=low
                )
            if not restricted or low:
                log.warning(
                    "upkeep.writes_refused addon=%s usage=%s quota=%s free=%s cancelled=%s",
                    addon.id,
                    usage,
                    quota,
                    free,
                    cancelled,
                )
        elif restricted:
            await conn.execute(_REINSTATE)
            log.info("upkeep.writes_reinstated addon=%s usage=%s quota=%s", addon.id, usage, quota)
        self._quota_condition(addon, state, usage, quota, free)

    async def _restrict(
        self,
        conn: asyncpg.Connection,
        sql: str,
        *,
        cancel: bool,
        spare_freeing: bool = False,
        low: bool = False,
    ) -> int:
        """Install the refusal; how many of the tenant's statements were cancelled for it.

        CREATE TRIGGER waits for the table locks of the statements writing to it, so a
        filler mid-statement would hold the refusal off until the disk is full: they are
        cancelled first, and again should a new one take the lock before us. Statements
        that start while we wait queue behind our lock request, then meet the trigger.
        """
        cancelled = 0
        for _ in range(RESTRICT_ATTEMPTS):
            if cancel:
                found = await conn.fetchval(_CANCEL_SQL, ADMIN_USER, spare_freeing, low)
                cancelled += int(found or 0)
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = '{RESTRICT_LOCK_MS}ms'")
                    await conn.execute(sql)
                return cancelled
            except asyncpg.LockNotAvailableError:
                if not cancel:
                    break
        raise AgentError("writes not refused yet: the tenant's statements hold the table locks")

    # --- Redis ----------------------------------------------------------------------
    async def _redis(
        self, addon: AddonSpec, conn: resp.Connection, admin: _AdminLink, info: resp.Reply = None
    ) -> None:
        """`conn`: the probe's connection (its least user), for INFO; `admin`: the admin's,
        for what changes something. `info`: the reply to `INFO memory` (with `server` on a
        connection whose server is not known yet) read with the probe (None: asked here)."""
        version = self._secret_version(addon.id)
        if version and self.secrets.applied(addon.id) != version:
            # Adds the new password; the old one stays until the grace ends.
            await (await admin.get()).call(
                "ACL", "SETUSER", "default", ">" + self.secrets.password(addon.id)
            )
            # In a thread: its fsync would hold the event loop (a burst applies sixty).
            await asyncio.to_thread(self.secrets.mark_applied, addon.id, version)
            log.info("upkeep.password_applied addon=%s version=%s", addon.id, version)
        previous = self.secrets.previous(addon.id)
        if previous is not None and previous[1] <= time.time():
            if previous[0] != self.secrets.password(addon.id):
                await (await admin.get()).call("ACL", "SETUSER", "default", "<" + previous[0])
            self.secrets.forget_previous(addon.id, addon.kind)
            log.info("upkeep.password_retired addon=%s", addon.id)
        quota = quota_bytes(addon)
        assert quota is not None  # Redis always has its memory ceiling
        if info is None:
            info = await conn.call("INFO", *(("server",) if conn.server is None else ()), "memory")
        elif isinstance(info, resp.RespError):
            raise info
        if not isinstance(info, bytes):
            raise resp.RespError(f"INFO answered {info!r}")
        if conn.server is None:
            conn.server = resp.info_field(info, "run_id") or f"connection {conn.serial}"
        # The memory settings are in INFO; `save` is not, and is read once per server start
        # and quota (only the admin may change a setting; a new start reads redis.conf).
        if (
            resp.info_field(info, "maxmemory") != str(quota)
            or resp.info_field(info, "maxmemory_policy") != "noeviction"
            or self._redis_config.get(addon.id) != (conn.server, quota)
        ):
            a = await admin.get()
            config = resp.pairs(await a.call("CONFIG", "GET", "maxmemory*", "save"))
            if config.get("maxmemory") != str(quota):
                await a.call("CONFIG", "SET", "maxmemory", quota)
            if config.get("maxmemory-policy") != "noeviction":
                await a.call("CONFIG", "SET", "maxmemory-policy", "noeviction")
            if config.get("save", ""):
                # A redis.conf from before `save ""` (the AOF alone persists).
                await a.call("CONFIG", "SET", "save", "")
            # redis.conf, for the next start, is the planner's (LimitRedisConf).
            self._redis_config[addon.id] = (conn.server, quota)
        used = resp.info_field(info, "used_memory") or ""
        if not used.isdigit():
            raise resp.RespError(f"INFO memory without used_memory: {info[:200]!r}")
        usage = int(used)
        self.usage[addon.id] = usage
        self.quota[addon.id] = quota
        self._quota_condition(addon, quota_state(usage, quota, REDIS_FULL_RATIO), usage, quota)
        await self._redis_roles(addon, conn.server, admin)  # last: the quota must not wait on it

    async def memory_check(self, addon: AddonSpec, db: model.ObservedContainer) -> None:
        """The MemoryLimit condition of a database that does not answer. The rounds reach
        ready databases only, so one the kernel kills at its limit before it ever answers
        (an initdb under a tiny plan) showed as unreachable, never why. Docker is asked
        only once the container is down or the kernel has killed in it."""
        if db.state == "running" and not oom_kills(db.id):
            return
        try:
            info = await self._inspection(addon)
        except AgentError:
            return
        self._memory_condition(addon, info)

    def _memory_condition(self, addon: AddonSpec, info: Mapping[str, Any]) -> None:
        kills = oom_kills(str(info.get("Id", "")))
        state = info.get("State") or {}
        limit = f"its {addon.resources.memory_mb} MB limit"
        if state.get("OOMKilled") or kills:
            count = f"{kills} process(es)" if kills else "its main process"
            self.book.set(
                addon.id,
                "MemoryLimit",
                "False",
                "OOMKilled",
                f"the kernel killed {count} of this add-on at {limit}; "
                f"the database restarted them (container restarts: {info.get('RestartCount', 0)})",
                datetime.now(UTC),
            )
        else:
            self.book.set(
                addon.id,
                "MemoryLimit",
                "True",
                "WithinLimit",
                f"no OOM kill at {limit}",
                datetime.now(UTC),
            )

    # --- shared ---------------------------------------------------------------------
    def _secret_version(self, addon_id: str) -> int:
        return self.secrets.version(addon_id)

    def _quota_condition(
        self,
        addon: AddonSpec,
        state: QuotaState,
        usage: int,
        quota: int,
        free: int | None = None,
    ) -> None:
        now = datetime.now(UTC)
        used = f"{usage / MIB:.1f} MB of {quota // MIB} MB ({100 * usage / quota:.0f} %)"
        if free is not None and free < RESERVE_BYTES:
            used += f", {free / MIB:.0f} MB left on its filesystem for the write-ahead log"
        if state == "exceeded":
            self.book.set(
                addon.id, "StorageQuota", "False", "Exceeded", f"{used}: writes refused", now
            )
        elif state == "warning":
            self.book.set(
                addon.id,
                "StorageQuota",
                "True",
                "NearQuota",
                f"{used}: writes are refused at 100 %",
                now,
            )
        else:
            self.book.set(addon.id, "StorageQuota", "True", "WithinQuota", used, now)


def _make_ballast(path: str) -> None:
    """The ballast file, if missing: its blocks allocated, owned by root, mode 0600."""
    if os.path.exists(path):
        return
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, BALLAST_BYTES)
        os.fsync(fd)
    except OSError:
        os.unlink(tmp)  # no half ballast left taking the tenant's room
        raise
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _least(free: int, wal_free: int | None) -> int:
    return free if wal_free is None else min(free, wal_free)


def _usage(path: str) -> tuple[int, int]:
    """(used, free) bytes of the filesystem holding `path`, as the database sees them."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize


class _AdminLink:
    """The admin's Redis connection for one round, opened by the first step that changes
    something (None: a quiet round never sends the admin's password to the server)."""

    def __init__(
        self,
        opener: Callable[[], Awaitable[resp.Connection]] | None,
        conn: resp.Connection | None = None,
    ) -> None:
        self._opener = opener
        self._conn = conn

    async def get(self) -> resp.Connection:
        if self._conn is None:
            assert self._opener is not None
            self._conn = await self._opener()
        return self._conn

    async def __aenter__(self) -> _AdminLink:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._conn is not None and self._opener is not None:
            await self._conn.close()
