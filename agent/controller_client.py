"""The agent's authenticated calls to the controller: add-on secrets and job environments.

The only module of the agent that makes HTTP requests.
"""

from __future__ import annotations

from typing import Any, TypeVar

import aiohttp
import msgspec

from agent.errors import NotFound, PermanentError, TransientError

T = TypeVar("T")


class Secret(msgspec.Struct, frozen=True):
    password: str
    secret_version: int


class Env(msgspec.Struct, frozen=True):
    env: dict[str, str]


class ControllerClient:
    def __init__(self, base_url: str, token: str, host: str) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._host = host
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ControllerClient:
        self._session = aiohttp.ClientSession(
            headers=self._headers, timeout=aiohttp.ClientTimeout(total=10)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _get(self, path: str) -> Any:
        assert self._session is not None
        url = f"{self._base}/v1/agent/hosts/{self._host}{path}"
        try:
            async with self._session.get(url) as response:
                body = await response.read()
                if response.status == 200:
                    return body
                if response.status == 404:
                    raise NotFound(f"controller: {path} not found")
                if response.status in (401, 403):
                    raise PermanentError(f"controller refused the agent token ({response.status})")
                raise TransientError(f"controller answered {response.status} for {path}")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise TransientError(f"controller unreachable: {exc!r}") from None

    async def secret(self, addon_id: str) -> Secret:
        return _decode(await self._get(f"/addons/{addon_id}/secret"), Secret)

    async def env(self, project_id: str) -> dict[str, str]:
        return _decode(await self._get(f"/projects/{project_id}/env"), Env).env


def _decode(body: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError as exc:
        # A proxy's error page, or a controller of another version.
        raise TransientError(f"controller answered an unexpected body: {exc}") from None
