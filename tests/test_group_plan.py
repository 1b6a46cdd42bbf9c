"""Project groups in the planner and the firewall, pure: tables and Hypothesis properties."""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from agent import firewall, model, specs
from agent import plan as p
from agent.model import Observed, ObservedContainer, ObservedNetwork, ObservedVolume
from schemas.messages import (
    AddonSpec,
    AppSpec,
    DesiredState,
    GroupSpec,
    JobSpec,
    ProjectSpec,
    Resources,
    SharedAddon,
)

SETTINGS = p.Settings(images=specs.Images(), secrets_root="/secrets")
A, B, C = "a" * 32, "b" * 32, "c" * 32
GID = "9" * 32
NET = model.group_network_name(GID)
RES = Resources(cpus=1.0, memory_mb=512)
ORDERS = AddonSpec(id="1" * 32, name="orders", kind="postgres", resources=RES)
CACHE = AddonSpec(id="2" * 32, name="cache", kind="redis", resources=RES)
BILLING = AddonSpec(id="3" * 32, name="billing", kind="postgres", resources=RES)
WEB = AppSpec(id="4" * 32, name="web", image="orkestr-local/toolbox:bookworm")
JOB = JobSpec(id="5" * 32, image="orkestr-local/toolbox:bookworm", command=("true",))
ADDONS = {A: (ORDERS, CACHE), B: (BILLING,), C: ()}


def share(addon: AddonSpec, project: str) -> SharedAddon:
    return SharedAddon(addon.id, project, f"addon-{addon.id}")


def desired(
    members: tuple[str, ...] = (A, B),
    shared: tuple[SharedAddon, ...] = (share(ORDERS, A),),
    jobs: Mapping[str, tuple[JobSpec, ...]] | None = None,
    apps: Mapping[str, tuple[AppSpec, ...]] | None = None,
    deleted: frozenset[str] = frozenset(),
    groups: bool = True,
) -> DesiredState:
    projects = tuple(
        ProjectSpec(
            id=pid,
            name=f"p{pid[0]}",
            addons=tuple(
                AddonSpec(a.id, a.name, a.kind, a.resources, deleted=a.id in deleted)
                for a in ADDONS[pid]
            ),
            jobs=(jobs or {}).get(pid, ()),
            apps=(apps or {}).get(pid, ()),
        )
        for pid in (A, B, C)
    )
    return DesiredState(
        version=1,
        host="h",
        generation=1,
        projects=projects,
        groups=(GroupSpec(GID, members, shared),) if groups else (),
    )


def settled(
    attached: Mapping[str, tuple[tuple[str, str], ...]] | None = None,
    group_net: bool = True,
    jobs: Mapping[str, tuple[JobSpec, ...]] | None = None,
    apps: Mapping[str, tuple[AppSpec, ...]] | None = None,
) -> Observed:
    """Every add-on, job and app of A, B and C running as specified; `attached` names each
    container's group networks."""
    attached = attached or {}
    containers: list[ObservedContainer] = []
    networks = [
        ObservedNetwork(id=pid, name=model.network_name(pid), project_id=pid, subnet="10.0.0.0/24")
        for pid in (A, B)  # C has nothing: its network would be removed
    ]
    if group_net:
        networks.append(ObservedNetwork(id="g", name=NET, project_id="", group_id=GID))
    for pid, addons in ADDONS.items():
        for a in addons:
            holder = specs.holder_spec(pid, a, SETTINGS.images)
            db = specs.db_spec(pid, a, SETTINGS.images, SETTINGS.secret_dir(a.id))
            containers.append(
                ObservedContainer(
                    id=holder.name,
                    name=holder.name,
                    role="holder",
                    project_id=pid,
                    state="running",
                    spec_hash=holder.spec_hash,
                    addon_id=a.id,
                    groups=attached.get(holder.name, ()),
                )
            )
            containers.append(
                ObservedContainer(
                    id=db.name,
                    name=db.name,
                    role="db",
                    project_id=pid,
                    state="running",
                    spec_hash=db.spec_hash,
                    addon_id=a.id,
                    network_mode=f"container:{holder.name}",
                )
            )
    for pid, js in (jobs or {}).items():
        for j in js:
            name = model.job_container_name(j.id)
            containers.append(
                ObservedContainer(
                    id=name,
                    name=name,
                    role="job",
                    project_id=pid,
                    state="running",
                    job_id=j.id,
                    groups=attached.get(name, ()),
                )
            )
    for pid, xs in (apps or {}).items():
        for app in xs:
            spec = specs.app_spec(pid, app, SETTINGS.jobs)
            containers.append(
                ObservedContainer(
                    id=spec.name,
                    name=spec.name,
                    role="app",
                    project_id=pid,
                    state="running",
                    spec_hash=spec.spec_hash,
                    app_id=app.id,
                    groups=attached.get(spec.name, ()),
                )
            )
    volumes = tuple(
        ObservedVolume(model.volume_name(a.id), a.id) for xs in ADDONS.values() for a in xs
    )
    return Observed(containers=tuple(containers), networks=tuple(networks), volumes=volumes)


