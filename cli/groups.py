"""`orkestr groups ...` and `orkestr addons share|unshare`: project groups from a shell.

The operator creates groups and adds members; a project's owner shares its add-ons in
the groups it belongs to, naming the variable the other members get.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from cli import render
from cli.client import ApiFailure, Client, CliError
from cli.main import (
    addons,
    client,
    json_option,
    main,
    project_option,
    resolve_addon,
    resolve_project,
)


def resolve_group(c: Client, given: str, project: dict[str, Any] | None = None) -> dict[str, Any]:
    """A group by name or id: among all groups (operator), or the project's."""
    path = f"/v1/projects/{project['id']}/groups" if project else "/v1/groups"
    try:
        found = c.list_all(path, "groups")
    except ApiFailure as exc:
        if exc.status != 404 or project is not None:
            raise
        raise CliError(
            "only the operator lists every group",
            "pass --project NAME to look among that project's groups",
        ) from None
    for g in found:
        if given in (g["id"], g["name"]):
            return g
    if project is None:
        raise CliError(f"no group {given!r}", "`orkestr groups list` lists them")
    # Shares are made in the project's own groups: the group may exist without it.
    raise CliError(
        f"project {project['name']} is in no group {given!r}",
        f"`orkestr groups list -p {project['name']}` lists its groups; the operator adds it "
        f"to one: `orkestr groups add GROUP {project['name']}`",
    )


def _rows(found: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            g["name"],
            g["host"] or "-",
            ", ".join(m["name"] for m in g["members"]) or "-",
            ", ".join(f"{s['env_name']} ({s['addon_name']})" for s in g["shares"]) or "-",
            g["id"],
        )
        for g in found
    ]


def _show(group: dict[str, Any], as_json: bool, said: str) -> None:
    if as_json:
        render.emit_json(group)
        return
    render.out.print(said)
    render.table(
        ("MEMBER", "HOST", "ID"),
        [(m["name"], m["host"], m["project_id"]) for m in group["members"]],
        "no members: `orkestr groups add GROUP PROJECT`",
    )
    render.table(
        ("VARIABLE", "ADD-ON", "KIND", "HOST NAME", "SHARED BY"),
        [
            (s["env_name"], s["addon_name"], s["kind"], s["host_name"], s["project_id"])
            for s in group["shares"]
        ],
        "nothing shared: `orkestr addons share ADDON GROUP VARIABLE -p PROJECT`",
    )


@main.group(invoke_without_command=True)
@project_option
@json_option
@click.pass_context
def groups(ctx: click.Context, project: str, as_json: bool) -> None:
    """Project groups: members share add-ons their owners choose (list by default)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(groups_list, project=project, as_json=as_json)


@groups.command("list")
@project_option
@json_option
def groups_list(project: str, as_json: bool) -> None:
    """List every group (operator), or with --project that project's groups."""
    c = client()
    if project:
        p = resolve_project(c, project)
        found = c.list_all(f"/v1/projects/{p['id']}/groups", "groups")
    else:
        try:
            found = c.list_all("/v1/groups", "groups")
        except ApiFailure as exc:
            if exc.status != 404:
                raise
            p = resolve_project(c, "")  # a project token: its own project's groups
            found = c.list_all(f"/v1/projects/{p['id']}/groups", "groups")
    if as_json:
        render.emit_json({"groups": found})
        return
    render.table(
        ("NAME", "HOST", "MEMBERS", "SHARED", "ID"),
        _rows(found),
        "no groups: `orkestr groups create NAME` (operator)",
    )


@groups.command("create")
@click.argument("name")
@json_option
def groups_create(name: str, as_json: bool) -> None:
    """Create a group (operator token)."""
    group = client().request("POST", "/v1/groups", {"name": name})
    if as_json:
        render.emit_json(group)
        return
    render.out.print(
        f"Created group {group['name']}. Add projects: `orkestr groups add {name} PROJECT`."
    )


@groups.command("info")
@click.argument("group")
@project_option
@json_option
def groups_info(group: str, project: str, as_json: bool) -> None:
    """A group's members and what is shared in it."""
    c = client()
    p = resolve_project(c, project) if project else None
    g = resolve_group(c, group, p)
    _show(g, as_json, f"Group {g['name']} on {g['host'] or 'no host yet'}:")


@groups.command("add")
@click.argument("group")
@click.argument("project")
@json_option
def groups_add(group: str, project: str, as_json: bool) -> None:
    """Make PROJECT a member of GROUP (operator token; members share one host)."""
    c = client()
    g = resolve_group(c, group)
    p = resolve_project(c, project)
    updated = c.request("PUT", f"/v1/groups/{g['id']}/members/{p['id']}")
    _show(updated, as_json, f"{p['name']} is a member of {g['name']}.")


@groups.command("remove")
@click.argument("group")
@click.argument("project")
@json_option
def groups_remove(group: str, project: str, as_json: bool) -> None:
    """Take PROJECT out of GROUP (operator token); its shares go, access is cut at once."""
    c = client()
    g = resolve_group(c, group)
    p = resolve_project(c, project)
    updated = c.request("DELETE", f"/v1/groups/{g['id']}/members/{p['id']}")
    _show(updated, as_json, f"{p['name']} left {g['name']}.")


@groups.command("delete")
@click.argument("group")
@click.option("--yes", is_flag=True, help="Do not ask; members lose the shared add-ons.")
@json_option
def groups_delete(group: str, yes: bool, as_json: bool) -> None:
    """Delete a group (operator token): members lose its shared add-ons at once."""
    c = client()
    g = resolve_group(c, group)
    if not yes:
        if not sys.stdin.isatty():
            raise CliError(f"deleting {g['name']} cuts its members off", "pass --yes to confirm")
        click.confirm(f"Delete group {g['name']}?", abort=True)
    c.request("DELETE", f"/v1/groups/{g['id']}")
    if as_json:
        render.emit_json({"deleted": g["id"]})
        return
    render.out.print(f"Deleted group {g['name']}.")


@addons.command("share")
@click.argument("name")
@click.argument("group")
@click.argument("variable")
@project_option
@json_option
def addons_share(name: str, group: str, variable: str, project: str, as_json: bool) -> None:
    """Share add-on NAME in GROUP: the other members get its URL as VARIABLE (<NAME>_URL)."""
    c = client()
    p = resolve_project(c, project)
    a = resolve_addon(c, p, name)
    g = resolve_group(c, group, p)
    updated = c.request(
        "PUT",
        f"/v1/projects/{p['id']}/groups/{g['id']}/shares/{a['id']}",
        {"env_name": variable},
    )
    _show(
        updated,
        as_json,
        f"{a['name']} is shared in {g['name']}: the other members get {variable} "
        "(apps on their next deploy).",
    )


@addons.command("unshare")
@click.argument("name")
@click.argument("group")
@project_option
@json_option
def addons_unshare(name: str, group: str, project: str, as_json: bool) -> None:
    """Stop sharing add-on NAME in GROUP; the other members lose it at once."""
    c = client()
    p = resolve_project(c, project)
    a = resolve_addon(c, p, name)
    g = resolve_group(c, group, p)
    c.request("DELETE", f"/v1/projects/{p['id']}/groups/{g['id']}/shares/{a['id']}")
    if as_json:
        render.emit_json({"unshared": a["id"], "group": g["id"]})
        return
    render.out.print(f"{a['name']} is no longer shared in {g['name']}.")
    # Network and variable are gone, but the members have seen the password.
    render.out.print(
        f"The other members have seen its password: `orkestr addons rotate {a['name']}` "
        "gives it a new one."
    )
