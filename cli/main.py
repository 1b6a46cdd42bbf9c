"""The `orkestr` command: projects, add-ons, variables, one-off jobs, sleep, from a shell.

Every command prints a human table by default and the API's JSON with `--json`. Names or
ids select projects and add-ons; the project comes from `--project`, `ORKESTR_PROJECT`,
the one saved by `orkestr login --project`, or is the only one the token can see.
"""

from __future__ import annotations

import collections
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click
from click.shell_completion import CompletionItem, get_completion_class

from cli import params, render, settings
from cli.client import ApiFailure, Client, CliError

F = TypeVar("F", bound=Callable[..., Any])
POLL_S = 0.5
# Seconds one long poll on a job's output waits (below the client's 30 s timeout).
FOLLOW_WAIT_S = 10
DEFAULT_IMAGE = "orkestr-local/toolbox:bookworm"
HEALTHY = ("ready", "sleeping")  # a sleeping add-on was ready and wakes on connect


def json_option(f: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON (the API's shape) instead of a table."
    )(f)


def _complete_projects(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    try:
        projects = client().list_all("/v1/projects", "projects")
    except (click.ClickException, ValueError):
        return []  # completion never fails loudly
    return [CompletionItem(p["name"]) for p in projects if p["name"].startswith(incomplete)]


def project_option(f: F) -> F:
    return click.option(
        "-p",
        "--project",
        default="",
        help="Project name or id (default: ORKESTR_PROJECT, the login's, or the only one).",
        shell_complete=_complete_projects,
    )(f)


def client() -> Client:
    try:
        s = settings.load()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return Client(s.api, s.token)


def resolve_project(c: Client, given: str) -> dict[str, Any]:
    wanted = given
    if not wanted:
        try:
            wanted = settings.load().project
        except ValueError:
            wanted = ""
    projects = c.list_all("/v1/projects", "projects")
    if not wanted:
        if len(projects) == 1:
            return projects[0]
        if not projects:
            raise CliError(
                "this token sees no project",
                "create one: `orkestr projects create NAME --plan starter`",
            )
        raise CliError(
            "several projects; which one?",
            "pass --project NAME (one of: " + ", ".join(p["name"] for p in projects) + ")",
        )
    for p in projects:
        if wanted in (p["id"], p["name"]):
            return p
    raise CliError(
        f"no project {wanted!r}",
        "`orkestr projects` lists the projects this token can see",
    )


def resolve_addon(c: Client, project: dict[str, Any], given: str) -> dict[str, Any]:
    addons = c.list_all(f"/v1/projects/{project['id']}/addons", "addons")
    live = [a for a in addons if a["deleted_at"] is None]
    for a in live + addons:  # a live add-on's name wins over a deleted one's
        if given in (a["id"], a["name"]):
            return a
    raise CliError(
        f"no add-on {given!r} in project {project['name']}",
        f"`orkestr addons list -p {project['name']}` lists them",
    )


def operator_request(c: Client, what: str, method: str, path: str, body: Any = None) -> Any:
    """A call only the operator's token may make. The API hides those routes from project
    tokens (404, as if absent); here the CLI knows the route exists, so it says why."""
    try:
        return c.request(method, path, body)
    except ApiFailure as exc:
        if exc.status != 404 or exc.api_message != "no such route":
            raise
        raise CliError(
            f"{what} needs the operator's token; this token is a project's",
            "ask the operator, or `orkestr login` with the operator token",
        ) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="orkestr-addons", prog_name="orkestr")
def main() -> None:
    """Managed PostgreSQL and Redis for orkestr projects.

    Start with `orkestr login`, then `orkestr projects` and `orkestr addons create`.
    Shell completion: `eval "$(orkestr completion bash)"` (or zsh, fish).
    """


# --- login and completion -----------------------------------------------------------------


@main.command()
@click.option("--api", default="", help="The controller's API URL, e.g. http://127.0.0.1:8080.")
@click.option("--token", default="", help="An operator or project token (asked for when left out).")
@click.option("--project", default="", help="A default project name for later commands.")
@json_option
def login(api: str, token: str, project: str, as_json: bool) -> None:
    """Check and save the API URL and token (a file only you can read)."""
    try:
        saved = settings.load()
    except ValueError:
        saved = settings.Settings()
    api = api or saved.api or "http://127.0.0.1:8080"
    if not token:
        if not sys.stdin.isatty():
            token = sys.stdin.readline().strip()
        else:
            token = click.prompt("Token", hide_input=True).strip()
    if not token:
        raise CliError(
            "no token given",
            "pass --token TOKEN, or the token on stdin (`orkestr login < token_file`)",
        )
    c = Client(api, token)
    projects = c.list_all("/v1/projects", "projects")
    chosen = resolve_project(c, project)["name"] if project else ""
    path = settings.save(settings.Settings(api=c.api, token=token, project=chosen))
    summary = {"api": c.api, "projects": len(projects), "project": chosen, "config": str(path)}
    if as_json:
        render.emit_json(summary)
        return
    render.out.print(
        f"Logged in to {c.api}: {len(projects)} project(s) visible"
        + (f", default project {chosen}" if chosen else "")
        + f". Saved to {path} (mode 0600)."
    )


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: eval "$(orkestr completion bash)"."""
    cls = get_completion_class(shell)
    assert cls is not None  # the Choice admits only the shells click knows
    click.echo(cls(main, {}, "orkestr", "_ORKESTR_COMPLETE").source())


# --- projects -------------------------------------------------------------------------


def _project_rows(projects: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(p["name"], p["plan"], p["host"], p["id"], p["created_at"]) for p in projects]


@main.group(invoke_without_command=True)
@json_option
@click.pass_context
def projects(ctx: click.Context, as_json: bool) -> None:
    """List the projects (or create, re-plan or delete one: `orkestr projects --help`)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(projects_list, as_json=as_json)


@projects.command("list")
@json_option
def projects_list(as_json: bool) -> None:
    """List the projects this token can see."""
    found = client().list_all("/v1/projects", "projects")
    if as_json:
        render.emit_json({"projects": found})
        return
    render.table(
        ("NAME", "PLAN", "HOST", "ID", "CREATED"),
        _project_rows(found),
        "no projects: `orkestr projects create NAME --plan starter`",
    )


@projects.command("create")
@click.argument("name")
@click.option("--plan", default="starter", show_default=True, help="starter, pro or team.")
@json_option
def projects_create(name: str, plan: str, as_json: bool) -> None:
    """Create a project (operator token)."""
    body = {"name": name, "plan": plan}
    project = operator_request(client(), "creating a project", "POST", "/v1/projects", body)
    if as_json:
        render.emit_json(project)
        return
    render.out.print(f"Created project {project['name']} ({project['plan']}) on {project['host']}.")


@projects.command("plan")
@click.argument("name")
@click.argument("plan")
@json_option
def projects_plan(name: str, plan: str, as_json: bool) -> None:
    """Move project NAME to PLAN in place, no restart (operator token); a downgrade the
    project would not fit is refused, naming what does not fit."""
    c = client()
    p = resolve_project(c, name)
    moved = operator_request(
        c, "changing a plan", "PATCH", f"/v1/projects/{p['id']}", {"plan": plan}
    )
    if as_json:
        render.emit_json(moved)
        return
    render.out.print(
        f"Project {moved['name']} is on plan {moved['plan']}; its host resizes its add-ons"
        " and apps in place."
    )


@projects.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask; every add-on's data is deleted.")
@json_option
def projects_delete(name: str, yes: bool, as_json: bool) -> None:
    """Delete project NAME with its apps, add-ons, data and backups (operator token)."""
    c = client()
    p = resolve_project(c, name)
    if not yes:
        if not sys.stdin.isatty():
            raise CliError(
                f"deleting project {p['name']} deletes every add-on's data and backups",
                "pass --yes to confirm",
            )
        click.confirm(f"Delete project {p['name']}, its add-ons, data and backups?", abort=True)
    gone = operator_request(c, "deleting a project", "DELETE", f"/v1/projects/{p['id']}")
    if as_json:
        render.emit_json(gone)
        return
    render.out.print(
        f"Project {gone['name']} is being deleted; its host removes its apps, add-ons and data."
    )


# --- add-ons --------------------------------------------------------------------------


@main.group()
def addons() -> None:
    """Create, list, inspect, rotate and delete add-ons."""


@addons.command("list")
@project_option
@click.option("--all", "show_all", is_flag=True, help="Include deleted add-ons still listed.")
@json_option
def addons_list(project: str, show_all: bool, as_json: bool) -> None:
    """List the project's add-ons."""
    c = client()
    p = resolve_project(c, project)
    found = c.list_all(f"/v1/projects/{p['id']}/addons", "addons")
    if not show_all:
        found = [a for a in found if a["deleted_at"] is None]
    if as_json:
        render.emit_json({"addons": found})
        return
    render.table(
        ("NAME", "KIND", "PHASE", "SLEEP", "VARIABLES", "ID"),
        [
            (
                a["name"],
                a["kind"],
                a["phase"],
                a["sleep_state"],
                ", ".join(a.get("variables") or [a["env_var"]]),
                a["id"],
            )
            for a in found
        ],
        f"no add-ons in {p['name']}: `orkestr addons create NAME --kind postgres`",
    )


def _wait_phase(c: Client, project_id: str, addon: dict[str, Any], timeout_s: float) -> Any:
    """Poll the add-on until it is healthy (ready or asleep), showing its phase meanwhile."""
    path = f"/v1/projects/{project_id}/addons/{addon['id']}"
    deadline = time.monotonic() + timeout_s
    seen = ""
    started = time.monotonic()
    with render.err.status(f"{addon['name']}: {addon['phase']}") as status:
        while True:
            addon = c.get(path)
            phase = addon["phase"]
            if phase != seen:
                seen = phase
                if not render.err.is_terminal:  # no spinner: one line per change
                    render.err.print(f"{addon['name']}: {phase}")
            status.update(f"{addon['name']}: {phase} ({time.monotonic() - started:.0f}s)")
            if phase in HEALTHY:
                return addon
            if phase == "failed":
                reasons = "; ".join(
                    f"{x['type']}={x['reason']}: {x['message']}"
                    for x in addon["conditions"]
                    if x["status"] == "False"
                )
                raise CliError(
                    f"add-on {addon['name']} failed: {reasons}",
                    f"`orkestr addons info {addon['name']}` shows its conditions",
                )
            if time.monotonic() > deadline:
                raise CliError(
                    f"add-on {addon['name']} is still {phase} after {timeout_s:g}s",
                    f"it may still get there: `orkestr addons info {addon['name']}`",
                )
            time.sleep(POLL_S)


@addons.command("create")
@click.argument("name")
@click.option(
    "--kind", type=click.Choice(["postgres", "redis"]), default="postgres", show_default=True
)
@project_option
@click.option("--wait", is_flag=True, help="Wait (with a progress display) until it is ready.")
@click.option(
    "--timeout", default=300.0, type=params.WAIT, show_default=True, help="Seconds --wait waits."
)
@json_option
def addons_create(
    name: str, kind: str, project: str, wait: bool, timeout: float, as_json: bool
) -> None:
    """Create an add-on; its variables reach the project's environment."""
    c = client()
    p = resolve_project(c, project)
    addon = c.request("POST", f"/v1/projects/{p['id']}/addons", {"name": name, "kind": kind})
    if wait:
        addon = _wait_phase(c, p["id"], addon, timeout)
    if as_json:
        render.emit_json(addon)
        return
    render.out.print(
        f"{addon['name']} ({addon['kind']}) is {addon['phase']}; "
        f"reachable as {addon['hostname']}:{addon['port']}, variable {addon['env_var']}."
    )


@addons.command("wait")
@click.argument("name")
@project_option
@click.option(
    "--timeout",
    default=300.0,
    type=params.WAIT,
    show_default=True,
    help="Seconds to wait at most.",
)
@json_option
def addons_wait(name: str, project: str, timeout: float, as_json: bool) -> None:
    """Wait until an add-on is healthy: ready, or asleep (it wakes when a client connects)."""
    c = client()
    p = resolve_project(c, project)
    addon = _wait_phase(c, p["id"], resolve_addon(c, p, name), timeout)
    if as_json:
        render.emit_json(addon)
    elif addon["phase"] == "sleeping":
        render.out.print(
            f"{addon['name']} sleeps ({addon['sleep_state']}): healthy, it wakes when a "
            "client connects."
        )
    else:
        render.out.print(f"{addon['name']} is ready.")


@addons.command("info")
@click.argument("name")
@project_option
@json_option
def addons_info(name: str, project: str, as_json: bool) -> None:
    """Show an add-on: phase, address, variable, sizing, conditions."""
    c = client()
    a = resolve_addon(c, resolve_project(c, project), name)
    if as_json:
        render.emit_json(a)
        return
    render.fields(
        [
            ("name", a["name"]),
            ("kind", a["kind"]),
            ("phase", a["phase"]),
            ("sleep", a["sleep_state"]),
            ("address", f"{a['hostname']}:{a['port']}"),
            ("variables", ", ".join(a.get("variables") or [a["env_var"]])),
            ("primary", "yes" if a.get("primary") else "no"),
            ("protected", "yes" if a.get("deletion_protection") else "no"),
            ("resources", f"{a['resources']['cpus']} CPU, {a['resources']['memory_mb']} MB"),
            ("created", a["created_at"]),
            ("deleted", a["deleted_at"]),
            ("id", a["id"]),
        ]
    )
    if a["conditions"]:
        render.out.print()
        render.table(
            ("CONDITION", "STATUS", "REASON", "MESSAGE"),
            [(x["type"], x["status"], x["reason"], x["message"]) for x in a["conditions"]],
        )


@addons.command("promote")
@click.argument("name")
@project_option
@json_option
def addons_promote(name: str, project: str, as_json: bool) -> None:
    """Make an add-on its kind's primary (DATABASE_URL / REDIS_URL); the old one keeps
    its <NAME>_URL."""
    c = client()
    p = resolve_project(c, project)
    a = resolve_addon(c, p, name)
    a = c.request("POST", f"/v1/projects/{p['id']}/addons/{a['id']}/promote")
    if as_json:
        render.emit_json(a)
        return
    render.out.print(f"{a['name']} is now primary: {', '.join(a['variables'])}.")


@addons.command("env-name")
@click.argument("name")
@click.argument("variable", required=False)
@click.option("--clear", is_flag=True, help="Remove the custom name.")
@project_option
@json_option
def addons_env_name(
    name: str, variable: str | None, clear: bool, project: str, as_json: bool
) -> None:
    """Give an add-on an exact variable name besides <NAME>_URL (e.g. PG_URL)."""
    if bool(variable) == clear:
        raise CliError("give a VARIABLE name or --clear", "e.g. orkestr addons env-name db PG_URL")
    c = client()
    p = resolve_project(c, project)
    a = resolve_addon(c, p, name)
    a = c.request(
        "PATCH", f"/v1/projects/{p['id']}/addons/{a['id']}", {"env_name": variable or None}
    )
    if as_json:
        render.emit_json(a)
        return
    render.out.print(f"{a['name']} gives {', '.join(a['variables'])}.")


@addons.command("protect")
@click.argument("name")
@click.option("--off", is_flag=True, help="Clear the protection (deleting works again).")
@project_option
@json_option
def addons_protect(name: str, off: bool, project: str, as_json: bool) -> None:
    """Protect an add-on from deletion: deleting it or its project is refused until
    `--off` clears it."""
    c = client()
    p = resolve_project(c, project)
    a = resolve_addon(c, p, name)
    a = c.request(
        "PATCH", f"/v1/projects/{p['id']}/addons/{a['id']}", {"deletion_protection": not off}
    )
    if as_json:
        render.emit_json(a)
    elif a["deletion_protection"]:
        render.out.print(f"{a['name']} is protected: deleting it or its project is refused.")
    else:
        render.out.print(f"{a['name']} is no longer protected from deletion.")


@addons.command("rotate")
@click.argument("name")
@project_option
@json_option
def addons_rotate(name: str, project: str, as_json: bool) -> None:
    """Give an add-on a new password; the previous one keeps working for the
    controller's grace period (1 h unless configured), then stops."""
    c = client()
    p = resolve_project(c, project)
    a = resolve_addon(c, p, name)
    a = c.request("POST", f"/v1/projects/{p['id']}/addons/{a['id']}/rotate-credentials")
    if as_json:
        render.emit_json(a)
        return
    # Jobs run with the newest release's variables once there is one, as the apps do.
    released = c.get(f"/v1/projects/{p['id']}/releases?limit=1")["releases"]
    then = (
        "; the apps and jobs get them with the next deploy (`orkestr deploy`): deploy before"
        " the grace period ends"
        if released
        else ", and jobs get them now"
    )
    render.out.print(
        f"{a['name']} has new credentials (secret version {a['secret_version']}) in"
        f" {', '.join(a['variables'])}: `orkestr env` shows them{then}."
    )


@addons.command("delete")
@click.argument("name")
@project_option
@click.option("--yes", is_flag=True, help="Do not ask; the data is deleted with it.")
@json_option
def addons_delete(name: str, project: str, yes: bool, as_json: bool) -> None:
    """Delete an add-on and its data."""
    c = client()
    p = resolve_project(c, project)
    a = resolve_addon(c, p, name)
    if not yes:
        if not sys.stdin.isatty():
            # Its backups leave the API with it (docs/api.md): no restore after this.
            raise CliError(
                f"deleting {a['name']} deletes its data, and its backups with it",
                "pass --yes to confirm",
            )
        click.confirm(
            f"Delete {a['name']}, its data and its backups in project {p['name']}?", abort=True
        )
    gone = c.request("DELETE", f"/v1/projects/{p['id']}/addons/{a['id']}")
    if as_json:
        render.emit_json(gone)
        return
    render.out.print(f"{gone['name']} is {gone['phase']}; its host removes container and data.")


# --- variables ------------------------------------------------------------------------


@main.group(invoke_without_command=True)
@project_option
@click.option("--shell", is_flag=True, help="Print `export NAME='value'` lines.")
@json_option
@click.pass_context
def env(ctx: click.Context, project: str, shell: bool, as_json: bool) -> None:
    """Show the project's variables (with the passwords in them)."""
    if ctx.invoked_subcommand is not None:
        return
    c = client()
    p = resolve_project(c, project)
    variables: dict[str, str] = c.get(f"/v1/projects/{p['id']}/env")["env"]
    if as_json:
        render.emit_json({"env": variables})
    elif shell:
        for key, value in sorted(variables.items()):
            click.echo(f"export {key}='" + value.replace("'", "'\\''") + "'")
    else:
        render.lines(
            ("NAME", "VALUE"),
            sorted(variables.items()),
            f"no variables in {p['name']}: add an add-on first",
        )


def _group_project(ctx: click.Context) -> str:
    """`orkestr env -p shop set ...`: the group's --project counts too."""
    parent = ctx.parent.params if ctx.parent is not None else {}
    return str(parent.get("project") or "")


def _print_env(variables: dict[str, str], as_json: bool, changed: str) -> None:
    if as_json:
        render.emit_json({"env": variables})
    else:
        render.out.print(changed)


@env.command("set")
@click.argument("assignments", nargs=-1, required=True, metavar="NAME=VALUE...")
@project_option
@json_option
@click.pass_context
def env_set(ctx: click.Context, assignments: tuple[str, ...], project: str, as_json: bool) -> None:
    """Set the project's own variables (add-on variables cannot be overwritten)."""
    project = project or _group_project(ctx)
    pairs: dict[str, str] = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CliError(f"{item!r} is not NAME=VALUE", "e.g. orkestr env set DEBUG=0")
        pairs[name] = value
    c = client()
    p = resolve_project(c, project)
    result = c.request("PATCH", f"/v1/projects/{p['id']}/env", {"set": pairs})
    _print_env(result["env"], as_json, f"Set {', '.join(sorted(pairs))} in {p['name']}.")


@env.command("unset")
@click.argument("names", nargs=-1, required=True)
@project_option
@json_option
@click.pass_context
def env_unset(ctx: click.Context, names: tuple[str, ...], project: str, as_json: bool) -> None:
    """Unset the project's own variables."""
    project = project or _group_project(ctx)
    c = client()
    p = resolve_project(c, project)
    path = f"/v1/projects/{p['id']}/env"
    before = c.get(path)["env"]
    result = c.request("PATCH", path, {"unset": list(names)})
    # The API unsets the project's own variables and ignores other names: say which
    # names were not set, and refuse to claim an add-on's variable gone (it stays).
    kept = [n for n in names if n in result["env"]]
    gone = [n for n in names if n in before and n not in kept]
    absent = [n for n in names if n not in before]
    said = (f"Unset {', '.join(gone)} in {p['name']}." if gone else "Nothing unset.") + (
        f" Not set: {', '.join(absent)}." if absent else ""
    )
    if kept:
        raise CliError(
            f"{said} {', '.join(kept)}: an add-on's variable (its own or shared in a group), "
            "not the project's; it stays",
            "`orkestr addons promote`, `orkestr addons env-name` or deleting the add-on changes it",
        )
    _print_env(result["env"], as_json, said)


# --- releases and apps ----------------------------------------------------------------


def _release_rows(found: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            f"v{r['number']}",
            r["description"],
            ", ".join(a["name"] for a in r["apps"]) or "-",
            len(r["variables"]),
            r["created_at"],
        )
        for r in found
    ]


