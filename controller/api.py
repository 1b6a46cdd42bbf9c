"""The HTTP API (aiohttp): user routes under /v1, agent routes under /v1/agent.

Every route needs `Authorization: Bearer <token>`: the agent token for /v1/agent/...,
the api token for everything else; neither works on the other's routes. Every error is
JSON `{"error": code, "message": text}` (see errors.py for the codes). Handlers that
change what a host should run mark that host dirty; the publisher does the rest.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from controller import bodies, store
from controller.backups_api import BackupsApi
from controller.config import Config, describe
from controller.db import Pool
from controller.env import compose_env
from controller.errors import (
    ApiError,
    DatabaseUnavailable,
    InvalidBody,
    InvalidJson,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PlanLimitReached,
    ServiceUnavailable,
    Unauthorized,
)
from controller.logs import log
from controller.metrics import Metrics
from controller.plans import Plans
from controller.seams import DirtyHosts
from controller.views import (
    AddonList,
    EnvView,
    ErrorView,
    HostList,
    ProjectList,
    SecretView,
    addon_view,
    host_view,
    job_view,
    project_view,
)

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
AGENT_PREFIX = "/v1/agent/"
ID = re.compile(r"^[0-9a-f]{32}$")
HOST = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
B = TypeVar("B", bound=msgspec.Struct)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(value), status=status, content_type="application/json"
    )


def error_response(exc: ApiError) -> web.Response:
    response = json_response(ErrorView(error=exc.code, message=exc.message), exc.status)
    if isinstance(exc, Unauthorized):
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _from_http_exception(exc: web.HTTPException) -> ApiError:
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("no such route")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(
            f"method not allowed; allowed: {', '.join(sorted(exc.allowed_methods))}"
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
    return ApiError(exc.reason, status=exc.status, code=re.sub(r"\W+", "_", exc.reason.lower()))


def _path_id(request: web.Request, key: str) -> str:
    value = request.match_info[key]
    if not ID.match(value):
        # A malformed id names nothing that could exist.
        raise NotFound(f"{key} {value!r} is not an id (32 lower-case hex digits)")
    return value


async def read_body(request: web.Request, kind: type[B]) -> B:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes") from None
    try:
        data = msgspec.json.decode(raw)
    # msgspec raises RecursionError (not DecodeError) for deeply nested input.
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InvalidJson(f"request body is not valid JSON: {exc}") from None
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise InvalidBody(f"invalid {kind.__name__} body: {describe(exc)}") from None


class Api:
    def __init__(
        self, config: Config, pool: Pool, plans: Plans, dirty: DirtyHosts, metrics: Metrics
    ) -> None:
        self._config = config
        self._pool = pool
        self._plans = plans
        self._dirty = dirty
        self._metrics = metrics
        self._api_token = config.http.api_token.encode()
        self._agent_token = config.http.agent_token.encode()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY_BYTES)
        r = app.router
        r.add_post("/v1/projects", self.create_project)
        r.add_get("/v1/projects", self.list_projects)
        r.add_get("/v1/projects/{project_id}", self.show_project)
        r.add_post("/v1/projects/{project_id}/addons", self.create_addon)
        r.add_get("/v1/projects/{project_id}/addons", self.list_addons)
        r.add_get("/v1/projects/{project_id}/addons/{addon_id}", self.show_addon)
        r.add_delete("/v1/projects/{project_id}/addons/{addon_id}", self.delete_addon)
        r.add_get("/v1/projects/{project_id}/env", self.project_env)
        r.add_post("/v1/projects/{project_id}/jobs", self.create_job)
        r.add_get("/v1/projects/{project_id}/jobs/{job_id}", self.show_job)
        BackupsApi(
            self._pool, self._plans, self._dirty, self._metrics, _path_id, read_body
        ).register(r)
        r.add_get("/v1/hosts", self.list_hosts)
        r.add_get("/metrics", self.metrics)
        r.add_get("/v1/agent/hosts/{host}/addons/{addon_id}/secret", self.agent_secret)
        r.add_get("/v1/agent/hosts/{host}/projects/{project_id}/env", self.agent_env)
        return app

    # --- cross-cutting ----------------------------------------------------------------

    def _authorize(self, request: web.Request) -> None:
        agent = request.path.startswith(AGENT_PREFIX)
        expected = self._agent_token if agent else self._api_token
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            kind = "agent" if agent else "api"
            raise Unauthorized(f"this route needs 'Authorization: Bearer <{kind} token>'")

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        try:
            self._authorize(request)
            response = await handler(request)
        except ApiError as exc:
            response = error_response(exc)
        except web.HTTPException as exc:
            response = error_response(_from_http_exception(exc))
        except DatabaseUnavailable as exc:
            log(logger, "database_unavailable", logging.WARNING, route=route, reason=exc)
            response = error_response(ServiceUnavailable("the database is unavailable; retry"))
        except Exception:
            logger.exception("http_handler_failed route=%s", route)
            response = error_response(ApiError("internal error; see the controller log"))
        elapsed = time.monotonic() - started
        self._metrics.http_requests.labels(request.method, route, str(response.status)).inc()
        self._metrics.http_duration.labels(route).observe(elapsed)
        log(
            logger,
            "http_request",
            logging.DEBUG if response.status < 400 and request.method == "GET" else logging.INFO,
            method=request.method,
            route=route,
            status=response.status,
            ms=round(elapsed * 1000, 1),
        )
        return response

    # --- projects ---------------------------------------------------------------------

    async def create_project(self, request: web.Request) -> web.Response:
        body = await read_body(request, bodies.ProjectCreate)
        bodies.check_project(body, self._plans)
        project = await store.create_project(
            self._pool, body.name, body.plan, self._config.hosts.offline_after_s
        )
        self._dirty.mark(project.host)
        log(logger, "project_created", project=project.id, plan=project.plan, host=project.host)
        return json_response(project_view(project), 201)

    async def list_projects(self, request: web.Request) -> web.Response:
        projects = await store.list_projects(self._pool)
        return json_response(ProjectList(projects=tuple(project_view(p) for p in projects)))

    async def show_project(self, request: web.Request) -> web.Response:
        project = await store.get_project(self._pool, _path_id(request, "project_id"))
        return json_response(project_view(project))

    # --- add-ons ----------------------------------------------------------------------

    async def create_addon(self, request: web.Request) -> web.Response:
        project_id = _path_id(request, "project_id")
        body = await read_body(request, bodies.AddonCreate)
        bodies.check_addon(body)
        password = secrets.token_urlsafe(24)
        try:
            addon = await store.create_addon(
                self._pool, project_id, body.name, body.kind, self._plans, password
            )
        except PlanLimitReached:
            self._metrics.plan_limit_rejections.labels(
                (await store.get_project(self._pool, project_id)).plan
            ).inc()
            raise
        self._dirty.mark(addon.host)
        self._metrics.addons_created.labels(addon.kind).inc()
        log(logger, "addon_created", project=project_id, addon=addon.id, kind=addon.kind)
        return json_response(addon_view(addon, self._plans), 201)

    async def list_addons(self, request: web.Request) -> web.Response:
        addons = await store.list_addons(self._pool, _path_id(request, "project_id"))
        return json_response(AddonList(addons=tuple(addon_view(a, self._plans) for a in addons)))

    async def show_addon(self, request: web.Request) -> web.Response:
        addon = await store.get_addon(
            self._pool, _path_id(request, "project_id"), _path_id(request, "addon_id")
        )
        return json_response(addon_view(addon, self._plans))

    async def delete_addon(self, request: web.Request) -> web.Response:
        project_id = _path_id(request, "project_id")
        addon = await store.tombstone_addon(self._pool, project_id, _path_id(request, "addon_id"))
        self._dirty.mark(addon.host)
        log(logger, "addon_deleted", project=project_id, addon=addon.id)
        return json_response(addon_view(addon, self._plans), 202)

    async def project_env(self, request: web.Request) -> web.Response:
        found = await store.credentials(self._pool, _path_id(request, "project_id"))
        return json_response(EnvView(env=compose_env(found)))

    # --- jobs -------------------------------------------------------------------------

    async def create_job(self, request: web.Request) -> web.Response:
        project_id = _path_id(request, "project_id")
        body = await read_body(request, bodies.JobCreate)
        bodies.check_job(body)
        job, host = await store.create_job(
            self._pool,
            project_id,
            body.image,
            body.command,
            body.timeout_s,
            bodies.MAX_PENDING_JOBS,
        )
        self._dirty.mark(host)
        log(logger, "job_created", project=project_id, job=job.id, image=job.image)
        return json_response(job_view(job), 201)

    async def show_job(self, request: web.Request) -> web.Response:
        job = await store.get_job(
            self._pool, _path_id(request, "project_id"), _path_id(request, "job_id")
        )
        return json_response(job_view(job))

    # --- operations -------------------------------------------------------------------

    async def list_hosts(self, request: web.Request) -> web.Response:
        hosts = await store.list_hosts(self._pool, self._config.hosts.offline_after_s)
        return json_response(HostList(hosts=tuple(host_view(h) for h in hosts)))

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self._metrics.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    # --- agent routes -----------------------------------------------------------------

    def _path_host(self, request: web.Request) -> str:
        host = request.match_info["host"]
        if not HOST.match(host):
            raise NotFound(f"host {host!r} is not a host name")
        return host

    async def agent_secret(self, request: web.Request) -> web.Response:
        host = self._path_host(request)
        secret = await store.addon_secret(self._pool, host, _path_id(request, "addon_id"))
        # Deliberately no password in the log line.
        log(logger, "secret_served", host=host, addon=request.match_info["addon_id"])
        return json_response(
            SecretView(password=secret.password, secret_version=secret.secret_version)
        )

    async def agent_env(self, request: web.Request) -> web.Response:
        host = self._path_host(request)
        found = await store.credentials(self._pool, _path_id(request, "project_id"), host)
        return json_response(EnvView(env=compose_env(found)))


@asynccontextmanager
async def serve(app: web.Application, host: str, port: int) -> AsyncIterator[None]:
    """Listen until the context exits; in-flight requests get a few seconds to finish."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log(logger, "http_listening", host=host, port=port)
        yield
    finally:
        await runner.cleanup()
