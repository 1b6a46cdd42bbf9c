"""The planner: `plan(desired, observed, local, settings) -> actions`, pure and deterministic.

No I/O and no clock: everything it needs is in its arguments, so a table of
(desired, observed) -> expected actions tests it completely. `apply.py` executes the
actions in order; a failed action skips the rest of its key's chain (the add-on, job or
project it belongs to) and the next pass plans again from what is then observed.

Data is only ever deleted for a tombstone (`AddonSpec.deleted`). Something that is
missing from the desired state, or a desired state that never arrived, deletes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import get_args

from msgspec import Struct

from agent import model, netremoval, specs
from agent.model import Observed, ObservedContainer
from agent.sleep import policy
from schemas import storage
from schemas.messages import (
    PORTS,
    AddonSpec,
    AppSpec,
    BackupSpec,
    DesiredState,
    GroupSpec,
    JobSpec,
    ProjectSpec,
    SleepState,
)


class EnsureNetwork(Struct, frozen=True, tag=True):
    key: str  # project id
    name: str


class RemoveNetwork(Struct, frozen=True, tag=True):
    key: str  # project id
    name: str


class EnsureGroupNetwork(Struct, frozen=True, tag=True):
    """A project group's network on this host: an internal bridge, fenced by the firewall
    so that only the shared add-ons' ports are reachable on it."""

    key: str  # group id
    name: str


class ConnectNetwork(Struct, frozen=True, tag=True):
    """Attach a container (a shared add-on's holder, a member's app or job) to a group network."""

    key: str  # the container's add-on, job or app id: after its own chain's actions
    network: str
    container: str
    aliases: tuple[str, ...] = ()


class DisconnectNetwork(Struct, frozen=True, tag=True):
    key: str
    network: str
    container: str
    reason: str


class EnsureVolume(Struct, frozen=True, tag=True):
    key: str  # add-on id
    name: str
    project_id: str
    # The volume's own filesystem (specs.fs_size_mb of the plan's quota); None: plain.
    size_mb: int | None = None


class FetchSecret(Struct, frozen=True, tag=True):
    key: str  # add-on id
    project_id: str
    kind: str
    secret_version: int
    # Redis: its memory quota, written into redis.conf beside the passwords.
    maxmemory: int | None = None


class LimitRedisConf(Struct, frozen=True, tag=True):
    """Write a Redis add-on's current memory quota into its redis.conf: a plan changed
    after its secret was written. The next start reads it, even one from deep sleep."""

    key: str  # add-on id
    maxmemory: int


class RunContainer(Struct, frozen=True, tag=True):
    key: str
    spec: specs.ContainerSpec


class StartContainer(Struct, frozen=True, tag=True):
    key: str
    name: str


class UnpauseContainer(Struct, frozen=True, tag=True):
    key: str
    name: str


class SleepAddon(Struct, frozen=True, tag=True):
    """Put an idle add-on to sleep: light pauses its database, deep stops it.

    The executor sets the wake redirect first and measures once more: a client that
    connected since the plan's measurement keeps it awake.
    """

    key: str  # add-on id
    name: str  # its database container
    stage: SleepState


class WakeAddon(Struct, frozen=True, tag=True):
    """Wake a sleeping add-on: a client waits at its wake listener, a backup holds it, or
    its plan stopped allowing sleep. Only ever carried out by the add-on's worker."""

    key: str  # add-on id
    name: str


class RemoveContainer(Struct, frozen=True, tag=True):
    key: str
    name: str
    reason: str
    # A database is stopped cleanly first, unless this says to kill it: a deleted add-on's
    # database that never answered (still in initdb, whose shell ignores SIGTERM).
    kill: bool = False


class RemoveVolume(Struct, frozen=True, tag=True):
    key: str
    name: str


class RemoveSecret(Struct, frozen=True, tag=True):
    key: str


