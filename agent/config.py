"""The agent's configuration: a TOML file validated into frozen structs.

A wrong key or type stops the agent at start with a message naming the key, rather than
a surprise hours later.
"""

from __future__ import annotations

import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from agent.firewall import Policy
from agent.specs import Images
from agent.synqueue import DeepWake
from schemas.messages import MAX_OUTPUT_CHUNK_CHARS, HostName
from schemas.mqtt_tls import client_context
from schemas.signed import SigningKeyError, Verifier


class AgentSection(Struct, frozen=True, forbid_unknown_fields=True):
    host: HostName
    state_dir: str = "/var/lib/orkestr-agent"
    resync_interval_s: Annotated[float, Meta(gt=0)] = 15.0
    heartbeat_s: Annotated[float, Meta(gt=0)] = 10.0
    probe_timeout_s: Annotated[float, Meta(gt=0)] = 3.0
    job_memory_mb: Annotated[int, Meta(ge=32)] = 512
    job_cpus: Annotated[float, Meta(gt=0, le=256)] = 1.0
    job_pids: Annotated[int, Meta(ge=16)] = 256
    # Jobs of one project running at once (the rest wait, in order): each has the plan's
    # CPU and memory, and a project may have 8 pending.
    jobs_per_project: Annotated[int, Meta(ge=1, le=64)] = 2
    job_output_bytes: Annotated[int, Meta(ge=1024)] = 65536
    # Live output of a running job (agent/joboutput.py): at most one chunk of at most
    # this many characters per interval, per job.
    job_stream_interval_s: Annotated[float, Meta(ge=0.05, le=10)] = 0.25
    job_stream_chunk_chars: Annotated[int, Meta(ge=256, le=MAX_OUTPUT_CHUNK_CHARS)] = 16384
    # Holders kept started per add-on kind, parked on an internal network, for new add-ons
    # to claim (agent/pool.py): a create then skips its holder's network start. 0: none.
    holder_pool: Annotated[int, Meta(ge=0, le=16)] = 2
    # How often idle add-ons are checked for sleep.
    sleep_tick_s: Annotated[float, Meta(gt=0)] = 1.0
    # The wake-socket keeper (agent/keeper.py); empty: none, and sleeping add-ons refuse
    # connections while the agent restarts.
    keeper_socket: str = ""
    # Caps on connections relayed after deep wakes (two descriptors each, in the keeper or,
    # without one, in the agent), per add-on and for the host; keep the host's below the
    # units' LimitNOFILE / 2 with room to spare.
    wake_relays_per_addon: Annotated[int, Meta(ge=1)] = 64
    wake_relays_total: Annotated[int, Meta(ge=1)] = 2048
    # How a deep-sleeping add-on takes a client (agent/synqueue.py): "queue" holds the SYN
    # in the kernel until the database runs (the connection is then the database's own);
    # "relay" accepts it at the wake listener and has the keeper relay it for its life.
    # "queue" falls back to "relay" by itself where NFQUEUE is not available.
    deep_wake: DeepWake = "queue"
    # A loop-mounted ext4 filesystem per add-on volume, sized by the plan (agent/loopfs.py):
    # the hard backstop behind storage quotas. False: plain Docker volumes.
    volume_filesystems: bool = True
    # New Postgres add-ons get their WAL on a loop filesystem of its own (with
    # volume_filesystems): a full data filesystem then fails the tenant's statement, never
    # a WAL write (a PANIC). Add-ons made without one keep their WAL inside PGDATA.
    wal_filesystems: bool = True
    # How often each Postgres volume's filesystem is looked at (one statfs) between passes:
    # growth by an eighth of the quota, or a filesystem short of its WAL reserve, gets an
    # upkeep round at once (agent/upkeep.py), so a fast filler meets the quota in time.
    quota_guard_s: Annotated[float, Meta(gt=0)] = 0.25
    # Each add-on's database on ceil(cpus) of the host's cores, the least loaded by plan
    # (agent/placement.py), so a hog at its quota delays only the add-ons on its cores.
    # False: every container on every core (Docker's default).
    home_cores: bool = True


class ControllerSection(Struct, frozen=True, forbid_unknown_fields=True):
    url: str
    # This host's own token (it names the host to the controller).
    agent_token: str = ""
    agent_token_file: str = ""
    # The CA that signed the controller's HTTPS certificate; empty: the system's CAs.
    ca_file: str = ""

    def token(self) -> str:
        if self.agent_token_file:
            return Path(self.agent_token_file).read_text().strip()
        return self.agent_token


