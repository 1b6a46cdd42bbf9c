"""Connection variables for a project's apps and jobs (pure: no I/O, no clock).

Every live add-on gives `<NAME>_URL` (name upper-cased, '-' -> '_'); the oldest live
Postgres add-on also gives DATABASE_URL and the oldest Redis gives REDIS_URL, the names
most frameworks read by default. Hostnames are add-on names: that is the DNS name of
the add-on container on the project's private network.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from urllib.parse import quote

from msgspec import Struct

from schemas.messages import PORTS, AddonKind

DEFAULT_VARIABLES: dict[AddonKind, str] = {"postgres": "DATABASE_URL", "redis": "REDIS_URL"}


class Credentials(Struct, frozen=True):
    id: str
    name: str
    kind: AddonKind
    database: str
    user: str
    password: str
    created_at: datetime


def variable_name(addon_name: str) -> str:
    return addon_name.upper().replace("-", "_") + "_URL"


def clashes_with_default(addon_name: str) -> bool:
    """True for names (`database`, `redis`) whose variable would shadow a default one."""
    return variable_name(addon_name) in DEFAULT_VARIABLES.values()


def url(addon: Credentials) -> str:
    password = quote(addon.password, safe="")
    if addon.kind == "postgres":
        user = quote(addon.user, safe="")
        return f"postgresql://{user}:{password}@{addon.name}:{PORTS['postgres']}/{addon.database}"
    # An explicit `default` user: redis-cli 7.0 sends AUTH "" <password> for `redis://:pw@`.
    return f"redis://default:{password}@{addon.name}:{PORTS['redis']}/0"


def compose_env(addons: Iterable[Credentials]) -> dict[str, str]:
    """The variables for a project's live add-ons, in a stable order."""
    env: dict[str, str] = {}
    for addon in sorted(addons, key=lambda a: (a.created_at, a.id)):
        value = url(addon)
        env.setdefault(DEFAULT_VARIABLES[addon.kind], value)
        env[variable_name(addon.name)] = value
    return env