class StartJob(Struct, frozen=True, tag=True):
    key: str  # job id
    project_id: str
    job: JobSpec
    # Group networks to join before the job starts, so it never runs without them.
    groups: tuple[str, ...] = ()


class WatchJob(Struct, frozen=True, tag=True):
    """Make sure a running job is awaited (and killed at its timeout), e.g. after a restart."""

    key: str  # job id
    project_id: str
    job: JobSpec
    name: str


class CollectJob(Struct, frozen=True, tag=True):
    key: str  # job id
    project_id: str
    name: str


class StartBackupOp(Struct, frozen=True, tag=True):
    """Run one backup-store operation (backup, verify, restore, delete) in the background."""

    key: str  # the operation's key, `<op>-<id>`
    project_id: str
    spec: BackupSpec
    addon: AddonSpec | None


class RunApp(Struct, frozen=True, tag=True):
    """Create and start an app's container with its release's environment."""

    key: str  # app id
    project_id: str
    app: AppSpec
    groups: tuple[str, ...] = ()


class ResizeApp(Struct, frozen=True, tag=True):
    """A new plan's CPU and memory for a running app's container, in place (`docker update`)."""

    key: str  # app id
    name: str
    cpus: float
    memory_mb: int
    spec_hash: str  # the spec the limits belong to: the planner's memory that it is done


Action = (
    EnsureNetwork
    | EnsureGroupNetwork
    | ConnectNetwork
    | DisconnectNetwork
    | EnsureVolume
    | FetchSecret
    | LimitRedisConf
    | RunContainer
    | StartContainer
    | UnpauseContainer
    | SleepAddon
    | WakeAddon
    | RemoveContainer
    | RemoveVolume
    | RemoveNetwork
    | RemoveSecret
    | StartJob
    | WatchJob
    | CollectJob
    | StartBackupOp
    | RunApp
    | ResizeApp
)

ACTION_KINDS: tuple[str, ...] = tuple(t.__name__ for t in get_args(Action))


class SleepFacts(Struct, frozen=True):
    """One add-on's sleep state and measured activity, as the sleep manager holds them."""

    state: SleepState = "awake"
    last_activity: float = 0.0  # epoch seconds of the last client activity
    clients: int = 0  # client connections open now, direct and relayed
    ready: bool = False  # has answered a client since it last started
    held: bool = False  # a platform operation (a backup) holds it awake
    # A new password waits for the database (the upkeep sets it, on an awake one only):
    # asleep, the client that woke it would be refused with the password it was given.
    credentials: bool = False
    wake_requested: bool = False  # a client waits at the wake listener
    listening: bool = False  # its wake listener runs: a sleep or wake can be carried out


class Local(Struct, frozen=True):
    """The agent's own facts that Docker does not hold."""

    # add-on id -> secret_version of the secret files on disk
    secrets: Mapping[str, int] = {}
    # Redis add-on id -> the maxmemory its redis.conf on disk sets (0: none); absent: no
    # secret files yet (FetchSecret writes the quota with them)
    redis_conf_quota: Mapping[str, int] = {}
    # job ids whose result is recorded locally (the job must not run again)
    finished_jobs: frozenset[str] = frozenset()
    # add-on id -> its sleep state and activity (absent: awake, never measured)
    sleep: Mapping[str, SleepFacts] = {}
    # backup-store operation keys (`<op>-<id>`) whose result is recorded locally
    backups_done: frozenset[str] = frozenset()
    # add-on id -> key of the backup-store operation running for it in this process
    backups_running: Mapping[str, str] = {}
    # epoch seconds: the clock the idle times are measured against
    now: float = 0.0
    # job ids this process already awaits: watching one again would finish at once and
    # ask for another pass, a pass loop for as long as the job runs
    watched_jobs: frozenset[str] = frozenset()
    # app id -> the spec hash whose CPU and memory this process applied in place: the
    # container's labels keep the hash it was made with, Docker cannot change them
    resized_apps: Mapping[str, str] = {}
    # network name -> Docker's last refusals to remove it (agent/netremoval.py)
    refused_networks: Mapping[str, netremoval.Refusal] = {}
    # add-on id -> the id of its database container that has answered a probe (tombstones
    # included, until they are gone): one that never did is still starting
    answered: Mapping[str, str] = {}


