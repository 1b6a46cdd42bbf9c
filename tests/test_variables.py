"""A project's own variables and the names of its add-ons' variables, against the real
controller and PostgreSQL; the naming rules themselves as pure properties.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from hypothesis import given
from hypothesis import strategies as st

from controller.env import DEFAULT_VARIABLES, Credentials, assign, compose_env, variable_name
from tests.services import ControllerProcess, FakeAgent


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def project(c: ControllerProcess) -> str:
    status, body = await c.api("POST", "/v1/projects", {"name": unique("vars"), "plan": "team"})
    assert status == 201, body
    return body["id"]  # type: ignore[no-any-return]


async def addon(c: ControllerProcess, pid: str, name: str, kind: str = "postgres") -> Any:
    status, body = await c.api("POST", f"/v1/projects/{pid}/addons", {"name": name, "kind": kind})
    assert status == 201, body
    return body


async def env(c: ControllerProcess, pid: str) -> dict[str, str]:
    status, body = await c.api("GET", f"/v1/projects/{pid}/env")
    assert status == 200, body
    return body["env"]  # type: ignore[no-any-return]


async def test_user_variables_set_unset_and_never_overwrite_an_addon(
    controller: ControllerProcess, fake_agent: FakeAgent, controller_db: str
) -> None:
    c = controller
    pid = await project(c)
    db = await addon(c, pid, "orders-db")
    url = f"/v1/projects/{pid}/env"
    status, body = await c.api("PATCH", url, {"set": {"SECRET_KEY": "s3cr3t value", "DEBUG": "0"}})
    assert status == 200, body
    assert body["env"]["SECRET_KEY"] == "s3cr3t value" and body["env"]["DEBUG"] == "0"
    assert "DATABASE_URL" in body["env"] and "ORDERS_DB_URL" in body["env"]

    # Add-on variables cannot be overwritten, and the refusal changes nothing.
    for name in ("DATABASE_URL", "ORDERS_DB_URL"):
        status, body = await c.api("PATCH", url, {"set": {name: "x", "OTHER": "y"}})
        assert status == 409 and body["error"] == "conflict", body
        assert name in body["message"] and "orders-db" in body["message"]
    assert "OTHER" not in await env(c, pid)

    bad: dict[str, Any]
    for bad in (
        {"set": {"lower": "x"}},
        {"set": {"1ABC": "x"}},
        {"set": {"A": "x\x00y"}},
        {"set": {"A": "x" * 8193}},
        {"unset": "A"},
        {"sets": {}},
    ):
        status, body = await c.api("PATCH", url, bad)
        assert status == 422 and body["error"] == "invalid_body", (bad, body)
    # A bad name is named as one: the field and that its key is wrong, not "top level".
    status, body = await c.api("PATCH", url, {"set": {"lower": "x"}})
    assert body["message"].startswith(
        'invalid EnvUpdate body: set: key "lower" is invalid: Expected'
    ), body

    status, body = await c.api("PATCH", url, {"unset": ["DEBUG", "NEVER_SET"]})
    assert status == 200 and "DEBUG" not in body["env"] and "SECRET_KEY" in body["env"]
    # Unset applies before set: naming a variable in both sets it.
    status, body = await c.api("PATCH", url, {"set": {"BOTH": "new"}, "unset": ["BOTH"]})
    assert status == 200 and body["env"]["BOTH"] == "new"

    # Values are sealed at rest, like add-on passwords.
    conn = await asyncpg.connect(controller_db)
    try:
        stored = await conn.fetchval(
            "SELECT value_sealed FROM project_variables WHERE project_id = $1",
            uuid.UUID(hex=pid),
        )
    finally:
        await conn.close()
    assert b"s3cr3t" not in stored

    # An add-on made later wins over a user variable of the same name.
    await c.api("PATCH", url, {"set": {"CACHE_URL": "redis://elsewhere"}})
    cache = await addon(c, pid, "cache", "redis")
    variables = await env(c, pid)
    assert (
        variables["CACHE_URL"].startswith("redis://default:")
        and "@cache:6379" in variables["CACHE_URL"]
    )

    # The host's agent reads the same variables for the jobs it runs.
    token = await c.new_agent_token(fake_agent.host)
    status, body = await c.api("GET", f"/v1/agent/projects/{pid}/env", token=token)
    assert status == 200 and body["env"] == variables
    del db, cache


async def test_at_most_100_variables_of_its_own(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    pid = await project(controller)
    url = f"/v1/projects/{pid}/env"
    status, _ = await controller.api("PATCH", url, {"set": {f"V{i}": "x" for i in range(100)}})
    assert status == 200
    status, body = await controller.api("PATCH", url, {"set": {"ONE_MORE": "x"}})
    assert status == 409 and "at most 100" in body["message"]
    assert "ONE_MORE" not in await env(controller, pid)
    status, _ = await controller.api("PATCH", url, {"set": {"ONE_MORE": "x"}, "unset": ["V0"]})
    assert status == 200


async def test_a_refused_variable_is_named_in_the_422(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    """msgspec says only `set[...]` or "a key": the message names the key at fault."""
    pid = await project(controller)
    url = f"/v1/projects/{pid}/env"
    cases = [
        ({"OK": "1", "bad-name": "x"}, 'set: key "bad-name" is invalid: Expected `str` matching'),
        ({"OK": "1", "LONG": "x" * 8193}, 'set["LONG"]: Expected `str` of length <= 8192'),
        ({"NUMBER": 5, "OK": "1"}, 'set["NUMBER"]: Expected `str`, got `int`'),
        ({"OK": "1", "NUL": "a\x00b"}, 'set["NUL"]: Expected `str` matching'),
    ]
    for changes, expected in cases:
        status, body = await controller.api("PATCH", url, {"set": changes})
        assert status == 422 and body["error"] == "invalid_body", body
        assert body["message"].startswith(f"invalid EnvUpdate body: {expected}"), body
    assert "OK" not in await env(controller, pid)  # nothing of a refused body is kept


async def test_custom_names_and_promotion(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    c = controller
    pid = await project(c)
    old = await addon(c, pid, "old-db")
    new = await addon(c, pid, "new-db")
    assert old["primary"] and not new["primary"]
    assert old["variables"] == ["DATABASE_URL", "OLD_DB_URL"] and new["variables"] == ["NEW_DB_URL"]
    before = await env(c, pid)
    assert before["DATABASE_URL"] == before["OLD_DB_URL"] != before["NEW_DB_URL"]

    # Promote: DATABASE_URL moves; the old primary keeps its own name (the alias).
    status, promoted = await c.api("POST", f"/v1/projects/{pid}/addons/{new['id']}/promote")
    assert status == 200 and promoted["primary"], promoted
    assert promoted["variables"] == ["DATABASE_URL", "NEW_DB_URL"]
    after = await env(c, pid)
    assert (
        after["DATABASE_URL"] == after["NEW_DB_URL"] and after["OLD_DB_URL"] == before["OLD_DB_URL"]
    )
    status, listed = await c.api("GET", f"/v1/projects/{pid}/addons")
    assert [a["primary"] for a in listed["addons"]] == [False, True]

    # An exact custom name, besides <NAME>_URL.
    path = f"/v1/projects/{pid}/addons/{old['id']}"
    status, body = await c.api("PATCH", path, {"env_name": "LEGACY_PG"})
    assert status == 200 and body["env_name"] == "LEGACY_PG", body
    assert body["variables"] == ["LEGACY_PG", "OLD_DB_URL"]
    assert (await env(c, pid))["LEGACY_PG"] == before["OLD_DB_URL"]
    # Taken names are refused: another add-on's, a default one, the project's own.
    status, body = await c.api("PATCH", path, {"env_name": "NEW_DB_URL"})
    assert status == 409 and "new-db" in body["message"]
    status, body = await c.api("PATCH", path, {"env_name": "DATABASE_URL"})
    assert status == 422 and "promote this add-on" in body["message"], body
    # Another kind's default: promoting cannot give it, so the advice says what can.
    cache = await addon(c, pid, "cache", "redis")
    cache_path = f"/v1/projects/{pid}/addons/{cache['id']}"
    status, body = await c.api(
        "PATCH", cache_path, {"env_name": "DATABASE_URL", "deletion_protection": True}
    )
    assert status == 422 and body["error"] == "invalid_body", body
    assert "primary Postgres add-on's variable" in body["message"], body
    assert "which a Redis add-on cannot take" in body["message"], body
    assert "promote this add-on instead" not in body["message"], body
    status, body = await c.api("GET", cache_path)
    assert body["env_name"] is None and body["deletion_protection"] is False, body
    status, body = await c.api("PATCH", cache_path, {"env_name": "REDIS_URL"})
    assert status == 422 and "primary Redis add-on; promote" in body["message"], body
    await c.api("PATCH", f"/v1/projects/{pid}/env", {"set": {"MINE": "1"}})
    status, body = await c.api("PATCH", path, {"env_name": "MINE"})
    assert status == 409 and "unset it first" in body["message"]
    status, body = await c.api("PATCH", f"/v1/projects/{pid}/env", {"set": {"LEGACY_PG": "x"}})
    assert status == 409
    status, body = await c.api("PATCH", path, {"env_name": None})
    assert status == 200 and body["env_name"] is None and "LEGACY_PG" not in await env(c, pid)

    # Deleting the promoted add-on hands DATABASE_URL back to the remaining one.
    status, _ = await c.api("DELETE", f"/v1/projects/{pid}/addons/{new['id']}")
    assert status == 202
    final = await env(c, pid)
    assert final["DATABASE_URL"] == final["OLD_DB_URL"] and "NEW_DB_URL" not in final
    status, body = await c.api("POST", f"/v1/projects/{pid}/addons/{new['id']}/promote")
    assert status == 409 and "being deleted" in body["message"]


# --- the naming rules, pure -------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)
names = st.from_regex(r"[a-z]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True).filter(
    lambda n: variable_name(n) not in DEFAULT_VARIABLES.values()
)


@st.composite
def addon_sets(draw: st.DrawFn) -> list[Credentials]:
    chosen = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    out = []
    for i, name in enumerate(chosen):
        promoted = draw(st.none() | st.integers(0, 5))
        out.append(
            Credentials(
                id=f"{i:032x}",
                name=name,
                kind=draw(st.sampled_from(["postgres", "redis"])),
                database="app",
                user="app",
                password="pw",
                created_at=T0 + timedelta(seconds=draw(st.integers(0, 3))),
                promoted_at=None if promoted is None else T0 + timedelta(minutes=promoted),
            )
        )
    return out


@given(
    addon_sets(),
    st.dictionaries(st.from_regex(r"[A-Z][A-Z_]{0,5}", fullmatch=True), st.text(max_size=5)),
)
def test_every_addon_has_its_name_and_each_kind_one_primary(
    addons: list[Credentials], user: dict[str, str]
) -> None:
    env = compose_env(addons, user)
    given_names = assign(addons)
    for a in addons:
        assert given_names[variable_name(a.name)] is a  # <NAME>_URL always
    for kind, default in DEFAULT_VARIABLES.items():
        of_kind = [a for a in addons if a.kind == kind]
        if not of_kind:
            assert default not in given_names
            continue
        promoted = [a for a in of_kind if a.promoted_at is not None]
        expected = (
            max(promoted, key=lambda a: (a.promoted_at, a.id))
            if promoted
            else min(of_kind, key=lambda a: (a.created_at, a.id))
        )
        assert given_names[default] is expected
    for name, value in user.items():  # the user's variables, unless an add-on gives the name
        assert env[name] == value or name in given_names
