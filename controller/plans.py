"""Plans: what each tier may run, loaded from a TOML file (data, not code).

The packaged `plans.toml` is the default; tests and operators pass their own file.
Each table is one plan; its name is what `POST /v1/projects` accepts as `plan`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from controller.config import describe, read_toml
from controller.errors import ConfigError
from schemas.messages import Resources, SleepPolicy

PLAN_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# The smallest storage quota a plan may give: an empty Postgres 15 takes about 7.5 MB.
MIN_STORAGE_MB = 10
# The least memory a new Postgres 15 starts in: at 32 MB initdb's bootstrap is OOM-killed
# and the container restarts for ever ("provisioning", Ready Unreachable).
MIN_MEMORY_MB = 64


class Plan(Struct, frozen=True, forbid_unknown_fields=True):
    max_addons: Annotated[int, Meta(ge=0, le=1000)]
    cpus: Annotated[float, Meta(gt=0, le=256)]
    memory_mb: Annotated[int, Meta(ge=32, le=1024 * 1024)]
    sleep: SleepPolicy = SleepPolicy()
    # Each add-on's storage quota (None: none), enforced by agent/upkeep.py.
    storage_mb: Annotated[int, Meta(ge=1)] | None = None
    manual_backups_per_day: Annotated[int, Meta(ge=0)] = 0
    backup_retention_days: Annotated[int, Meta(ge=0)] = 0

    @property
    def resources(self) -> Resources:
        return Resources(cpus=self.cpus, memory_mb=self.memory_mb)


Plans = Mapping[str, Plan]


def load_plans(path: Path | None) -> Plans:
    """Load and validate a plans file; `None` loads the packaged default."""
    if path is None:
        with resources.as_file(resources.files("controller") / "plans.toml") as packaged:
            return _validate(read_toml(packaged, "plans file"), packaged)
    return _validate(read_toml(path, "plans file"), path)


def _validate(raw: dict[str, object], path: Path) -> Plans:
    if not raw:
        raise ConfigError(f"plans file {path} defines no plan")
    plans: dict[str, Plan] = {}
    for name, table in raw.items():
        if not PLAN_NAME.match(name):
            raise ConfigError(
                f"plans file {path}: plan name {name!r} must match {PLAN_NAME.pattern}"
            )
        try:
            plan = msgspec.convert(table, Plan)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"plans file {path}: {describe(exc, name)}") from None
        if plan.sleep.enabled and plan.sleep.deep_after_s <= plan.sleep.light_after_s:
            raise ConfigError(
                f"plans file {path}: {name}.sleep.deep_after_s must be greater than light_after_s"
            )
        if plan.storage_mb is not None and plan.storage_mb < MIN_STORAGE_MB:
            # A unit slip (10 meant as GB) made every new Postgres refuse writes from birth.
            raise ConfigError(
                f"plans file {path}: {name}.storage_mb = {plan.storage_mb} is below "
                f"{MIN_STORAGE_MB}: an empty Postgres takes about 8 MB, so its writes would be "
                "refused from the start (storage_mb is in MB; leave it out for no quota)"
            )
        if plan.memory_mb < MIN_MEMORY_MB:
            raise ConfigError(
                f"plans file {path}: {name}.memory_mb = {plan.memory_mb} is below "
                f"{MIN_MEMORY_MB}: a Postgres on it is killed for memory in initdb and never "
                "starts (every plan can run both kinds)"
            )
        plans[name] = plan
    return plans