class Settings(Struct, frozen=True):
    images: specs.Images
    secrets_root: str
    jobs: specs.JobLimits = specs.JobLimits()
    # New Postgres add-ons with a quota get their WAL on a volume of its own
    # (`agent.wal_filesystems`, with `agent.volume_filesystems`).
    wal_volumes: bool = False

    def secret_dir(self, addon_id: str) -> str:
        return f"{self.secrets_root}/{addon_id}"


def plan(
    desired: DesiredState | None, observed: Observed, local: Local, settings: Settings
) -> tuple[Action, ...]:
    if desired is None:
        return ()
    actions: list[Action] = []
    wanted_jobs: set[str] = set()
    # Backup containers belong to an operation of this process; any other is a leftover
    # of a killed agent and goes before anything new starts.
    running = set(local.backups_running.values())
    for c in observed.containers:
        if c.role == "backup" and c.backup_op not in running:
            actions.append(RemoveContainer(c.backup_op or c.name, c.name, "BackupOrphaned"))
    wanted_apps: set[str] = set()
    wanted_networks: set[str] = set()
    groups = group_networks(desired)
    for net, group in sorted(groups.items()):
        wanted_networks.add(net)
        if observed.network(net) is None:
            actions.append(EnsureGroupNetwork(group.id, net))
    member_of = _memberships(groups)
    for project in desired.projects:
        net = model.network_name(project.id)
        live = [a for a in project.addons if not a.deleted]
        if live or project.jobs or project.apps:
            wanted_networks.add(net)
            if observed.network(net) is None:
                actions.append(EnsureNetwork(project.id, net))
        # Tombstones first: a deleted add-on's name may already belong to a new one, and
        # the old holder must leave the network before the new one takes the DNS alias.
        taken: set[str] = set()
        for addon in project.addons:
            if addon.deleted:
                actions += _remove_addon(addon, observed, local)
                if observed.container(model.holder_name(addon.id)) is not None:
                    taken.add(addon.name)
        for addon in project.addons:
            if addon.deleted:
                continue
            if addon.name in taken and observed.container(model.holder_name(addon.id)) is None:
                continue  # next pass, once the old holder is gone
            actions += _converge_addon(project.id, addon, observed, local, settings)
        nets = member_of.get(project.id, ())
        # Each job has the plan's CPU and memory, and a project may have 8 pending: at
        # most `per_project` of them run at once, the others start in order as they end
        # (their timeout counts from their start).
        slots = settings.jobs.per_project - sum(
            1 for job in project.jobs if _job_occupies(observed, job.id)
        )
        for job in project.jobs:
            wanted_jobs.add(job.id)
            job_actions = _converge_job(project.id, job, observed, local, nets)
            if any(isinstance(a, StartJob) for a in job_actions):
                if slots <= 0:
                    continue
                slots -= 1
            actions += job_actions
        actions += _converge_backups(project, observed, local)
        for app in project.apps:
            wanted_apps.add(app.id)
            actions += _converge_app(project.id, app, observed, local, settings, nets)
    # Job containers are ephemeral: one whose job left the desired state is garbage.
    for c in observed.containers:
        if c.role == "job" and c.job_id not in wanted_jobs:
            actions.append(RemoveContainer(c.job_id or c.name, c.name, "JobNotDesired"))
        # Apps hold no data: one no longer in its project's current release goes.
        if c.role == "app" and c.app_id not in wanted_apps:
            actions.append(RemoveContainer(c.app_id or c.name, c.name, "AppNotDesired"))
    actions += _attach(desired, groups, observed, actions)
    # A network Docker refused to remove is asked for again on its own schedule.
    actions += [
        a
        for a in _remove_networks(observed, wanted_networks)
        if netremoval.due(local.refused_networks.get(a.name), local.now)
    ]
    return tuple(actions)


