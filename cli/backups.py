"""`orkestr backups`: list, take, restore and schedule an add-on's backups, through the API.

Each backup is test-restored by its host before it counts as good; the list shows that
verdict, and a restore of one that failed (or is not verified yet) is refused by the API.
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Any

import click

from cli import params, render
from cli.client import Client, CliError
from cli.main import (
    POLL_S,
    client,
    json_option,
    main,
    project_option,
    resolve_addon,
    resolve_project,
)


def _size(n: int | None) -> str:
    if n is None:
        return ""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


def _verdict(b: dict[str, Any]) -> str:
    if b["verifying"]:
        return "verifying"
    if b["verified"] is None:
        return "failed" if b["state"] == "failed" else "pending"
    return "verified" if b["verified"] else f"FAILED: {b['verify_error'] or ''}".strip()


def describe_counts(counts: dict[str, int]) -> str:
    """What the test restore compared: a Redis's keys, or the rows of each table."""
    if set(counts) == {"keys"}:
        return f"its {counts['keys']} key(s)"
    if not counts:
        return "an empty database"
    return f"{sum(counts.values())} row(s) in {len(counts)} table(s)"


def _target(project: str, addon: str) -> tuple[Client, dict[str, Any], str]:
    c = client()
    p = resolve_project(c, project)
    a = resolve_addon(c, p, addon)
    return c, a, f"/v1/projects/{p['id']}/addons/{a['id']}"


