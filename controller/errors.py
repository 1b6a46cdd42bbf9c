"""Errors the controller raises, translated once at each adapter boundary.

    ControllerError
    ├── ConfigError              bad controller.toml or plans file (exit code 2)
    ├── Transient                worth retrying after a backoff
    │   ├── DatabaseUnavailable  asyncpg lost or cannot get a connection
    │   └── BrokerUnavailable    not connected to MQTT, or a publish failed
    └── ApiError                 rendered as {"error": code, "message": ...} by api.py
        ├── InvalidJson          400 invalid_json
        ├── Unauthorized         401 unauthorized
        ├── NotFound             404 not_found
        ├── MethodNotAllowed     405 method_not_allowed
        ├── Conflict             409 conflict
        ├── PlanLimitReached     409 plan_limit_reached
        ├── PlanChangeRefused    409 plan_change_refused
        ├── DeletionProtected    409 deletion_protected
        ├── TooManyPendingJobs   409 too_many_pending_jobs
        ├── PayloadTooLarge      413 payload_too_large
        ├── InvalidBody          422 invalid_body
        ├── Throttled            429, with Retry-After
        │   ├── TooManyWrites    429 too_many_writes
        │   └── TooManyReads     429 too_many_reads
        ├── NoHostAvailable      503 no_host_available
        └── ServiceUnavailable   503 database_unavailable

asyncpg exceptions become DatabaseUnavailable / Conflict in db.py and store.py; aiomqtt
exceptions become BrokerUnavailable in mqtt.py; nothing else sees a foreign exception.
"""

from __future__ import annotations


class ControllerError(Exception):
    """Base of every error the controller raises on purpose."""


class ConfigError(ControllerError):
    """A configuration or plans file is invalid; the message names the bad key."""


class Transient(ControllerError):
    """A dependency is unavailable for now; retry with backoff."""


class DatabaseUnavailable(Transient):
    pass


class BrokerUnavailable(Transient):
    pass


class ApiError(ControllerError):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class InvalidJson(ApiError):
    status = 400
    code = "invalid_json"


class BadRequest(ApiError):
    """A request that is not valid HTTP, or a header no client of ours would send."""

    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    code = "method_not_allowed"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class PlanLimitReached(ApiError):
    status = 409
    code = "plan_limit_reached"


class PlanChangeRefused(ApiError):
    """A downgrade the project's add-on count or storage usage would not fit."""

    status = 409
    code = "plan_change_refused"


class DeletionProtected(ApiError):
    status = 409
    code = "deletion_protected"


class TooManyPendingJobs(ApiError):
    status = 409
    code = "too_many_pending_jobs"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class InvalidBody(ApiError):
    status = 422
    code = "invalid_body"


class Throttled(ApiError):
    """A project token past one of its budgets (controller/write_budget.py)."""

    status = 429

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyWrites(Throttled):
    code = "too_many_writes"


class TooManyReads(Throttled):
    code = "too_many_reads"


class NoHostAvailable(ApiError):
    status = 503
    code = "no_host_available"


class ServiceUnavailable(ApiError):
    status = 503
    code = "database_unavailable"