def unwanted_networks(desired: DesiredState | None, observed: Observed) -> set[str]:
    """The networks the plan removes (or would, but for a refusal's schedule)."""
    if desired is None:
        return set()
    wanted = set(group_networks(desired))
    for project in desired.projects:
        if any(not a.deleted for a in project.addons) or project.jobs or project.apps:
            wanted.add(model.network_name(project.id))
    return {a.name for a in _remove_networks(observed, wanted)}


def group_networks(desired: DesiredState) -> dict[str, GroupSpec]:
    """Group network name -> its group, for each group with a live shared add-on here.

    A group whose shared add-ons are all elsewhere, deleted or unshared needs no network:
    nothing would be reachable on it.
    """
    live = {(p.id, a.id) for p in desired.projects for a in p.addons if not a.deleted}
    found: dict[str, GroupSpec] = {}
    for g in desired.groups:
        shared = tuple(
            s for s in g.shared if s.project_id in g.members and (s.project_id, s.addon_id) in live
        )
        if shared:
            found[model.group_network_name(g.id)] = GroupSpec(g.id, g.members, shared)
    return found


def _memberships(groups: Mapping[str, GroupSpec]) -> dict[str, tuple[str, ...]]:
    """Project id -> the group networks its apps and jobs join (sorted)."""
    nets: dict[str, list[str]] = {}
    for net, g in sorted(groups.items()):
        for member in g.members:
            nets.setdefault(member, []).append(net)
    return {k: tuple(v) for k, v in nets.items()}


def shared_ports(desired: DesiredState | None) -> dict[str, dict[str, int]]:
    """Group network name -> {holder name: port}: what the firewall lets through on it."""
    if desired is None:
        return {}
    kinds = {a.id: a.kind for p in desired.projects for a in p.addons}
    return {
        net: {model.holder_name(s.addon_id): PORTS[kinds[s.addon_id]] for s in g.shared}
        for net, g in group_networks(desired).items()
    }


def _attach(
    desired: DesiredState,
    groups: Mapping[str, GroupSpec],
    observed: Observed,
    planned: list[Action],
) -> list[Action]:
    """Connect what belongs on a group network, disconnect everything else from them.

    Shared holders join under their alias; members' apps and jobs join without one. A
    holder created in this pass joins right after (its key orders it behind the create);
    jobs and apps created in this pass join before they start (StartJob/RunApp groups).
    """
    # (container, network) -> (key, aliases)
    want: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}
    for net, g in groups.items():
        for s in g.shared:
            want[(model.holder_name(s.addon_id), net)] = (s.addon_id, (s.alias,))
        members = set(g.members)
        for project in desired.projects:
            if project.id not in members:
                continue
            for job in project.jobs:
                want[(model.job_container_name(job.id), net)] = (job.id, ())
            for app in project.apps:
                want[(model.app_container_name(app.id), net)] = (app.id, ())
    created = {a.spec.name for a in planned if isinstance(a, RunContainer)}
    removed = {a.name for a in planned if isinstance(a, RemoveContainer)}
    actions: list[Action] = []
    for (name, net), (key, aliases) in sorted(want.items()):
        c = observed.container(name)
        if name in created or (c is not None and name not in removed and not c.on(net)):
            if (
                c is not None
                and c.state in ("exited", "dead", "removing", "created")
                and not aliases
            ):
                # A finished job waits to be collected (nothing to reach); a created job or
                # app joins before it starts, in its own chain.
                continue
            actions.append(ConnectNetwork(key, net, name, aliases))
    for c in observed.containers:
        for net, _ip in c.groups:
            if (c.name, net) not in want and c.name not in removed:
                key = c.addon_id or c.job_id or c.app_id or c.name
                actions.append(DisconnectNetwork(key, net, c.name, "NotShared"))
    return actions


