"""The README's quick start, as written: its marked shell blocks run in bash against a
real controller and a real agent. Three things are put in place of this machine's, and
nothing else is changed: the API address (`http://127.0.0.1:8080`), the operator token's
file (`/etc/orkestr/operator_token`) and the virtual environment (`$PWD/.venv/bin`).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent_fixtures import AgentProcess, Stack

pytest_plugins = ["tests.agent_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- quickstart:(\w+) -->\n```sh\n(.*?)```", re.DOTALL)


def blocks() -> dict[str, str]:
    return dict(BLOCK.findall((ROOT / "README.md").read_text()))


def test_the_readme_marks_its_quick_start() -> None:
    found = blocks()
    assert set(found) == {"setup", "cli", "curl"}
    # One name for the token everywhere.
    readme = (ROOT / "README.md").read_text()
    assert "$ORKESTR_TOKEN" in readme and not re.search(r"\$(T|TOKEN|API_TOKEN)\b", readme)


def test_up_sh_prints_the_setup_lines_the_readme_shows() -> None:
    # README: "deploy/up.sh prints these two lines". Render up.sh's closing message with
    # this machine's values and find each line of the setup block in it, as written.
    up = (ROOT / "deploy" / "up.sh").read_text()
    message = up[up.index("cat <<TXT\n") + len("cat <<TXT\n") : up.rindex("\nTXT")]
    printed = subprocess.run(
        ["bash", "-c", f"cat <<TXT\n{message}\nTXT"],
        env={
            "PATH": os.environ["PATH"],
            "api": "http://127.0.0.1:8080",
            "etc": "/etc/orkestr",
            "repo": str(ROOT),
            "project": "p",
        },
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shown = [line.strip() for line in printed.splitlines()]
    for line in blocks()["setup"].strip().splitlines():
        assert line.replace("$PWD", str(ROOT)).strip() in shown, (line, printed)


async def run_block(stack: Stack, tmp_path: Path, name: str) -> str:
    c = stack.controller
    assert c is not None
    token_file = tmp_path / "operator_token"
    token_file.write_text(c.operator_token + "\n")
    script = blocks()["setup"] + blocks()[name]
    script = (
        script.replace("http://127.0.0.1:8080", c.url)
        .replace("/etc/orkestr/operator_token", str(token_file))
        .replace("$PWD/.venv/bin", str(Path(sys.executable).parent))
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORKESTR_")}
    env |= {"HOME": str(tmp_path), "COLUMNS": "200"}
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-e",
        "-o",
        "pipefail",
        "-c",
        script,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 400)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    return text


@pytest.mark.parametrize("name", ["cli", "curl"])
async def test_the_quick_start_works_as_pasted(
    stack: Stack, agent: AgentProcess, tmp_path: Path, name: str
) -> None:
    text = await run_block(stack, tmp_path, name)
    if name == "cli":
        assert "DATABASE_URL" in text and "ORDERS_DB_URL" in text
        assert re.search(r"now\s*\n-+\n\s*20\d\d-", text), text  # psql's answer
        assert "orders-db" in text and "state" in text
    else:
        assert "POSTS_DB_URL" in text
        assert '"state":"succeeded"' in text and '"exit_code":0' in text, text
        assert '"token":"okp_' in text
