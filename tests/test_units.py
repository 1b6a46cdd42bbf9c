"""The systemd units, as deploy/up.sh installs them: valid, and fenced.

`systemd-analyze` reads the unit files offline, so this runs where systemd is not PID 1.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.config import AgentSection

ROOT = Path(__file__).resolve().parent.parent
UNITS = ("orkestr-controller", "orkestr-wake-keeper", "orkestr-agent", "orkestr-broker")
# systemd-analyze security's exposure scale, 0 (safe) to 10 (exposed).
# The agent's 5.2: loop devices and CAP_SYS_RESOURCE for the add-on filesystems (0.2).
MAX_EXPOSURE = {
    "orkestr-controller": 4.0, "orkestr-wake-keeper": 4.0, "orkestr-agent": 5.2,
    "orkestr-broker": 2.5,
}  # fmt: skip

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units rewritten for this checkout, as up.sh does it."""
    out = tmp_path_factory.mktemp("units")
    etc = out / "etc"
    etc.mkdir()
    for unit in UNITS:
        text = (ROOT / "systemd" / f"{unit}.service").read_text()
        text = text.replace("/opt/orkestr", str(ROOT)).replace("/etc/orkestr", str(etc))
        (out / f"{unit}.service").write_text(text)
    return out


def test_units_verify_clean(installed: Path) -> None:
    files = [str(installed / f"{u}.service") for u in UNITS]
    r = subprocess.run(
        ["systemd-analyze", "verify", *files], capture_output=True, text=True, timeout=60
    )
    problems = [
        line for line in (r.stdout + r.stderr).splitlines()
        # The test machine may lack the services the units order themselves after.
        if line.strip() and not re.search(r"(docker|postgresql|mosquitto)\.service", line)
    ]  # fmt: skip
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_exposure_is_bounded(installed: Path, unit: str) -> None:
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(installed / f"{unit}.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert match, r.stdout + r.stderr
    assert float(match[1]) <= MAX_EXPOSURE[unit], r.stdout


def _settings(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (ROOT / "systemd" / f"{unit}.service").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_agent_keeps_only_the_capabilities_it_uses() -> None:
    s = _settings("orkestr-agent")
    caps = set(" ".join(s["CapabilityBoundingSet"]).split())
    assert caps == {
        "CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_PTRACE", "CAP_DAC_OVERRIDE",
        "CAP_SYS_RESOURCE",
    }  # fmt: skip
    # Devices: the loop devices of the add-on filesystems and nothing else.
    assert s["DevicePolicy"] == ["closed"]
    assert sorted(s["DeviceAllow"]) == ["/dev/loop-control rw", "block-loop rw"]
    writable = " ".join(s["ReadWritePaths"]).split()
    assert "/run" not in writable, writable
    # Wake relays (two descriptors each) fit under the descriptor limit with room to spare.
    relays = AgentSection(host="h").wake_relays_total
    assert int(s["LimitNOFILE"][0]) >= 2 * relays + 1024


def test_controller_and_keeper_have_no_capabilities() -> None:
    for unit in ("orkestr-controller", "orkestr-wake-keeper"):
        assert _settings(unit)["CapabilityBoundingSet"] == [""], unit


def test_broker_keeps_only_what_dropping_to_its_user_takes() -> None:
    s = _settings("orkestr-broker")
    assert set(" ".join(s["CapabilityBoundingSet"]).split()) == {"CAP_SETUID", "CAP_SETGID"}
    assert s["NoNewPrivileges"] == ["true"]
    assert " ".join(s["ReadWritePaths"]).split() == ["/var/lib/orkestr-broker"]
    # The config is checked before the broker starts, and the controller starts after it.
    assert any("controller.broker_config" in x for x in s["ExecStartPre"])
    assert "orkestr-broker.service" in _settings("orkestr-controller")["After"][0].split()