def _remove_networks(observed: Observed, wanted: set[str]) -> list[RemoveNetwork]:
    """A project network with no live add-on or job left, once no container of it exists.

    Any container of the project, a tombstone's holder included, may still be attached:
    the network goes in a later pass, after the last of them is gone. A network holds no
    data, so one of a project that left the desired state goes too.
    """
    in_use = {c.project_id for c in observed.containers}
    attached = {net for c in observed.containers for net, _ip in c.groups}
    return [
        RemoveNetwork(n.group_id or n.project_id, n.name)
        for n in observed.networks
        if n.name not in wanted
        and (n.project_id not in in_use if not n.group_id else n.name not in attached)
    ]


def _remove_addon(addon: AddonSpec, observed: Observed, local: Local) -> list[Action]:
    actions: list[Action] = []
    db = observed.container(model.db_name(addon.id))
    if db is not None:
        # Its volume goes below: a clean shutdown only spares a database that has run
        # (and asleep, it has). One that never answered is still in initdb, where the
        # Postgres entrypoint's shell ignores SIGTERM and a stop takes its full timeout.
        unanswered = local.answered.get(addon.id) != db.id
        awake = local.sleep.get(addon.id, _AWAKE).state == "awake"
        actions.append(RemoveContainer(addon.id, db.name, "AddonDeleted", unanswered and awake))
    if observed.container(model.holder_name(addon.id)) is not None:
        actions.append(RemoveContainer(addon.id, model.holder_name(addon.id), "AddonDeleted"))
    for volume in (model.volume_name(addon.id), model.wal_volume_name(addon.id)):
        if observed.volume(volume) is not None:
            actions.append(RemoveVolume(addon.id, volume))
    if addon.id in local.secrets:
        actions.append(RemoveSecret(addon.id))
    return actions


def _converge_addon(
    project_id: str, addon: AddonSpec, observed: Observed, local: Local, settings: Settings
) -> list[Action]:
    actions: list[Action] = []
    wal = wal_apart(addon, observed, settings)
    # The WAL's volume before the data's: a data volume without one is then always an
    # add-on made before WAL volumes (WAL inside PGDATA), never one half-way through.
    if wal and observed.volume(model.wal_volume_name(addon.id)) is None:
        wal_mb = specs.wal_fs_size_mb(addon.storage_mb or 0)
        actions.append(EnsureVolume(addon.id, model.wal_volume_name(addon.id), project_id, wal_mb))
    if observed.volume(model.volume_name(addon.id)) is None:
        size = specs.fs_size_mb(addon.storage_mb) if addon.storage_mb else None
        actions.append(EnsureVolume(addon.id, model.volume_name(addon.id), project_id, size))
    maxmemory = (
        storage.quota_bytes(addon.kind, addon.storage_mb, addon.resources.memory_mb)
        if addon.kind == "redis"
        else None
    )
    if local.secrets.get(addon.id) != addon.secret_version:
        actions.append(
            FetchSecret(addon.id, project_id, addon.kind, addon.secret_version, maxmemory)
        )
    elif maxmemory is not None and local.redis_conf_quota.get(addon.id, maxmemory) != maxmemory:
        # Before any start in this chain: a wake from deep sleep starts on this file.
        actions.append(LimitRedisConf(addon.id, maxmemory))

    want_holder = specs.holder_spec(project_id, addon, settings.images)
    want_db = specs.db_spec(
        project_id, addon, settings.images, settings.secret_dir(addon.id), wal=wal
    )
    holder = observed.container(want_holder.name)
    db = observed.container(want_db.name)

    holder_ok = (
        holder is not None
        and not want_holder.drifted(holder.spec_hash, holder.shape_hash)
        and holder.state == "running"
    )
    if not holder_ok:
        # A new holder is a new network namespace: the database must join the new one.
        if db is not None:
            actions.append(RemoveContainer(addon.id, db.name, "HolderReplaced"))
        if holder is not None:
            actions.append(RemoveContainer(addon.id, holder.name, _why(holder, want_holder)))
        actions.append(RunContainer(addon.id, want_holder))
        actions.append(RunContainer(addon.id, want_db))
        return actions

    assert holder is not None
    if db is None:
        actions.append(RunContainer(addon.id, want_db))
    elif (drifted := want_db.drifted(db.spec_hash, db.shape_hash)) or (
        db.network_mode != f"container:{holder.id}"
    ):
        # CPU, memory and the password change in place (agent/upkeep.py), not here.
        reason = "SpecChanged" if drifted else "HolderReplaced"
        actions.append(RemoveContainer(addon.id, db.name, reason))
        actions.append(RunContainer(addon.id, want_db))
    elif not local.backups_running.get(addon.id, "").startswith("restore-"):
        # A restore stops and starts the database itself (Redis swaps its files).
        actions += _db_run_state(addon, db, local.sleep.get(addon.id, _AWAKE), local.now)
    return actions


