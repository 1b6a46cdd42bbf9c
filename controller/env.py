"""Variables for a project's apps and jobs (pure: no I/O, no clock).

Every live add-on gives `<NAME>_URL` (name upper-cased, '-' -> '_'), and its custom name
(`env_name`) when it has one. The primary add-on of each kind also gives DATABASE_URL or
REDIS_URL, the names most frameworks read by default: the one promoted last, else the
oldest. Promoting another keeps the old primary reachable under its `<NAME>_URL` (the
alias). When two add-ons claim a name, `<NAME>_URL` beats a custom name, which beats a
default; the API refuses custom names that would be shadowed.

The user's own variables come first and add-on variables override them: the API refuses
to set a name an add-on gives, and an add-on made later wins over an older user variable.
Hostnames are add-on names: the DNS name of the add-on on the project's private network.

Add-ons other members share with the project in a group come between the two: under the
name the sharing owner picked, with the add-on's credentials and its host name on the
group network (`shared_host`). The project's own add-ons win a name clash; the API
refuses a share whose name a member's add-on or variable already takes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Protocol
from urllib.parse import quote

from msgspec import Struct

from schemas.messages import PORTS, AddonKind

DEFAULT_VARIABLES: dict[AddonKind, str] = {"postgres": "DATABASE_URL", "redis": "REDIS_URL"}
# The names a user or an add-on's custom name may take (POSIX-ish, upper case).
VARIABLE_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")


class EnvSource(Protocol):
    """What naming needs of an add-on (AddonRow and Credentials both have it)."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> AddonKind: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def env_name(self) -> str | None: ...
    @property
    def promoted_at(self) -> datetime | None: ...


class Credentials(Struct, frozen=True):
    id: str
    name: str
    kind: AddonKind
    database: str
    user: str
    password: str
    created_at: datetime
    env_name: str | None = None
    promoted_at: datetime | None = None


def variable_name(addon_name: str) -> str:
    return addon_name.upper().replace("-", "_") + "_URL"


def clashes_with_default(addon_name: str) -> bool:
    """True for names (`database`, `redis`) whose variable would shadow a default one."""
    return variable_name(addon_name) in DEFAULT_VARIABLES.values()


KIND_TITLES: dict[AddonKind, str] = {"postgres": "Postgres", "redis": "Redis"}


def default_name_refusal(env_name: str, kind: AddonKind) -> str | None:
    """Why an add-on of `kind` may not take `env_name` as its own name (None: no default's).

    The defaults go to each kind's primary: the own kind's by promoting, another's never.
    """
    for owner, default in DEFAULT_VARIABLES.items():
        if env_name != default:
            continue
        if owner == kind:
            return (
                f"env_name: {env_name} goes to the primary {KIND_TITLES[kind]} add-on; "
                "promote this add-on instead (POST .../addons/{id}/promote)"
            )
        return (
            f"env_name: {env_name} is the primary {KIND_TITLES[owner]} add-on's variable, "
            f"which a {KIND_TITLES[kind]} add-on cannot take; pick a name of its own "
            f"(its kind's default, {DEFAULT_VARIABLES[kind]}, comes by promoting it)"
        )
    return None


def shared_host(addon_id: str) -> str:
    """A shared add-on's DNS name on a group network: unique, whatever members call theirs."""
    return f"addon-{addon_id}"


def url(addon: Credentials, host: str | None = None) -> str:
    password = quote(addon.password, safe="")
    host = host or addon.name
    if addon.kind == "postgres":
        user = quote(addon.user, safe="")
        return f"postgresql://{user}:{password}@{host}:{PORTS['postgres']}/{addon.database}"
    # An explicit `default` user: redis-cli 7.0 sends AUTH "" <password> for `redis://:pw@`.
    return f"redis://default:{password}@{host}:{PORTS['redis']}/0"


def primaries(addons: Iterable[EnvSource]) -> set[str]:
    """The ids of the primary add-on of each kind: promoted last, else the oldest."""
    by_kind: dict[AddonKind, list[EnvSource]] = {}
    for a in addons:
        by_kind.setdefault(a.kind, []).append(a)
    chosen: set[str] = set()
    for xs in by_kind.values():
        promoted = [a for a in xs if a.promoted_at is not None]
        if promoted:
            chosen.add(max(promoted, key=lambda a: (a.promoted_at, a.id)).id)
        else:
            chosen.add(min(xs, key=lambda a: (a.created_at, a.id)).id)
    return chosen


def assign(addons: Iterable[EnvSource]) -> dict[str, EnvSource]:
    """Variable name -> the live add-on that gives it, by the precedence in the docstring."""
    ordered = sorted(addons, key=lambda a: (a.created_at, a.id))
    primary = primaries(ordered)
    names: dict[str, EnvSource] = {}
    for a in ordered:
        if a.id in primary:
            names[DEFAULT_VARIABLES[a.kind]] = a
    for a in ordered:
        if a.env_name:
            names[a.env_name] = a
    for a in ordered:
        names[variable_name(a.name)] = a
    return names


def names_of(addons: Sequence[EnvSource]) -> dict[str, tuple[str, ...]]:
    """Add-on id -> the variable names it gives (sorted)."""
    given: dict[str, list[str]] = {a.id: [] for a in addons}
    for name, a in assign(addons).items():
        given[a.id].append(name)
    return {k: tuple(sorted(v)) for k, v in given.items()}


def compose_env(
    addons: Iterable[Credentials],
    user: Mapping[str, str] | None = None,
    shared: Iterable[tuple[str, Credentials]] = (),
) -> dict[str, str]:
    """The variables for a project: its own, then the add-ons shared with it in its
    groups (variable name, add-on), then its live add-ons', in a stable order."""
    env = dict(sorted((user or {}).items()))
    given: set[str] = set()
    # The API refuses to let two groups give a member one name (controller/groups.py);
    # should rows still disagree, the oldest add-on keeps it, whatever the order here.
    for name, other in sorted(shared, key=lambda s: (s[0], s[1].created_at, s[1].id)):
        if name not in given:
            given.add(name)
            env[name] = url(other, shared_host(other.id))
    for name, addon in sorted(assign(addons).items()):
        assert isinstance(addon, Credentials)
        env[name] = url(addon)
    return env
