"""The agent's start with a bad configuration: exit 2 and one line naming what is wrong,
before it touches Docker or the broker (no Docker here: its address leads nowhere)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.services import ROOT, free_port


def config_text(tmp_path: Path, token_line: str) -> str:
    (tmp_path / "mqtt.password").write_text("secret\n")
    return f"""
[agent]
host = "cfg-probe"
state_dir = "{tmp_path / "state"}"

[controller]
url = "http://127.0.0.1:1"
{token_line}

[signing]
public_key_file = "{tmp_path / "signing.pub"}"

[mqtt]
port = 1
password_file = "{tmp_path / "mqtt.password"}"

[docker]
url = "unix://{tmp_path / "no-docker.sock"}"

[metrics]
listen = "127.0.0.1:{free_port()}"
"""


def signing_key(tmp_path: Path) -> None:
    public = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "signing.pub").write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def start(config: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "agent", "--config", str(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the agent ran on: {exc.stderr!r}"[-600:]) from None


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "cannot read"), ("\n", "is empty")],
)
def test_an_agent_token_file_it_cannot_use_stops_the_start(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    # It ran: every add-on's secrets then failed ("cannot read the agent token", retried
    # for ever) while the host looked online.
    signing_key(tmp_path)
    token_file = tmp_path / "agent_token"
    if content is not None:
        token_file.write_text(content)
    config = tmp_path / "agent.toml"
    config.write_text(config_text(tmp_path, f'agent_token_file = "{token_file}"'))
    done = start(config)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "bad configuration" in lines[0] and "controller.agent_token_file" in lines[0], lines
    assert str(token_file) in lines[0] and expected in lines[0], lines


@pytest.mark.parametrize("key", ["agent.state_dir", "backups.dir"])
def test_a_directory_it_cannot_use_is_named(tmp_path: Path, key: str) -> None:
    # A state_dir under a file was blamed on metrics.token_file (a key not even set); a
    # backups.dir under one stopped the agent with a traceback (exit 1).
    signing_key(tmp_path)
    (tmp_path / "agent_token").write_text("token\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    text = config_text(tmp_path, f'agent_token_file = "{tmp_path / "agent_token"}"')
    if key == "agent.state_dir":
        text = text.replace(f'"{tmp_path / "state"}"', f'"{blocker / "state"}"')
    else:
        text += f'\n[backups]\ndir = "{blocker / "backups"}"\n'
    config = tmp_path / "agent.toml"
    config.write_text(text)
    done = start(config)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"bad configuration: {key}: cannot use {blocker}" in lines[0], lines
    assert "Not a directory" in lines[0], lines