_AWAKE = SleepFacts()


def wal_apart(addon: AddonSpec, observed: Observed, settings: Settings) -> bool:
    """Whether a Postgres add-on's WAL lives on its own volume: it has one, or it is new
    (no data volume yet) and WAL volumes are on. An add-on whose data volume exists without
    one keeps its WAL inside PGDATA, as it was initialised: never migrated, never recreated."""
    if addon.kind != "postgres":
        return False
    if observed.volume(model.wal_volume_name(addon.id)) is not None:
        return True
    return (
        settings.wal_volumes
        and bool(addon.storage_mb)
        and observed.volume(model.volume_name(addon.id)) is None
    )


def _db_run_state(
    addon: AddonSpec, db: ObservedContainer, facts: SleepFacts, now: float
) -> list[Action]:
    goal = policy.goal(
        addon.sleep,
        facts.state,
        now - facts.last_activity,
        has_clients=facts.clients > 0,
        ready=facts.ready,
        held=facts.held or facts.credentials,
        wake_requested=facts.wake_requested,
    )
    if facts.state != "awake":
        # Paused or stopped on purpose: it wakes through its wake listener's path.
        if not facts.listening:
            return []  # not yet after a restart: the next pass has its listener
        if goal == "awake":
            return [WakeAddon(addon.id, db.name)]
        return [SleepAddon(addon.id, db.name, goal)] if goal != facts.state else []
    if db.state in ("exited", "created", "dead"):
        return [StartContainer(addon.id, db.name)]
    if db.state == "paused":
        return [UnpauseContainer(addon.id, db.name)]
    if goal != "awake" and db.state == "running" and facts.listening:
        return [SleepAddon(addon.id, db.name, goal)]
    return []


def next_sleep_deadline(
    desired: DesiredState | None, sleep: Mapping[str, SleepFacts], now: float
) -> float | None:
    """The earliest epoch second at which an idle add-on's next sleep stage falls due.

    The runtime schedules a pass for it, so an add-on falls asleep at its setting rather
    than at whatever pass some other event causes. Only add-ons the planner could put to
    sleep then count: listening, answered a client, no client, no hold, no wake asked.
    A deadline at or before `now` is not returned: the pass that saw it planned that sleep
    (and a pass per timer for one its worker cannot take yet would spin).
    """
    if desired is None:
        return None
    earliest: float | None = None
    for project in desired.projects:
        for addon in project.addons:
            facts = sleep.get(addon.id)
            rule = addon.sleep
            if (
                addon.deleted
                or facts is None
                or not rule.enabled
                or not facts.listening
                or facts.clients
                or facts.held
                or facts.credentials
                or facts.wake_requested
            ):
                continue
            if facts.state == "awake" and facts.ready:
                after = min(rule.light_after_s, rule.deep_after_s)
            elif facts.state == "light":
                after = rule.deep_after_s
            else:
                continue
            due = facts.last_activity + after
            if due > now and (earliest is None or due < earliest):
                earliest = due
    return earliest


