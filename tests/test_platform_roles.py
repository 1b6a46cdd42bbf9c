"""The least roles' pure parts: the Redis ACL rules, the Postgres fixes, the secret files.

No server here (tests/test_backup_privileges.py has the real ones): what the agent would
run against what a server could report.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent import pg_passwords, platform_roles
from agent.platform_roles import (
    Found,
    pg_fixes,
    redis_acl_line,
    redis_backup_rules,
    redis_rules,
)
from agent.secrets import SecretStore, redis_conf
from agent.specs import BACKUP_USER, PROBE_USER, RESTORE_USER

PASSWORDS = {BACKUP_USER: "backup-pw", RESTORE_USER: "restore-pw", PROBE_USER: "probe-pw"}
MEMBER_OF = {
    BACKUP_USER: ("pg_read_all_data",),
    RESTORE_USER: ("app_user", "pg_signal_backend"),
    PROBE_USER: (),
}
SALT = b"0123456789abcdef"


def found(name: str, **changes: object) -> Found:
    """A role as the server reports it once made right."""
    backup = name == BACKUP_USER
    base: dict[str, object] = {
        "name": name,
        "verifier": pg_passwords.scram_verifier(PASSWORDS[name], SALT, 4096),
        "superuser": False,
        "createrole": False,
        "createdb": name == RESTORE_USER,
        "login": True,
        "replication": False,
        "bypassrls": backup,
        "inherit": True,
        "member_of": MEMBER_OF[name],
        "members": (),
        "connect_here": True,
        "connect_postgres": name == RESTORE_USER,
    }
    base.update(changes)
    return Found(**base)  # type: ignore[arg-type]


def right() -> dict[str, Found]:
    return {u: found(u) for u in PASSWORDS}


def fixes(**roles: Found) -> list[str]:
    have = right()
    have.update(roles)
    return pg_fixes(have, "app_user", "app", PASSWORDS)


def test_roles_made_right_need_nothing() -> None:
    assert pg_fixes(right(), "app_user", "app", PASSWORDS) == []


def test_missing_roles_are_made_with_only_what_they_need() -> None:
    assert pg_fixes({}, "app_user", "app", PASSWORDS) == [
        'CREATE ROLE "orkestr_backup" LOGIN NOSUPERUSER NOCREATEROLE NOREPLICATION INHERIT'
        " NOCREATEDB BYPASSRLS PASSWORD 'backup-pw'",
        'GRANT "pg_read_all_data" TO "orkestr_backup"',
        'GRANT CONNECT ON DATABASE "app" TO "orkestr_backup"',
        'CREATE ROLE "orkestr_restore" LOGIN NOSUPERUSER NOCREATEROLE NOREPLICATION INHERIT'
        " CREATEDB NOBYPASSRLS PASSWORD 'restore-pw'",
        'GRANT "app_user" TO "orkestr_restore"',
        'GRANT "pg_signal_backend" TO "orkestr_restore"',
        'GRANT CONNECT ON DATABASE "postgres" TO "orkestr_restore"',
        # The probe's: a login and CONNECT on the tenant's database, nothing else.
        'CREATE ROLE "orkestr_probe" LOGIN NOSUPERUSER NOCREATEROLE NOREPLICATION INHERIT'
        " NOCREATEDB NOBYPASSRLS PASSWORD 'probe-pw'",
        'GRANT CONNECT ON DATABASE "app" TO "orkestr_probe"',
    ]


ALTER_BACKUP = (
    'ALTER ROLE "orkestr_backup" LOGIN NOSUPERUSER NOCREATEROLE NOREPLICATION INHERIT'
    " NOCREATEDB BYPASSRLS"
)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"superuser": True}, [ALTER_BACKUP]),
        ({"createrole": True}, [ALTER_BACKUP]),
        ({"createdb": True}, [ALTER_BACKUP]),
        ({"replication": True}, [ALTER_BACKUP]),
        ({"bypassrls": False}, [ALTER_BACKUP]),
        ({"login": False}, [ALTER_BACKUP]),
        ({"inherit": False}, [ALTER_BACKUP]),
        # A password set by someone else, or none: the platform's is set again.
        ({"verifier": None}, ["ALTER ROLE \"orkestr_backup\" PASSWORD 'backup-pw'"]),
        (
            {"verifier": pg_passwords.scram_verifier("other", SALT, 4096)},
            ["ALTER ROLE \"orkestr_backup\" PASSWORD 'backup-pw'"],
        ),
        # Memberships granted beside ours are taken back, in both directions.
        (
            {"member_of": ("app_user", "pg_read_all_data", "pg_write_all_data")},
            [
                'REVOKE "app_user" FROM "orkestr_backup"',
                'REVOKE "pg_write_all_data" FROM "orkestr_backup"',
            ],
        ),
        ({"member_of": ()}, ['GRANT "pg_read_all_data" TO "orkestr_backup"']),
        ({"members": ("app_user",)}, ['REVOKE "orkestr_backup" FROM "app_user"']),
        # The tenant revoked CONNECT from PUBLIC on its database.
        ({"connect_here": False}, ['GRANT CONNECT ON DATABASE "app" TO "orkestr_backup"']),
    ],
)
def test_a_backup_role_that_drifted_is_put_back(
    changes: dict[str, object], expected: list[str]
) -> None:
    assert fixes(**{BACKUP_USER: found(BACKUP_USER, **changes)}) == expected


def test_a_restore_role_that_drifted_is_put_back() -> None:
    drifted = found(
        RESTORE_USER, createdb=False, member_of=("pg_signal_backend",), connect_postgres=False
    )
    assert fixes(**{RESTORE_USER: drifted}) == [
        'ALTER ROLE "orkestr_restore" LOGIN NOSUPERUSER NOCREATEROLE NOREPLICATION INHERIT'
        " CREATEDB NOBYPASSRLS",
        'GRANT "app_user" TO "orkestr_restore"',
        'GRANT CONNECT ON DATABASE "postgres" TO "orkestr_restore"',
    ]
    # Its CONNECT is on `postgres`: the tenant's database does not matter to it.
    assert fixes(**{RESTORE_USER: found(RESTORE_USER, connect_here=False)}) == []


ALTER_PROBE = (
    'ALTER ROLE "orkestr_probe" LOGIN NOSUPERUSER NOCREATEROLE NOREPLICATION INHERIT'
    " NOCREATEDB NOBYPASSRLS"
)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"superuser": True}, [ALTER_PROBE]),
        ({"createdb": True}, [ALTER_PROBE]),
        ({"bypassrls": True}, [ALTER_PROBE]),
        ({"login": False}, [ALTER_PROBE]),
        ({"verifier": None}, ["ALTER ROLE \"orkestr_probe\" PASSWORD 'probe-pw'"]),
        (
            {"member_of": ("app_user", "pg_read_all_data")},
            [
                'REVOKE "app_user" FROM "orkestr_probe"',
                'REVOKE "pg_read_all_data" FROM "orkestr_probe"',
            ],
        ),
        ({"members": ("app_user",)}, ['REVOKE "orkestr_probe" FROM "app_user"']),
        # The tenant, its database's owner, revoked the probe's CONNECT.
        ({"connect_here": False}, ['GRANT CONNECT ON DATABASE "app" TO "orkestr_probe"']),
    ],
)
def test_a_probe_role_that_drifted_is_put_back(
    changes: dict[str, object], expected: list[str]
) -> None:
    assert fixes(**{PROBE_USER: found(PROBE_USER, **changes)}) == expected


def test_names_and_passwords_are_quoted() -> None:
    out = pg_fixes({}, 'we"ird', 'd"b', {BACKUP_USER: "it's", RESTORE_USER: "x", PROBE_USER: "y"})
    assert "PASSWORD 'it''s'" in out[0]
    assert 'GRANT CONNECT ON DATABASE "d""b" TO "orkestr_backup"' in out
    assert 'GRANT "we""ird" TO "orkestr_restore"' in out
    assert platform_roles.redact(out[0]).endswith("PASSWORD ***")
    assert "it''s" not in platform_roles.redact(out[0])


def test_the_redis_backup_user_may_only_take_a_replica_dump() -> None:
    rules = redis_backup_rules("pw")
    assert rules == ("reset", "on", ">pw", "+ping", "+info", "+sync", "+replconf")
    # No key or channel pattern, no category: nothing but these commands.
    assert not [r for r in rules if r[0] in "~&%" or "@" in r]
    assert redis_acl_line("pw") == "user orkestr_backup reset on >pw +ping +info +sync +replconf\n"


def test_the_redis_probe_user_may_only_ask_whether_it_answers() -> None:
    rules = redis_rules(PROBE_USER, "pw")
    assert rules == ("reset", "on", ">pw", "+ping", "+info", "+client|setname")
    assert not [r for r in rules if r[0] in "~&%" or "@" in r]


def test_redis_conf_has_the_least_users_only_when_given() -> None:
    conf = redis_conf("tenant", "admin", platform={BACKUP_USER: "bk", PROBE_USER: "pr"})
    assert redis_acl_line("bk") in conf
    assert redis_acl_line("pr", PROBE_USER) in conf
    assert "orkestr_backup" not in redis_conf("tenant", "admin")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_each_role_has_its_password_alone_in_a_root_only_directory(tmp_path: Path) -> None:
    store = SecretStore(tmp_path)
    store.ensure_root()
    aid = "a" * 32
    store.write(aid, "redis", "tenant-pw", 1)
    d = store.platform_dir(aid, BACKUP_USER)
    assert os.listdir(d) == ["password"]
    assert (_mode(d), _mode(d / "password")) == (0o700, 0o400)
    password = store.platform_password(aid, BACKUP_USER)
    assert password not in {"tenant-pw", store.admin_password(aid)} and len(password) >= 40
    assert redis_acl_line(password) in (tmp_path / aid / "redis.conf").read_text()
    # Kept while nothing rotates; made anew with a rotation of the tenant's password.
    store.write(aid, "redis", "tenant-pw", 1)
    assert store.platform_password(aid, BACKUP_USER) == password
    store.write(aid, "redis", "tenant-pw-2", 2, previous_valid_until=1.0)
    rotated = store.platform_password(aid, BACKUP_USER)
    assert rotated != password
    assert redis_acl_line(rotated) in (tmp_path / aid / "redis.conf").read_text()


def test_an_addon_from_before_the_roles_gets_its_passwords_on_first_use(tmp_path: Path) -> None:
    store = SecretStore(tmp_path)
    aid = "b" * 32
    store.write(aid, "postgres", "tenant-pw", 1)
    for user in (BACKUP_USER, RESTORE_USER):
        d = store.platform_dir(aid, user)
        assert not d.exists()
        first = store.platform_password(aid, user)
        assert store.platform_password(aid, user) == first
        assert _mode(d / "password") == 0o400
