"""Running backup, verify, restore and delete operations (the I/O side; plan.py decides).

Every step runs in a one-shot container the agent owns (the toolbox image), labelled
`orkestr.role=backup` with its operation, so a restarted agent's planner removes any left
running; the tenant's container is never entered. Dumps go to the backup store mounted at
/backup (only the add-on's own directory). A result is written to the agent's state dir
before anything is reported, and resent until the operation leaves the desired state.

Credentials come from `backup_credentials`, the single place that names the role and the
secret file a backup connects with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import msgspec

from agent import backup_checks, backup_scripts, deleted_backups, model, netns, specs
from agent.backup_store import BackupStore, GrowingHash, Sidecar, sha256_of
from agent.control_pipe import ControlPipe, PipeClosed
from agent.docker import Docker
from agent.errors import AgentError, Conflict, NotFound
from agent.metrics import (
    BACKUP_DURATION,
    BACKUP_LAST_SIZE,
    BACKUP_LAST_VERIFIED,
    BACKUP_OPERATIONS,
    BACKUP_VERIFICATIONS,
)
from agent.plan import op_key
from agent.state import atomic_write
from agent.upkeep import RESERVE_BYTES
from schemas import storage
from schemas.messages import SCHEMA_VERSION, AddonSpec, BackupResult, BackupSpec, DesiredState

log = logging.getLogger("orkestr.agent.backups")

Hold = Callable[[str], contextlib.AbstractAsyncContextManager[None]]
Ready = Callable[[AddonSpec], Awaitable[bool]]


class StepFailed(AgentError):
    pass


class RoomExhausted(AgentError):
    """A restore's copy came too close to filling the add-on's filesystem."""


class HolderChanged(StepFailed):
    """The holder whose namespace a step joined was restarted or removed meanwhile."""


# While a Postgres restore builds its copy, the data filesystem's free space is looked at
# this often, and the copy is stopped under this floor: the quota guard's reserve and
# what a copy growing up to 100 MB/s writes between two looks, so it is stopped before
# the guard refuses the tenant's writes. A copy that fits the quota beside the live data
# stays above it: the filesystem has twice the WAL ceiling and 64 MB past the quota.
WATCH_INTERVAL_S = 0.2
MIB = 1024 * 1024
ROOM_FLOOR = RESERVE_BYTES + 24 * MIB

# The `network` of a step whose container joins the add-on's holder's network namespace
# (`container:<holder id>`) and talks to the server on loopback: a Redis dump
# (docs/architecture.md, "Backups"). No new endpoint on the project network, no address
# an app named like the add-on could answer for.
IN_HOLDER = "holder"


class Holder(NamedTuple):
    """The add-on's holder as inspected before a step that joins it."""

    id: str
    ip: str  # its address on the project network
    pid: int
    netns: int | None  # that namespace's inode (None: not visible from here)


class Phases:
    """Where an operation's time went: one `name=seconds` pair per phase, logged once."""

    def __init__(self) -> None:
        self.t = time.monotonic()
        self.spent: list[tuple[str, float]] = []
        self.at: dict[str, float] = {}  # name -> when (time.monotonic) its phase ended

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.spent.append((name, now - self.t))
        self.t = self.at[name] = now

    def __str__(self) -> str:
        return " ".join(f"{n}={s:.3f}" for n, s in self.spent)


class Interrupted(msgspec.Struct, frozen=True):
    """A Redis restore past its point of no return (the database stopped for the swap),
    on disk until the data is settled, so a restarted agent finishes it (or rolls it
    back) before anything starts that database again."""

    project_id: str
    addon: AddonSpec
    spec: BackupSpec


# A swap script that fails this many times (not Docker: the script) is rolled back.
SWAP_ATTEMPTS = 3


class _RedisRestore:
    """What the steps of one Redis restore share."""

    def __init__(
        self,
        project_id: str,
        addon: AddonSpec,
        spec: BackupSpec,
        env: dict[str, str],
        phases: Phases,
        state_file: Path,
    ) -> None:
        self.project_id, self.addon, self.spec, self.phases = project_id, addon, spec, phases
        self.state_file = state_file
        self.env = {**env, "STATE": state_file.name}
        self.db = model.db_name(addon.id)


def _transfer(growing: GrowingHash | None, phases: Phases) -> str:
    """When the dump's first byte and its last were seen, in seconds after the one-shot
    container's start returned (a wake-up's precision). The first byte may come before
    that return: the container runs before Docker's answer reaches the agent."""
    start = phases.at.get("start")
    if growing is None or start is None or growing.first_byte is None:
        return ""
    last = growing.last_growth or growing.first_byte
    return f" first_byte={growing.first_byte - start:+.3f} last_byte={last - start:+.3f}"


def backup_credentials(addon: AddonSpec, op: str = "backup") -> tuple[str, str]:
    """(role, secret file name) a dump or a restore connects to the live server with: one
    of the least roles (agent/platform_roles.py), never the platform's superuser. Its
    password is alone in the directory the container mounts (`SecretStore.platform_dir`).

    Postgres: the backup role reads (pg_read_all_data, BYPASSRLS); the restore role builds
    the tenant's copy and swaps it in. Redis: the backup user may only PING, INFO and take
    a replica's RDB (SYNC); a Redis restore works on the volume and connects to nothing.
    """
    user = specs.RESTORE_USER if op == "restore" and addon.kind == "postgres" else specs.BACKUP_USER
    return user, "password"


