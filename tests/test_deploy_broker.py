"""The broker as deploy/ sets it up: broker-setup.sh into temporary directories, the real
mosquitto started on its output, and the start-up check of broker configs
(controller/broker_config.py) on good and bad configs, alone and inside the controller.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from controller.broker_config import check
from schemas import broker_acl, topics
from schemas.mqtt_tls import client_context
from tests.services import (
    ControllerProcess,
    Mosquitto,
    _mosquitto_binary,
    _terminate,
    free_port,
    wait_for_port,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def world() -> Iterator[Path]:
    """A base directory the mosquitto user can traverse (pytest's tmp_path is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="orkestr-deploy-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def setup(base: Path, port: int, tls_port: int) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ORKESTR_ETC": str(base / "etc"),
        "ORKESTR_BROKER_ETC": str(base / "broker"),
        "ORKESTR_BROKER_DATA": str(base / "data"),
        "ORKESTR_MQTT_PORT": str(port),
        "ORKESTR_MQTT_TLS_PORT": str(tls_port),
        "ORKESTR_PYTHON": sys.executable,
    }
    return subprocess.run(
        ["bash", "deploy/broker-setup.sh", "host-one"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def unit_confinement() -> list[str]:
    """setpriv with systemd/orkestr-broker.service's capability bounding set: what systemd
    leaves the broker, so a key or directory it could read only as full root shows here."""
    unit = (ROOT / "systemd" / "orkestr-broker.service").read_text()
    caps = next(
        line.partition("=")[2].split() for line in unit.splitlines()
        if line.startswith("CapabilityBoundingSet=")
    )  # fmt: skip
    keep = ",".join(f"+{c.removeprefix('CAP_').lower()}" for c in caps)
    return ["setpriv", f"--bounding-set=-all,{keep}", "--inh-caps=-all", "--no-new-privs", "--"]


@pytest.mark.skipif(os.geteuid() != 0, reason="installs files for the mosquitto user")
async def test_broker_setup_gives_a_working_private_persistent_broker(world: Path) -> None:
    port, tls_port = free_port(), free_port()
    done = setup(world, port, tls_port)
    assert done.returncode == 0, done.stdout + done.stderr
    etc, broker = world / "etc", world / "broker"
    kept = {p.name: p.read_bytes() for p in etc.iterdir()}
    assert oct((etc / "signing.key").stat().st_mode & 0o777) == "0o600"
    assert oct((etc / "mqtt-agent.password").stat().st_mode & 0o777) == "0o600"
    assert oct((broker / "passwd").stat().st_mode & 0o777) == "0o640"
    # A second run keeps every key, password and the CA.
    again = setup(world, port, tls_port)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {p.name: p.read_bytes() for p in etc.iterdir()} == kept

    log = world / "mosquitto.log"
    with log.open("wb") as out:
        # Confined as its unit confines it: only the capabilities it keeps, no new privileges.
        proc = await asyncio.create_subprocess_exec(
            *unit_confinement(), _mosquitto_binary(), "-c", str(broker / "mosquitto.conf"),
            stdout=out, stderr=out,
        )  # fmt: skip
    try:
        await wait_for_port(port, 10, lambda: proc.returncode is None)
        await wait_for_port(tls_port, 10, lambda: proc.returncode is None)
        tls = client_context(str(etc / "mqtt-ca.crt"))
        agent_password = (etc / "mqtt-agent.password").read_text().strip()
        controller_password = (etc / "mqtt-controller.password").read_text().strip()
        # The agent over TLS (verifying the broker's name), the controller in plain text.
        async with aiomqtt.Client(
            "127.0.0.1", tls_port, username="host-one", password=agent_password, tls_context=tls
        ) as c:
            await c.publish(topics.status("host-one"), b"kept", qos=1, retain=True)
        got = None
        async with aiomqtt.Client(
            "127.0.0.1", port, username=broker_acl.CONTROLLER_USER, password=controller_password
        ) as c:
            await c.subscribe(topics.STATUS_ALL, qos=1)
            message = await asyncio.wait_for(anext(aiter(c.messages)), 10)
            got = message.payload
        assert got == b"kept"
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", port, identifier="anonymous"):
                pass
    finally:
        await _terminate(proc, 10)
    # Saved on the way out, by the user mosquitto dropped to.
    assert (world / "data" / "mosquitto.db").exists()
    assert "Permission denied" not in log.read_text(), log.read_text()


# --- the start-up check ------------------------------------------------------------------

GOOD_ACL = broker_acl.acl_text()


def conf(base: Path, text: str, acl: str = GOOD_ACL) -> Path:
    (base / "acl").write_text(acl)
    (base / "passwd").write_text("")
    path = base / "mosquitto.conf"
    path.write_text(text)
    return path


SECURE = "allow_anonymous false\npassword_file passwd\nacl_file acl\n"


@pytest.mark.parametrize(
    ("text", "acl", "problem"),
    [
        (SECURE + "listener 1883 127.0.0.1\nuse_username_as_clientid true\n", GOOD_ACL, None),
        (SECURE + "listener 0 /run/m.sock\nuse_username_as_clientid true\n", GOOD_ACL, None),
        (
            SECURE + "listener 1883 127.0.0.1\nuse_username_as_clientid true\n",
            "# nothing\n\n",
            "is empty",
        ),
        (
            SECURE + "listener 1883 127.0.0.1\nuse_username_as_clientid true\n",
            "",
            "is empty",
        ),
        (
            "allow_anonymous true\npassword_file passwd\nacl_file acl\n"
            "listener 8883 0.0.0.0\nuse_username_as_clientid true\n",
            GOOD_ACL,
            "allows anonymous clients on a non-loopback address",
        ),
        (
            "allow_anonymous true\npassword_file passwd\nacl_file acl\n"
            "listener 8883\nuse_username_as_clientid true\n",
            GOOD_ACL,
            "allows anonymous clients",
        ),
        (
            "per_listener_settings true\nlistener 1883 127.0.0.1\nallow_anonymous true\n"
            "password_file passwd\nacl_file acl\nuse_username_as_clientid true\n"
            "listener 8883 10.0.0.5\nallow_anonymous true\npassword_file passwd\nacl_file acl\n"
            "use_username_as_clientid true\n",
            GOOD_ACL,
            "listener 8883 10.0.0.5",
        ),
        (
            # Loopback anonymous access is allowed by the check (not by our configs).
            "allow_anonymous true\npassword_file passwd\nacl_file acl\n"
            "listener 1883 127.0.0.1\nuse_username_as_clientid true\n",
            GOOD_ACL,
            None,
        ),
        (
            "allow_anonymous true\nuse_username_as_clientid true\n",
            GOOD_ACL,
            "1883 (every interface)",
        ),
        (
            "password_file passwd\nlistener 1883 127.0.0.1\nuse_username_as_clientid true\n",
            GOOD_ACL,
            "no acl_file",
        ),
        (
            "acl_file acl\nlistener 1883 127.0.0.1\nuse_username_as_clientid true\n",
            GOOD_ACL,
            "no password_file",
        ),
        (SECURE + "listener 1883 127.0.0.1\n", GOOD_ACL, "use_username_as_clientid"),
        (
            SECURE + "use_username_as_clientid true\nlistener 1883 127.0.0.1\n",
            GOOD_ACL,
            "listener 1883 127.0.0.1 (",
        ),
    ],
)
def test_broker_config_check(tmp_path: Path, text: str, acl: str, problem: str | None) -> None:
    problems = check(conf(tmp_path, text, acl))
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_broker_config_check_follows_include_dir(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "open.conf").write_text("listener 9999 0.0.0.0\nallow_anonymous true\n")
    path = conf(
        tmp_path,
        SECURE + "listener 1883 127.0.0.1\nuse_username_as_clientid true\n"
        f"include_dir {tmp_path / 'conf.d'}\n",
    )
    assert any("9999" in p and "anonymous" in p for p in check(path))


def test_the_shipped_and_the_test_broker_configs_pass(tmp_path: Path) -> None:
    shipped = (ROOT / "deploy" / "mosquitto.conf").read_text()
    for key, value in {
        "@BROKER_ETC@": str(tmp_path),
        "@BROKER_DATA@": str(tmp_path / "data"),
        "@PORT@": "1883",
        "@TLS_PORT@": "8883",
        "@TLS_BIND@": "10.1.2.3",
    }.items():
        shipped = shipped.replace(key, value)
    assert check(conf(tmp_path, shipped)) == []
    broker = Mosquitto(tls=True)
    try:
        path = broker.dir / "mosquitto.conf"
        path.write_text(broker.config_text())
        assert check(path) == []
    finally:
        shutil.rmtree(broker.dir, ignore_errors=True)


def test_cli_refuses_an_empty_acl_with_a_clear_message(tmp_path: Path) -> None:
    path = conf(tmp_path, SECURE + "listener 1883 127.0.0.1\nuse_username_as_clientid true\n", "")
    done = subprocess.run(
        [sys.executable, "-m", "controller.broker_config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert done.returncode == 1
    assert "refusing the broker config" in done.stderr and "is empty" in done.stderr


async def test_the_controller_refuses_to_start_on_an_unsafe_broker(
    mosquitto: Mosquitto, controller_db: str, tmp_path: Path
) -> None:
    path = conf(
        tmp_path,
        "allow_anonymous true\npassword_file passwd\nacl_file acl\nlistener 1883\n",
        "",
    )
    process = ControllerProcess(database_url=controller_db, broker=mosquitto)
    process.mqtt_extra = f'broker_config = "{path}"\n'
    try:
        with pytest.raises(RuntimeError, match="exited during start") as caught:
            await process.start()
    finally:
        await process.close()
    message = str(caught.value)
    assert "mqtt.broker_config: refusing the broker config" in message
    assert "allows anonymous clients on a non-loopback address" in message
    assert "the ACL file acl is empty" in message