@main.command()
@project_option
@click.option(
    "--app",
    "apps",
    multiple=True,
    metavar="NAME=IMAGE",
    help="An app to run (repeatable); left out, the newest release's apps again.",
)
@click.option(
    "--command",
    "commands",
    multiple=True,
    metavar="NAME=ARGV",
    help=(
        "An app's command, split into words by Python's shlex (e.g. web='sh -c \"exec serve\"');"
        ' inside double quotes only \\" and \\\\ are escapes, so write $VAR there, not \\$VAR.'
    ),
)
@json_option
def deploy(project: str, apps: tuple[str, ...], commands: tuple[str, ...], as_json: bool) -> None:
    """Deploy: a new release with the project's variables now; its apps run with them."""
    body: dict[str, Any] = {}  # checked before any request
    if apps:
        parsed: dict[str, dict[str, Any]] = {}
        for item in apps:
            name, sep, image = item.partition("=")
            if not sep or not name or not image:
                raise CliError(f"--app {item!r} is not NAME=IMAGE", "e.g. --app web=IMAGE")
            parsed[name] = {"image": image}
        for item in commands:
            name, sep, argv = item.partition("=")
            if name not in parsed:
                raise CliError(f"--command {item!r} names no --app", "give NAME=ARGV of an app")
            try:
                parsed[name]["command"] = shlex.split(argv)
            except ValueError as exc:  # "No closing quotation", "No escaped character"
                raise CliError(
                    f"--command {item!r} cannot be split into words: {exc}",
                    "close the quotes, e.g. --command web='sh -c \"exec serve\"'",
                ) from None
        body["apps"] = parsed
    elif commands:
        raise CliError("--command needs --app", "e.g. --app web=IMAGE --command web='...'")
    c = client()
    p = resolve_project(c, project)
    release = c.request("POST", f"/v1/projects/{p['id']}/releases", body)
    if as_json:
        render.emit_json(release)
        return
    names = ", ".join(a["name"] for a in release["apps"]) or "no apps"
    render.out.print(
        f"Released v{release['number']} of {p['name']} ({names}) with "
        f"{len(release['variables'])} variable(s)."
    )