def _poll(c: Client, path: str, done: Any, what: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    with render.err.status(what):
        while True:
            item: dict[str, Any] = c.get(path)
            if done(item):
                return item
            if time.monotonic() > deadline:
                raise CliError(
                    f"{what}: not finished after {timeout_s:g}s", "it goes on; list it later"
                )
            time.sleep(POLL_S)


def _backup_done(b: dict[str, Any]) -> bool:
    return b["state"] != "pending" and not b["verifying"]


def match_backup(ids: list[str], given: str, addon: str) -> str:
    """The backup `given` names: a whole id, or the start of one (as the list shows it,
    cut to the terminal's width), like a short git commit id."""
    wanted = given.strip().rstrip("…").lower()
    found = [i for i in ids if i.startswith(wanted)] if wanted else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise CliError(
            f"no backup {given!r} of {addon} (an id, or its first characters)",
            f"`orkestr backups list {addon}` lists them",
        )
    raise CliError(f"{given!r} starts {len(found)} backup ids of {addon}", "give more of the id")


def first_backup_hint(addon: str, plan: dict[str, Any] | None) -> str:
    """How to get a first backup under the plan: take one, schedule them, or (a plan
    with neither, Starter) a plan that has backups."""
    if plan is None or plan["manual_backups_per_day"] > 0:
        return f"`orkestr backups capture {addon}`"
    if plan["backup_retention_days"] > 0:
        return f"`orkestr backups schedule {addon} --on` (plan {plan['name']!r}: automatic only)"
    return (
        f"plan {plan['name']!r} takes no backups; have the operator move the project to a "
        "plan that does (`orkestr projects plan NAME PLAN`)"
    )


@main.group()
def backups() -> None:
    """Back up an add-on, list its backups (each one test-restored), restore one."""


@backups.command("list")
@click.argument("addon")
@project_option
@json_option
def backups_list(addon: str, project: str, as_json: bool) -> None:
    """List an add-on's backups, newest first, with their verification."""
    c, a, path = _target(project, addon)
    found = c.list_all(f"{path}/backups", "backups")
    if as_json:
        render.emit_json({"backups": found})
        return
    empty = ""
    if not found:
        plan = c.get(f"{path}/backups").get("plan")
        empty = f"no backups of {a['name']} yet: " + first_backup_hint(a["name"], plan)
    render.table(
        ("CREATED", "KIND", "STATE", "SIZE", "DATA", "VERIFICATION", "SHA256", "ID"),
        [
            (
                b["created_at"],
                b["kind"],
                b["state"],
                _size(b["size_bytes"]),
                _size(b.get("data_bytes")),
                _verdict(b),
                (b["sha256"] or "")[:12],
                b["id"],
            )
            for b in found
        ],
        empty,
    )


@backups.command("capture")
@click.argument("addon")
@project_option
@click.option("--wait", is_flag=True, help="Wait until it is taken and verified.")
@click.option(
    "--timeout", default=1800.0, type=params.WAIT, show_default=True, help="Seconds --wait waits."
)
@json_option
def backups_capture(addon: str, project: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Take a backup now (the plan's daily limit applies)."""
    c, a, path = _target(project, addon)
    b = c.request("POST", f"{path}/backups")
    if wait:
        b = _poll(c, f"{path}/backups/{b['id']}", _backup_done, f"backup of {a['name']}", timeout)
    if as_json:
        render.emit_json(b)
    elif not wait:
        render.out.print(
            f"Backup {b['id']} of {a['name']} requested; "
            f"`orkestr backups list {a['name']}` shows it when done."
        )
    elif b["state"] == "succeeded" and b["verified"]:
        render.out.print(
            f"Backup {b['id']} of {a['name']}: {_size(b['size_bytes'])}, verified "
            f"(a test restore reproduced {describe_counts(b['counts'])})."
        )
    elif b["state"] == "failed":
        raise CliError(
            f"backup {b['id']} of {a['name']} failed: {b['error']}",
            f"a failed backup does not count against the day's limit: retry with "
            f"`orkestr backups capture {a['name']} --wait`",
        )
    else:
        raise CliError(
            f"backup {b['id']} of {a['name']}: {_verdict(b)}",
            f"it cannot be restored; take another (`orkestr backups capture {a['name']}`)",
        )


# `create` still works (earlier docs used it); `capture` is Heroku's `pg:backups:capture`.
backups.add_command(copy.copy(backups_capture), "create")
backups.commands["create"].hidden = True


@backups.command("restore")
@click.argument("addon")
@click.argument("backup_id")
@project_option
@click.option("--yes", is_flag=True, help="Do not ask; the add-on's current data is replaced.")
@click.option("--wait", is_flag=True, help="Wait until the restored data is live.")
@click.option(
    "--timeout", default=1800.0, type=params.WAIT, show_default=True, help="Seconds --wait waits."
)
@json_option
def backups_restore(
    addon: str, backup_id: str, project: str, yes: bool, wait: bool, timeout: float, as_json: bool
) -> None:
    """Restore a verified backup into the add-on (same address and credentials).

    BACKUP_ID: the id from `orkestr backups list`, or its first characters."""
    c, a, path = _target(project, addon)
    found = c.list_all(f"{path}/backups", "backups")
    backup_id = match_backup([b["id"] for b in found], backup_id, a["name"])
    if not yes:
        if not sys.stdin.isatty():
            raise CliError(f"restoring replaces the data of {a['name']}", "pass --yes to confirm")
        click.confirm(f"Replace the data of {a['name']} with backup {backup_id}?", abort=True)
    r = c.request("POST", f"{path}/backups/{backup_id}/restore")
    if wait:
        r = _poll(
            c,
            f"{path}/restores/{r['id']}",
            lambda x: x["state"] != "pending",
            f"restore of {a['name']}",
            timeout,
        )
    if as_json:
        render.emit_json(r)
    elif not wait:
        render.out.print(f"Restore {r['id']} of {a['name']} requested.")
    elif r["state"] == "succeeded":
        render.out.print(f"{a['name']} now serves backup {backup_id}.")
    else:
        raise CliError(f"restore of {a['name']} failed: {r['error']}", "its data is unchanged")


@backups.command("schedule")
@click.argument("addon")
@project_option
@click.option("--on/--off", "enabled", default=None, help="Turn automatic backups on or off.")
@click.option("--at", "time_of_day", default=None, help="Time of day, UTC (HH:MM).")
@json_option
def backups_schedule(
    addon: str, project: str, enabled: bool | None, time_of_day: str | None, as_json: bool
) -> None:
    """Show the automatic backups, or change them (--on/--off, --at)."""
    c, a, path = _target(project, addon)
    if enabled is None and time_of_day is None:
        s = c.get(f"{path}/backup-schedule")
    else:
        body = {
            k: v for k, v in (("enabled", enabled), ("time_of_day", time_of_day)) if v is not None
        }
        s = c.request("PATCH", f"{path}/backup-schedule", body)
    if as_json:
        render.emit_json(s)
        return
    state = f"daily at {s['time_of_day']} UTC" if s["enabled"] else "off"
    render.out.print(f"Automatic backups of {a['name']}: {state}.")
