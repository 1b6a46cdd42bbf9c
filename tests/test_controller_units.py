"""Pure parts of the controller: env composition, plans and config validation, phase
derivation, topic classification, backoff. No services needed."""

from __future__ import annotations

import atexit
import base64
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote, urlsplit

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from controller.api import Api
from controller.backoff import Backoff
from controller.config import load_config, parse_config
from controller.env import Credentials, clashes_with_default, compose_env, variable_name
from controller.errors import ApiError, ConfigError
from controller.ingest import classify
from controller.metrics import Metrics
from controller.plans import load_plans
from controller.responses import phase
from controller.sealing import Sealer, SealError
from controller.store_rows import AddonRow
from controller.tokens import digest, parse_agent_tokens
from schemas import topics
from schemas.messages import AddonStatus, Condition, ConditionStatus, SleepState

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2025, 1, 1, tzinfo=UTC)
ID = "a" * 32

# --- env ------------------------------------------------------------------------------

dns_names = st.from_regex(r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$", fullmatch=True)


def creds(
    name: str, kind: str = "postgres", at: int = 0, password: str = "pw", i: int = 0
) -> Credentials:
    return Credentials(
        id=f"{i:032x}",
        name=name,
        kind=kind,  # type: ignore[arg-type]
        database="app",
        user="app",
        password=password,
        created_at=T0 + timedelta(seconds=at),
    )


def test_env_for_one_postgres_and_one_redis() -> None:
    env = compose_env([creds("orders-db", "postgres", 0, "p1"), creds("cache", "redis", 1, "r1")])
    assert env == {
        "DATABASE_URL": "postgresql://app:p1@orders-db:5432/app",
        "ORDERS_DB_URL": "postgresql://app:p1@orders-db:5432/app",
        "REDIS_URL": "redis://default:r1@cache:6379/0",
        "CACHE_URL": "redis://default:r1@cache:6379/0",
    }


def test_env_defaults_come_from_the_oldest_addon_of_each_kind() -> None:
    env = compose_env(
        [creds("second", "postgres", 5, "b", 2), creds("first", "postgres", 1, "a", 1)]
    )
    assert env["DATABASE_URL"] == env["FIRST_URL"]
    assert "REDIS_URL" not in env


def test_env_is_empty_without_addons() -> None:
    assert compose_env([]) == {}


def test_env_percent_encodes_passwords() -> None:
    env = compose_env([creds("db", password="a/b@c:d%"), creds("kv", "redis", 1, "x y#", 1)])
    assert env["DB_URL"] == "postgresql://app:a%2Fb%40c%3Ad%25@db:5432/app"
    assert env["KV_URL"] == "redis://default:x%20y%23@kv:6379/0"


def test_reserved_names() -> None:
    assert clashes_with_default("database") and clashes_with_default("redis")
    assert not clashes_with_default("db") and not clashes_with_default("redis-cache")


@given(
    addons=st.lists(
        st.tuples(dns_names, st.sampled_from(["postgres", "redis"]), st.text(min_size=1)),
        max_size=6,
        unique_by=lambda a: a[0],
    )
)
def test_env_properties(addons: list[tuple[str, str, str]]) -> None:
    live = [
        creds(name, kind, at, password, i)
        for i, (name, kind, password) in enumerate(addons)
        for at in [i]
        if not clashes_with_default(name)
    ]
    env = compose_env(live)
    for c in live:
        value = env[variable_name(c.name)]
        url = urlsplit(value)
        assert url.hostname == c.name
        assert unquote(url.password or "") == c.password
        assert url.port == (5432 if c.kind == "postgres" else 6379)
        assert variable_name(c.name).replace("_", "").isalnum()
    for kind, var in [("postgres", "DATABASE_URL"), ("redis", "REDIS_URL")]:
        first = next((c for c in live if c.kind == kind), None)
        if first is None:
            assert var not in env
        else:
            assert env[var] == env[variable_name(first.name)]
    assert len(env) == len(live) + len({c.kind for c in live})


# --- plans ----------------------------------------------------------------------------


def test_packaged_plans_match_the_product_page() -> None:
    plans = load_plans(None)
    assert {n: p.max_addons for n, p in plans.items()} == {"starter": 1, "pro": 2, "team": 5}
    assert plans["starter"].sleep.enabled and not plans["team"].sleep.enabled
    assert plans["pro"].resources.memory_mb == 1024


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "defines no plan"),
        ("[Bad]\nmax_addons = 1\ncpus = 1\nmemory_mb = 64", "plan name 'Bad'"),
        ("[x]\ncpus = 1\nmemory_mb = 64", "x: Object missing required field `max_addons`"),
        ("[x]\nmax_addons = -1\ncpus = 1\nmemory_mb = 64", "x.max_addons"),
        ("[x]\nmax_addons = 1\ncpus = 0\nmemory_mb = 64", "x.cpus"),
        ("[x]\nmax_addons = 1\ncpus = 1\nmemory_mb = 8", "x.memory_mb"),
        (
            # initdb was OOM-killed, the add-on "provisioning" for ever, Ready Unreachable.
            "[x]\nmax_addons = 1\ncpus = 1\nmemory_mb = 32",
            "x.memory_mb = 32 is below 64: a Postgres on it is killed for memory in initdb",
        ),
        ("[x]\nmax_addons = 1\ncpus = 1\nmemory_mb = 64\ncolour = 1", "unknown field `colour`"),
        (
            "[x]\nmax_addons = 1\ncpus = 1\nmemory_mb = 64\nsleep = { enabled = true, light = 1 }",
            "x.sleep: Object contains unknown field `light`",
        ),
        (
            "[x]\nmax_addons = 1\ncpus = 1\nmemory_mb = 64\n"
            "sleep = { enabled = true, light_after_s = 10, deep_after_s = 5 }",
            "x.sleep.deep_after_s must be greater than light_after_s",
        ),
        ("[x]\nmax_addons = 'two'\ncpus = 1\nmemory_mb = 64", "x.max_addons: Expected `int`"),
        (
            # A new Postgres on it refused writes from birth (7.4 MB of 2 MB: Exceeded).
            "[x]\nmax_addons = 1\ncpus = 1\nmemory_mb = 64\nstorage_mb = 2",
            "x.storage_mb = 2 is below 10: an empty Postgres takes about 8 MB",
        ),
        ("[x\n", "not valid TOML"),
    ],
)
def test_plans_validation_names_the_problem(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "plans.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_plans(path)
    assert error in str(caught.value)


def test_missing_plans_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read plans file"):
        load_plans(tmp_path / "nope.toml")


# --- config ---------------------------------------------------------------------------


def _signing_key_file() -> str:
    """A throwaway Ed25519 key for configs parsed here (removed at exit)."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd, name = tempfile.mkstemp(prefix="orkestr-signing-", suffix=".key")
    os.write(fd, pem)
    os.close(fd)
    atexit.register(os.unlink, name)
    return name


GOOD = f"""
[signing]
key_file = "{_signing_key_file()}"
[http]
listen = "127.0.0.1:8080"
operator_token = "user-token-0123456789"
metrics_token = "metrics-token-0123456789"
[secrets]
key_file = "secrets.key"
[database]
url = "postgresql://u:p@127.0.0.1:5432/orkestr"
"""


def key_dir(path: Path) -> Path:
    """`path` with the key file GOOD names."""
    (path / "secrets.key").write_text(base64.b64encode(bytes(range(32))).decode() + "\n")
    return path


def test_config_defaults(tmp_path: Path) -> None:
    config = parse_config(GOOD, key_dir(tmp_path))
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8080)
    assert config.mqtt.port == 1883 and config.mqtt.client_id == "orkestr-controller"
    assert config.hosts.offline_after_s == 30 and config.plans_file is None
    assert config.http.tls is None and config.http.agent_tokens is None
    assert config.jobs.retention_s == 7 * 86400
    assert config.http.operator.matches(digest("user-token-0123456789"))
    assert config.http.metrics is not None
    assert config.http.metrics.matches(digest("metrics-token-0123456789"))


def test_config_token_files_resolve_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "api.token").write_text("file-token-0123456789\n")
    (tmp_path / "agents").write_text(f"host-a {'ab' * 32}  # up.sh\n\n")
    path = key_dir(tmp_path) / "controller.toml"
    # api_token_file: the operator token's older name still works.
    path.write_text(
        GOOD.replace(
            'operator_token = "user-token-0123456789"',
            'api_token_file = "api.token"\nagent_tokens_file = "agents"',
        )
    )
    config = load_config(path)
    assert config.http.operator.matches(digest("file-token-0123456789"))
    assert config.http.agent_tokens is not None
    assert config.http.agent_tokens.host_of(bytes.fromhex("ab" * 32)) == "host-a"
    assert config.http.agent_tokens.host_of(bytes.fromhex("cd" * 32)) is None


def test_sealed_passwords_open_with_their_key_and_row_only(tmp_path: Path) -> None:
    sealer = parse_config(GOOD, key_dir(tmp_path)).sealer
    sealed = sealer.seal("s3cret-password", b"row-1")
    assert b"s3cret" not in sealed and sealed != sealer.seal("s3cret-password", b"row-1")
    assert sealer.open(sealed, b"row-1") == "s3cret-password"
    with pytest.raises(SealError):
        sealer.open(sealed, b"row-2")  # copied onto another add-on's row
    with pytest.raises(SealError):
        Sealer(bytes(32)).open(sealed, b"row-1")  # another key
    with pytest.raises(SealError):
        sealer.open(sealed[:-1] + bytes([sealed[-1] ^ 1]), b"row-1")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (("[http]", "[http]\nport = 1"), "http: Object contains unknown field `port`"),
        (("127.0.0.1:8080", "127.0.0.1"), "http.listen must be HOST:PORT"),
        (("127.0.0.1:8080", "127.0.0.1:99999"), "http.listen must be HOST:PORT"),
        (
            ('operator_token = "user-token-0123456789"', ""),
            "exactly one of operator_token and operator_token_file",
        ),
        (
            ('operator_token = "user-token-0123456789"', 'operator_token = "short"'),
            "http.operator_token must be at least",
        ),
        (
            (
                'operator_token = "user-token-0123456789"',
                'api_token = "user-token-0123456789"\noperator_token = "user-token-0123456789"',
            ),
            "operator_token[_file] or its older name",
        ),
        (
            ("[http]", '[http]\nagent_token = "agent-token-0123456789"'),
            "shared agent token is gone",
        ),
        (("[http]", '[http]\nagent_tokens_file = "nope"'), "http.agent_tokens_file"),
        (("[http]", '[http]\ntls_cert_file = "c.pem"'), "tls_key_file must be given together"),
        (('key_file = "secrets.key"', 'key_file = "nope.key"'), "secrets.key_file: cannot use"),
        (('[secrets]\nkey_file = "secrets.key"', ""), "missing required field `secrets`"),
        (("[database]", "[jobs]\nretention_s = 0\n[database]"), "jobs.retention_s"),
        (("postgresql://", "mysql://"), "database.url must be a postgresql:// URL"),
        (("[database]", "[mqtt]\nport = 'x'\n[database]"), "mqtt.port: Expected `int`"),
        (("[database]", "[hosts]\noffline_after_s = 0\n[database]"), "hosts.offline_after_s"),
        (("[database]", "[mqtt]\nusername = 'u'\n[database]"), "username and mqtt.password_file"),
        (
            ("[database]", "[mqtt]\ncert_file = 'c'\nkey_file = 'k'\n[database]"),
            "needs mqtt.ca_file",
        ),
        (("[database]", "[mqtt]\nca_file = 'nope.crt'\n[database]"), "mqtt TLS files"),
        (("key_file = ", "key_file = 'missing' #"), "signing.key_file: cannot read"),
        (("[signing]", "[signing]\nkey_id = 1"), "unknown field `key_id`"),
        (("[database]", "[nope]\n[database]"), "unknown field `nope`"),
        (('url = "postgresql://u:p@127.0.0.1:5432/orkestr"', ""), "missing required field `url`"),
        (("[http]", "[http\n"), "not valid TOML"),
    ],
)
def test_config_validation_names_the_bad_key(
    tmp_path: Path, change: tuple[str, str], error: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(GOOD.replace(*change), key_dir(tmp_path))
    assert error in str(caught.value)


@pytest.mark.parametrize(
    "text",
    ["host-a", "host-a abc", f"Host_A {'ab' * 32}", f"host-a {'ab' * 32} extra"],
)
def test_agent_tokens_file_lines_are_checked(text: str) -> None:
    with pytest.raises(ConfigError, match="line 1: expected"):
        parse_agent_tokens(text)


def test_a_broken_key_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "secrets.key").write_text("not base64!")
    with pytest.raises(ConfigError, match=r"secrets\.key_file"):
        parse_config(GOOD, tmp_path)
    (tmp_path / "secrets.key").write_text(base64.b64encode(bytes(16)).decode())
    with pytest.raises(ConfigError, match="32 bytes"):
        parse_config(GOOD, tmp_path)
    # The key's raw bytes, the `| base64` left out: named as such, not as a codec error.
    (tmp_path / "secrets.key").write_bytes(bytes(range(200, 232)))
    with pytest.raises(ConfigError) as caught:
        parse_config(GOOD, tmp_path)
    assert "is not base64 text" in str(caught.value), caught.value
    assert "codec" not in str(caught.value), caught.value


def test_cli_exits_2_with_one_line_on_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "controller.toml"
    path.write_text(GOOD.replace("[http]", "[http]\nlisten_port = 1"))
    done = subprocess.run(
        [sys.executable, "-m", "controller", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "listen_port" in lines[0], done.stderr


def test_cli_exits_2_without_a_config() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "controller"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        env={"PATH": ""},
    )
    assert done.returncode == 2 and "ORKESTR_CONTROLLER_CONFIG" in done.stderr


# --- phase ----------------------------------------------------------------------------


def cond(type_: str, status: ConditionStatus, reason: str) -> Condition:
    return Condition(type=type_, status=status, reason=reason, message="", last_transition_time=T0)


def status(*conditions: Condition, sleep: SleepState = "awake") -> AddonStatus:
    return AddonStatus(
        id=ID, project_id=ID, observed_generation=1, conditions=conditions, sleep_state=sleep
    )


@pytest.mark.parametrize(
    ("deleted", "observed", "expected"),
    [
        (False, None, "provisioning"),
        (True, None, "deleting"),
        (True, status(cond("Ready", "True", "Running")), "deleting"),
        (False, status(cond("Ready", "True", "Running")), "ready"),
        (False, status(cond("Ready", "True", "Running"), sleep="light"), "sleeping"),
        (False, status(cond("Ready", "False", "Sleeping"), sleep="deep"), "sleeping"),
        (False, status(cond("Ready", "False", "PullFailed")), "failed"),
        (False, status(cond("Ready", "False", "StartError")), "failed"),
        (False, status(cond("Ready", "False", "Starting")), "provisioning"),
        (False, status(cond("Ready", "Unknown", "Failed")), "provisioning"),
        (
            False,
            status(cond("Ready", "False", "Waiting"), cond("Volume", "False", "MountFailed")),
            "failed",
        ),
        (False, status(), "provisioning"),
    ],
)
def test_phase(deleted: bool, observed: AddonStatus | None, expected: str) -> None:
    assert phase(deleted, observed) == expected


# --- topics and backoff ---------------------------------------------------------------


def test_classify_topics() -> None:
    assert classify(topics.status("h1")) == ("status", "h1", None)
    assert classify(topics.presence("h1")) == ("presence", "h1", None)
    assert classify(topics.job_result("h1", ID)) == ("job_result", "h1", ID)
    assert classify(topics.job_output("h1", ID)) == ("job_output", "h1", ID)
    assert classify(f"orkestr/v1/hosts/h1/jobs/{ID}/other") is None
    assert classify(topics.desired("h1")) is None
    assert classify("orkestr/v1/hosts/h1/status/extra") is None
    assert classify("other/topic") is None


def test_backoff_doubles_to_the_cap_and_resets() -> None:
    # rng 1.0 draws the top of each interval: the un-jittered schedule itself.
    top = Backoff(first=0.5, cap=10.0, rng=lambda: 1.0)
    assert [top.next() for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    top.reset()
    assert top.next() == 0.5
    # rng 0.0 draws the bottom: half of each step.
    bottom = Backoff(first=0.5, cap=10.0, rng=lambda: 0.0)
    assert [bottom.next() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0]


@given(st.lists(st.floats(0, 1), min_size=1, max_size=40))
def test_backoff_is_jittered_within_each_step(draws: list[float]) -> None:
    values = iter(draws)
    backoff = Backoff(first=0.5, cap=10.0, rng=lambda: next(values))
    for attempt, draw in enumerate(draws):
        step = min(10.0, 0.5 * 2**attempt)
        # Exactly the draw's point in [step/2, step]: the jitter is the rng's, not constant.
        assert backoff.next() == step / 2 + draw * step / 2


# --- docs -----------------------------------------------------------------------------


class _NoHosts:
    def mark(self, *hosts: str) -> None:
        pass


def test_openapi_documents_every_route(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "openapi.yaml").read_text()
    config = parse_config(GOOD, key_dir(tmp_path))
    api = Api(config, None, load_plans(None), _NoHosts(), Metrics())
    routes = [
        (r.method.lower(), r.resource.canonical)
        for r in api.app().router.routes()
        if r.method != "HEAD" and r.resource is not None
    ]
    # 24, 9 backup routes (controller/backups_api.py), 9 for releases, apps and variables,
    # 3 for plans (project PATCH and DELETE, rotate-credentials), 10 for project groups
    # (controller/groups_api.py), 1 to follow a job's output, 2 for a host's ceiling
    assert len(routes) == 58
    for method, path in routes:
        start = text.index(f"\n  {path}:\n")
        end = text.find("\n  /", start + 1)
        assert f"\n    {method}:\n" in text[start:end], (method, path)


def _api_errors(cls: type[ApiError]) -> set[type[ApiError]]:
    return {cls}.union(*(_api_errors(sub) for sub in cls.__subclasses__()))


def test_every_error_code_the_api_answers_is_in_the_openapi_enum() -> None:
    import yaml  # type: ignore[import-untyped]  # comes with schemathesis

    spec = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
    documented = set(spec["components"]["schemas"]["Error"]["properties"]["error"]["enum"])
    codes = {cls.code for cls in _api_errors(ApiError) if cls is not ApiError}
    assert codes <= documented, codes - documented


def test_which_retained_topics_the_controller_clears() -> None:
    from controller.ingest import topics_to_clear

    job, h = "a" * 32, "host-a"
    # A job's result (stored, redelivered or refused) clears itself, not the job's output
    # (its last chunk may still be on its way).
    for outcome in ("accepted", "stale", "rejected", "error"):
        assert topics_to_clear("job_result", h, job, outcome, False) == [topics.job_result(h, job)]
        assert topics_to_clear("backup_result", h, f"backup-{job}", outcome, False) == [
            topics.backup_result(h, f"backup-{job}")
        ]
    # A running job's live output stays (the next chunk replaces it) unless it came retained.
    assert topics_to_clear("job_output", h, job, "accepted", False) == []
    assert topics_to_clear("job_output", h, job, "accepted", True) == [topics.job_output(h, job)]
    for outcome in ("stale", "rejected"):
        assert topics_to_clear("job_output", h, job, outcome, False) == [topics.job_output(h, job)]
    # The host's current state stays retained.
    assert topics_to_clear("status", h, None, "accepted", True) == []
    assert topics_to_clear("presence", h, None, "accepted", True) == []


async def test_a_deleted_addons_answer_reads_no_listing_of_its_project(tmp_path: Path) -> None:
    """A DELETE answers with the add-on alone: deleted, it gives no names among its
    project's add-ons, and listing all of them per DELETE was half the controller's time
    in a burst of sixty (docs/benchmarks.md, branch delete7). No database here: a listing
    would fail."""
    config = parse_config(GOOD, key_dir(tmp_path))
    api = Api(config, None, load_plans(None), _NoHosts(), Metrics())
    now = datetime.now(UTC)
    row = AddonRow(
        id="a" * 32, project_id="p" * 32, plan="starter", host="h1", name="cache",
        kind="redis", secret_version=1, created_at=now - timedelta(hours=1), deleted_at=now,
        status=None, observed_generation=None,
    )  # fmt: skip
    view = await api._addon_view(row)
    assert (view.phase, view.variables, view.primary) == ("deleting", (), False)
    assert view.deleted_at == now
    live = msgspec.structs.replace(row, deleted_at=None)
    with pytest.raises(AttributeError):  # a live add-on's names do need the listing
        await api._addon_view(live)
