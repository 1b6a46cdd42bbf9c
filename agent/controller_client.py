"""The agent's authenticated calls to the controller: add-on secrets and job environments.

The only module of the agent that makes HTTP requests. The agent token names the host:
the controller answers only for what is placed on it. With `ca_file` the controller's
HTTPS certificate is checked against that CA (instead of the system's).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import aiohttp
import msgspec

from agent.errors import NotFound, PermanentError, TransientError

T = TypeVar("T")


class Secret(msgspec.Struct, frozen=True):
    password: str
    secret_version: int
    # Until then the password before the last rotation keeps working.
    previous_valid_until: datetime | None = None


class Env(msgspec.Struct, frozen=True):
    env: dict[str, str]


class ControllerClient:
    def __init__(self, base_url: str, token: str | Callable[[], str], ca_file: str = "") -> None:
        """`token` may be a function (read the token file): asked on every request, so a
        rotated token file is used without a restart."""
        self._base = base_url.rstrip("/")
        self._token = token if callable(token) else (lambda: token)
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ControllerClient:
        connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl is not None else None
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10), connector=connector
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _get(self, path: str) -> Any:
        assert self._session is not None
        url = f"{self._base}/v1/agent{path}"
        try:
            headers = {"Authorization": f"Bearer {self._token()}"}
        except OSError as exc:
            raise TransientError(f"cannot read the agent token: {exc}") from None
        try:
            async with self._session.get(url, headers=headers) as response:
                body = await response.read()
                if response.status == 200:
                    return body
                if response.status == 404:
                    raise NotFound(f"controller: {path} not found")
                if response.status in (401, 403):
                    raise PermanentError(f"controller refused the agent token ({response.status})")
                raise TransientError(f"controller answered {response.status} for {path}")
        except aiohttp.ClientSSLError as exc:
            # A wrong CA or host name will not fix itself, but the operator may fix it.
            raise TransientError(f"controller's TLS certificate refused: {exc!r}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise TransientError(f"controller unreachable: {exc!r}") from None

    async def secret(self, addon_id: str) -> Secret:
        return _decode(await self._get(f"/addons/{addon_id}/secret"), Secret)

    async def env(self, project_id: str) -> dict[str, str]:
        return _decode(await self._get(f"/projects/{project_id}/env"), Env).env

    async def release_env(self, project_id: str, release: int) -> dict[str, str]:
        """The variables an app of `release` runs with (the release's snapshot)."""
        return _decode(await self._get(f"/projects/{project_id}/releases/{release}/env"), Env).env


def _decode(body: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError as exc:
        # A proxy's error page, or a controller of another version.
        raise TransientError(f"controller answered an unexpected body: {exc}") from None