LOCAL = p.Local(secrets={a.id: 1 for xs in ADDONS.values() for a in xs})
HOLDER = model.holder_name(ORDERS.id)
APP_NAME = model.app_container_name(WEB.id)
JOB_NAME = model.job_container_name(JOB.id)


def plan(d: DesiredState, o: Observed) -> tuple[p.Action, ...]:
    # A running job is always watched (after a restart too): not what these tests are about.
    return tuple(a for a in p.plan(d, o, LOCAL, SETTINGS) if not isinstance(a, p.WatchJob))


def test_a_group_network_is_made_and_the_shared_holder_and_members_join_it() -> None:
    apps = {A: (WEB,)}
    d = desired(jobs={B: (JOB,)}, apps=apps)
    actions = plan(d, settled(group_net=False, apps=apps))
    assert actions == (
        p.EnsureGroupNetwork(GID, NET),
        p.StartJob(JOB.id, B, JOB, (NET,)),  # joins before it starts
        p.ConnectNetwork(ORDERS.id, NET, HOLDER, (f"addon-{ORDERS.id}",)),
        p.ConnectNetwork(WEB.id, NET, APP_NAME, ()),
    )


def test_whatever_joins_a_group_network_waits_for_the_pass_that_made_it() -> None:
    # Keys run in parallel: a join planned beside the network's creation would race it.
    apps = {A: (WEB,)}
    d = desired(jobs={B: (JOB,)}, apps=apps)
    chains = p.chains(d, plan(d, settled(group_net=False, apps=apps)))
    assert chains == {GID: (p.EnsureGroupNetwork(GID, NET),)}
    # Once the network is observed, the joins go ahead.
    later = p.chains(d, plan(d, settled(apps=apps)))
    assert GID not in later and later, later


def test_nothing_to_do_once_attached_and_nothing_else_joins() -> None:
    apps = {A: (WEB,)}
    jobs = {B: (JOB,)}
    attached = {HOLDER: ((NET, "10.9.0.2"),), APP_NAME: ((NET, "10.9.0.3"),)}
    attached[JOB_NAME] = ((NET, "10.9.0.4"),)
    assert plan(desired(jobs=jobs, apps=apps), settled(attached, jobs=jobs, apps=apps)) == ()


def test_a_project_outside_the_group_never_joins() -> None:
    jobs = {C: (JOB,)}
    actions = plan(desired(jobs=jobs), settled({HOLDER: ((NET, "10.9.0.2"),)}))
    assert actions == (
        p.EnsureNetwork(C, model.network_name(C)),
        p.StartJob(JOB.id, C, JOB, ()),
    )


def test_a_holder_made_in_this_pass_joins_after_it_is_created() -> None:
    o = settled()
    o = Observed(
        containers=tuple(c for c in o.containers if c.addon_id != ORDERS.id),
        networks=o.networks,
        volumes=o.volumes,
    )
    actions = plan(desired(), o)
    runs = [i for i, a in enumerate(actions) if isinstance(a, p.RunContainer)]
    [connect] = [i for i, a in enumerate(actions) if isinstance(a, p.ConnectNetwork)]
    assert runs and connect > max(runs)
    assert actions[connect] == p.ConnectNetwork(ORDERS.id, NET, HOLDER, (f"addon-{ORDERS.id}",))


