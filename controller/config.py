"""The controller's configuration: controller.toml validated into frozen structs.

`load_config` reads the TOML file, checks every key (unknown keys are errors, so typos
are caught), reads token files relative to the config file and returns a `Config`.
Every problem becomes a `ConfigError` whose message names the offending key.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from controller.errors import ConfigError

Port = Annotated[int, Meta(ge=1, le=65535)]
MIN_TOKEN_CHARS = 16


class HttpSection(Struct, frozen=True, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:8080"
    api_token: str | None = None
    api_token_file: str | None = None
    agent_token: str | None = None
    agent_token_file: str | None = None


class DatabaseSection(Struct, frozen=True, forbid_unknown_fields=True):
    url: str
    min_connections: Annotated[int, Meta(ge=1, le=100)] = 2
    max_connections: Annotated[int, Meta(ge=1, le=100)] = 10


class MqttSection(Struct, frozen=True, forbid_unknown_fields=True):
    host: Annotated[str, Meta(min_length=1)] = "127.0.0.1"
    port: Port = 1883
    client_id: Annotated[str, Meta(min_length=1, max_length=128)] = "orkestr-controller"
    username: str | None = None
    password: str | None = None
    keepalive_s: Annotated[int, Meta(ge=5, le=3600)] = 30


class PlansSection(Struct, frozen=True, forbid_unknown_fields=True):
    file: str = ""


class HostsSection(Struct, frozen=True, forbid_unknown_fields=True):
    offline_after_s: Annotated[float, Meta(gt=0, le=86400)] = 30.0


class BackupsSection(Struct, frozen=True, forbid_unknown_fields=True):
    # How often the scheduler checks for owed automatic backups and applies retention.
    schedule_tick_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0


class LogSection(Struct, frozen=True, forbid_unknown_fields=True):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class _File(Struct, frozen=True, forbid_unknown_fields=True):
    database: DatabaseSection
    http: HttpSection = HttpSection()
    mqtt: MqttSection = MqttSection()
    plans: PlansSection = PlansSection()
    hosts: HostsSection = HostsSection()
    log: LogSection = LogSection()
    backups: BackupsSection = BackupsSection()


class HttpConfig(Struct, frozen=True):
    host: str
    port: int
    api_token: str
    agent_token: str


class Config(Struct, frozen=True):
    http: HttpConfig
    database: DatabaseSection
    mqtt: MqttSection
    plans_file: Path | None  # None: the plans.toml packaged with the controller
    hosts: HostsSection
    log: LogSection
    backups: BackupsSection = BackupsSection()


def describe(exc: msgspec.ValidationError, within: str = "") -> str:
    """msgspec's "Expected `int`, got `str` - at `$.http.port`" as "http.port: Expected ...".

    `within` prefixes the key path (a plan name, say); errors with no path name it alone.
    """
    text, path = str(exc), ""
    match = re.fullmatch(r"(.*) - at `\$\.?(.*)`", text, re.DOTALL)
    if match is not None:
        text, path = match[1], match[2]
    where = ".".join(p for p in (within, path) if p) or "top level"
    return f"{where}: {text}"


def read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from None


def load_config(path: Path) -> Config:
    raw = read_toml(path, "config file")
    try:
        file = msgspec.convert(raw, _File)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config file {path}: {describe(exc)}") from None
    return resolve(file, path.parent)


def parse_config(text: str, base: Path) -> Config:
    """The same as `load_config` for TOML text; relative paths resolve against `base`."""
    try:
        file = msgspec.convert(tomllib.loads(text), _File)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config is not valid TOML: {exc}") from None
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config: {describe(exc)}") from None
    return resolve(file, base)


def resolve(file: _File, base: Path) -> Config:
    host, port = parse_listen(file.http.listen)
    api_token = _token(file.http.api_token, file.http.api_token_file, "api_token", base)
    agent_token = _token(file.http.agent_token, file.http.agent_token_file, "agent_token", base)
    if api_token == agent_token:
        # Otherwise a user could call the agent routes and read every add-on password.
        raise ConfigError("http.agent_token must differ from http.api_token")
    if not re.match(r"^postgres(ql)?://", file.database.url):
        raise ConfigError("database.url must be a postgresql:// URL")
    if file.database.min_connections > file.database.max_connections:
        raise ConfigError("database.min_connections must not exceed database.max_connections")
    if (file.mqtt.username is None) != (file.mqtt.password is None):
        raise ConfigError("mqtt.username and mqtt.password must be given together")
    plans = base / file.plans.file if file.plans.file else None
    return Config(
        http=HttpConfig(host=host, port=port, api_token=api_token, agent_token=agent_token),
        database=file.database,
        mqtt=file.mqtt,
        plans_file=plans,
        hosts=file.hosts,
        log=file.log,
        backups=file.backups,
    )


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port_text = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # "[::1]:8080"
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"http.listen must be HOST:PORT with a port 1-65535, got {listen!r}")
    return host, int(port_text)


def _token(value: str | None, file: str | None, key: str, base: Path) -> str:
    if (value is None) == (file is None):
        raise ConfigError(f"http: exactly one of {key} and {key}_file is required")
    if file is not None:
        try:
            value = (base / file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"http.{key}_file: cannot read {file}: {exc}") from None
    assert value is not None
    if len(value) < MIN_TOKEN_CHARS or any(c.isspace() for c in value):
        raise ConfigError(
            f"http.{key} must be at least {MIN_TOKEN_CHARS} characters without whitespace"
        )
    return value
