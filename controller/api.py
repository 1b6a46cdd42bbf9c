"""The HTTP API (aiohttp): user routes under /v1, agent routes under /v1/agent.

Every route but /healthz needs `Authorization: Bearer <token>`. The middleware resolves
the token to a principal (principals.py) and admits it by default-deny rules, so a new
route is safe before anyone thinks about it:

- agent routes take an agent token only, and the host comes from the token, never the URL;
- /metrics takes the metrics or the operator token;
- a project token passes only on routes whose `{project_id}` is its own project (and
  GET /v1/projects, which then lists that project alone); anything else answers 404,
  as if nothing else existed. Handlers call `require_operator` for project routes that
  only the operator may use (tokens), and `require_project` for a project id that does
  not come from the path.

Every error is JSON `{"error": code, "message": text}` (see errors.py for the codes).
Handlers that change what a host should run mark that host dirty; the publisher does
the rest.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from controller import (
    groups,
    joboutput,
    principals,
    releases,
    reports,
    request_bodies,
    store,
    tokens,
    variables,
)
from controller.backups_api import BackupsApi
from controller.body_errors import describe_body, duplicate_key, shown_key
from controller.config import Config
from controller.db import Pool
from controller.dirty_hosts import DirtyHosts
from controller.env import compose_env, names_of, primaries
from controller.errors import (
    ApiError,
    BadRequest,
    ConfigError,
    Conflict,
    DatabaseUnavailable,
    InvalidBody,
    InvalidJson,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PlanLimitReached,
    ServiceUnavailable,
    Throttled,
    TooManyReads,
    TooManyWrites,
    Unauthorized,
)
from controller.httpserver import JsonErrorsRunner
from controller.logs import log
from controller.metrics import Metrics
from controller.plans import Plans
from controller.principals import Principal
from controller.responses import (
    AddonList,
    AddonView,
    AppList,
    EnvView,
    ErrorView,
    HostCeiling,
    HostList,
    JobList,
    ProjectList,
    ReleaseList,
    TokenList,
    addon_view,
    app_views,
    host_view,
    job_view,
    new_token_view,
    project_view,
    release_view,
    token_view,
)
from controller.store_rows import AddonRow, new_id
from controller.write_budget import WriteBudget
from schemas import agent_api
from schemas.images import ImageRefused, check_reference
from schemas.messages import MAX_COUNT

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
AGENT_PREFIX = "/v1/agent/"
ID = re.compile(r"^[0-9a-f]{32}$")
HOST = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
PUBLIC_ROUTES = frozenset({"/healthz"})
# The methods a project token's write budget counts (controller/write_budget.py); every
# other method (GET, HEAD) its read budget.
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
UNMATCHED = "unmatched"
# Project tokens remembered for refusing before their lookup (forgotten all at once past it).
MAX_KNOWN_TOKENS = 100_000
# Routes without a {project_id} that a project token may use.
PROJECT_TOKEN_ROUTES = frozenset({("GET", "/v1/projects")})
# Lists are paginated by `limit` (1-500, default 100) and `offset` (0-1,000,000); each
# answers `next_offset` (null on the last page). Offsets, not cursors: any value the schema
# admits is meaningful (past the end is an empty page), so a fuzzer finds nothing to refuse.
DEFAULT_LIMIT = 100
MAX_LIMIT = 500
MAX_OFFSET = 1_000_000
# A long poll on a job's output waits at most this long (clients' timeouts exceed it).
MAX_OUTPUT_WAIT_S = 10
B = TypeVar("B", bound=msgspec.Struct)
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(value), status=status, content_type="application/json"
    )


def created(value: Any, location: str) -> web.Response:
    """201 with the new resource's address in `Location`."""
    response = json_response(value, 201)
    response.headers["Location"] = location
    return response


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    given = request.query.getall(name, [])
    if not given:
        return default
    if len(given) > 1:
        raise BadRequest(f"{name}: given {len(given)} times; give it once")
    raw = given[0]
    if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= high:
        raise BadRequest(f"{name}: expected an integer from {low} to {high}, got {raw!r}")
    return int(raw)


