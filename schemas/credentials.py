"""Which Postgres role a given secret version logs in as (pure; controller and agent agree).

A Postgres role has one password, so rotation alternates between two login roles: the
tenant's own role (odd versions) and `<role>_rot` (even versions), a member of it whose
sessions `SET ROLE` to it, so objects stay owned by the tenant's role. During a rotation's
grace period the previous login role keeps its password; afterwards the agent clears it
(`PASSWORD NULL`), which refuses new logins and leaves open sessions alone.
"""

from __future__ import annotations

ROTATION_SUFFIX = "_rot"


def login_role(owner: str, secret_version: int) -> str:
    return owner if secret_version % 2 == 1 else owner + ROTATION_SUFFIX