def _why(have: ObservedContainer, want: specs.ContainerSpec) -> str:
    return "SpecChanged" if want.drifted(have.spec_hash, have.shape_hash) else "NotRunning"


def _job_occupies(observed: Observed, job_id: str) -> bool:
    """A job container that exists and has not ended holds one of its project's slots."""
    container = observed.container(model.job_container_name(job_id))
    return container is not None and container.state not in ("exited", "dead")


def _converge_job(
    project_id: str, job: JobSpec, observed: Observed, local: Local, groups: tuple[str, ...] = ()
) -> list[Action]:
    container = observed.container(model.job_container_name(job.id))
    if container is None:
        if job.id in local.finished_jobs:
            return []
        return [StartJob(job.id, project_id, job, groups)]
    if container.state in ("exited", "dead"):
        return [CollectJob(job.id, project_id, container.name)]
    if container.state == "created":  # the agent stopped between create and start
        return [
            # Its group networks first: a member's job never runs without them.
            *(ConnectNetwork(job.id, n, container.name) for n in groups if not container.on(n)),
            StartContainer(job.id, container.name),
            WatchJob(job.id, project_id, job, container.name),
        ]
    if job.id in local.watched_jobs:
        return []
    return [WatchJob(job.id, project_id, job, container.name)]


def op_key(spec: BackupSpec) -> str:
    return f"{spec.op}-{spec.id}"


def _converge_backups(project: ProjectSpec, observed: Observed, local: Local) -> list[Action]:
    """The first pending operation of each add-on, if none runs for it: one at a time."""
    addons = {a.id: a for a in project.addons}
    busy = set(local.backups_running)
    actions: list[Action] = []
    for spec in project.backups:
        key = op_key(spec)
        if key in local.backups_done or spec.addon_id in busy:
            continue
        busy.add(spec.addon_id)  # later operations of this add-on wait for this one
        addon = addons.get(spec.addon_id)
        if spec.op != "delete" and addon is not None and not addon.deleted:
            holder = observed.container(model.holder_name(addon.id))
            if addon.id not in local.secrets or holder is None or holder.state != "running":
                continue  # not provisioned yet: wait (a deleted add-on fails at once)
        actions.append(StartBackupOp(key, project.id, spec, addon))
    return actions


def _converge_app(
    project_id: str,
    app: AppSpec,
    observed: Observed,
    local: Local,
    settings: Settings,
    groups: tuple[str, ...] = (),
) -> list[Action]:
    want = specs.app_spec(project_id, app, settings.jobs)
    have = observed.container(want.name)
    if have is None:
        return [RunApp(app.id, project_id, app, groups)]
    if want.drifted(have.spec_hash, have.shape_hash):  # a new release, image or command
        return [
            RemoveContainer(app.id, have.name, "ReleaseChanged"),
            RunApp(app.id, project_id, app, groups),
        ]
    if have.disk_volume:  # made before image VOLUMEs were tmpfs: the host's disk is open
        return [
            RemoveContainer(app.id, have.name, "ImageVolumeOnDisk"),
            RunApp(app.id, project_id, app, groups),
        ]
    if have.state == "created":  # the agent stopped between create and start
        return [
            *(ConnectNetwork(app.id, n, have.name) for n in groups if not have.on(n)),
            StartContainer(app.id, have.name),
        ]
    if have.spec_hash != want.spec_hash and local.resized_apps.get(app.id) != want.spec_hash:
        # Only CPU or memory changed (a plan change): the app keeps running.
        assert want.cpus is not None and want.memory_mb is not None  # apps always have both
        return [ResizeApp(app.id, have.name, want.cpus, want.memory_mb, want.spec_hash)]
    # Running, or restarting by Docker's on-failure policy, or exited 0 on its own: as is.
    return []


