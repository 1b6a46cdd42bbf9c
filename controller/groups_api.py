"""The project-group routes (see groups.py for what a group is).

Registered on the API's application by `Api.app()`, so they share its middleware. Routes
without a `{project_id}` are the operator's; with one, a project token passes for its own
project, and the membership routes then refuse it (only the operator groups projects).

    POST    /v1/groups                                   create a group (operator)
    GET     /v1/groups                                   list groups (operator)
    GET     /v1/groups/{group_id}                        one group (operator)
    DELETE  /v1/groups/{group_id}                        remove it, with its shares (operator)
    PUT     /v1/groups/{group_id}/members/{project_id}   add a member (operator)
    DELETE  /v1/groups/{group_id}/members/{project_id}   remove a member (operator)
    GET     /v1/projects/{project_id}/groups             the project's groups
    GET     /v1/projects/{project_id}/groups/{group_id}  one of them
    PUT     /v1/projects/{project_id}/groups/{group_id}/shares/{addon_id}   share an add-on
    DELETE  /v1/projects/{project_id}/groups/{group_id}/shares/{addon_id}   stop sharing it
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated

from aiohttp import web
from msgspec import Meta, Struct

from controller import api as http
from controller import groups
from controller.db import Pool
from controller.dirty_hosts import DirtyHosts
from controller.env import DEFAULT_VARIABLES
from controller.errors import InvalidBody
from controller.groups import GroupRow, MemberRow, ShareRow
from controller.logs import log
from controller.request_bodies import ProjectName, VariableName

logger = logging.getLogger(__name__)


class GroupCreate(Struct, frozen=True, forbid_unknown_fields=True):
    name: ProjectName


# A share's name lands in other tenants' environments: only names of the form <NAME>_URL,
# so one member cannot set PATH, LD_PRELOAD, NODE_OPTIONS, HTTP_PROXY... in another's.
SHARE_SUFFIX = "_URL"


class ShareBody(Struct, frozen=True, forbid_unknown_fields=True):
    # The variable the other members get the add-on's URL under.
    env_name: Annotated[VariableName, Meta(description="e.g. ORDERS_DATABASE_URL")]


class GroupView(Struct, frozen=True):
    id: str
    name: str
    host: str | None  # where every member is placed; null while it has none
    members: tuple[MemberRow, ...]
    shares: tuple[ShareRow, ...]
    created_at: datetime


class GroupList(Struct, frozen=True):
    groups: tuple[GroupView, ...]
    next_offset: int | None


def group_view(g: GroupRow) -> GroupView:
    return GroupView(g.id, g.name, g.host, g.members, g.shares, g.created_at)


class GroupsApi:
    def __init__(self, pool: Pool, dirty: DirtyHosts) -> None:
        self._pool = pool
        self._dirty = dirty

    def register(self, r: web.UrlDispatcher) -> None:
        r.add_post("/v1/groups", self.create)
        r.add_get("/v1/groups", self.list_groups)
        r.add_get("/v1/groups/{group_id}", self.show)
        r.add_delete("/v1/groups/{group_id}", self.delete)
        r.add_put("/v1/groups/{group_id}/members/{project_id}", self.add_member)
        r.add_delete("/v1/groups/{group_id}/members/{project_id}", self.remove_member)
        r.add_get("/v1/projects/{project_id}/groups", self.project_groups)
        r.add_get("/v1/projects/{project_id}/groups/{group_id}", self.project_group)
        shares = "/v1/projects/{project_id}/groups/{group_id}/shares/{addon_id}"
        r.add_put(shares, self.share)
        r.add_delete(shares, self.unshare)

    def _changed(self, group: GroupRow) -> None:
        if group.host is not None:
            self._dirty.mark(group.host)

    # --- operator -------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        body = await http.read_body(request, GroupCreate)
        group = await groups.create(self._pool, body.name)
        log(logger, "group_created", group=group.id, name=group.name)
        return http.created(group_view(group), f"/v1/groups/{group.id}")

    async def list_groups(self, request: web.Request) -> web.Response:
        limit, offset = http.page_of(request)
        page, next_offset = http.paged(await groups.list_all(self._pool), limit, offset)
        return http.json_response(
            GroupList(groups=tuple(group_view(g) for g in page), next_offset=next_offset)
        )

    async def show(self, request: web.Request) -> web.Response:
        group = await groups.get(self._pool, http._path_id(request, "group_id"))
        return http.json_response(group_view(group))

    async def delete(self, request: web.Request) -> web.Response:
        group = await groups.delete(self._pool, http._path_id(request, "group_id"))
        self._changed(group)
        log(logger, "group_deleted", group=group.id)
        return web.Response(status=204)

    async def add_member(self, request: web.Request) -> web.Response:
        http.require_operator(request)
        group_id = http._path_id(request, "group_id")
        project_id = http._path_id(request, "project_id")
        group, joined = await groups.add_member(self._pool, group_id, project_id)
        if joined:
            self._changed(group)
            log(logger, "group_member_added", group=group_id, project=project_id)
        return http.json_response(group_view(group))

    async def remove_member(self, request: web.Request) -> web.Response:
        http.require_operator(request)
        group_id = http._path_id(request, "group_id")
        project_id = http._path_id(request, "project_id")
        group = await groups.remove_member(self._pool, group_id, project_id)
        self._changed(group)
        log(logger, "group_member_removed", group=group_id, project=project_id)
        return http.json_response(group_view(await groups.get(self._pool, group_id)))

    # --- a project's owner ----------------------------------------------------------

    async def project_groups(self, request: web.Request) -> web.Response:
        project_id = http._path_id(request, "project_id")
        limit, offset = http.page_of(request)
        found = await groups.list_all(self._pool, member=project_id)
        page, next_offset = http.paged(found, limit, offset)
        return http.json_response(
            GroupList(groups=tuple(group_view(g) for g in page), next_offset=next_offset)
        )

    async def project_group(self, request: web.Request) -> web.Response:
        group = await groups.get(
            self._pool,
            http._path_id(request, "group_id"),
            member=http._path_id(request, "project_id"),
        )
        return http.json_response(group_view(group))

    async def share(self, request: web.Request) -> web.Response:
        project_id = http._path_id(request, "project_id")
        group_id = http._path_id(request, "group_id")
        addon_id = http._path_id(request, "addon_id")
        body = await http.read_body(request, ShareBody)
        if body.env_name in DEFAULT_VARIABLES.values():
            raise InvalidBody(
                f"env_name: {body.env_name} is each member's own primary add-on's variable; "
                "pick a name of its own"
            )
        if not body.env_name.endswith(SHARE_SUFFIX):
            raise InvalidBody(
                f"env_name: {body.env_name} does not end in {SHARE_SUFFIX}; a shared add-on's "
                "variable is set in the other members' apps and jobs, where a name such as "
                "PATH or LD_PRELOAD would change how their programs run (e.g. ORDERS_URL)"
            )
        group = await groups.share(self._pool, project_id, group_id, addon_id, body.env_name)
        self._changed(group)
        log(
            logger,
            "addon_shared",
            project=project_id,
            group=group_id,
            addon=addon_id,
            name=body.env_name,
        )
        return http.json_response(group_view(group))

    async def unshare(self, request: web.Request) -> web.Response:
        project_id = http._path_id(request, "project_id")
        group_id = http._path_id(request, "group_id")
        addon_id = http._path_id(request, "addon_id")
        group = await groups.unshare(self._pool, project_id, group_id, addon_id)
        self._changed(group)
        log(logger, "addon_unshared", project=project_id, group=group_id, addon=addon_id)
        return web.Response(status=204)
