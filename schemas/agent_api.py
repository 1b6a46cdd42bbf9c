"""The agent <-> controller HTTP contract: the routes an agent calls and what they answer.

Defined once, for both sides: `agent/controller_client.py` calls these paths and decodes
these structs; `controller/api.py` serves them. Every route takes the host's agent token
(`Authorization: Bearer ...`) and answers only for what is placed on that host.
"""

from __future__ import annotations

from datetime import datetime

from msgspec import Struct

# aiohttp route patterns; the agent fills them with `.format(...)`.
SECRET_PATH = "/v1/agent/addons/{addon_id}/secret"
ENV_PATH = "/v1/agent/projects/{project_id}/env"
RELEASE_ENV_PATH = "/v1/agent/projects/{project_id}/releases/{number}/env"


class AddonSecret(Struct, frozen=True):
    """The add-on's tenant password and the version it belongs to (rotation bumps it)."""

    password: str
    secret_version: int
    # After a rotation the previous password keeps working until then (the grace period).
    previous_valid_until: datetime | None = None


class ProjectEnv(Struct, frozen=True):
    """The variables a project's jobs (the newest release's, once there is one) or a
    release's apps run with. The user API's env answer (`EnvView`) has the same shape."""

    env: dict[str, str]