@main.command("releases")
@project_option
@json_option
def releases_list(project: str, as_json: bool) -> None:
    """List the project's releases, newest first."""
    c = client()
    p = resolve_project(c, project)
    found = c.list_all(f"/v1/projects/{p['id']}/releases", "releases")
    if as_json:
        render.emit_json({"releases": found})
        return
    render.table(
        ("RELEASE", "DESCRIPTION", "APPS", "VARIABLES", "CREATED"),
        _release_rows(found),
        f"no releases in {p['name']}: `orkestr deploy --app web=IMAGE`",
    )


@main.command()
@click.argument("release")
@project_option
@json_option
def rollback(release: str, project: str, as_json: bool) -> None:
    """Roll back to RELEASE (e.g. v3): a new release with its variables and apps."""
    number = release.lstrip("v")
    if not number.isdigit():
        raise CliError(f"{release!r} is not a release", "e.g. orkestr rollback v3")
    c = client()
    p = resolve_project(c, project)
    made = c.request("POST", f"/v1/projects/{p['id']}/releases/{int(number)}/rollback")
    if as_json:
        render.emit_json(made)
        return
    render.out.print(f"Released v{made['number']}: {made['description']}.")


@main.command("apps")
@project_option
@json_option
def apps_list(project: str, as_json: bool) -> None:
    """The apps of the newest release: their state, restarts, last exit, and the
    variables they still lack."""
    c = client()
    p = resolve_project(c, project)
    found = c.get(f"/v1/projects/{p['id']}/apps")["apps"]
    if as_json:
        render.emit_json({"apps": found})
        return
    render.table(
        ("APP", "IMAGE", "RELEASE", "STATE", "RESTARTS", "LAST EXIT", "PENDING"),
        [
            (
                a["name"],
                a["image"],
                _app_release(a),
                a["state"] or "no report yet",
                a["restart_count"],
                _last_exit(a),
                a["message"] or "-",
            )
            for a in found
        ],
        f"no apps in {p['name']}: `orkestr deploy --app web=IMAGE`",
    )


