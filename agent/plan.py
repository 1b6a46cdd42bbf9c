"""The planner: `plan(desired, observed, local, settings) -> actions`, pure and deterministic.

No I/O and no clock: everything it needs is in its arguments, so a table of
(desired, observed) -> expected actions tests it completely. `apply.py` executes the
actions in order; a failed action skips the rest of its key's chain (the add-on, job or
project it belongs to) and the next pass plans again from what is then observed.

Data is only ever deleted for a tombstone (`AddonSpec.deleted`). Something that is
missing from the desired state, or a desired state that never arrived, deletes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import get_args

from msgspec import Struct

from agent import model, specs
from agent.model import Observed, ObservedContainer
from agent.sleep import policy
from schemas.messages import (
    AddonSpec,
    AppSpec,
    BackupSpec,
    DesiredState,
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
    """Wake a sleeping add-on (a client waits at its wake listener, or a backup holds it)."""

    key: str  # add-on id
    name: str


class RemoveContainer(Struct, frozen=True, tag=True):
    key: str
    name: str
    reason: str


class RemoveVolume(Struct, frozen=True, tag=True):
    key: str
    name: str


class RemoveSecret(Struct, frozen=True, tag=True):
    key: str


class StartJob(Struct, frozen=True, tag=True):
    key: str  # job id
    project_id: str
    job: JobSpec


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


Action = (
    EnsureNetwork
    | EnsureVolume
    | FetchSecret
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
)

ACTION_KINDS: tuple[str, ...] = tuple(t.__name__ for t in get_args(Action))


class SleepFacts(Struct, frozen=True):
    """One add-on's sleep state and measured activity, as the sleep manager holds them."""

    state: SleepState = "awake"
    last_activity: float = 0.0  # epoch seconds of the last client activity
    clients: int = 0  # client connections open now, direct and relayed
    ready: bool = False  # has answered a client since it last started
    held: bool = False  # a platform operation (a backup) holds it awake
    wake_requested: bool = False  # a client waits at the wake listener
    listening: bool = False  # its wake listener runs: a sleep or wake can be carried out


class Local(Struct, frozen=True):
    """The agent's own facts that Docker does not hold."""

    # add-on id -> secret_version of the secret files on disk
    secrets: Mapping[str, int] = {}
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


class Settings(Struct, frozen=True):
    images: specs.Images
    secrets_root: str
    jobs: specs.JobLimits = specs.JobLimits()

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
        for job in project.jobs:
            wanted_jobs.add(job.id)
            actions += _converge_job(project.id, job, observed, local)
        actions += _converge_backups(project, observed, local)
        for app in project.apps:
            wanted_apps.add(app.id)
            actions += _converge_app(project.id, app, observed, settings)
    # Job containers are ephemeral: one whose job left the desired state is garbage.
    for c in observed.containers:
        if c.role == "job" and c.job_id not in wanted_jobs:
            actions.append(RemoveContainer(c.job_id or c.name, c.name, "JobNotDesired"))
        # Apps hold no data: one no longer in its project's current release goes.
        if c.role == "app" and c.app_id not in wanted_apps:
            actions.append(RemoveContainer(c.app_id or c.name, c.name, "AppNotDesired"))
    actions += _remove_networks(observed, wanted_networks)
    return tuple(actions)


def _remove_networks(observed: Observed, wanted: set[str]) -> list[Action]:
    """A project network with no live add-on or job left, once no container of it exists.

    Any container of the project, a tombstone's holder included, may still be attached:
    the network goes in a later pass, after the last of them is gone. A network holds no
    data, so one of a project that left the desired state goes too.
    """
    in_use = {c.project_id for c in observed.containers}
    return [
        RemoveNetwork(n.project_id, n.name)
        for n in observed.networks
        if n.name not in wanted and n.project_id not in in_use
    ]


def _remove_addon(addon: AddonSpec, observed: Observed, local: Local) -> list[Action]:
    actions: list[Action] = []
    for name in (model.db_name(addon.id), model.holder_name(addon.id)):
        if observed.container(name) is not None:
            actions.append(RemoveContainer(addon.id, name, "AddonDeleted"))
    if observed.volume(model.volume_name(addon.id)) is not None:
        actions.append(RemoveVolume(addon.id, model.volume_name(addon.id)))
    if addon.id in local.secrets:
        actions.append(RemoveSecret(addon.id))
    return actions


def _converge_addon(
    project_id: str, addon: AddonSpec, observed: Observed, local: Local, settings: Settings
) -> list[Action]:
    actions: list[Action] = []
    if observed.volume(model.volume_name(addon.id)) is None:
        size = specs.fs_size_mb(addon.storage_mb) if addon.storage_mb else None
        actions.append(EnsureVolume(addon.id, model.volume_name(addon.id), project_id, size))
    if local.secrets.get(addon.id) != addon.secret_version:
        actions.append(FetchSecret(addon.id, project_id, addon.kind, addon.secret_version))

    want_holder = specs.holder_spec(project_id, addon, settings.images)
    want_db = specs.db_spec(project_id, addon, settings.images, settings.secret_dir(addon.id))
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


def _db_run_state(
    addon: AddonSpec, db: ObservedContainer, facts: SleepFacts, now: float
) -> list[Action]:
    goal = policy.goal(
        addon.sleep,
        facts.state,
        now - facts.last_activity,
        has_clients=facts.clients > 0,
        ready=facts.ready,
        held=facts.held,
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


def _why(have: ObservedContainer, want: specs.ContainerSpec) -> str:
    return "SpecChanged" if want.drifted(have.spec_hash, have.shape_hash) else "NotRunning"


def _converge_job(project_id: str, job: JobSpec, observed: Observed, local: Local) -> list[Action]:
    container = observed.container(model.job_container_name(job.id))
    if container is None:
        return [] if job.id in local.finished_jobs else [StartJob(job.id, project_id, job)]
    if container.state in ("exited", "dead"):
        return [CollectJob(job.id, project_id, container.name)]
    if container.state == "created":  # the agent stopped between create and start
        return [
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
    project_id: str, app: AppSpec, observed: Observed, settings: Settings
) -> list[Action]:
    want = specs.app_spec(project_id, app, settings.jobs)
    have = observed.container(want.name)
    if have is None:
        return [RunApp(app.id, project_id, app)]
    if have.spec_hash != want.spec_hash:  # a new release, image or command
        return [
            RemoveContainer(app.id, have.name, "ReleaseChanged"),
            RunApp(app.id, project_id, app),
        ]
    if have.state == "created":  # the agent stopped between create and start
        return [StartContainer(app.id, have.name)]
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
    grouped: dict[str, list[Action]] = {}
    for action in actions:
        grouped.setdefault(action.key, []).append(action)
    return {
        key: tuple(chain)
        for key, chain in grouped.items()
        if not (
            owner.get(key) in creating
            and key not in creating
            and any(isinstance(a, _NEEDS_NETWORK) for a in chain)
        )
    }