Prepare = Callable[[AddonSpec, str, str], Awaitable[None]]


async def no_prepare(_addon: AddonSpec, _ip: str, _role: str) -> None:
    return None


class BackupRunner:
    def __init__(
        self,
        host: str,
        docker: Docker,
        store: BackupStore,
        state_dir: Path,
        secrets_root: Path,
        image: str,
        memory_mb: int,
        timeout_s: float,
        hold: Hold,
        ready: Ready,
        on_done: Callable[[], None],
        keep_deleted_days: float = 7.0,
        keep_deleted_projects: bool = False,
        prepare: Prepare = no_prepare,
    ) -> None:
        """`prepare(addon, address, role)`: make the least roles right on the live server
        (Upkeep.platform_roles), awaited before each step that logs in to it as `role`."""
        self.host = host
        self._prepare = prepare
        self.keep_deleted_days = keep_deleted_days
        self.keep_projects = keep_deleted_projects
        self.docker = docker
        self.store = store
        self.results_dir = state_dir / "backup-results"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.inflight_dir = state_dir / "backup-inflight"
        self.inflight_dir.mkdir(parents=True, exist_ok=True)
        self._resumed = False
        self.secrets_root = secrets_root
        self.image = image
        self.memory_mb = memory_mb
        self.timeout_s = timeout_s
        self._hold = hold
        self._ready = ready
        self._on_done = on_done
        # add-on id -> (operation key, task): one operation per add-on at a time.
        self.running: dict[str, tuple[str, BackupSpec, asyncio.Task[None]]] = {}

    # --- bookkeeping ---------------------------------------------------------------------
    def results(self) -> dict[str, BackupResult]:
        out: dict[str, BackupResult] = {}
        for p in self.results_dir.glob("*.json"):
            try:
                out[p.stem] = msgspec.json.decode(p.read_bytes(), type=BackupResult)
            except (OSError, msgspec.DecodeError):
                p.unlink(missing_ok=True)
        return out

    def forget(self, key: str) -> None:
        (self.results_dir / f"{key}.json").unlink(missing_ok=True)

    def running_ops(self) -> dict[str, str]:
        """add-on id -> the key of the operation running for it.

        The first call (the first pass after a start) resumes the Redis restores a killed
        agent left past their point of no return: they run before the planner, which
        never starts the database of an add-on whose restore runs, could start it.
        """
        if not self._resumed:
            self._resumed = True
            self._resume_interrupted()
        ops = {aid: key for aid, (key, _spec, task) in self.running.items() if not task.done()}
        # A marker outliving its task (only a bug ends one before the data is settled)
        # still holds the add-on: nothing starts Redis on a half-swapped volume; the next
        # start of the agent resumes it.
        for path in self.inflight_dir.glob("*.json"):
            if path.stem not in ops:
                with contextlib.suppress(OSError, msgspec.DecodeError):
                    left = msgspec.json.decode(path.read_bytes(), type=Interrupted)
                    ops[path.stem] = op_key(left.spec)
        return ops

    def _inflight(self, addon_id: str) -> Path:
        return self.inflight_dir / f"{addon_id}.json"

    def _resume_interrupted(self) -> None:
        for path in sorted(self.inflight_dir.glob("*.json")):
            try:
                left = msgspec.json.decode(path.read_bytes(), type=Interrupted)
            except (OSError, msgspec.DecodeError) as exc:
                log.error("backup.inflight_unreadable path=%s error=%s", path, exc)
                continue
            log.warning("backup.restore_resumed op=%s addon=%s", op_key(left.spec), left.addon.id)
            self.start(left.project_id, left.addon, left.spec)

    def sweep_deleted(self, desired: DesiredState | None, now: float) -> None:
        """Mark the store directories of deleted add-ons, remove those whose time is up
        (agent/deleted_backups.py). Skips an add-on while an operation of it runs."""
        busy = self.running_ops()
        for project in desired.projects if desired is not None else ():
            for addon in project.addons:
                if not addon.deleted:
                    continue
                found = self.store.tombstone(project.id, addon.id)
                if found is None:
                    continue  # it never had a backup here
                path, old = found
                new = deleted_backups.mark(old, now, project.deleted)
                if new is not None:
                    try:
                        self.store.write_tombstone(path, new)
                    except OSError as exc:  # a full or read-only store: next pass
                        log.warning("backup.mark_deleted_failed addon=%s error=%s", addon.id, exc)
                        continue
                    log.info(
                        "backup.addon_deleted addon=%s project_deleted=%s",
                        addon.id,
                        project.deleted,
                    )
        for project_id, addon_id, tomb in self.store.tombstones():
            if addon_id in busy:
                continue
            if deleted_backups.expired(tomb, now, self.keep_deleted_days, self.keep_projects):
                try:
                    self.store.remove_addon(project_id, addon_id)
                except OSError as exc:
                    log.warning("backup.prune_deleted_failed addon=%s error=%s", addon_id, exc)
                    continue
                log.info("backup.pruned_deleted addon=%s project=%s", addon_id, project_id)

    def start(self, project_id: str, addon: AddonSpec | None, spec: BackupSpec) -> None:
        current = self.running.get(spec.addon_id)
        if current is not None and not current[2].done():
            return
        key = op_key(spec)
        task = asyncio.create_task(self._run(project_id, addon, spec), name=f"backup-{key}")
        self.running[spec.addon_id] = (key, spec, task)

    async def close(self) -> None:
        tasks = [t for _k, _s, t in self.running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- one operation ---------------------------------------------------------------------
    async def _run(self, project_id: str, addon: AddonSpec | None, spec: BackupSpec) -> None:
        started = datetime.now(UTC)
        t0 = time.monotonic()
        kind = addon.kind if addon is not None else "unknown"
        result = BackupResult(
            version=SCHEMA_VERSION,
            host=self.host,
            id=spec.id,
            op=spec.op,
            project_id=project_id,
            addon_id=spec.addon_id,
            backup_id=spec.backup_id,
            ok=False,
            started_at=started,
            finished_at=started,
        )
        try:
            if spec.op == "delete":
                self.store.delete(project_id, spec.addon_id, spec.backup_id)
                result = msgspec.structs.replace(result, ok=True)
            elif addon is None or addon.deleted:
                result = msgspec.structs.replace(result, error="the add-on is deleted")
            elif spec.op == "backup":
                result = await self._backup(project_id, addon, spec, result)
            elif spec.op == "verify":
                result = await self._verify_op(project_id, addon, spec, result)
            else:
                result = await self._restore(project_id, addon, spec, result)
        except asyncio.CancelledError:
            raise  # agent stopping: no result; the operation runs again after the restart
        except (AgentError, OSError, ValueError) as exc:
            result = msgspec.structs.replace(result, error=str(exc)[-2000:])
        except Exception as exc:  # a bug: report it rather than retry forever
            log.exception("backup.crashed op=%s", op_key(spec))
            result = msgspec.structs.replace(result, error=f"internal error: {exc!r}")
        # A restore reports when its data went live; housekeeping after that is not counted.
        finished = result.finished_at if result.finished_at > started else datetime.now(UTC)
        result = msgspec.structs.replace(result, finished_at=finished)
        outcome = "ok" if result.ok else "failed"
        BACKUP_OPERATIONS.labels(spec.op, kind, outcome).inc()
        BACKUP_DURATION.labels(spec.op, kind).observe(time.monotonic() - t0)
        if result.verified is not None:
            BACKUP_VERIFICATIONS.labels(kind, "verified" if result.verified else "failed").inc()
        if result.verified and addon is not None:
            BACKUP_LAST_VERIFIED.labels(addon.id, project_id, kind).set(finished.timestamp())
        if spec.op == "backup" and result.size_bytes is not None and addon is not None:
            BACKUP_LAST_SIZE.labels(addon.id, project_id, kind).set(result.size_bytes)
        log.info(
            "backup.done op=%s addon=%s ok=%s verified=%s size=%s seconds=%.2f error=%s",
            op_key(spec),
            spec.addon_id,
            result.ok,
            result.verified,
            result.size_bytes,
            time.monotonic() - t0,
            result.error,
        )
        atomic_write(self.results_dir / f"{op_key(spec)}.json", msgspec.json.encode(result))
        self._on_done()

    async def _backup(
        self, project_id: str, addon: AddonSpec, spec: BackupSpec, result: BackupResult
    ) -> BackupResult:
        phases = Phases()
        self.store.clean_addon(project_id, addon.id)
        final = self.store.dump(project_id, addon.id, spec.backup_id)
        if final.exists():  # already made (the result was lost): verify it again
            return await self._verify_op(project_id, addon, spec, result)
        tmp = self.store.tmp(final)
        counts_file = final.with_name(f"{spec.backup_id}.counts.tmp")
        script = (
            backup_scripts.PG_BACKUP if addon.kind == "postgres" else backup_scripts.REDIS_BACKUP
        )
        # Redis: hashed while redis-cli writes it (the dump's time holds it; pg_dump's
        # custom format seeks back at the end, so a Postgres dump is read once written).
        growing = GrowingHash(tmp) if addon.kind == "redis" else None
        follower = asyncio.create_task(asyncio.to_thread(growing.follow)) if growing else None
        dumped = False
        try:
            phases.mark("prep")
            async with self._hold(addon.id):
                phases.mark("hold")
                await self._dump_step(spec, project_id, addon, script, tmp, counts_file, phases)
            dumped = True
        finally:
            if growing is not None and follower is not None:
                growing.stop.set()  # the thread ends within 20 ms or one chunk
                await asyncio.shield(follower)
                if not dumped:
                    growing.close()
        counts, data_bytes = backup_checks.split_data_bytes(
            backup_checks.parse_counts(counts_file.read_text())
        )
        counts_file.unlink(missing_ok=True)
        if growing is not None:
            digest, size = await asyncio.to_thread(growing.result)
        else:
            digest, size = await asyncio.to_thread(sha256_of, tmp)
        phases.mark("hash")
        if size == 0:
            raise StepFailed("the dump is empty")
        sidecar = Sidecar(
            backup_id=spec.backup_id,
            kind=addon.kind,
            size_bytes=size,
            sha256=digest,
            counts=counts,
            created_at=datetime.now(UTC).isoformat(),
            data_bytes=data_bytes,
        )
        await asyncio.to_thread(self.store.sync, tmp)
        phases.mark("fsync")
        await asyncio.to_thread(self.store.publish, tmp, final, sidecar)
        phases.mark("publish")
        log.info(
            "backup.backup_phases op=%s started=%s %s%s",
            op_key(spec),
            result.started_at.isoformat(),
            phases,
            _transfer(growing, phases),
        )
        result = msgspec.structs.replace(
            result,
            ok=True,
            size_bytes=size,
            data_bytes=data_bytes,
            sha256=digest,
            counts=backup_checks.dump_counts(addon.kind, counts),
        )
        return await self._verify(project_id, addon, spec, final, sidecar, digest, result)

    async def _dump_step(
        self,
        spec: BackupSpec,
        project_id: str,
        addon: AddonSpec,
        script: str,
        tmp: Path,
        counts_file: Path,
        phases: Phases | None = None,
    ) -> None:
        user, password_file = backup_credentials(addon)
        env = {
            "OUT": tmp.name,
            "COUNTS": counts_file.name,
            "BACKUP_USER": user,
            "PASSWORD_FILE": password_file,
        }
        if addon.kind == "postgres":
            # On the project network, at the holder's address: the postgres image trusts
            # loopback for every role (pg_hba.conf), so in the holder's namespace a
            # container could log in as any role, the superuser too, with no password.
            env |= {"ADDON_HOST": addon.name, "ADDON_DB": addon.database, "ADDON_USER": addon.user}
            network = model.network_name(project_id)
        else:
            network = IN_HOLDER  # Redis asks every connection's password, loopback's too
        await self._step(
            spec, "dump", project_id, addon, script, env, network, secrets=user, phases=phases
        )

    async def _verify_op(
        self, project_id: str, addon: AddonSpec, spec: BackupSpec, result: BackupResult
    ) -> BackupResult:
        final = self.store.dump(project_id, addon.id, spec.backup_id)
        side = final.with_suffix(".json")
        if not final.exists() or not side.exists():
            raise StepFailed(f"backup {spec.backup_id} is not in the store")
        sidecar = msgspec.json.decode(side.read_bytes(), type=Sidecar)
        expected = spec.sha256 or sidecar.sha256
        result = msgspec.structs.replace(
            result,
            ok=True,
            size_bytes=sidecar.size_bytes,
            data_bytes=sidecar.data_bytes,
            sha256=expected,
            counts=backup_checks.dump_counts(addon.kind, sidecar.counts),
        )
        return await self._verify(project_id, addon, spec, final, sidecar, expected, result)

    async def _verify(
        self,
        project_id: str,
        addon: AddonSpec,
        spec: BackupSpec,
        final: Path,
        sidecar: Sidecar,
        expected_sha: str,
        result: BackupResult,
    ) -> BackupResult:
        """Checksum, then a test restore into a scratch server, then the counts compared."""
        t0 = time.monotonic()
        problem = await self._checksum_problem(final, expected_sha)
        if problem is None:
            counts_file = final.with_name(f"{spec.backup_id}.verify.tmp")
            script = (
                backup_scripts.PG_VERIFY
                if addon.kind == "postgres"
                else backup_scripts.REDIS_VERIFY
            )
            try:
                await self._step(
                    spec,
                    "verify",
                    project_id,
                    addon,
                    script,
                    {"IN": final.name, "COUNTS": counts_file.name},
                    network="none",
                )
                restored = backup_checks.parse_counts(counts_file.read_text())
                problem = backup_checks.verdict(addon.kind, sidecar.counts, restored)
            except (StepFailed, ValueError, OSError) as exc:
                problem = f"test restore failed: {exc}"
            finally:
                counts_file.unlink(missing_ok=True)
        return msgspec.structs.replace(
            result,
            verified=problem is None,
            verify_error=problem,
            verify_seconds=round(time.monotonic() - t0, 3),
        )

    async def _checksum_problem(self, path: Path, expected: str) -> str | None:
        try:
            digest, _size = await asyncio.to_thread(sha256_of, path)
        except OSError as exc:
            return f"cannot read the backup: {exc}"
        if digest != expected:
            return f"checksum mismatch: file has sha256 {digest}, recorded {expected}"
        return None

    async def _restore(
        self, project_id: str, addon: AddonSpec, spec: BackupSpec, result: BackupResult
    ) -> BackupResult:
        final = self.store.dump(project_id, addon.id, spec.backup_id)
        if spec.sha256 is None:
            raise StepFailed("a restore needs the backup's sha256")
        phases = Phases()
        user, password_file = backup_credentials(addon, "restore")
        env = {
            "IN": final.name,
            "COUNTS": f"{spec.id}.restore.tmp",
            "ADDON_HOST": addon.name,
            "ADDON_DB": addon.database,
            "ADDON_USER": addon.user,
            "BACKUP_USER": user,
            "PASSWORD_FILE": password_file,
        }
        # A resumed restore staged its copy from the checked file already, and must finish
        # (or roll back) even if that file has gone since.
        resumed = self._resuming(addon.id, spec)
        async with self._hold(addon.id):
            if addon.kind == "postgres":
                # The checksum runs while the restore's container starts; the container
                # waits for its result before it touches anything (`_GATE`).
                checksum = asyncio.create_task(self._checksum_problem(final, spec.sha256))
                try:
                    await self._restore_postgres(project_id, addon, spec, final, env, checksum)
                finally:
                    checksum.cancel()
                live = datetime.now(UTC)
                phases.mark("restore")
                await self._housekeeping(spec, "cleanup", project_id, addon, env, True)
            else:
                state = self.store.addon_dir(project_id, addon.id) / f"{spec.id}.swap.tmp"
                ctx = _RedisRestore(project_id, addon, spec, env, phases, state)
                if resumed:
                    outcome = await self._settle(ctx, started=False)
                else:
                    # The checksum runs while the container starts and stages the copy.
                    checksum = asyncio.create_task(self._checksum_problem(final, spec.sha256))
                    try:
                        outcome = await self._restore_redis(ctx, checksum)
                    finally:
                        checksum.cancel()
                live = datetime.now(UTC)
                if outcome == "restored":
                    await self._housekeeping(spec, "cleanup", project_id, addon, env, False)
                self._inflight(addon.id).unlink(missing_ok=True)
                if outcome != "restored":
                    raise StepFailed("the restored data did not come up; the previous data is back")
        (final.parent / env["COUNTS"]).unlink(missing_ok=True)
        phases.mark("cleanup")
        log.info("backup.restore_phases op=%s %s", op_key(spec), phases)
        return msgspec.structs.replace(result, ok=True, sha256=spec.sha256, finished_at=live)

    async def _restore_postgres(
        self,
        project_id: str,
        addon: AddonSpec,
        spec: BackupSpec,
        final: Path,
        env: dict[str, str],
        checksum: asyncio.Task[str | None],
    ) -> None:
        """pg_restore beside the live database, then the swap (`PG_RESTORE`), once
        `checksum` has found the file good.

        Under a quota both copies must fit it: the script measures the live database and
        stops before creating the copy if they would not (exit 7), and the agent watches
        the filesystem while the copy grows, stopping it before the quota guard's reserve
        is reached (the guard would refuse the tenant's writes; a full disk would fail them).
        """
        quota = storage.quota_bytes(addon.kind, addon.storage_mb, addon.resources.memory_mb)
        room, need = f"{spec.id}.room.tmp", 0
        if quota is not None:
            side = msgspec.json.decode(final.with_suffix(".json").read_bytes(), type=Sidecar)
            need = side.data_bytes if side.data_bytes is not None else side.size_bytes
            env = {**env, "QUOTA_BYTES": str(quota), "NEED_BYTES": str(need), "ROOM": room}
        watch = await self._room_watch(addon, final.parent / room) if quota is not None else None
        try:
            await self._step(
                spec,
                "restore",
                project_id,
                addon,
                backup_scripts.PG_RESTORE,
                env,
                network=model.network_name(project_id),
                secrets=env["BACKUP_USER"],
                watch=watch,
                gate=checksum,
            )
        except RoomExhausted as exc:
            # Killed wherever it was, perhaps in the swap: the abandon step settles which.
            (final.parent / room).unlink(missing_ok=True)
            await self._step(
                spec,
                "abandon",
                project_id,
                addon,
                backup_scripts.PG_RESTORE_ABANDON,
                env,
                network=model.network_name(project_id),
                secrets=env["BACKUP_USER"],
            )
            swapped = (final.parent / room).exists()
            log.warning("backup.restore_stopped op=%s swapped=%s", op_key(spec), swapped)
            if not swapped:
                raise StepFailed(str(exc)) from None
        except StepFailed as exc:
            live_file = final.parent / room
            if quota is None or "(exit 7)" not in str(exc) or not live_file.exists():
                raise
            live = int(live_file.read_text().strip())
            why = storage.beside_refusal(spec.backup_id, need, live, quota, addon.plan)
            raise StepFailed(f"refused: {why}") from None
        finally:
            (final.parent / room).unlink(missing_ok=True)

    async def _room_watch(self, addon: AddonSpec, measured: Path) -> Callable[[], None] | None:
        """A check of the free space on the database's data filesystem (where the copy
        grows; the WAL it writes is recycled like any bulk write's), through the database
        process's root; None if not visible (a plain volume, no process).

        It acts only once the script has written `measured` (after dropping what earlier
        restores left, before creating the copy), so a `<db>_orkestr_previous` found
        after a stop is this restore's swap (PG_RESTORE_ABANDON)."""
        try:
            info = await self.docker.inspect(model.db_name(addon.id))
        except AgentError:
            return None
        pid = (info.get("State") or {}).get("Pid")
        if not pid:
            return None
        path = f"/proc/{pid}/root{specs.DATA_DIRS[addon.kind]}"
        try:
            dev = os.stat(path).st_dev
        except OSError:
            return None

        def check() -> None:
            if not measured.exists():
                return
            try:
                if os.stat(path).st_dev != dev:
                    return  # that process is gone: nothing known to watch
                st = os.statvfs(path)
            except OSError:
                return
            free = st.f_bavail * st.f_frsize
            if free < ROOM_FLOOR:
                raise RoomExhausted(
                    f"stopped: the restored copy outgrew the room beside the live database "
                    f"(its filesystem had {free / MIB:.0f} MB left; under "
                    f"{RESERVE_BYTES / MIB:.0f} MB the quota guard refuses the add-on's "
                    "writes); the copy was dropped and the live database is unchanged. "
                    "The backup's recorded data size was too small for what it restores "
                    "to: free space in the live database, or restore on a plan with more "
                    "storage"
                )

        return check

    async def _housekeeping(
        self,
        spec: BackupSpec,
        step: str,
        project_id: str,
        addon: AddonSpec,
        env: dict[str, str],
        postgres: bool,
    ) -> None:
        """Remove what the restore replaced; a failure is logged, the restore stands."""
        try:
            if postgres:
                await self._step(
                    spec,
                    step,
                    project_id,
                    addon,
                    backup_scripts.PG_RESTORE_CLEANUP,
                    env,
                    network=model.network_name(project_id),
                    secrets=env["BACKUP_USER"],
                )
            else:
                await self._step(
                    spec,
                    step,
                    project_id,
                    addon,
                    backup_scripts.REDIS_RESTORE_CLEANUP,
                    env,
                    "none",
                    volume=True,
                )
        except AgentError as exc:
            log.warning("backup.cleanup_failed op=%s error=%s", op_key(spec), exc)

    def _resuming(self, addon_id: str, spec: BackupSpec) -> bool:
        path = self._inflight(addon_id)
        try:
            left = msgspec.json.decode(path.read_bytes(), type=Interrupted)
        except (OSError, msgspec.DecodeError):
            return False
        return op_key(left.spec) == op_key(spec)

    async def _restore_redis(self, ctx: _RedisRestore, checksum: asyncio.Task[str | None]) -> str:
        """Stage the data in the volume while Redis runs, swap while it is stopped.

        One container does both (`REDIS_RESTORE`), told through a `ControlPipe` when to go
        on, so Redis is down only for a stop, some renames and a start (and its own load).
        From the stop on, an on-disk marker names this restore, and whatever fails is
        settled by `_settle`, retried until the volume holds one whole data set; an agent
        killed anywhere after it resumes there. Returns `restored` or `previous`.
        """
        spec, addon, phases = ctx.spec, ctx.addon, ctx.phases
        key = op_key(spec)
        name = model.backup_container_name(key, "restore")
        folder = self.store.addon_dir(ctx.project_id, addon.id)
        pipe = ControlPipe(folder / f"{spec.id}.up.tmp", folder / f"{spec.id}.ctl.tmp")
        env = {**ctx.env, "STATE": ctx.state_file.name, "UP": pipe.up.name, "CTL": pipe.ctl.name}
        with pipe:
            container = self._container(
                spec, "restore", ctx.project_id, addon, backup_scripts.REDIS_RESTORE, env,
                "none", volume=True,
            )  # fmt: skip
            await self.docker.remove(name)
            exited: asyncio.Task[int] | None = None
            try:
                await self.docker.run(container)
                exited = asyncio.create_task(self.docker.wait(name, self.timeout_s + 5))
                try:
                    await pipe.expect("staged", exited, self.timeout_s)
                    phases.mark("staged")
                    problem = await checksum
                    phases.mark("checksum")
                    if problem is not None:
                        pipe.send("abort")
                        await asyncio.wait({exited}, timeout=30)
                        raise StepFailed(f"refusing to restore: {problem}")
                except (PipeClosed, TimeoutError, ValueError) as exc:
                    raise StepFailed(f"restore: {exc}: {await self._output(name)}") from None
                # The point of no return: from here on the data is settled whatever happens.
                marker = self._inflight(addon.id)
                atomic_write(marker, msgspec.json.encode(Interrupted(ctx.project_id, addon, spec)))
                _fsync_dir(marker.parent)  # the rename too: a host crash must find it
                try:
                    await self._halt(ctx.db)
                except AgentError:
                    # Nothing is swapped yet and Redis may still run: this restore fails.
                    marker.unlink(missing_ok=True)
                    pipe.send("abort")
                    raise
                phases.mark("stop")
                outcome = ""
                try:
                    pipe.send("swap")
                    # Its `swapped` line, not its exit: Redis starts while the container
                    # ends (Docker's answer to an exit came 0.03-0.09 s after it).
                    try:
                        await pipe.expect("swapped", exited, self.timeout_s)
                    except PipeClosed as closed:
                        if closed.exit_code != 0:
                            output = await self._output(name)
                            raise StepFailed(
                                f"swap failed (exit {closed.exit_code}): {output}"
                            ) from None
                    except ValueError as exc:  # a line it never writes
                        raise StepFailed(f"swap: {exc}") from None
                    outcome = ctx.state_file.read_text().strip()
                    phases.mark("swap")
                    await self.docker.start(ctx.db)
                    phases.mark("start")
                except (AgentError, OSError, TimeoutError) as exc:
                    log.warning("backup.restore_settling op=%s error=%s", key, exc)
                    outcome = ""  # settled below, by the resumable steps
                finally:
                    ctx.state_file.unlink(missing_ok=True)
            finally:
                if exited is not None:
                    exited.cancel()
                with contextlib.suppress(AgentError):
                    await self.docker.remove(name)
        if outcome == "previous":
            return outcome
        return await self._settle(ctx, started=outcome == "restored")

    async def _settle(self, ctx: _RedisRestore, started: bool) -> str:
        """Past the point of no return: retried until the volume holds one whole data set
        (the restored one, answering, or the previous one) and Redis runs on it.

        Every step is idempotent (stop, the swap and rollback scripts, start), so a Docker
        error, or an agent killed and resumed, only repeats steps. Meanwhile the add-on
        counts as restoring, so the planner never starts Redis on a half-swapped volume.
        A swap script that keeps failing is rolled back; the rollback is never given up.
        `started`: the restored data is live already and only has to answer.
        """
        key, addon, phases = op_key(ctx.spec), ctx.addon, ctx.phases

        async def step(name: str, script: str) -> None:
            await self._step(
                ctx.spec, name, ctx.project_id, addon, script, ctx.env, "none", volume=True
            )

        leftover = model.backup_container_name(key, "restore")  # a killed agent's, waiting
        rollback, swap_failures, delay = False, 0, 0.5
        while True:
            try:
                if not started:
                    await self.docker.remove(leftover)
                    await self._halt(ctx.db)
                    if rollback:
                        await step("rollback", backup_scripts.REDIS_RESTORE_ROLLBACK)
                        outcome = "previous"
                    else:
                        try:
                            await step("swap", backup_scripts.REDIS_RESTORE_SWAP)
                            outcome = ctx.state_file.read_text().strip()
                        finally:
                            ctx.state_file.unlink(missing_ok=True)
                    await self.docker.start(ctx.db)
                    if outcome != "restored":
                        return outcome
                started = False
                if await self._ready(addon):
                    phases.mark("ready")
                    return "restored"
                log.warning("backup.restore_rollback op=%s addon=%s", key, addon.id)
                rollback = True
                continue
            except StepFailed as exc:
                if not rollback:
                    swap_failures += 1
                    rollback = swap_failures >= SWAP_ATTEMPTS
                log.warning("backup.restore_retry op=%s rollback=%s error=%s", key, rollback, exc)
            except (AgentError, OSError) as exc:  # Docker's: transient, or fixed by someone
                log.warning("backup.restore_retry op=%s rollback=%s error=%s", key, rollback, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _halt(self, db: str) -> None:
        """Stop Redis for the swap, at once (SIGKILL, then its exit awaited).

        Nothing is lost by not shutting it down: every write it acknowledged is in the
        kernel already (the AOF is written before the reply; a crash of the process loses
        none of it), the data is being replaced, and the previous files stay for a
        rollback. A graceful stop would write an RDB snapshot of the old data first. (The
        staged copy is on disk already: left dirty, its writeback held this kill's return
        0.3-0.45 s past Redis's exit when the volume shares Docker's filesystem.)
        """
        with contextlib.suppress(NotFound, Conflict):  # Conflict: not running
            await self.docker.kill(db)
        with contextlib.suppress(NotFound):
            await self.docker.wait(db, 60)

    async def _output(self, name: str) -> str:
        with contextlib.suppress(AgentError):
            return (await self.docker.logs(name, 4096)).strip()[-1500:]
        return ""

    async def _step(
        self,
        spec: BackupSpec,
        step: str,
        project_id: str,
        addon: AddonSpec,
        script: str,
        env: dict[str, str],
        network: str,
        secrets: str = "",
        volume: bool = False,
        watch: Callable[[], None] | None = None,
        phases: Phases | None = None,
        gate: asyncio.Future[str | None] | None = None,
    ) -> None:
        """Run one script in a one-shot container; raise StepFailed with its output.

        `gate`: the script starts with `_GATE` and waits for `go`, sent once this gives
        None; a problem it gives instead ends the step, refused, before the script did
        anything.

        `network`: a Docker network, "none", or IN_HOLDER. `ADDON_HOST` in `env` is
        replaced by the holder's address on the project network. `watch`, if given, is
        called every WATCH_INTERVAL_S while the script runs; the RoomExhausted (or, joined
        to the holder, HolderChanged) it may raise kills the container and is raised
        again."""
        key = op_key(spec)
        name = model.backup_container_name(key, step)
        mark = phases.mark if phases is not None else lambda _name: None
        holder: Holder | None = None
        if network == IN_HOLDER or "ADDON_HOST" in env:
            holder = await self._holder(project_id, addon)
            if "ADDON_HOST" in env:
                env = {**env, "ADDON_HOST": holder.ip}
            if secrets:
                await self._prepare_roles(addon, holder.ip, secrets)
        if network == IN_HOLDER and holder is not None:
            network = f"container:{holder.id}"
            watch = _holder_watch(holder, watch)
        if secrets and not (self.secrets_root / addon.id / secrets / "password").is_file():
            raise StepFailed(f"no password for the {secrets} role on this host")
        pipe: ControlPipe | None = None
        if gate is not None:
            folder = self.store.addon_dir(project_id, addon.id)
            pipe = ControlPipe(folder / f"{key}.{step}.up.tmp", folder / f"{key}.{step}.ctl.tmp")
            env = {**env, "CTL": pipe.ctl.name}
        container = self._container(
            spec, step, project_id, addon, script, env, network, secrets, volume
        )
        await self.docker.remove(name)  # left by an interrupted run of this operation
        mark("address")
        t0 = time.monotonic()
        with pipe or contextlib.nullcontext():
            try:
                await self.docker.run(container, start=False)
                mark("create")
                try:
                    await self.docker.start(name)
                except AgentError as exc:
                    if not network.startswith("container:"):
                        raise
                    # Docker's "cannot join network of a non running container", or it is gone.
                    raise StepFailed(f"{step} could not join the add-on's holder: {exc}") from None
                mark("start")
                if gate is not None and pipe is not None:
                    problem = await gate
                    if problem is not None:
                        pipe.send("abort")
                        with contextlib.suppress(NotFound, Conflict):
                            await self.docker.kill(name)
                        raise StepFailed(f"refusing to restore: {problem}")
                    pipe.send("go")
                    mark("gate")
                try:
                    code = await self._exit_code(name, watch)
                except TimeoutError:
                    raise StepFailed(f"{step} did not finish within {self.timeout_s:g}s") from None
                mark("run")
                if code != 0:
                    raise StepFailed(f"{step} failed (exit {code}): {await self._output(name)}")
                log.info("backup.step op=%s step=%s seconds=%.3f", key, step, time.monotonic() - t0)
            finally:
                with contextlib.suppress(AgentError):
                    await self.docker.remove(name)
                mark("remove")

    async def _prepare_roles(self, addon: AddonSpec, ip: str, role: str) -> None:
        try:
            await self._prepare(addon, ip, role)
        except AgentError as exc:
            raise StepFailed(f"the backup role could not be made ready: {exc}") from None

    async def _holder(self, project_id: str, addon: AddonSpec) -> Holder:
        """The add-on's holder, running: the namespace a step joins, or the address on
        the project network a step connects to, never the add-on's name. The tenant's
        apps are on that network under names of their choosing, and an app named like
        the add-on answered the platform's login (its admin password: Redis AUTH in
        clear, Postgres asked for it in clear)."""
        try:
            info = await self.docker.inspect(model.holder_name(addon.id))
        except NotFound:
            raise StepFailed("the add-on's holder container is missing") from None
        state = info.get("State") or {}
        if not state.get("Running"):
            raise StepFailed("the add-on's holder container is not running")
        networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
        ip = (networks.get(model.network_name(project_id)) or {}).get("IPAddress")
        if not ip:
            raise StepFailed("the add-on has no address on its project network yet")
        pid, inode = int(state.get("Pid") or 0), None
        if pid:
            with contextlib.suppress(OSError):
                inode = netns.netns_inode(pid)
        return Holder(str(info["Id"]), str(ip), pid, inode)

    async def _exit_code(self, name: str, watch: Callable[[], None] | None) -> int:
        exited = asyncio.create_task(self.docker.wait(name, self.timeout_s + 5))
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                pause = min(left, WATCH_INTERVAL_S) if watch is not None else left
                done, _ = await asyncio.wait({exited}, timeout=pause)
                if done:
                    return exited.result()
                if watch is not None:
                    try:
                        watch()
                    except (RoomExhausted, HolderChanged):
                        with contextlib.suppress(NotFound, Conflict):
                            await self.docker.kill(name)
                        raise
        finally:
            exited.cancel()

    def _container(
        self,
        spec: BackupSpec,
        step: str,
        project_id: str,
        addon: AddonSpec,
        script: str,
        env: dict[str, str],
        network: str,
        secrets: str = "",
        volume: bool = False,
    ) -> specs.ContainerSpec:
        """`secrets`: the least role whose password directory (that alone) is mounted.
        `network`: a Docker network, "none", or `container:<id>` (that one's namespace)."""
        key = op_key(spec)
        name = model.backup_container_name(key, step)
        joined = network.removeprefix("container:") if network.startswith("container:") else ""
        addon_dir = self.store.addon_dir(project_id, addon.id)
        mounts = [specs.Mount("bind", str(addon_dir), "/backup")]
        if secrets:
            source = self.secrets_root / addon.id / secrets
            mounts.append(specs.Mount("bind", str(source), specs.SECRET_MOUNT, True))
        if volume:
            mounts.append(
                specs.Mount("volume", model.volume_name(addon.id), specs.DATA_DIRS[addon.kind])
            )
        return specs.ContainerSpec(
            name=name,
            role="backup",
            project_id=project_id,
            addon_id=addon.id,
            image=self.image,
            entrypoint=("bash", "-c"),
            cmd=(script,),
            env=tuple(sorted(env.items())),
            mounts=tuple(mounts),
            network=None if joined else network,
            netns_of=joined or None,
            memory_mb=self.memory_mb,
            pids_limit=256,
            # The Postgres scratch server runs as postgres (setpriv, chown); Redis restores
            # write into a volume the redis user owns.
            cap_add=specs.DB_CAPABILITIES,
            extra_labels=((model.LABEL_BACKUP_OP, key),),
        )


def _holder_watch(holder: Holder, then: Callable[[], None] | None) -> Callable[[], None]:
    """A check that the holder still runs in the namespace the step joined. Restarted or
    removed, it leaves the step's container (and the database, which the agent then
    recreates: `_repair_split_namespace` in agent/runtime.py) in a namespace without the
    add-on's address, where the step's connection can only hang until the step's
    timeout: it is killed at once instead, and the step fails. A step that exited 0
    before this noticed had its whole answer (a dump is complete, and verified after)."""

    def check() -> None:
        if holder.netns is not None:
            try:
                same = netns.netns_inode(holder.pid) == holder.netns
            except OSError:
                same = False  # its process is gone
            if not same:
                raise HolderChanged("the add-on's holder was restarted or removed during the step")
        if then is not None:
            then()

    return check


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def no_hold(_addon_id: str) -> AsyncIterator[None]:
    yield