def _app_release(app: dict[str, Any]) -> str:
    running = app["running_release"]
    if running is None or running == app["release"]:
        return f"v{app['release']}"
    return f"v{app['release']} (runs v{running})"


def _last_exit(app: dict[str, Any]) -> str:
    if app["oom_killed"]:
        return f"OOM-killed (exit {app['last_exit_code']})"
    if app["last_exit_code"] is None:
        return "-"
    return f"exit {app['last_exit_code']}"


# --- jobs -----------------------------------------------------------------------------


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@project_option
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="The job's image.")
@click.option(
    "--timeout", default=600.0, type=params.RUN, show_default=True, help="Seconds the job may run."
)
@json_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(project: str, image: str, timeout: float, as_json: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND as a one-off job with the project's variables; exit with its code.

    Example: orkestr run -- sh -c 'psql "$DATABASE_URL" -c "select 1"' (the single
    quotes keep $DATABASE_URL for the job's shell; unquoted, your own shell would
    expand it, usually to nothing). Once the project has a release, jobs get that
    release's variables, as its apps do: a variable added since (a new add-on's) comes
    with the next `orkestr deploy`.
    """
    c = client()
    p = resolve_project(c, project)
    _note_release_variables(c, p)
    job = c.request(
        "POST",
        f"/v1/projects/{p['id']}/jobs",
        {"image": image, "command": list(command), "timeout_s": timeout},
    )
    path = f"/v1/projects/{p['id']}/jobs/{job['id']}"
    try:
        if as_json:
            with render.err.status(f"job {job['id'][:8]}: pending"):
                while job["state"] == "pending":
                    time.sleep(POLL_S)
                    job = c.get(path)
        else:
            _stream_output(c, path, job["id"])
            job = c.get(path)
    except KeyboardInterrupt:
        try:
            c.request("POST", path + "/cancel")
            render.err.print(f"cancelled job {job['id']}")
        except ApiFailure as exc:
            render.err.print(f"could not cancel job {job['id']}: {exc.api_message}")
        sys.exit(130)
    if as_json:
        render.emit_json(job)
    elif job["error"]:
        render.err.print(f"job {job['state']}: {job['error']}")
        render.err.print(f"  hint: {_job_hint(job['error'])}")
    code = job["exit_code"]
    sys.exit(code if code is not None else (0 if job["state"] == "succeeded" else 1))


def _note_release_variables(c: Client, p: dict[str, Any]) -> None:
    """A job that reads a variable its release lacks fails with a puzzling empty URL:
    say before it runs which ones come only with the next deploy (and which ones, gone
    from the project since, it still gets)."""
    releases = c.get(f"/v1/projects/{p['id']}/releases?limit=1")["releases"]
    if not releases:
        return  # no release: jobs get the current variables
    released = set(releases[0]["variables"])
    current = set(c.get(f"/v1/projects/{p['id']}/env")["env"])
    apps = c.get(f"/v1/projects/{p['id']}/apps")["apps"]
    if apps:
        pending = apps[0]["pending_variables"]  # values compared too (a rotation)
    else:  # a release without apps shows its variables' names only
        pending = sorted(current ^ released)
    gone = [n for n in pending if n not in current]
    coming = [n for n in pending if n in current]
    said = []
    if coming:
        said.append(f"{', '.join(coming)} come(s) with the next `orkestr deploy`")
    if gone:
        names = ", ".join(gone)
        said.append(f"{names}, removed since, stay(s) set until the next `orkestr deploy`")
    if said:
        render.err.print(
            f"note: jobs run with release v{releases[0]['number']}'s variables; " + "; ".join(said)
        )


def _job_hint(error: str) -> str:
    if "timeout" in error:
        return "give it longer: `orkestr run --timeout SECONDS -- ...`"
    if "not allowed" in error:
        return "run an allowed image (`--image`; the message lists the patterns)"
    return "`orkestr run --help` shows the job's image, timeout and command"


def _stream_output(c: Client, path: str, job_id: str) -> None:
    """Print the job's output as it arrives, until the stream is complete (the long poll
    of GET .../output; each call waits up to FOLLOW_WAIT_S for more)."""
    after = 0
    waiting = render.err.status(f"job {job_id[:8]}: waiting for output")
    waiting.start()
    try:
        while True:
            page = c.get(f"{path}/output?after={after}&wait={FOLLOW_WAIT_S}")
            if page["output"] or page["lost"]:
                waiting.stop()
            if page["lost"]:
                render.err.print(
                    f"[{page['lost']} characters of output not streamed (too fast, or lost); "
                    f"the job's final output, GET {path}, keeps its last part]"
                )
            sys.stdout.write(page["output"])
            sys.stdout.flush()
            after = page["next_offset"]
            if page["complete"]:
                return
    finally:
        waiting.stop()


# --- sleep ----------------------------------------------------------------------------


@main.group()
def sleep() -> None:
    """What keeps add-ons awake."""


def sleep_summary(addon: dict[str, Any]) -> str:
    """One line on what keeps the add-on awake: its plan (Team never sleeps), or clients."""
    sleeping = next((x for x in addon["conditions"] if x["type"] == "Sleeping"), None)
    if sleeping is not None and sleeping["reason"] == "Disabled":
        return f"It never sleeps: {sleeping['message']}."
    if not addon["clients"]:
        return "No client connections: nothing keeps it awake."
    return f"{len(addon['clients'])} client connection(s) keep it awake:"


@sleep.command("status")
@click.argument("name")
@project_option
@json_option
def sleep_status(name: str, project: str, as_json: bool) -> None:
    """Show an add-on's sleep state and the clients (by source) keeping it awake."""
    c = client()
    a = resolve_addon(c, resolve_project(c, project), name)
    by_source: dict[str, dict[str, Any]] = collections.defaultdict(
        lambda: {"connections": 0, "via": set()}
    )
    for client_ in a["clients"]:
        source = client_["source"].rsplit(":", 1)[0]
        by_source[source]["connections"] += 1
        by_source[source]["via"].add(client_["via"])
    sources = [
        {"source": s, "connections": v["connections"], "via": sorted(v["via"])}
        for s, v in sorted(by_source.items(), key=lambda kv: (-kv[1]["connections"], kv[0]))
    ]
    if as_json:
        render.emit_json(
            {
                "addon": a["name"],
                "id": a["id"],
                "phase": a["phase"],
                "sleep_state": a["sleep_state"],
                "last_activity": a["last_activity"],
                "sleeps": a["sleeps"],
                "wakes": a["wakes"],
                "last_wake_ms": a["last_wake_ms"],
                "clients_by_source": sources,
            }
        )
        return
    render.fields(
        [
            ("add-on", a["name"]),
            ("state", a["sleep_state"] or "unknown (no report yet)"),
            ("last activity", a["last_activity"]),
            ("sleeps / wakes", f"{a['sleeps']} / {a['wakes']}"),
            (
                "recent wakes",
                ", ".join(f"{ms:.0f} ms" for ms in a["last_wake_ms"]) or "none",
            ),
        ]
    )
    render.out.print()
    render.out.print(sleep_summary(a))
    if not sources:
        return
    render.table(
        ("SOURCE", "CONNECTIONS", "VIA"),
        [(s["source"], s["connections"], ", ".join(s["via"])) for s in sources],
    )


# The backup commands live in their own module, which uses the helpers above and adds
# its group to `main` when imported.
import cli.backups  # noqa: E402,F401

# Project groups live in their own module; importing it registers its commands here.
from cli import groups as _groups  # noqa: E402, F401
