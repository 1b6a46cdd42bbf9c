"""A small synchronous HTTP client for the controller's API (stdlib only).

Errors become `CliError`s that say what went wrong and what to do next.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import click

# Lists are paginated; the CLI follows the pages up to this many items.
PAGE = 100
MAX_ITEMS = 10_000


class CliError(click.ClickException):
    """An error for a human: what failed, then what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(f"{message}\n  hint: {hint}" if hint else message)


class ApiFailure(CliError):
    def __init__(self, status: int, code: str, message: str, hint: str = "") -> None:
        self.status = status
        self.code = code
        self.api_message = message
        super().__init__(f"{message} (HTTP {status} {code})", hint or _hint(status, code, message))


LARGER_PLAN = (
    "have the operator move the project to a larger plan (`orkestr projects plan NAME PLAN`)"
)


NOT_THE_API = (
    "check the address (`orkestr login --api URL`): it must be the controller's API, "
    "e.g. http://127.0.0.1:8080"
)


def _hint(status: int, code: str, message: str = "") -> str:
    """What to do next, for every error the API answers (the message says what failed)."""
    if code == "http_error" and status < 500:
        # The controller answers every error with its JSON: this server is something else.
        return NOT_THE_API
    if status == 401:
        return "the token was refused: run `orkestr login` with a valid one (or set ORKESTR_TOKEN)"
    if code == "plan_limit_reached" and "would not fit" in message:
        # A restore bigger than the plan's storage: only a larger plan makes room for it.
        return (
            "have the operator move the project to a plan with more storage "
            "(`orkestr projects plan NAME PLAN`), then restore again"
        )
    if code == "plan_limit_reached" and "needs room for two copies" in message:
        # A Postgres restore that fits the plan but not beside the live database.
        return (
            "free the space the message names in the live database, or have the operator "
            "move the project to a plan with more storage (`orkestr projects plan NAME "
            "PLAN`), restore, and move it back"
        )
    if code == "plan_limit_reached" and "backup" in message:
        # The day's manual backups are used up (the message says when the next one is
        # possible), or the plan has none: deleting an add-on would not help.
        return ("wait until then, or " if "possible after" in message else "") + LARGER_PLAN
    if code == "plan_limit_reached":
        return "delete an add-on (`orkestr addons delete NAME`), or " + LARGER_PLAN
    if code == "plan_change_refused":
        return "free or delete what the message names, then retry; or choose a plan it fits"
    if code == "deletion_protected":
        return "clear the protection first: `orkestr addons protect NAME --off`"
    if code == "too_many_pending_jobs":
        return "wait for the project's pending jobs to finish (or cancel some), then retry"
    if code == "too_many_writes":
        return "wait the seconds the message names, then retry; a script should pace its writes"
    if code == "too_many_reads":
        return "wait the seconds the message names, then retry; a script should poll less often"
    if code == "payload_too_large":
        return "send less: shorter values, or a shorter command"
    if code == "no_host_available":
        return "no agent is online; start one (see docs/operations.md) and retry"
    if code == "database_unavailable" or status >= 500:
        return "the controller has trouble; retry in a moment, or check its log"
    if status == 404:
        return (
            "check the name or id: `orkestr projects`, `orkestr addons list`, "
            "`orkestr releases` and `orkestr backups list ADDON` show what exists"
        )
    if status == 409:
        if "in progress" in message:
            return "wait until it has finished (`orkestr backups list ADDON`), then retry"
        if "being deleted" in message:
            return "it is being deleted: nothing more can change it"
        if "already" in message or "variable" in message:
            return "choose another name"
        return "change what the message names first, then retry"
    return f"`{_command()} --help` shows what each argument takes"


def _command() -> str:
    """The command being run (`orkestr env set`), or the program's name outside one."""
    ctx = click.get_current_context(silent=True)
    return ctx.command_path if ctx is not None else "orkestr"


class Client:
    def __init__(self, api: str, token: str, timeout_s: float = 30.0) -> None:
        if not api:
            raise CliError(
                "no API address configured",
                "run `orkestr login --api http://127.0.0.1:8080` (or set ORKESTR_API)",
            )
        if not api.startswith(("http://", "https://")):
            raise CliError(
                f"the API address {api!r} has no scheme",
                f"give the whole URL, e.g. `orkestr login --api http://{api}`",
            )
        try:  # urllib would raise ValueError on the first request, a traceback for the user
            if urllib.parse.urlsplit(api).port == 0:
                raise ValueError("port 0")
        except ValueError as exc:
            raise CliError(
                f"the API address {api!r} is not a valid URL: {exc}", NOT_THE_API
            ) from None
        if not token:
            raise CliError("no token configured", "run `orkestr login` (or set ORKESTR_TOKEN)")
        self.api = api.rstrip("/")
        self._token = token
        self._timeout_s = timeout_s
        self._ssl = ssl.create_default_context()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Call the API; returns the decoded JSON body (None for 204)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self._token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(  # the scheme is the user's own API address
                req,
                timeout=self._timeout_s,
                context=self._ssl if self.api.startswith("https:") else None,
            ) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                err = json.loads(raw)
                code, message = str(err["error"]), str(err["message"])
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", raw.decode(errors="replace")[:200] or exc.reason
            raise ApiFailure(exc.code, code, message) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            # HTTPException: something that does not speak HTTP answered (BadStatusLine).
            reason = getattr(exc, "reason", exc)
            raise CliError(
                f"cannot reach the API at {self.api}: {reason!s:.200}",
                "check the address (`orkestr login --api URL`) and that the controller runs",
            ) from None
        if not raw:
            return None
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):  # every answer of the controller is a JSON object
            raise CliError(
                f"the server at {self.api} answered {method} {path.split('?')[0]}, "
                "but not as the orkestr API does (no JSON object)",
                NOT_THE_API,
            )
        return answer

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def list_all(self, path: str, key: str) -> list[dict[str, Any]]:
        """Every item of a paginated list route, following `next_offset`."""
        items: list[dict[str, Any]] = []
        offset: int | None = 0
        while offset is not None and len(items) < MAX_ITEMS:
            query = urllib.parse.urlencode({"limit": PAGE, "offset": offset})
            page = self.get(f"{path}?{query}")
            found = page.get(key) if isinstance(page, dict) else None
            if not isinstance(found, list):
                raise CliError(
                    f"the server at {self.api} answered {path} without its {key!r} list",
                    NOT_THE_API,
                )
            items.extend(found)
            offset = page.get("next_offset")
        return items
