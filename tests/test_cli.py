"""The `orkestr` CLI as a user runs it: the installed console script, as a subprocess,
against a real controller and a real agent (dockerd, mosquitto, PostgreSQL).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import stat
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.agent_fixtures import (
    TOOLBOX,
    AgentProcess,
    Stack,
    create_project,
    wait_for,
    wait_phase,
)
from tests.services import FakeAgent

pytest_plugins = ["tests.agent_fixtures"]

ORKESTR = str(Path(sys.executable).with_name("orkestr"))


class Cli:
    """Runs `orkestr` with its own config file and HOME, and no ORKESTR_* from outside."""

    def __init__(self, home: Path) -> None:
        self.config = home / "cfg" / "orkestr.json"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ORKESTR_")}
        self.env |= {"HOME": str(home), "ORKESTR_CONFIG": str(self.config), "COLUMNS": "250"}

    async def __call__(
        self, *args: str, stdin: str = "", env: dict[str, str] | None = None
    ) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            ORKESTR,
            *args,
            env=self.env | (env or {}),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 300)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def ok(self, *args: str, stdin: str = "") -> str:
        code, out, err = await self(*args, stdin=stdin)
        assert code == 0, (args, code, out, err)
        return out

    async def json(self, *args: str) -> Any:
        return json.loads(await self.ok(*args, "--json"))


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


async def test_login_checks_the_token_and_saves_it_for_its_owner_only(
    stack: Stack, cli: Cli
) -> None:
    c = stack.controller
    assert c is not None
    # Nothing configured: say so, and what to run.
    code, _, err = await cli("projects")
    assert code == 1 and "no API address configured" in err and "orkestr login" in err

    code, _, err = await cli("login", "--api", c.url, "--token", "wrong")
    assert code == 1
    assert "HTTP 401" in err and "run `orkestr login` with a valid one" in err
    assert not cli.config.exists()

    code, _, err = await cli("login", "--api", "http://127.0.0.1:1", "--token", "x")
    assert code == 1 and "cannot reach the API at http://127.0.0.1:1" in err

    # The token from stdin (never on the command line of a shared machine).
    out = await cli.ok("login", "--api", c.url + "/", stdin=c.operator_token + "\n")
    assert f"Logged in to {c.url}" in out and "0600" in out
    assert stat.S_IMODE(cli.config.stat().st_mode) == 0o600
    saved = json.loads(cli.config.read_text())
    assert saved == {"api": c.url, "token": c.operator_token, "project": ""}

    name = f"cli-{uuid.uuid4().hex[:6]}"
    code, out, err = await cli("projects", "create", name, "--plan", "team")
    if code != 0:  # no agent in this test: nowhere to place it
        assert "no_host_available" in err and "start one" in err
        return
    assert name in out


async def test_the_user_story_through_the_cli(stack: Stack, agent: AgentProcess, cli: Cli) -> None:
    c = stack.controller
    assert c is not None
    await cli.ok("login", "--api", c.url, "--token", c.operator_token)
    name = f"cli-{uuid.uuid4().hex[:6]}"
    # Pro: its add-ons sleep when idle, and report the clients that keep them awake.
    created = await cli.json("projects", "create", name, "--plan", "pro")
    assert created["name"] == name and created["host"] == agent.host
    assert name in await cli.ok("projects")
    listed = await cli.json("projects")
    assert name in [p["name"] for p in listed["projects"]]

    # Several projects are visible to the operator: the CLI asks which one.
    await create_project(c, "team")
    code, _, err = await cli("addons", "list")
    assert code == 1 and "several projects" in err and "--project" in err
    code, _, err = await cli("addons", "list", "-p", "nope")
    assert code == 1 and "no project 'nope'" in err and "orkestr projects" in err

    # --wait returns once the add-on is ready, not before.
    code, out, err = await cli("addons", "create", "orders-db", "-p", name, "--wait", "--json")
    assert code == 0, err
    made = json.loads(out)
    assert made["phase"] in ("ready", "sleeping") and made["env_var"] == "ORDERS_DB_URL"
    assert any(x["type"] == "Ready" and x["status"] == "True" for x in made["conditions"])
    assert "orders-db: provisioning" in err  # progress, on stderr
    code, _, err = await cli("addons", "create", "orders-db", "-p", name)
    assert code == 1 and "HTTP 409 conflict" in err

    out = await cli.ok("addons", "list", "-p", name)
    assert "orders-db" in out and "postgres" in out and made["id"] in out
    assert [a["name"] for a in (await cli.json("addons", "list", "-p", name))["addons"]] == [
        "orders-db"
    ]
    out = await cli.ok("addons", "info", "orders-db", "-p", name)
    assert "orders-db:5432" in out and "ORDERS_DB_URL" in out and "Ready" in out
    assert (await cli.json("addons", "info", made["id"], "-p", name))["id"] == made["id"]

    variables = (await cli.json("env", "-p", name))["env"]
    assert set(variables) == {"DATABASE_URL", "ORDERS_DB_URL"}
    out = await cli.ok("env", "-p", name)
    assert "DATABASE_URL" in out and variables["DATABASE_URL"] in out
    shell = await cli.ok("env", "-p", name, "--shell")
    assert f"export DATABASE_URL='{variables['DATABASE_URL']}'" in shell

    # run: the job's output on stdout, its exit code as ours.
    code, out, err = await cli(
        "run", "-p", name, "--", "sh", "-c", 'psql "$DATABASE_URL" -tAc "select 40 + 2"; exit 3'
    )
    assert code == 3, err
    assert out.strip() == "42"
    job = json.loads((await cli("run", "-p", name, "--json", "--", "sh", "-c", "echo hi"))[1])
    assert job["state"] == "succeeded" and job["exit_code"] == 0 and job["output"] == "hi\n"
    code, _, err = await cli("run", "-p", name, "--image", "alpine:3", "--", "true")
    assert code == 1 and "HTTP 422" in err and "alpine:3" in err
    code, _, err = await cli("run", "-p", name, "--timeout", "2", "--", "sleep", "60")
    assert code == 137 and "job failed: job exceeded its timeout" in err, err
    assert "hint: give it longer: `orkestr run --timeout SECONDS" in err, err
    # After a deploy, jobs get the release's variables: one set since waits for the next
    # deploy, and `run` says so before the job runs.
    await cli.ok("deploy", "-p", name, "--app", f"web={TOOLBOX}", "--command", "web=sleep 300")
    await cli.ok("env", "set", "-p", name, "LATER=1")
    code, out, err = await cli("run", "-p", name, "--", "sh", "-c", 'echo "[$LATER]"')
    assert code == 0 and out.strip() == "[]", (out, err)
    assert "note: jobs run with release v1's variables; LATER" in err, err
    # One removed since the release stays set for jobs until the next deploy: said so
    # (it was "LATER come(s) with the next deploy").
    await cli.ok("deploy", "-p", name)
    await cli.ok("env", "unset", "-p", name, "LATER")
    code, out, err = await cli("run", "-p", name, "--", "sh", "-c", 'echo "[$LATER]"')
    assert code == 0 and out.strip() == "[1]", (out, err)
    assert "v2's variables; LATER, removed since, stay(s) set until the next" in err, err

    # sleep status: a job holding a connection shows up as a client, by source. The
    # session checks its client every 0.2 s, so the job's cancel below ends it at once (a
    # backend in pg_sleep otherwise notices a closed client only when the sleep ends, and
    # the add-on's idle timer waited out the rest of the 30 s).
    hold = (
        'psql "$DATABASE_URL" -c "set client_connection_check_interval = 200" '
        '-c "select pg_sleep(30)"'
    )
    status, held = await c.api(
        "POST",
        f"/v1/projects/{created['id']}/jobs",
        {"image": TOOLBOX, "command": ["sh", "-c", hold]},
    )
    assert status == 201, held

    async def held_client() -> Any:
        # The add-on may be in light sleep when the job connects: the client is queued at
        # the paused database (listed already) until the wake it asked for is done.
        view = await cli.json("sleep", "status", "orders-db", "-p", name)
        return view if view["clients_by_source"] and view["sleep_state"] == "awake" else None

    view = await wait_for(held_client, 60, "a client of orders-db, awake")
    source = view["clients_by_source"][0]
    assert source["connections"] >= 1 and set(source["via"]) <= {"direct", "activator"}
    assert source["source"].count(".") == 3  # the job's address, without the port
    out = await cli.ok("sleep", "status", "orders-db", "-p", name)
    assert "keep it awake" in out and source["source"] in out
    await c.api("POST", f"/v1/projects/{created['id']}/jobs/{held['id']}/cancel")

    # A sleeping add-on is healthy: `addons wait` (what deploy/up.sh runs) says so at once.
    await wait_phase(c, created["id"], made["id"], "sleeping", timeout=60)
    started = time.monotonic()
    out = await cli.ok("addons", "wait", "orders-db", "-p", name, "--timeout", "120")
    assert time.monotonic() - started < 10
    assert "orders-db sleeps" in out and "healthy" in out

    # A project token sees its project alone, so no --project is needed.
    token = await c.new_project_token(created["id"])
    await cli.ok("login", "--api", c.url, "--token", token)
    assert [p["name"] for p in (await cli.json("projects"))["projects"]] == [name]
    assert "orders-db" in await cli.ok("addons", "list")

    # Delete asks for confirmation; without a terminal, --yes is the way.
    code, _, err = await cli("addons", "delete", "orders-db")
    assert code == 1 and "pass --yes" in err and "and its backups with it" in err, err
    gone = await cli.json("addons", "delete", "orders-db", "--yes")
    assert gone["phase"] == "deleting"
    assert (await cli.json("addons", "list"))["addons"] == []


async def test_variables_and_names_through_the_cli(stack: Stack, cli: Cli) -> None:
    c = stack.controller
    assert c is not None
    async with FakeAgent(f"h-{secrets.token_hex(5)}", stack.mosquitto) as host:
        await c.wait_host_online(host.host)
        await cli.ok("login", "--api", c.url, "--token", c.operator_token)
        name = f"vars-{uuid.uuid4().hex[:6]}"
        await cli.ok("projects", "create", name, "--plan", "team")
        await cli.ok("addons", "create", "old-db", "-p", name)
        await cli.ok("addons", "create", "new-db", "-p", name)

        out = await cli.ok("env", "-p", name, "set", "DEBUG=0", "GREETING=a=b c")
        assert "Set DEBUG, GREETING" in out
        variables = (await cli.json("env", "-p", name))["env"]
        assert variables["GREETING"] == "a=b c" and variables["DEBUG"] == "0"
        # Values are shown whole, on one line, however narrow the terminal: copied as they are.
        long = "postgresql://app:" + "p" * 150 + "@old-db:5432/app"
        await cli.ok("env", "-p", name, "set", f"LONG_URL={long}")
        code, out, err = await cli("env", "-p", name, env={"COLUMNS": "80"})
        assert code == 0, err
        shown = out.splitlines()
        assert any(line.split() == ["LONG_URL", long] for line in shown), shown
        assert any(line.split() == ["GREETING", "a=b", "c"] for line in shown), shown
        code, _, err = await cli("env", "set", "-p", name, "DATABASE_URL=x")
        assert code == 1 and "cannot be overwritten" in err and "HTTP 409" in err
        code, _, err = await cli("env", "set", "-p", name, "NOEQUALS")
        assert code == 1 and "is not NAME=VALUE" in err
        unset = await cli.json("env", "unset", "-p", name, "DEBUG")
        assert "DEBUG" not in unset["env"] and "GREETING" in unset["env"]
        # A name that was not set, or an add-on's variable, is not reported unset.
        out = await cli.ok("env", "unset", "-p", name, "GREETING", "NOPE")
        assert "Unset GREETING in " + name + ". Not set: NOPE." in out, out
        code, out, err = await cli("env", "unset", "-p", name, "DATABASE_URL")
        assert code == 1 and "Unset" not in out + err, (out, err)
        assert "DATABASE_URL: an add-on's variable" in err and "it stays" in err, err
        assert "\n  hint: `orkestr addons promote`" in err, err

        out = await cli.ok("addons", "promote", "new-db", "-p", name)
        assert "new-db is now primary: DATABASE_URL, NEW_DB_URL" in out
        variables = (await cli.json("env", "-p", name))["env"]
        assert variables["DATABASE_URL"] == variables["NEW_DB_URL"] != variables["OLD_DB_URL"]
        out = await cli.ok("addons", "env-name", "old-db", "LEGACY_PG", "-p", name)
        assert "old-db gives LEGACY_PG, OLD_DB_URL" in out
        listed = await cli.ok("addons", "list", "-p", name)
        assert "LEGACY_PG, OLD_DB_URL" in listed and "DATABASE_URL, NEW_DB_URL" in listed
        info = await cli.json("addons", "env-name", "old-db", "--clear", "-p", name)
        assert info["env_name"] is None and info["variables"] == ["OLD_DB_URL"]

        # deploy, apps, releases, rollback
        code, _, err = await cli("deploy", "-p", name, "--app", "web")
        assert code == 1 and "is not NAME=IMAGE" in err
        out = await cli.ok(
            "deploy", "-p", name, "--app", f"web={TOOLBOX}", "--command", "web=sh -c 'exec sleep 9'"
        )
        assert "Released v1 of " + name + " (web) with " in out
        assert "pending" not in await cli.ok("apps", "-p", name)
        await cli.ok("env", "-p", name, "set", "NEW=1")
        apps = await cli.json("apps", "-p", name)
        assert apps["apps"][0]["pending_variables"] == ["NEW"]
        assert apps["apps"][0]["command"] == ["sh", "-c", "exec sleep 9"]
        assert "pending variables: redeploy (NEW)" in await cli.ok("apps", "-p", name)
        v2 = await cli.json("deploy", "-p", name)
        assert v2["number"] == 2 and "NEW" in v2["variables"]
        assert [a["name"] for a in v2["apps"]] == ["web"]
        out = await cli.ok("rollback", "v1", "-p", name)
        assert "Released v3: rollback to v1." in out
        listed = await cli.ok("releases", "-p", name)
        assert "v3" in listed and "rollback to v1" in listed and "deploy v2" in listed
        assert [r["number"] for r in (await cli.json("releases", "-p", name))["releases"]] == [
            3,
            2,
            1,
        ]
        code, _, err = await cli("rollback", "v9", "-p", name)
        assert code == 1 and "HTTP 404" in err


async def test_every_api_refusal_ends_with_a_hint(stack: Stack, cli: Cli) -> None:
    # README: "errors end with a hint of what to do next", the API's refusals included.
    c = stack.controller
    assert c is not None
    async with FakeAgent(f"h-{secrets.token_hex(5)}", stack.mosquitto) as host:
        await c.wait_host_online(host.host)
        await cli.ok("login", "--api", c.url, "--token", c.operator_token)
        name = f"hint-{uuid.uuid4().hex[:6]}"
        created = await cli.json("projects", "create", name, "--plan", "pro")
        db = await cli.json("addons", "create", "db", "-p", name)
        await cli.ok("addons", "create", "cache", "--kind", "redis", "-p", name)
        out = await cli.ok("addons", "protect", "db", "-p", name)
        assert out.strip() == "db is protected: deleting it or its project is refused.", out
        assert re.search(
            r"^protected\s+yes\s*$", await cli.ok("addons", "info", "db", "-p", name), re.M
        )
        db_url = f"/v1/projects/{created['id']}/addons/{db['id']}"
        assert (await c.api("GET", db_url))[1]["deletion_protection"] is True
        refusals = {
            ("projects", "create", name, "--plan", "pro"): ("409 conflict", "another name"),
            ("projects", "create", "other", "--plan", "gold"): (
                "422 invalid_body",
                "`orkestr projects create --help`",
            ),
            ("projects", "plan", name, "starter"): ("plan_change_refused", "choose a plan"),
            ("env", "set", "-p", name, "lower=1"): (
                'key "lower" is invalid',
                "`orkestr env set --help`",
            ),
            ("env", "set", "-p", name, "DATABASE_URL=x"): ("409 conflict", "another name"),
            ("rollback", "v9", "-p", name): ("404 not_found", "`orkestr releases`"),
            ("addons", "delete", "db", "--yes", "-p", name): (
                "deletion_protected",
                "`orkestr addons protect NAME --off`",
            ),
        }
        for args, (error, hint) in refusals.items():
            code, _, err = await cli(*args)
            assert code == 1 and error in err, (args, err)
            assert "\n  hint: " in err and hint in err.split("\n  hint: ", 1)[1], (args, err)
        protection = await cli.json("addons", "protect", "db", "--off", "-p", name)
        assert protection["deletion_protection"] is False, protection
        assert (await c.api("GET", db_url))[1]["deletion_protection"] is False
        await cli.ok("addons", "delete", "db", "--yes", "-p", name)


async def test_plan_rotation_and_project_deletion_through_the_cli(stack: Stack, cli: Cli) -> None:
    c = stack.controller
    assert c is not None
    async with FakeAgent(f"h-{secrets.token_hex(5)}", stack.mosquitto) as host:
        await c.wait_host_online(host.host)
        await cli.ok("login", "--api", c.url, "--token", c.operator_token)
        name = f"plan-{uuid.uuid4().hex[:6]}"
        await cli.ok("projects", "create", name, "--plan", "starter")
        await cli.ok("addons", "create", "db", "-p", name)
        # The plan's limit names the way out: the operator's plan change.
        code, _, err = await cli("addons", "create", "cache", "--kind", "redis", "-p", name)
        assert code == 1 and "plan_limit_reached" in err and "orkestr projects plan" in err
        assert "delete an add-on" in err
        # A backup limit's hint does not suggest deleting add-ons: that would not help.
        for args in (("capture", "db"), ("schedule", "db", "--on")):
            code, _, err = await cli("backups", *args, "-p", name)
            assert code == 1 and "plan_limit_reached" in err, err
            assert "orkestr projects plan" in err and "delete an add-on" not in err, err
        out = await cli.ok("projects", "plan", name, "pro")
        assert f"Project {name} is on plan pro" in out
        assert (await cli.json("projects", "plan", name, "pro"))["plan"] == "pro"
        await cli.ok("addons", "create", "cache", "--kind", "redis", "-p", name)
        code, _, err = await cli("projects", "plan", name, "starter")
        assert code == 1 and "plan_change_refused" in err and "allows 1 add-on(s)" in err
        code, _, err = await cli("projects", "plan", name, "gold")
        assert code == 1 and "unknown plan 'gold'" in err

        # Rotation: new variables at once, the old password gone from them.
        before = (await cli.json("env", "-p", name))["env"]
        out = await cli.ok("addons", "rotate", "db", "-p", name)
        assert "db has new credentials (secret version 2)" in out and "DATABASE_URL" in out
        after = (await cli.json("env", "-p", name))["env"]
        assert after["DATABASE_URL"] != before["DATABASE_URL"]
        assert after["REDIS_URL"] == before["REDIS_URL"]
        assert "and jobs get them now" in out, out  # no release yet
        rotated = await cli.json("addons", "rotate", "cache", "-p", name)
        assert rotated["secret_version"] == 2 and rotated["name"] == "cache"
        # Once there is a release, jobs run with its variables, as the apps do.
        await cli.ok("deploy", "-p", name, "--app", f"web={TOOLBOX}")
        out = await cli.ok("addons", "rotate", "db", "-p", name)
        assert "the apps and jobs get them with the next deploy" in out, out
        assert "jobs get them now" not in out, out

        # A project's token: the operator's commands say whose token they need.
        project_id = (await cli.json("projects", "plan", name, "pro"))["id"]
        dev = Cli(cli.config.parent.parent / "dev")
        await dev.ok("login", "--api", c.url, "--token", await c.new_project_token(project_id))
        for args in (("create", "other"), ("plan", name, "team"), ("delete", name, "--yes")):
            code, _, err = await dev("projects", *args)
            assert code == 1 and "needs the operator's token" in err, (args, err)

        # Deleting a project asks first; without a terminal, --yes is the way.
        code, _, err = await cli("projects", "delete", name)
        assert code == 1 and "pass --yes" in err
        assert (await cli.json("projects", "delete", name, "--yes"))["deleted_at"] is not None
        code, _, err = await cli("addons", "create", "late", "-p", name)
        assert code == 1 and "HTTP 409" in err


async def test_completion_scripts(cli: Cli) -> None:
    for shell in ("bash", "zsh", "fish"):
        out = await cli.ok("completion", shell)
        assert "_ORKESTR_COMPLETE" in out
    # Completion of commands works through click's protocol.
    code, out, _ = await cli(
        env={"_ORKESTR_COMPLETE": "bash_complete", "COMP_WORDS": "orkestr add", "COMP_CWORD": "1"}
    )
    assert code == 0 and "addons" in out


async def test_groups_through_the_cli(stack: Stack, cli: Cli) -> None:
    c = stack.controller
    assert c is not None
    async with FakeAgent(f"h-{secrets.token_hex(5)}", stack.mosquitto) as host:
        await c.wait_host_online(host.host)

        async def alone() -> bool:
            # Members must share a host: placement picks the emptiest online host, so the
            # hosts of this module's earlier tests must have gone offline first.
            _, body = await c.api("GET", "/v1/hosts")
            return [h["name"] for h in body["hosts"] if h["online"]] == [host.host]

        await wait_for(alone, 30, "the other hosts offline")
        await cli.ok("login", "--api", c.url, "--token", c.operator_token)
        shop, billing = f"shop-{uuid.uuid4().hex[:6]}", f"bill-{uuid.uuid4().hex[:6]}"
        group = f"g-{uuid.uuid4().hex[:6]}"
        await cli.ok("projects", "create", shop, "--plan", "team")
        billing_id = (await cli.json("projects", "create", billing, "--plan", "team"))["id"]
        await cli.ok("addons", "create", "orders", "-p", shop)

        assert f"Created group {group}" in await cli.ok("groups", "create", group)
        out = await cli.ok("groups", "add", group, shop)
        assert f"{shop} is a member of {group}" in out and "nothing shared" in out
        added = await cli.json("groups", "add", group, billing)
        assert [m["name"] for m in added["members"]] == [shop, billing]
        assert added["host"] == host.host

        out = await cli.ok("addons", "share", "orders", group, "SHOP_ORDERS_URL", "-p", shop)
        assert "the other members get SHOP_ORDERS_URL" in out and "addon-" in out
        variables = (await cli.json("env", "-p", billing))["env"]
        assert variables["SHOP_ORDERS_URL"].startswith("postgresql://app:")
        assert "SHOP_ORDERS_URL" not in (await cli.json("env", "-p", shop))["env"]
        listed = await cli.ok("groups")
        assert group in listed and f"{shop}, {billing}" in listed
        assert "SHOP_ORDERS_URL (orders)" in listed
        code, _, err = await cli("addons", "share", "orders", group, "lower", "-p", shop)
        assert code == 1 and "HTTP 422" in err
        code, _, err = await cli("addons", "share", "orders", "nope", "X_URL", "-p", shop)
        assert code == 1 and f"{shop} is in no group 'nope'" in err, err
        assert f"orkestr groups list -p {shop}" in err and "orkestr groups add GROUP" in err
        # A group that exists, but without the project: said the same way, not "no group".
        other = f"g-{uuid.uuid4().hex[:6]}"
        await cli.ok("groups", "create", other)
        code, _, err = await cli("addons", "share", "orders", other, "X_URL", "-p", shop)
        assert code == 1 and f"{shop} is in no group '{other}'" in err, err
        await cli.ok("groups", "delete", other, "--yes")

        # A project token sees its own project's groups, and cannot change members.
        status, token = await c.api("POST", f"/v1/projects/{billing_id}/tokens", {})
        assert status == 201, token
        await cli.ok("login", "--api", c.url, "--token", token["token"])
        mine = await cli.json("groups")
        assert [g["name"] for g in mine["groups"]] == [group]
        code, _, err = await cli("groups", "remove", group, billing)
        assert code == 1 and "only the operator" in err, err

        await cli.ok("login", "--api", c.url, "--token", c.operator_token)
        out = await cli.ok("addons", "unshare", "orders", group, "-p", shop)
        assert "no longer shared" in out
        assert "orkestr addons rotate orders" in out  # the members saw its password
        assert "SHOP_ORDERS_URL" not in (await cli.json("env", "-p", billing))["env"]
        left = await cli.json("groups", "remove", group, billing)
        assert [m["name"] for m in left["members"]] == [shop]
        code, _, err = await cli("groups", "delete", group)
        assert code == 1 and "--yes" in err
        assert f"Deleted group {group}" in await cli.ok("groups", "delete", group, "--yes")
        assert group not in await cli.ok("groups")