def test_unsharing_disconnects_everyone_then_the_network_goes() -> None:
    apps = {A: (WEB,)}
    jobs = {B: (JOB,)}
    attached = {
        HOLDER: ((NET, "10.9.0.2"),),
        APP_NAME: ((NET, "10.9.0.3"),),
        JOB_NAME: ((NET, "10.9.0.4"),),
    }
    d = desired(shared=(), jobs=jobs, apps=apps)
    actions = plan(d, settled(attached, jobs=jobs, apps=apps))
    assert set(actions) == {
        p.DisconnectNetwork(ORDERS.id, NET, HOLDER, "NotShared"),
        p.DisconnectNetwork(WEB.id, NET, APP_NAME, "NotShared"),
        p.DisconnectNetwork(JOB.id, NET, JOB_NAME, "NotShared"),
    }
    # Once nothing is attached, the group network is removed.
    assert plan(d, settled(jobs=jobs, apps=apps)) == (p.RemoveNetwork(GID, NET),)


def test_leaving_the_group_disconnects_only_the_leaver() -> None:
    jobs = {B: (JOB,)}
    attached = {HOLDER: ((NET, "10.9.0.2"),), JOB_NAME: ((NET, "10.9.0.4"),)}
    actions = plan(desired(members=(A,), jobs=jobs), settled(attached, jobs=jobs))
    assert actions == (p.DisconnectNetwork(JOB.id, NET, JOB_NAME, "NotShared"),)


def test_a_share_of_a_deleted_addon_or_of_a_non_member_makes_no_network() -> None:
    assert p.group_networks(desired(deleted=frozenset({ORDERS.id}))) == {}
    assert p.group_networks(desired(members=(B,))) == {}
    assert p.group_networks(desired(shared=())) == {}
    assert set(p.group_networks(desired())) == {NET}
    assert p.shared_ports(desired()) == {NET: {HOLDER: 5432}}


# --- Hypothesis: attachments converge to exactly the allowed ones ----------------------

ALL_SHARES = (share(ORDERS, A), share(CACHE, A), share(BILLING, B))
CANDIDATES = (
    HOLDER,
    model.holder_name(CACHE.id),
    model.holder_name(BILLING.id),
    APP_NAME,
    JOB_NAME,
)


def _step(o: Observed, actions: tuple[p.Action, ...]) -> Observed:
    """Apply the group actions to an observed world (the other actions do not occur here)."""
    containers = {c.name: c for c in o.containers}
    networks = {n.name: n for n in o.networks}
    for a in actions:
        match a:
            case p.EnsureGroupNetwork(key, name):
                networks[name] = ObservedNetwork(id=name, name=name, project_id="", group_id=key)
            case p.ConnectNetwork(_k, net, name, _aliases):
                c = containers[name]
                containers[name] = ObservedContainer(
                    **{
                        **{f: getattr(c, f) for f in c.__struct_fields__},
                        "groups": tuple(sorted({*c.groups, (net, f"10.9.0.{len(c.groups) + 2}")})),
                    }
                )
            case p.DisconnectNetwork(_k, net, name, _r):
                c = containers[name]
                containers[name] = ObservedContainer(
                    **{
                        **{f: getattr(c, f) for f in c.__struct_fields__},
                        "groups": tuple(g for g in c.groups if g[0] != net),
                    }
                )
            case p.RemoveNetwork(_k, name):
                if not any(name == g for c in containers.values() for g, _ in c.groups):
                    networks.pop(name, None)
            case _:
                raise AssertionError(f"unexpected action {a}")
    return Observed(
        containers=tuple(containers.values()),
        networks=tuple(networks.values()),
        volumes=o.volumes,
    )