class MqttSection(Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 1883
    # This host's broker identity: the username is the host name (the ACL relies on it).
    username: str | None = None
    password_file: str = ""
    # TLS: verify the broker against this CA; optionally present a client certificate.
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    keepalive_s: Annotated[int, Meta(ge=5)] = 30

    def password(self) -> str | None:
        return Path(self.password_file).read_text().strip() if self.password_file else None


class SigningSection(Struct, frozen=True, forbid_unknown_fields=True):
    # The controller's Ed25519 public key(s), PEM; several while a key is rotated.
    public_key_file: str


class DockerSection(Struct, frozen=True, forbid_unknown_fields=True):
    url: str | None = None
    # Docker API calls in flight at once, across all add-on, job and network workers.
    max_in_flight: Annotated[int, Meta(ge=1, le=256)] = 16


class MetricsSection(Struct, frozen=True, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:9464"
    # The scrape token (Authorization: Bearer); empty: the agent's own, made once in
    # `<state_dir>/metrics_token` (0600). /metrics is never open.
    token_file: str = ""


class BackupsSection(Struct, frozen=True, forbid_unknown_fields=True):
    # The backup store; empty: `<state_dir>/backups`. May be a mount of shared storage.
    dir: str = ""
    # The one-shot containers' image: bash, pg_dump/pg_restore/postgres, redis-cli/-server.
    image: str = "orkestr-local/toolbox:bookworm"
    memory_mb: Annotated[int, Meta(ge=128)] = 1024
    timeout_s: Annotated[float, Meta(gt=0)] = 6 * 3600.0
    # A deleted add-on's backups stay this many days after its deletion (for the operator
    # to recover from), then its directory of the store goes (agent/deleted_backups.py).
    deleted_addon_days: Annotated[float, Meta(ge=0)] = 7.0
    # A deleted project's backups go at once; true keeps them for deleted_addon_days too.
    keep_deleted_projects: bool = False

    def root(self, state_dir: str) -> Path:
        return Path(self.dir) if self.dir else Path(state_dir) / "backups"


class LogSection(Struct, frozen=True, forbid_unknown_fields=True):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "json": one JSON object per line (schemas/logs.py), for a log shipper.
    format: Literal["text", "json"] = "text"


class AgentConfig(Struct, frozen=True, forbid_unknown_fields=True):
    agent: AgentSection
    controller: ControllerSection
    signing: SigningSection
    mqtt: MqttSection = MqttSection()
    docker: DockerSection = DockerSection()
    images: Images = Images()
    metrics: MetricsSection = MetricsSection()
    backups: BackupsSection = BackupsSection()
    network: Policy = Policy()
    log: LogSection = LogSection()


class ConfigError(Exception):
    pass


def load(path: Path) -> AgentConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        config = msgspec.convert(raw, AgentConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not (config.controller.agent_token or config.controller.agent_token_file):
        raise ConfigError(f"{path}: controller.agent_token or agent_token_file is required")
    if config.controller.agent_token_file:
        # Read again on every request (a rotation needs no restart), but a file missing at
        # the start is a set-up error: the agent ran and failed every add-on's secrets.
        token_file = config.controller.agent_token_file
        try:
            token = config.controller.token()
        except OSError as exc:
            raise ConfigError(
                f"{path}: controller.agent_token_file: cannot read {token_file}: {exc.strerror}"
            ) from None
        if not token:
            raise ConfigError(f"{path}: controller.agent_token_file: {token_file} is empty")
    if config.mqtt.username not in (None, config.agent.host):
        # The broker's ACL grants each user the topics named after it.
        raise ConfigError(f"{path}: mqtt.username must be the host name ({config.agent.host})")
    if bool(config.mqtt.cert_file) != bool(config.mqtt.key_file):
        raise ConfigError(f"{path}: mqtt.cert_file and mqtt.key_file go together")
    if config.mqtt.cert_file and not config.mqtt.ca_file:
        raise ConfigError(f"{path}: mqtt.cert_file needs mqtt.ca_file (TLS)")
    return config


def verifier(config: AgentConfig) -> Verifier:
    """The trusted signing keys; ConfigError when the file is missing or holds none."""
    path = config.signing.public_key_file
    try:
        return Verifier.from_pem(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"signing.public_key_file: cannot read {path}: {exc.strerror}") from None
    except SigningKeyError as exc:
        raise ConfigError(f"signing.public_key_file {path}: {exc}") from None


def tls_context(config: AgentConfig) -> ssl.SSLContext | None:
    m = config.mqtt
    if not m.ca_file:
        return None
    try:
        return client_context(m.ca_file, m.cert_file, m.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt TLS files: {exc}") from None