# Actions that need the project's network to exist before they can succeed.
_NEEDS_NETWORK = (RunContainer, StartContainer, StartJob, RunApp)


def chains(
    desired: DesiredState | None, actions: tuple[Action, ...]
) -> dict[str, tuple[Action, ...]]:
    """Group a plan by key, in plan order: each chain is one key worker's work.

    Keys run in parallel, so the one ordering between keys that matters is kept here: a
    chain that creates or starts a container of a project whose network this plan still
    creates waits for a later pass (the network's completion asks for one).

    Chains that start a Postgres come first (in plan order among themselves, see
    `starts_slow`).
    """
    owner: dict[str, str] = {}
    for project in desired.projects if desired is not None else ():
        for addon in project.addons:
            owner[addon.id] = project.id
        for job in project.jobs:
            owner[job.id] = project.id
        for app in project.apps:
            owner[app.id] = project.id
    creating = {a.key for a in actions if isinstance(a, EnsureNetwork)}
    creating_groups = {a.name for a in actions if isinstance(a, EnsureGroupNetwork)}
    grouped: dict[str, list[Action]] = {}
    for action in actions:
        grouped.setdefault(action.key, []).append(action)

    ordered = sorted(grouped.items(), key=lambda item: not starts_slow(desired, *item))
    return {
        key: tuple(chain)
        for key, chain in ordered
        if not (
            owner.get(key) in creating
            and key not in creating
            and any(isinstance(a, _NEEDS_NETWORK) for a in chain)
        )
        and not any(_joins(a) & creating_groups for a in chain)
    }


def starts_slow(desired: DesiredState | None, key: str, chain: Sequence[Action]) -> bool:
    """Whether a chain starts a Postgres: seconds of initdb, where a Redis takes a tenth of
    one. The daemon serves such chains first (agent/slots.py), so sixty add-ons created at
    once are all answering soonest: the slowest start first, whenever they arrive."""
    if not any(isinstance(a, RunContainer | StartContainer) for a in chain):
        return False
    return any(
        a.id == key and a.kind == "postgres"
        for p in (desired.projects if desired is not None else ())
        for a in p.addons
    )


def steps(chain: tuple[Action, ...]) -> list[tuple[Action, ...]]:
    """A chain as steps run one after another; the actions of one step run together.

    An add-on's volume, its secret and its holder are independent of each other (only the
    database mounts the first two): made side by side, the database starts sooner; once
    the database is gone, the holder, the volume and the secret go side by side. Other
    actions are steps of their own, and a step never mixes making with removing (a holder
    replaced is removed, then made again, in chain order).
    """
    out: list[tuple[Action, ...]] = []
    beside: list[Action] = []
    kind = ""
    for action in chain:
        group = _beside(action)
        if beside and group != kind:
            out.append(tuple(beside))
            beside = []
        if group:
            beside.append(action)
            kind = group
        else:
            out.append((action,))
    if beside:
        out.append(tuple(beside))
    return out


def _beside(action: Action) -> str:
    """Which step of independent actions an action may share ("" for none)."""
    if isinstance(action, EnsureVolume | FetchSecret | LimitRedisConf) or (
        isinstance(action, RunContainer) and action.spec.role == "holder"
    ):
        return "make"
    if isinstance(action, RemoveVolume | RemoveSecret) or (
        isinstance(action, RemoveContainer) and action.name == model.holder_name(action.key)
    ):
        return "remove"
    return ""


def _joins(action: Action) -> set[str]:
    """The group networks an action attaches a container to (they must exist first)."""
    match action:
        case ConnectNetwork(_, network, _, _):
            return {network}
        case StartJob(_, _, _, groups) | RunApp(_, _, _, groups):
            return set(groups)
    return set()