def page_of(request: web.Request) -> tuple[int, int]:
    """The (limit, offset) a list route was asked for."""
    return (
        _query_int(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
        _query_int(request, "offset", 0, 0, MAX_OFFSET),
    )


def paged(items: list[T], limit: int, offset: int) -> tuple[list[T], int | None]:
    """One page of a complete list, and the offset of the next page (None: no more)."""
    end = offset + limit
    return items[offset:end], (end if end < len(items) else None)


def _throttle(budget: WriteBudget, write: bool, wait: float) -> None:
    """Refuse a project token's request past its budget (`wait`: seconds until it may)."""
    if wait > 0:
        kind, error = ("writes", TooManyWrites) if write else ("reads", TooManyReads)
        raise error(
            f"this project's tokens may make {budget.burst} {kind} at once, "
            f"then {budget.per_s:g} a second; retry in {wait:.1f} s",
            retry_after_s=wait,
        )


def error_response(exc: ApiError) -> web.Response:
    response = json_response(ErrorView(error=exc.code, message=exc.message), exc.status)
    if isinstance(exc, Unauthorized):
        response.headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, Throttled):
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
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


def _path_number(request: web.Request) -> int:
    value = request.match_info["number"]
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= 2**31 - 1:
        raise NotFound(f"release {value!r} is not a release number")
    return int(value)


def principal_of(request: web.Request) -> Principal:
    principal: Principal = request["principal"]
    return principal


def require_project(request: web.Request, project_id: str) -> None:
    """Refuse (404) a project token asking about another project; the operator passes."""
    principal = principal_of(request)
    if principal.kind == "project" and principal.project_id != project_id:
        raise NotFound(f"project {project_id} does not exist")
    if principal.kind not in ("operator", "project"):
        raise NotFound("no such route")


def require_operator(request: web.Request) -> None:
    if principal_of(request).kind != "operator":
        raise NotFound("no such route")


def admit(principal: Principal | None, request: web.Request, route: str) -> None:
    """The default-deny rules of the module docstring."""
    # The matched route decides (it picks the handler); the raw path only when none did.
    agent_route = (request.path if route == UNMATCHED else route).startswith(AGENT_PREFIX)
    if agent_route and (principal is None or principal.kind != "agent"):
        raise Unauthorized("this route needs 'Authorization: Bearer <agent token>'")
    if principal is None or (principal.kind == "agent" and not agent_route):
        raise Unauthorized("this route needs 'Authorization: Bearer <operator or project token>'")
    if principal.kind == "metrics" and route != "/metrics":
        raise Unauthorized("the metrics token only reads GET /metrics")
    if principal.kind == "project":
        project_id = request.match_info.get("project_id")
        if project_id is not None:
            require_project(request, project_id)
        elif (request.method, route) not in PROJECT_TOKEN_ROUTES:
            raise NotFound("no such route")


async def read_body(request: web.Request, kind: type[B], optional: bool = False) -> B:
    """The body as `kind`; with `optional`, an empty body means `{}` (all defaults)."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes") from None
    if optional and not raw.strip():
        raw = b"{}"
    try:
        data = msgspec.json.decode(raw)
    # msgspec raises RecursionError (not DecodeError) for deeply nested input.
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InvalidJson(f"request body is not valid JSON: {exc}") from None
    twice = duplicate_key(raw)
    if twice is not None:  # msgspec would keep the last value; the sender meant one of them
        raise InvalidJson(f"request body gives the key {shown_key(twice)} twice in one object")
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        where = describe_body(exc, data, kind)  # the mapping key at fault named, too
        raise InvalidBody(f"invalid {kind.__name__} body: {where}") from None


class NoBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a route without a body accepts: nothing, or `{}`."""


_ADDON = "/v1/projects/{project_id}/addons/{addon_id}"
# The routes a project token may use that take no body: one sent is refused.
NO_BODY_ROUTES = frozenset(
    {
        ("POST", f"{_ADDON}/promote"),
        ("POST", f"{_ADDON}/rotate-credentials"),
        ("POST", f"{_ADDON}/backups"),
        ("POST", f"{_ADDON}/backups/{{backup_id}}/verify"),
        ("POST", f"{_ADDON}/backups/{{backup_id}}/restore"),
        ("POST", "/v1/projects/{project_id}/releases/{number}/rollback"),
        ("POST", "/v1/projects/{project_id}/jobs/{job_id}/cancel"),
        ("DELETE", _ADDON),
        ("DELETE", "/v1/projects/{project_id}/jobs/{job_id}"),
        ("DELETE", "/v1/projects/{project_id}/groups/{group_id}/shares/{addon_id}"),
    }
)