@settings(max_examples=150, deadline=None)
@given(
    members=st.sets(st.sampled_from((A, B, C))),
    shared=st.sets(st.sampled_from(ALL_SHARES)),
    in_group=st.booleans(),
    start=st.dictionaries(st.sampled_from(CANDIDATES), st.just(((NET, "10.9.0.9"),))),
    group_net=st.booleans(),
)
def test_attachments_converge_to_shared_holders_and_members_only(
    members: set[str],
    shared: set[SharedAddon],
    in_group: bool,
    start: dict[str, tuple[tuple[str, str], ...]],
    group_net: bool,
) -> None:
    apps, jobs = {A: (WEB,)}, {B: (JOB,)}
    d = desired(
        members=tuple(sorted(members)),
        shared=tuple(sorted(shared, key=lambda s: s.addon_id)),
        jobs=jobs,
        apps=apps,
        groups=in_group,
    )
    o = settled(start, group_net=group_net or bool(start), jobs=jobs, apps=apps)
    for _ in range(4):
        actions = plan(d, o)
        if not actions:
            break
        o = _step(o, actions)
    assert plan(d, o) == ()
    on_net = {c.name for c in o.containers if c.on(NET)}
    live_shares = {s for s in shared if s.project_id in members} if in_group else set()
    expected = {model.holder_name(s.addon_id) for s in live_shares}
    if live_shares:
        expected |= {APP_NAME} if A in members else set()
        expected |= {JOB_NAME} if B in members else set()
    assert on_net == expected
    assert (o.network(NET) is not None) == bool(live_shares)


# --- the group bridge's firewall rules ------------------------------------------------

addresses = st.tuples(
    st.integers(1, 254).map(lambda i: f"10.9.0.{i}"), st.sampled_from((5432, 6379))
)


@given(shared=st.lists(addresses, max_size=5))
def test_a_group_bridge_passes_only_new_connections_to_shared_ports(
    shared: list[tuple[str, int]],
) -> None:
    bridges = [
        firewall.Bridge("br-proj", "10.200.0.0/24"),
        firewall.Bridge("br-group", "10.9.0.0/24", shared=tuple(shared)),
    ]
    rules = firewall.host_ruleset("h1", bridges, firewall.Policy()).splitlines()
    _in, fwd, pol = firewall.chains("h1")
    group = [r for r in rules if " -i br-group " in r and r.startswith(f"-A {fwd}")]
    # Replies first, one rule per shared address and port, then everything else dropped.
    assert group[0].endswith("--ctstate ESTABLISHED,RELATED -j RETURN")
    assert group[-1] == f"-A {fwd} -i br-group -j DROP"
    accepted = group[1:-1]
    assert accepted == [
        f"-A {fwd} -i br-group -o br-group -d {ip}/32 -p tcp --dport {port} "
        "-m conntrack --ctstate NEW -j RETURN"
        for ip, port in sorted(set(shared))
    ]
    # The host itself is closed to the group bridge, as to project bridges.
    assert f"-A {_in} -i br-group -j DROP" in rules
    # A group bridge never reaches the policy chain; a project bridge's traffic to the
    # group's subnet meets it there and is dropped.
    assert not any(r.endswith(f"-j {pol}") for r in group)
    assert f"-A {pol} -d 10.9.0.0/24 -j DROP" in rules
    assert firewall.host_ruleset("h1", bridges[::-1], firewall.Policy()).splitlines() == rules


def test_a_created_member_job_or_app_joins_before_it_starts() -> None:
    jobs, apps = {B: (JOB,)}, {A: (WEB,)}
    o = settled({HOLDER: ((NET, "10.9.0.2"),)}, jobs=jobs, apps=apps)
    o = Observed(
        containers=tuple(
            ObservedContainer(
                **{**{f: getattr(c, f) for f in c.__struct_fields__}, "state": "created"}
            )
            if c.role in ("job", "app")
            else c
            for c in o.containers
        ),
        networks=o.networks,
        volumes=o.volumes,
    )
    assert plan(desired(jobs=jobs, apps=apps), o) == (
        p.ConnectNetwork(WEB.id, NET, APP_NAME),  # project A's app
        p.StartContainer(WEB.id, APP_NAME),
        p.ConnectNetwork(JOB.id, NET, JOB_NAME),  # project B's job
        p.StartContainer(JOB.id, JOB_NAME),
    )
