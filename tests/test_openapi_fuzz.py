"""schemathesis against docs/openapi.yaml and a running controller (its own database, the
packaged plans and job-image allowlist that the schema states), with every check: no
request the schema allows may be refused, no response may stray from the schema, no 5xx,
405s name the allowed methods. Bounded in time so the suite stays quick.

One check is left out, `use_after_free`: deleting an add-on is asynchronous (202), and
the add-on stays readable, phase `deleting`, until its host confirms that container and
data are gone (docs/api.md), which a fake host never does.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from pathlib import Path

from schemas.images import DEFAULT_JOB_IMAGES
from tests.services import ControllerProcess, FakeAgent, Mosquitto, create_database, drop_database

ROOT = Path(__file__).resolve().parent.parent
SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
PACKAGED_PLANS = ROOT / "controller" / "plans.toml"
MAX_EXAMPLES = "25"
MAX_TIME_S = "90"


async def test_schemathesis_finds_nothing(mosquitto: Mosquitto, tmp_path: Path) -> None:
    dsn = await create_database("orkestr_fuzz")
    controller = ControllerProcess(
        database_url=dsn,
        broker=mosquitto,
        plans_file=PACKAGED_PLANS,
        allowed_images=DEFAULT_JOB_IMAGES,
    )
    try:
        await controller.start()
        # An online host, so projects can be placed (their add-ons stay provisioning).
        async with FakeAgent(f"h-{secrets.token_hex(5)}", mosquitto) as host:
            await controller.wait_host_online(host.host)
            proc = await asyncio.create_subprocess_exec(
                SCHEMATHESIS,
                "run",
                str(ROOT / "docs" / "openapi.yaml"),
                "--url",
                controller.url,
                "--header",
                f"Authorization: Bearer {controller.operator_token}",
                "--checks",
                "all",
                "--exclude-checks",
                "use_after_free",
                "--max-examples",
                MAX_EXAMPLES,
                "--max-time",
                MAX_TIME_S,
                # A job's output is a long poll of up to 10 s (`wait`): a full wait plus
                # the answer's own few milliseconds is on time, not slow.
                "--request-timeout",
                "30",
                "--max-response-time",
                "15",
                # One worker: CPython 3.11's compile() is not thread-safe for the deep
                # patterns schemathesis builds ("AST constructor recursion depth mismatch").
                "--workers",
                "1",
                "--seed",
                "1",
                "--no-color",
                cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 300)
    finally:
        await controller.close()
        await drop_database(dsn)
    text = out.decode(errors="replace")
    (tmp_path / "schemathesis.txt").write_text(text)
    assert proc.returncode == 0, text[-20000:]