def takes_no_body(request: web.Request, route: str) -> bool:
    """The operator's too (every DELETE, adding a group member); a project token's other
    answers there stay the 404 of a route that does not exist for it."""
    if (request.method, route) in NO_BODY_ROUTES:
        return True
    principal: Principal | None = request.get("principal")
    return (
        principal is not None
        and principal.kind == "operator"
        and (
            request.method == "DELETE"
            or (request.method, route) == ("PUT", "/v1/groups/{group_id}/members/{project_id}")
        )
    )


class Api:
    def __init__(
        self,
        config: Config,
        pool: Pool,
        plans: Plans,
        dirty: DirtyHosts,
        metrics: Metrics,
        watch: joboutput.OutputWatch | None = None,
    ) -> None:
        self._watch = watch or joboutput.OutputWatch()
        self._config = config
        self._pool = pool
        self._plans = plans
        self._dirty = dirty
        self._metrics = metrics
        self._sealer = config.sealer
        self._writes = WriteBudget(
            config.http.project_writes_per_s, config.http.project_write_burst
        )
        self._reads = WriteBudget(config.http.project_reads_per_s, config.http.project_read_burst)
        # Project token digest -> its project, as last resolved: a token whose project is
        # out of budget is refused before the lookup, so a client ignoring Retry-After
        # costs no query. Only for refusing: admission always resolves the token afresh.
        self._token_projects: dict[bytes, str] = {}

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY_BYTES)
        r = app.router
        r.add_post("/v1/projects", self.create_project)
        r.add_get("/v1/projects", self.list_projects)
        r.add_get("/v1/projects/{project_id}", self.show_project)
        r.add_patch("/v1/projects/{project_id}", self.update_project)
        r.add_delete("/v1/projects/{project_id}", self.delete_project)
        r.add_post("/v1/projects/{project_id}/addons", self.create_addon)
        r.add_get("/v1/projects/{project_id}/addons", self.list_addons)
        r.add_get("/v1/projects/{project_id}/addons/{addon_id}", self.show_addon)
        r.add_patch("/v1/projects/{project_id}/addons/{addon_id}", self.update_addon)
        r.add_delete("/v1/projects/{project_id}/addons/{addon_id}", self.delete_addon)
        r.add_post("/v1/projects/{project_id}/addons/{addon_id}/promote", self.promote_addon)
        r.add_post(
            "/v1/projects/{project_id}/addons/{addon_id}/rotate-credentials", self.rotate_addon
        )
        r.add_get("/v1/projects/{project_id}/env", self.project_env)
        r.add_patch("/v1/projects/{project_id}/env", self.update_env)
        r.add_post("/v1/projects/{project_id}/releases", self.create_release)
        r.add_get("/v1/projects/{project_id}/releases", self.list_releases)
        r.add_get("/v1/projects/{project_id}/releases/{number}", self.show_release)
        r.add_post("/v1/projects/{project_id}/releases/{number}/rollback", self.rollback)
        r.add_get("/v1/projects/{project_id}/apps", self.list_apps)
        r.add_post("/v1/projects/{project_id}/jobs", self.create_job)
        r.add_get("/v1/projects/{project_id}/jobs", self.list_jobs)
        r.add_get("/v1/projects/{project_id}/jobs/{job_id}", self.show_job)
        r.add_get("/v1/projects/{project_id}/jobs/{job_id}/output", self.job_output)
        r.add_delete("/v1/projects/{project_id}/jobs/{job_id}", self.cancel_job)
        r.add_post("/v1/projects/{project_id}/jobs/{job_id}/cancel", self.cancel_job)
        r.add_post("/v1/projects/{project_id}/tokens", self.create_project_token)
        r.add_get("/v1/projects/{project_id}/tokens", self.list_project_tokens)
        r.add_delete("/v1/projects/{project_id}/tokens/{token_id}", self.revoke_project_token)
        BackupsApi(
            self._pool, self._plans, self._dirty, self._metrics, _path_id, read_body, page_of
        ).register(r)
        from controller.groups_api import GroupsApi  # it uses this module's helpers

        GroupsApi(self._pool, self._dirty).register(r)
        r.add_get("/v1/hosts", self.list_hosts)
        r.add_put("/v1/hosts/{host}/ceiling", self.set_host_ceiling)
        r.add_delete("/v1/hosts/{host}/ceiling", self.clear_host_ceiling)
        r.add_post("/v1/hosts/{host}/agent-tokens", self.create_agent_token)
        r.add_get("/v1/hosts/{host}/agent-tokens", self.list_agent_tokens)
        r.add_delete("/v1/hosts/{host}/agent-tokens/{token_id}", self.revoke_agent_token)
        r.add_get("/metrics", self.metrics)
        r.add_get("/healthz", self.healthz)
        r.add_get(agent_api.SECRET_PATH, self.agent_secret)
        r.add_get(agent_api.ENV_PATH, self.agent_env)
        r.add_get(agent_api.RELEASE_ENV_PATH, self.agent_release_env)
        return app

    # --- cross-cutting ----------------------------------------------------------------

    async def _authorize(self, request: web.Request, route: str) -> None:
        if route in PUBLIC_ROUTES:
            return
        header = request.headers.get("Authorization", "")
        if not header.isascii():
            # Tokens are ASCII; anything else cannot match (and cannot be encoded to hash).
            raise BadRequest("the Authorization header must be ASCII")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        principal = None
        write = request.method in WRITES
        budget = self._writes if write else self._reads
        if scheme.lower() == "bearer":
            known = None
            if token.startswith(tokens.PROJECT_PREFIX):
                known = tokens.digest(token)
                project_id = self._token_projects.get(known)
                # Its own project's routes only: another project's stays a 404 (admit).
                if (
                    project_id is not None
                    and request.match_info.get("project_id", project_id) == project_id
                ):
                    _throttle(budget, write, budget.wait(project_id, time.monotonic()))
            principal = await principals.resolve(self._pool, self._config.http, token)
            if known is not None:
                if principal is not None and principal.project_id is not None:
                    if len(self._token_projects) >= MAX_KNOWN_TOKENS:
                        self._token_projects.clear()
                    self._token_projects[known] = principal.project_id
                else:
                    self._token_projects.pop(known, None)
        request["principal"] = principal
        admit(principal, request, route)
        if principal is not None and principal.kind == "project":
            assert principal.project_id is not None
            _throttle(budget, write, budget.take(principal.project_id, time.monotonic()))

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else UNMATCHED
        try:
            await self._authorize(request, route)
            # (A method the route lacks stays a 405, whatever the body.)
            if request.match_info.http_exception is None and takes_no_body(request, route):
                # Refused, never ignored: `{"backup_id": ...}` sent to a restore, say,
                # would otherwise act on the path's ids as if nothing had been asked.
                await read_body(request, NoBody, optional=True)
            response = await handler(request)
        except ApiError as exc:
            response = error_response(exc)
        except web.HTTPException as exc:
            response = error_response(_from_http_exception(exc))
            if isinstance(exc, web.HTTPMethodNotAllowed):
                response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
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
        body = await read_body(request, request_bodies.ProjectCreate)
        request_bodies.check_project(body, self._plans)
        project = await store.create_project(
            self._pool, body.name, body.plan, self._config.hosts.offline_after_s
        )
        self._dirty.mark(project.host)
        log(logger, "project_created", project=project.id, plan=project.plan, host=project.host)
        return created(project_view(project), f"/v1/projects/{project.id}")

    async def list_projects(self, request: web.Request) -> web.Response:
        limit, offset = page_of(request)
        found = await store.list_projects(self._pool, principal_of(request).project_id)
        projects, next_offset = paged(found, limit, offset)
        return json_response(
            ProjectList(projects=tuple(project_view(p) for p in projects), next_offset=next_offset)
        )

    async def show_project(self, request: web.Request) -> web.Response:
        project = await store.get_project(self._pool, _path_id(request, "project_id"))
        return json_response(project_view(project))

    async def update_project(self, request: web.Request) -> web.Response:
        """A plan change: the host resizes the add-ons in place (see agent/upkeep.py)."""
        require_operator(request)  # the plan is what the tenant pays for
        project_id = _path_id(request, "project_id")
        body = await read_body(request, request_bodies.ProjectUpdate)
        request_bodies.check_project(body, self._plans)
        before = await store.get_project(self._pool, project_id)
        project = await store.change_plan(self._pool, project_id, body.plan, self._plans)
        self._dirty.mark(project.host)
        log(logger, "project_plan_changed", project=project.id, old=before.plan, plan=body.plan)
        return json_response(project_view(project))

    async def delete_project(self, request: web.Request) -> web.Response:
        require_operator(request)
        project, gone = await store.delete_project(self._pool, _path_id(request, "project_id"))
        self._dirty.mark(project.host)
        log(logger, "project_deleted", project=project.id, rows_gone=gone)
        return json_response(project_view(project), 202)

    # --- add-ons ----------------------------------------------------------------------

    async def create_addon(self, request: web.Request) -> web.Response:
        project_id = _path_id(request, "project_id")
        body = await read_body(request, request_bodies.AddonCreate)
        request_bodies.check_addon(body)
        addon_id = new_id()
        sealed = self._sealer.seal(secrets.token_urlsafe(24), addon_id.encode())
        try:
            addon = await store.create_addon(
                self._pool,
                project_id,
                addon_id,
                body.name,
                body.kind,
                self._plans,
                sealed,
                body.deletion_protection,
            )
        except PlanLimitReached:
            self._metrics.plan_limit_rejections.labels(
                (await store.get_project(self._pool, project_id)).plan
            ).inc()
            raise
        self._dirty.mark(addon.host)
        self._metrics.addons_created.labels(addon.kind).inc()
        log(logger, "addon_created", project=project_id, addon=addon.id, kind=addon.kind)
        return created(
            await self._addon_view(addon), f"/v1/projects/{project_id}/addons/{addon.id}"
        )

    async def list_addons(self, request: web.Request) -> web.Response:
        limit, offset = page_of(request)
        found = await store.list_addons(self._pool, _path_id(request, "project_id"))
        addons, next_offset = paged(found, limit, offset)
        live = [a for a in found if a.deleted_at is None]
        names, primary = names_of(live), primaries(live)
        return json_response(
            AddonList(
                addons=tuple(addon_view(a, self._plans, names, primary) for a in addons),
                next_offset=next_offset,
            )
        )

    async def show_addon(self, request: web.Request) -> web.Response:
        addon = await store.get_addon(
            self._pool, _path_id(request, "project_id"), _path_id(request, "addon_id")
        )
        return json_response(await self._addon_view(addon))

    async def delete_addon(self, request: web.Request) -> web.Response:
        project_id = _path_id(request, "project_id")
        addon = await store.tombstone_addon(self._pool, project_id, _path_id(request, "addon_id"))
        self._dirty.mark(addon.host)
        log(logger, "addon_deleted", project=project_id, addon=addon.id)
        return json_response(await self._addon_view(addon), 202)

    async def update_addon(self, request: web.Request) -> web.Response:
        project_id = _path_id(request, "project_id")
        addon_id = _path_id(request, "addon_id")
        body = await read_body(request, request_bodies.AddonUpdate)
        request_bodies.check_addon_update(body)
        if not isinstance(body.env_name, msgspec.UnsetType):
            await variables.set_env_name(self._pool, project_id, addon_id, body.env_name)
            log(
                logger,
                "addon_env_name_set",
                project=project_id,
                addon=addon_id,
                name=body.env_name,
            )
        if not isinstance(body.deletion_protection, msgspec.UnsetType):
            await store.set_deletion_protection(
                self._pool, project_id, addon_id, body.deletion_protection
            )
            log(
                logger,
                "addon_protection_set",
                project=project_id,
                addon=addon_id,
                protected=body.deletion_protection,
            )
        return json_response(
            await self._addon_view(await store.get_addon(self._pool, project_id, addon_id))
        )

    async def promote_addon(self, request: web.Request) -> web.Response:
        project_id = _path_id(request, "project_id")
        addon_id = _path_id(request, "addon_id")
        await variables.promote(self._pool, project_id, addon_id)
        log(logger, "addon_promoted", project=project_id, addon=addon_id)
        return json_response(
            await self._addon_view(await store.get_addon(self._pool, project_id, addon_id))
        )

    async def _addon_view(self, addon: AddonRow) -> AddonView:
        """The view of one add-on, with the names it gives among its project's add-ons."""
        if addon.deleted_at is not None:
            # A deleted add-on gives no names: its project's listing (a read of every
            # add-on, per DELETE) was half the controller's time in a burst of deletes.
            return addon_view(addon, self._plans)
        live = [
            a for a in await store.list_addons(self._pool, addon.project_id) if a.deleted_at is None
        ]
        return addon_view(addon, self._plans, names_of(live), primaries(live))

    async def _env(self, project_id: str, host: str | None = None) -> EnvView:
        found = await store.credentials(self._pool, self._sealer, project_id, host)
        own = await variables.user_variables(self._pool, self._sealer, project_id)
        shared = await groups.shared_with(self._pool, self._sealer, project_id)
        return EnvView(env=compose_env(found, own, shared))

    async def rotate_addon(self, request: web.Request) -> web.Response:
        """A new password; the previous one works for `secrets.rotation_grace_s` more."""
        project_id = _path_id(request, "project_id")
        addon_id = _path_id(request, "addon_id")
        sealed = self._sealer.seal(secrets.token_urlsafe(24), addon_id.encode())
        addon = await store.rotate_password(self._pool, project_id, addon_id, sealed)
        self._dirty.mark(addon.host)
        log(
            logger,
            "addon_credentials_rotated",
            project=project_id,
            addon=addon.id,
            secret_version=addon.secret_version,
        )
        return json_response(await self._addon_view(addon), 202)

    async def project_env(self, request: web.Request) -> web.Response:
        return json_response(await self._env(_path_id(request, "project_id")))

    async def update_env(self, request: web.Request) -> web.Response:
        project_id = _path_id(request, "project_id")
        body = await read_body(request, request_bodies.EnvUpdate)
        # A name an add-on or a group's share gives is refused inside the update's
        # transaction (variables.update), where a concurrent share is seen.
        await variables.update(self._pool, self._sealer, project_id, body.set_, body.unset)
        # Names only: values are often secrets.
        log(
            logger,
            "variables_changed",
            project=project_id,
            set=",".join(sorted(body.set_)) or "-",
            unset=",".join(body.unset) or "-",
        )
        return json_response(await self._env(project_id))

    # --- releases and apps ---------------------------------------------------------------

    async def create_release(self, request: web.Request) -> web.Response:
        project_id = _path_id(request, "project_id")
        body = await read_body(request, releases.ReleaseCreate)
        apps = None
        if body.apps is not None:
            for name, app in body.apps.items():
                try:
                    check_reference(app.image, self._config.jobs.allowed_images)
                except ImageRefused as exc:
                    raise InvalidBody(f"apps.{name}: {exc}") from None
            apps = [
                releases.AppDef(name=name, image=a.image, command=a.command)
                for name, a in sorted(body.apps.items())
            ]
        env = await self._env(project_id)
        release = await releases.create(
            self._pool, self._sealer, project_id, env.env, apps, body.description
        )
        await self._released(project_id, release)
        return created(
            release_view(release), f"/v1/projects/{project_id}/releases/{release.number}"
        )

    async def rollback(self, request: web.Request) -> web.Response:
        project_id = _path_id(request, "project_id")
        number = _path_number(request)
        release = await releases.rollback(self._pool, self._sealer, project_id, number)
        await self._released(project_id, release)
        return created(
            release_view(release), f"/v1/projects/{project_id}/releases/{release.number}"
        )

    async def _released(self, project_id: str, release: releases.ReleaseRow) -> None:
        project = await store.get_project(self._pool, project_id)
        self._dirty.mark(project.host)
        log(
            logger,
            "release_created",
            project=project_id,
            release=release.number,
            apps=len(release.apps),
            description=release.description,
        )

    async def list_releases(self, request: web.Request) -> web.Response:
        limit, offset = page_of(request)
        found = await releases.list_all(self._pool, self._sealer, _path_id(request, "project_id"))
        page, next_offset = paged(found, limit, offset)
        return json_response(
            ReleaseList(releases=tuple(release_view(r) for r in page), next_offset=next_offset)
        )

    async def show_release(self, request: web.Request) -> web.Response:
        release = await releases.get(
            self._pool, self._sealer, _path_id(request, "project_id"), _path_number(request)
        )
        return json_response(release_view(release))

    async def list_apps(self, request: web.Request) -> web.Response:
        project_id = _path_id(request, "project_id")
        current = await self._env(project_id)  # 404 for an unknown project
        newest = await releases.latest(self._pool, self._sealer, project_id)
        statuses = await reports.app_statuses(self._pool, project_id)
        apps = app_views(newest, current.env, statuses) if newest else ()
        return json_response(AppList(apps=apps))

    async def agent_release_env(self, request: web.Request) -> web.Response:
        host = principal_of(request).host
        assert host is not None
        project_id = _path_id(request, "project_id")
        if not await releases.placed_on(self._pool, project_id, host):
            raise NotFound(f"project {project_id} does not exist on host {host}")
        release = await releases.get(self._pool, self._sealer, project_id, _path_number(request))
        return json_response(agent_api.ProjectEnv(env=release.env))

    # --- jobs -------------------------------------------------------------------------

    async def create_job(self, request: web.Request) -> web.Response:
        project_id = _path_id(request, "project_id")
        body = await read_body(request, request_bodies.JobCreate)
        spec_bytes = request_bodies.check_job(body, self._config.jobs.allowed_images)
        job, host = await store.create_job(
            self._pool, project_id, body.image, body.command, body.timeout_s, spec_bytes
        )
        self._dirty.mark(host)
        log(logger, "job_created", project=project_id, job=job.id, image=job.image)
        return created(job_view(job), f"/v1/projects/{project_id}/jobs/{job.id}")

    async def show_job(self, request: web.Request) -> web.Response:
        job = await store.get_job(
            self._pool, _path_id(request, "project_id"), _path_id(request, "job_id")
        )
        return json_response(job_view(job))

    async def job_output(self, request: web.Request) -> web.Response:
        """A long poll on the job's live output (controller/joboutput.py)."""
        project_id = _path_id(request, "project_id")
        job_id = _path_id(request, "job_id")
        after = _query_int(request, "after", 0, 0, MAX_COUNT)
        deadline = time.monotonic() + _query_int(request, "wait", 0, 0, MAX_OUTPUT_WAIT_S)
        while True:
            changed = self._watch.event(job_id)
            view = await joboutput.read(self._pool, project_id, job_id, after)
            left = deadline - time.monotonic()
            if view.output or view.lost or view.complete or left <= 0:
                return json_response(view)
            # Woken by the ingest; at least once a second anyway (another controller).
            await self._watch.wait(job_id, changed, min(left, 1.0))

    async def list_jobs(self, request: web.Request) -> web.Response:
        limit, offset = page_of(request)
        # One more than asked: whether there is a next page, without counting them all.
        jobs = await store.list_jobs(self._pool, _path_id(request, "project_id"), limit + 1, offset)
        next_offset = offset + limit if len(jobs) > limit else None
        return json_response(
            JobList(jobs=tuple(job_view(j) for j in jobs[:limit]), next_offset=next_offset)
        )

    async def cancel_job(self, request: web.Request) -> web.Response:
        project_id = _path_id(request, "project_id")
        job, host, changed = await store.cancel_job(
            self._pool, project_id, _path_id(request, "job_id")
        )
        if job.state not in ("pending", "cancelled"):
            raise Conflict(f"job {job.id} already finished ({job.state}); nothing to cancel")
        if changed:
            self._dirty.mark(host)  # the job leaves the desired state; the agent stops it
            log(logger, "job_cancelled", project=project_id, job=job.id)
        return json_response(job_view(job))

    # --- tokens -----------------------------------------------------------------------

    async def create_project_token(self, request: web.Request) -> web.Response:
        require_operator(request)
        project_id = _path_id(request, "project_id")
        body = await read_body(request, request_bodies.TokenCreate, optional=True)
        row, token = await principals.create_project_token(self._pool, project_id, body.name)
        log(logger, "project_token_created", project=project_id, token_id=row.id)
        return created(new_token_view(row, token), f"/v1/projects/{project_id}/tokens/{row.id}")

    async def list_project_tokens(self, request: web.Request) -> web.Response:
        require_operator(request)
        limit, offset = page_of(request)
        found = await principals.list_project_tokens(self._pool, _path_id(request, "project_id"))
        rows, next_offset = paged(found, limit, offset)
        return json_response(
            TokenList(tokens=tuple(token_view(r) for r in rows), next_offset=next_offset)
        )

    async def revoke_project_token(self, request: web.Request) -> web.Response:
        require_operator(request)
        project_id = _path_id(request, "project_id")
        token_id = _path_id(request, "token_id")
        await principals.revoke_project_token(self._pool, project_id, token_id)
        log(logger, "project_token_revoked", project=project_id, token_id=token_id)
        return web.Response(status=204)

    async def create_agent_token(self, request: web.Request) -> web.Response:
        host = self._path_host(request)
        body = await read_body(request, request_bodies.TokenCreate, optional=True)
        row, token = await principals.create_agent_token(self._pool, host, body.name)
        log(logger, "agent_token_created", host=host, token_id=row.id)
        return created(new_token_view(row, token), f"/v1/hosts/{host}/agent-tokens/{row.id}")

    async def list_agent_tokens(self, request: web.Request) -> web.Response:
        limit, offset = page_of(request)
        host = self._path_host(request)
        found = await principals.list_agent_tokens(self._pool, host)
        if not found and not await self._host_known(host):
            raise NotFound(
                f"host {host} is unknown: it never reported, and has no agent token or ceiling"
            )
        rows, next_offset = paged(found, limit, offset)
        return json_response(
            TokenList(tokens=tuple(token_view(r) for r in rows), next_offset=next_offset)
        )

    async def revoke_agent_token(self, request: web.Request) -> web.Response:
        host = self._path_host(request)
        token_id = _path_id(request, "token_id")
        await principals.revoke_agent_token(self._pool, host, token_id)
        log(logger, "agent_token_revoked", host=host, token_id=token_id)
        return web.Response(status=204)

    # --- operations -------------------------------------------------------------------

    async def list_hosts(self, request: web.Request) -> web.Response:
        limit, offset = page_of(request)
        found = await store.list_hosts(self._pool, self._config.hosts.offline_after_s)
        hosts, next_offset = paged(found, limit, offset)
        return json_response(
            HostList(hosts=tuple(host_view(h) for h in hosts), next_offset=next_offset)
        )

    async def set_host_ceiling(self, request: web.Request) -> web.Response:
        require_operator(request)
        host = self._path_host(request)
        body = await read_body(request, request_bodies.HostCeilingSet)
        memory_mb = body.memory()
        await store.set_host_ceiling(self._pool, host, body.cpus, memory_mb)
        log(logger, "host_ceiling_set", host=host, cpus=body.cpus, memory_mb=memory_mb)
        cpus, memory_mb = await store.get_host_ceiling(self._pool, host)
        if cpus is None and memory_mb is None:
            return web.Response(status=204)
        return json_response(HostCeiling(cpus=cpus, memory_mb=memory_mb))

    async def clear_host_ceiling(self, request: web.Request) -> web.Response:
        require_operator(request)
        host = self._path_host(request)
        await store.set_host_ceiling(self._pool, host, None, None)
        log(logger, "host_ceiling_cleared", host=host)
        return web.Response(status=204)

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self._metrics.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"ok": True})

    async def _host_known(self, host: str) -> bool:
        bootstrap = self._config.http.agent_tokens  # up.sh's hosts, before they report
        return (bootstrap is not None and host in bootstrap.hosts()) or await store.host_known(
            self._pool, host
        )

    def _path_host(self, request: web.Request) -> str:
        host = request.match_info["host"]
        if not HOST.match(host):
            raise NotFound(f"host {host!r} is not a host name")
        return host

    # --- agent routes: the host is the one the agent token belongs to -----------------

    async def agent_secret(self, request: web.Request) -> web.Response:
        host = principal_of(request).host
        assert host is not None
        addon_id = _path_id(request, "addon_id")
        secret = await store.addon_secret(
            self._pool, self._sealer, host, addon_id, self._config.rotation_grace_s
        )
        # Deliberately no password in the log line.
        log(logger, "secret_served", host=host, addon=request.match_info["addon_id"])
        return json_response(
            agent_api.AddonSecret(
                password=secret.password,
                secret_version=secret.secret_version,
                previous_valid_until=secret.previous_valid_until,
            )
        )

    async def agent_env(self, request: web.Request) -> web.Response:
        host = principal_of(request).host
        assert host is not None
        project_id = _path_id(request, "project_id")
        env = await self._env(project_id, host)  # 404 unless placed on this host
        # Jobs run with the newest release's variables once the project has one.
        newest = await releases.latest(self._pool, self._sealer, project_id)
        return json_response(agent_api.ProjectEnv(env=newest.env if newest else env.env))


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"http.tls_cert_file/tls_key_file: cannot load: {exc}") from None
    return context


@asynccontextmanager
async def serve(
    app: web.Application,
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
    *,
    per_client: int = 0,
    idle_timeout_s: float = 75.0,
) -> AsyncIterator[None]:
    """Listen until the context exits; in-flight requests get a few seconds to finish."""
    runner = JsonErrorsRunner(
        app, per_client=per_client, keepalive_timeout=idle_timeout_s,
        access_log=None, handle_signals=False, shutdown_timeout=5.0,
    )  # fmt: skip
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=tls).start()
        log(logger, "http_listening", host=host, port=port, tls=tls is not None)
        yield
    finally:
        await runner.cleanup()
