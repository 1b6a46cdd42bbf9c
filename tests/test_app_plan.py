"""The planner's app actions, pure: (desired, observed) -> actions."""

from __future__ import annotations

import msgspec

from agent import model, specs
from agent import plan as p
from agent.model import Observed, ObservedContainer, ObservedNetwork
from schemas.messages import AppSpec, DesiredState, ProjectSpec, Resources

SETTINGS = p.Settings(images=specs.Images(), secrets_root="/secrets")
PID = "a" * 32
APP = AppSpec(id="b" * 32, name="web", image="orkestr-local/toolbox:bookworm", release=1)
NET = ObservedNetwork(id="n", name=model.network_name(PID), project_id=PID)


def desired(*apps: AppSpec) -> DesiredState:
    return DesiredState(
        version=1, host="h", generation=1, projects=(ProjectSpec(id=PID, name="p", apps=apps),)
    )


def container(app: AppSpec, state: str = "running") -> ObservedContainer:
    spec = specs.app_spec(PID, app, SETTINGS.jobs)
    return ObservedContainer(
        id="c",
        name=spec.name,
        role="app",
        project_id=PID,
        state=state,  # type: ignore[arg-type]
        spec_hash=spec.spec_hash,
        shape_hash=spec.shape_hash,
        app_id=app.id,
    )


def plan(
    d: DesiredState, *containers: ObservedContainer, local: p.Local | None = None
) -> tuple[p.Action, ...]:
    observed = Observed(containers=containers, networks=(NET,))
    return p.plan(d, observed, local or p.Local(), SETTINGS)


def test_a_new_app_is_run_on_its_project_network() -> None:
    assert plan(desired(APP)) == (p.RunApp(APP.id, PID, APP),)
    actions = p.plan(desired(APP), Observed(), p.Local(), SETTINGS)
    assert actions[0] == p.EnsureNetwork(PID, model.network_name(PID))


def test_a_running_app_of_its_release_is_left_alone_even_restarting_or_exited() -> None:
    for state in ("running", "restarting", "exited"):
        assert plan(desired(APP), container(APP, state)) == ()


def test_a_new_release_replaces_the_container() -> None:
    newer = AppSpec(id=APP.id, name="web", image=APP.image, release=2)
    assert plan(desired(newer), container(APP)) == (
        p.RemoveContainer(APP.id, model.app_container_name(APP.id), "ReleaseChanged"),
        p.RunApp(APP.id, PID, newer),
    )


def test_a_plan_change_resizes_the_running_app_in_place_once() -> None:
    sized = AppSpec(id=APP.id, name="web", image=APP.image, release=1,
                    resources=Resources(cpus=0.5, memory_mb=256))  # fmt: skip
    bigger = msgspec.structs.replace(sized, resources=Resources(cpus=2.0, memory_mb=1024))
    want = specs.app_spec(PID, bigger, SETTINGS.jobs)
    resize = p.ResizeApp(APP.id, want.name, 2.0, 1024, want.spec_hash)
    assert plan(desired(bigger), container(sized)) == (resize,)
    # Docker cannot relabel the container: the agent remembers what it applied.
    done = p.Local(resized_apps={APP.id: want.spec_hash})
    assert plan(desired(bigger), container(sized), local=done) == ()
    # A later change is applied again, and a new release still replaces the container.
    assert plan(desired(sized), container(sized), local=done) == ()
    newer = msgspec.structs.replace(bigger, release=2)
    assert plan(desired(newer), container(sized), local=done)[0] == p.RemoveContainer(
        APP.id, want.name, "ReleaseChanged"
    )


def test_an_app_left_out_of_the_release_is_removed_and_a_created_one_started() -> None:
    assert plan(desired(), container(APP)) == (
        p.RemoveContainer(APP.id, model.app_container_name(APP.id), "AppNotDesired"),
    )
    assert plan(desired(APP), container(APP, "created")) == (
        p.StartContainer(APP.id, model.app_container_name(APP.id)),
    )


def test_the_app_spec_is_hardened_and_restarts_on_failure() -> None:
    spec = specs.app_spec(PID, APP, SETTINGS.jobs)
    assert spec.user == specs.NOBODY and spec.restart == "on-failure"
    assert spec.pids_limit and spec.memory_mb and spec.aliases == ("web",)
    body = specs.create_body(spec, "h", {"A": "1"})
    host_config = body["HostConfig"]
    assert isinstance(host_config, dict) and host_config["CapDrop"] == ["ALL"]
    assert "A=1" in body["Env"]  # type: ignore[operator]


def test_an_app_with_its_images_volume_on_the_hosts_disk_is_made_again() -> None:
    # Made before image VOLUMEs became tmpfs: the same release, but its tenant can fill
    # the host's disk through the anonymous volume, so the container is replaced once.
    old = msgspec.structs.replace(container(APP), disk_volume=True)
    assert plan(desired(APP), old) == (
        p.RemoveContainer(APP.id, model.app_container_name(APP.id), "ImageVolumeOnDisk"),
        p.RunApp(APP.id, PID, APP),
    )
