"""The controller's configuration: controller.toml validated into frozen structs.

`load_config` reads the TOML file, checks every key (unknown keys are errors, so typos
are caught), checks the token and key files (relative to the config file) and returns a
`Config`. Every problem becomes a `ConfigError` whose message names the offending key.
"""

from __future__ import annotations

import re
import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from controller.broker_config import BrokerConfigError, require_safe
from controller.errors import ConfigError
from controller.sealing import Sealer
from controller.tokens import AgentTokensFile, FileToken
from schemas.images import DEFAULT_JOB_IMAGES
from schemas.mqtt_tls import client_context
from schemas.signed import Signer, SigningKeyError

Port = Annotated[int, Meta(ge=1, le=65535)]


class HttpSection(Struct, frozen=True, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:8080"
    operator_token: str | None = None
    operator_token_file: str | None = None
    # The older names of operator_token[_file].
    api_token: str | None = None
    api_token_file: str | None = None
    metrics_token: str | None = None
    metrics_token_file: str | None = None
    agent_tokens_file: str | None = None
    # Replaced by per-host agent tokens; kept only to say so.
    agent_token: str | None = None
    agent_token_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # Connections one client address may hold open (0: no cap; behind a proxy every
    # client has the proxy's address), and seconds an idle one is kept.
    max_connections_per_client: Annotated[int, Meta(ge=0)] = 128
    idle_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 75.0
    # Writes (POST, PUT, PATCH, DELETE) one project's tokens may make: `burst` at once,
    # then `project_writes_per_s` (0: no budget). The operator's are not counted.
    project_writes_per_s: Annotated[float, Meta(ge=0, le=10000)] = 5.0
    project_write_burst: Annotated[int, Meta(ge=1, le=100000)] = 30
    # Reads (GET, HEAD) one project's tokens may make, alike: each keeps the controller's
    # one process busy for everyone, agents' fetches included. Not the operator's.
    project_reads_per_s: Annotated[float, Meta(ge=0, le=100000)] = 20.0
    project_read_burst: Annotated[int, Meta(ge=1, le=100000)] = 100


class DatabaseSection(Struct, frozen=True, forbid_unknown_fields=True):
    url: str
    min_connections: Annotated[int, Meta(ge=1, le=100)] = 2
    max_connections: Annotated[int, Meta(ge=1, le=100)] = 10


class MqttSection(Struct, frozen=True, forbid_unknown_fields=True):
    host: Annotated[str, Meta(min_length=1)] = "127.0.0.1"
    port: Port = 1883
    # With `use_username_as_clientid` (required by the broker check) the broker uses the
    # username as client id instead.
    client_id: Annotated[str, Meta(min_length=1, max_length=128)] = "orkestr-controller"
    username: str | None = None
    password_file: str | None = None
    # TLS: verify the broker against this CA; optionally present a client certificate.
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # The broker's mosquitto.conf when it runs on this machine: checked at start.
    broker_config: str | None = None
    keepalive_s: Annotated[int, Meta(ge=5, le=3600)] = 30


class SigningSection(Struct, frozen=True, forbid_unknown_fields=True):
    # Ed25519 private key (PEM) that signs every desired state; agents hold the public key.
    key_file: str


class PlansSection(Struct, frozen=True, forbid_unknown_fields=True):
    file: str = ""


class HostsSection(Struct, frozen=True, forbid_unknown_fields=True):
    offline_after_s: Annotated[float, Meta(gt=0, le=86400)] = 30.0


class BackupsSection(Struct, frozen=True, forbid_unknown_fields=True):
    # How often the scheduler checks for owed automatic backups and applies retention.
    schedule_tick_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0


class LogSection(Struct, frozen=True, forbid_unknown_fields=True):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "json": one JSON object per line (schemas/logs.py), for a log shipper.
    format: Literal["text", "json"] = "text"


class SecretsSection(Struct, frozen=True, forbid_unknown_fields=True):
    key_file: Annotated[str, Meta(min_length=1)]
    # After a rotation the previous password keeps working this long, so apps can be
    # redeployed with the new variables before the old ones stop.
    rotation_grace_s: Annotated[float, Meta(ge=0, le=30 * 86400)] = 3600.0


class JobsSection(Struct, frozen=True, forbid_unknown_fields=True):
    # Shell-style patterns of the images a job may run (schemas/images.py).
    allowed_images: tuple[str, ...] = DEFAULT_JOB_IMAGES
    # Finished jobs (and their output) are deleted this long after they finish.
    retention_s: Annotated[float, Meta(ge=1, le=365 * 86400)] = 7 * 86400.0
    prune_interval_s: Annotated[float, Meta(ge=0.1, le=86400)] = 300.0
    # Finished jobs kept per project (the newest), whatever their age: one project token
    # running short jobs back to back otherwise filled the controller's database with
    # rows and outputs (~100 kB a job, a job a second) for the whole retention.
    keep_per_project: Annotated[int, Meta(ge=1, le=1_000_000)] = 500
    # Live output kept per job (the newest characters), as agents stream it.
    output_retain_chars: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 65536


class _File(Struct, frozen=True, forbid_unknown_fields=True):
    database: DatabaseSection
    secrets: SecretsSection
    signing: SigningSection
    http: HttpSection = HttpSection()
    mqtt: MqttSection = MqttSection()
    plans: PlansSection = PlansSection()
    hosts: HostsSection = HostsSection()
    jobs: JobsSection = JobsSection()
    log: LogSection = LogSection()
    backups: BackupsSection = BackupsSection()


class HttpConfig:
    """Resolved [http]: the listen address, the credentials and TLS (not a struct: the
    token holders re-read their files)."""

    def __init__(
        self,
        host: str,
        port: int,
        operator: FileToken,
        metrics: FileToken | None,
        agent_tokens: AgentTokensFile | None,
        tls: tuple[Path, Path] | None,
        max_connections_per_client: int = 128,
        idle_timeout_s: float = 75.0,
        project_writes_per_s: float = 5.0,
        project_write_burst: int = 30,
        project_reads_per_s: float = 20.0,
        project_read_burst: int = 100,
    ) -> None:
        self.host = host
        self.port = port
        self.operator = operator
        self.metrics = metrics
        self.agent_tokens = agent_tokens
        self.tls = tls  # (certificate chain file, private key file)
        self.max_connections_per_client = max_connections_per_client
        self.idle_timeout_s = idle_timeout_s
        self.project_writes_per_s = project_writes_per_s
        self.project_write_burst = project_write_burst
        self.project_reads_per_s = project_reads_per_s
        self.project_read_burst = project_read_burst


class MqttConfig(Struct, frozen=True):
    host: str
    port: int
    client_id: str
    username: str | None
    password: str | None
    tls: ssl.SSLContext | None
    keepalive_s: int


class Config(Struct, frozen=True):
    http: HttpConfig
    database: DatabaseSection
    mqtt: MqttConfig
    signer: Signer
    plans_file: Path | None  # None: the plans.toml packaged with the controller
    hosts: HostsSection
    log: LogSection
    sealer: Sealer
    jobs: JobsSection = JobsSection()
    rotation_grace_s: float = 3600.0
    backups: BackupsSection = BackupsSection()


def describe(exc: msgspec.ValidationError, within: str = "") -> str:
    """msgspec's "Expected `int`, got `str` - at `$.http.port`" as "http.port: Expected ...".

    `within` prefixes the key path (a plan name, say); errors with no path name it alone.
    """
    text, path, key = str(exc), "", ""
    # A mapping's key: "... - at `key` in `$.set`".
    match = re.fullmatch(r"(.*) - at (`key` in )?`\$\.?(.*)`", text, re.DOTALL)
    if match is not None:
        text, key, path = match[1], match[2] or "", match[3]
    where = ".".join(p for p in (within, path) if p) or "top level"
    return f"{where}{', a key' if key else ''}: {text}"


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
    http = file.http
    host, port = parse_listen(http.listen)
    if http.agent_token is not None or http.agent_token_file is not None:
        raise ConfigError(
            "http.agent_token[_file]: the shared agent token is gone; give each host its own "
            "(http.agent_tokens_file or POST /v1/hosts/{host}/agent-tokens)"
        )
    if http.api_token is not None or http.api_token_file is not None:
        if http.operator_token is not None or http.operator_token_file is not None:
            raise ConfigError(
                "http: give operator_token[_file] or its older name api_token[_file], not both"
            )
        http = msgspec.structs.replace(
            http, operator_token=http.api_token, operator_token_file=http.api_token_file
        )
    operator = _token(http.operator_token, http.operator_token_file, "operator_token", base)
    assert operator is not None
    metrics = _token(http.metrics_token, http.metrics_token_file, "metrics_token", base, True)
    agents = AgentTokensFile(base / http.agent_tokens_file) if http.agent_tokens_file else None
    if (http.tls_cert_file is None) != (http.tls_key_file is None):
        raise ConfigError("http.tls_cert_file and http.tls_key_file must be given together")
    tls = None
    if http.tls_cert_file is not None and http.tls_key_file is not None:
        tls = (base / http.tls_cert_file, base / http.tls_key_file)
    if not re.match(r"^postgres(ql)?://", file.database.url):
        raise ConfigError("database.url must be a postgresql:// URL")
    if file.database.min_connections > file.database.max_connections:
        raise ConfigError("database.min_connections must not exceed database.max_connections")
    plans = base / file.plans.file if file.plans.file else None
    return Config(
        http=HttpConfig(
            host,
            port,
            operator,
            metrics,
            agents,
            tls,
            http.max_connections_per_client,
            http.idle_timeout_s,
            http.project_writes_per_s,
            http.project_write_burst,
            http.project_reads_per_s,
            http.project_read_burst,
        ),
        database=file.database,
        mqtt=_mqtt(file.mqtt, base),
        signer=_signer(file.signing, base),
        plans_file=plans,
        hosts=file.hosts,
        log=file.log,
        backups=file.backups,
        sealer=Sealer.from_file(base / file.secrets.key_file),
        jobs=file.jobs,
        rotation_grace_s=file.secrets.rotation_grace_s,
    )


def _mqtt(section: MqttSection, base: Path) -> MqttConfig:
    if (section.username is None) != (section.password_file is None):
        raise ConfigError("mqtt.username and mqtt.password_file must be given together")
    password = None
    if section.password_file is not None:
        password = _read(base / section.password_file, "mqtt.password_file").strip()
        if not password:
            raise ConfigError(f"mqtt.password_file: {section.password_file} is empty")
    if (section.cert_file is None) != (section.key_file is None):
        raise ConfigError("mqtt.cert_file and mqtt.key_file must be given together")
    if section.cert_file is not None and section.ca_file is None:
        raise ConfigError("mqtt.cert_file needs mqtt.ca_file (TLS)")
    tls = None
    if section.ca_file is not None:
        try:
            tls = client_context(
                str(base / section.ca_file),
                str(base / section.cert_file) if section.cert_file else "",
                str(base / section.key_file) if section.key_file else "",
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"mqtt TLS files: {exc}") from None
    if section.broker_config is not None:
        try:
            require_safe(base / section.broker_config)
        except BrokerConfigError as exc:
            raise ConfigError(f"mqtt.broker_config: {exc}") from None
    return MqttConfig(
        host=section.host,
        port=section.port,
        client_id=section.client_id,
        username=section.username,
        password=password,
        tls=tls,
        keepalive_s=section.keepalive_s,
    )


def _signer(section: SigningSection, base: Path) -> Signer:
    pem = _read(base / section.key_file, "signing.key_file")
    try:
        return Signer.from_pem(pem.encode())
    except SigningKeyError as exc:
        raise ConfigError(f"signing.key_file {section.key_file}: {exc}") from None


def _read(path: Path, key: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc}") from None


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port_text = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # "[::1]:8080"
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"http.listen must be HOST:PORT with a port 1-65535, got {listen!r}")
    return host, int(port_text)


def _token(
    value: str | None, file: str | None, key: str, base: Path, optional: bool = False
) -> FileToken | None:
    if value is not None and file is not None:
        raise ConfigError(f"http: give only one of {key} and {key}_file")
    if value is None and file is None:
        if optional:
            return None
        raise ConfigError(f"http: exactly one of {key} and {key}_file is required")
    return FileToken(f"http.{key}", value, base / file if file is not None else None)
