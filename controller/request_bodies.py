"""Request bodies of the user API, validated by msgspec (unknown fields are errors).

Checks msgspec cannot express (plan names from the plans file, variable clashes, the
size of a job's command) live next to the structs as plain functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from controller.env import VARIABLE_NAME, clashes_with_default, variable_name
from controller.errors import InvalidBody, PayloadTooLarge
from controller.plans import Plan
from schemas.images import ImageRefused, check_reference
from schemas.messages import MAX_MESSAGE_BYTES, AddonKind, DnsName, JobSpec, Resources

ProjectName = Annotated[
    str,
    Meta(
        pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        description="lower-case letters, digits and '-', 1-63 characters",
    ),
]
ImageRef = Annotated[
    str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$", min_length=1, max_length=512)
]
# Pending jobs travel in the host's desired state, which must stay below 1 MiB whatever
# the commands hold: a control character grows 6x in JSON, so the budgets count encoded
# bytes. A project's pending jobs share one budget, a host's projects a larger one.
# docs/openapi.yaml states the per-field limits; the two sums JSON Schema cannot state
# (16 KiB of arguments, 64 KiB once encoded) are in its description.
MAX_ARGUMENTS = 128
MAX_ARGUMENT_CHARS = 4096
MAX_COMMAND_BYTES = 16 * 1024
Argument = Annotated[str, Meta(max_length=MAX_ARGUMENT_CHARS, pattern="^[^\x00]*$")]
MAX_PENDING_JOBS = 8
MAX_PROJECT_JOB_BYTES = 64 * 1024
MAX_HOST_JOB_BYTES = MAX_MESSAGE_BYTES // 4
# The snapshot adds the plan's sizing to each job: count it at its longest encoding.
LONGEST_RESOURCES = Resources(cpus=0.1234567890123456, memory_mb=1024 * 1024)
TokenName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,62}$")]
VariableName = Annotated[str, Meta(pattern=VARIABLE_NAME.pattern)]
MAX_VALUE_CHARS = 8192
VariableValue = Annotated[str, Meta(max_length=MAX_VALUE_CHARS, pattern="^[^\x00]*$")]
MAX_CHANGES = 100
Variables = Annotated[dict[VariableName, VariableValue], Meta(max_length=MAX_CHANGES)]


class ProjectCreate(Struct, frozen=True, forbid_unknown_fields=True):
    name: ProjectName
    plan: Annotated[str, Meta(min_length=1, max_length=32)]


class ProjectUpdate(Struct, frozen=True, forbid_unknown_fields=True):
    plan: Annotated[str, Meta(min_length=1, max_length=32)]


class AddonCreate(Struct, frozen=True, forbid_unknown_fields=True):
    name: DnsName
    kind: AddonKind
    deletion_protection: bool = False


class JobCreate(Struct, frozen=True, forbid_unknown_fields=True):
    image: ImageRef
    command: Annotated[tuple[Argument, ...], Meta(max_length=MAX_ARGUMENTS)] = ()
    timeout_s: Annotated[float, Meta(gt=0, le=86400)] = 600.0


class TokenCreate(Struct, frozen=True, forbid_unknown_fields=True):
    name: TokenName = "default"


class HostCeilingSet(Struct, frozen=True, forbid_unknown_fields=True):
    """PUT /v1/hosts/{host}/ceiling: null (or absent) leaves that dimension unbounded."""

    cpus: Annotated[float, Meta(ge=0, le=65536)] | None = None
    # A number, so that JSON's 8192.0 (an integer to JSON Schema) is accepted too.
    memory_mb: Annotated[float, Meta(ge=0, le=2**31 - 1)] | None = None

    def memory(self) -> int | None:
        if self.memory_mb is None:
            return None
        if not float(self.memory_mb).is_integer():
            raise InvalidBody("invalid HostCeilingSet body: memory_mb: Expected a whole number")
        return int(self.memory_mb)


class EnvUpdate(Struct, frozen=True, forbid_unknown_fields=True):
    set_: Variables = msgspec.field(default_factory=dict, name="set")
    unset: Annotated[tuple[VariableName, ...], Meta(max_length=MAX_CHANGES)] = ()


class AddonUpdate(Struct, frozen=True, forbid_unknown_fields=True):
    # Each field is optional; a field left out is left as it is (null clears env_name).
    env_name: VariableName | UnsetType | None = UNSET
    deletion_protection: bool | UnsetType = UNSET


def check_addon_update(body: AddonUpdate) -> None:
    if body.env_name is UNSET and body.deletion_protection is UNSET:
        raise InvalidBody("expected at least one of env_name, deletion_protection")
    # A default variable's name: refused by kind in variables.set_env_name.


def check_project(body: ProjectCreate | ProjectUpdate, plans: Mapping[str, Plan]) -> None:
    if body.plan not in plans:
        raise InvalidBody(f"plan: unknown plan {body.plan!r}; expected one of {', '.join(plans)}")


def check_addon(body: AddonCreate) -> None:
    if clashes_with_default(body.name):
        raise InvalidBody(
            f"name: {body.name!r} is reserved: its variable {variable_name(body.name)} "
            "is the default connection variable; choose another name"
        )


def check_job(body: JobCreate, allowed_images: Iterable[str]) -> int:
    """Validate a job; returns the bytes its JobSpec takes in the desired state."""
    try:
        check_reference(body.image, allowed_images)
    except ImageRefused as exc:
        raise InvalidBody(str(exc)) from None
    size = sum(len(arg.encode()) for arg in body.command)
    if size > MAX_COMMAND_BYTES:
        raise InvalidBody(f"command: {size} bytes in total; at most {MAX_COMMAND_BYTES}")
    spec = JobSpec(
        id="0" * 32,
        image=body.image,
        command=body.command,
        timeout_s=body.timeout_s,
        resources=LONGEST_RESOURCES,
    )
    encoded = len(msgspec.json.encode(spec))
    if encoded > MAX_PROJECT_JOB_BYTES:
        raise PayloadTooLarge(
            f"job: {encoded} bytes once encoded for the host (control characters count 6x); "
            f"at most {MAX_PROJECT_JOB_BYTES}"
        )
    return encoded
