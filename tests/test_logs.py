"""One log format in both services (schemas/logs.py), as text or as JSON lines."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from controller.logs import format_event
from schemas import logs
from tests.agent_fixtures import AgentProcess, remove_host_objects, wait_for
from tests.docker_leaks import host_name
from tests.services import ControllerProcess, Mosquitto, create_database, drop_database

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+ \S"
)

keys = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True)
values = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)


@given(
    event=st.from_regex(r"[a-z][a-z_.]{0,15}", fullmatch=True), fields=st.dictionaries(keys, values)
)
def test_messages_parse_back_to_their_fields(event: str, fields: dict[str, str]) -> None:
    assert logs.parse(format_event(event, fields)) == (event, fields)


def test_free_text_is_not_taken_for_fields() -> None:
    assert logs.parse("Error handling request") is None
    assert logs.parse('x a="unterminated') is None
    assert logs.parse("") is None


def capture(fmt: logs.Format) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    logs.configure("INFO", fmt, stream)
    return logging.getLogger("orkestr.test"), stream


def test_json_lines() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logger, stream = capture("json")
        logger.info("action.done action=%s key=%s", "RunContainer", "k1")
        logger.warning('http_bad_request reason="a \\"quoted\\" word"')
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            logger.exception("reconcile.crashed retry_in=%.1fs", 0.5)
        logger.debug("not shown")
        lines = stream.getvalue().splitlines()
        assert len(lines) == 3  # the traceback stays inside its line
        first, second, third = (json.loads(line) for line in lines)
        assert first["event"] == "action.done" and first["action"] == "RunContainer"
        assert first["msg"] == "action.done action=RunContainer key=k1"
        assert first["level"] == "INFO" and first["logger"] == "orkestr.test"
        assert first["ts"].endswith("+00:00")
        assert second["reason"] == 'a "quoted" word'
        assert third["event"] == "reconcile.crashed" and third["retry_in"] == "0.5s"
        assert "ValueError: boom" in third["exc"]
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_text_lines() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logger, stream = capture("text")
        logger.info("action.done action=%s", "RunContainer")
        line = stream.getvalue().splitlines()[0]
        assert TEXT_LINE.match(line) and line.endswith(
            "INFO orkestr.test action.done action=RunContainer"
        )
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def event_lines(text: str, fmt: str) -> list[dict[str, str]]:
    """Each line of a service's log as {event, level, ...}; fails on a line of another format."""
    out: list[dict[str, str]] = []
    for line in text.splitlines():
        if fmt == "json":
            out.append(json.loads(line))
        elif TEXT_LINE.match(line):
            _date, _time, level, name, message = line.split(" ", 4)
            parsed = logs.parse(message)
            out.append({"level": level, "logger": name, "event": parsed[0] if parsed else ""})
        else:  # a traceback's continuation lines belong to the line before
            assert out and not line.startswith("20"), f"not a {fmt} log line: {line!r}"
    return out


async def run_both(
    fmt: str, mosquitto: Mosquitto, plans_file: Path
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    # A database of its own: this controller publishes for its hosts only.
    database_url = await create_database("orkestr_logs")
    controller = ControllerProcess(
        database_url=database_url, broker=mosquitto, plans_file=plans_file, log_format=fmt
    )
    await controller.start()
    host = host_name("l")
    token = await controller.new_agent_token(host)
    agent = AgentProcess(
        host,
        mosquitto,
        controller.url,
        token,
        log_format=fmt,
        public_key_file=controller.public_key_file,
    )
    try:
        await agent.start()

        async def online() -> bool:
            _, body = await controller.api("GET", "/v1/hosts")
            return any(h["name"] == host and h["online"] for h in body["hosts"])

        await wait_for(online, 30, "agent online")
    finally:
        await agent.close()
        remove_host_objects(host)
        await controller.stop()
        controller_log = controller.log_text()
        await controller.close()
        await drop_database(database_url)
        agent_log = agent.log_path.read_text()
        shutil.rmtree(agent.dir, ignore_errors=True)
    return event_lines(controller_log, fmt), event_lines(agent_log, fmt)


async def test_both_services_write_the_configured_format(
    mosquitto: Mosquitto, plans_file: Path
) -> None:
    for fmt in ("text", "json"):
        controller, agent = await run_both(fmt, mosquitto, plans_file)
        assert "controller_ready" in {e.get("event") for e in controller}, fmt
        assert "agent.started" in {e.get("event") for e in agent}, fmt
        if fmt == "json":
            ready = next(e for e in agent if e.get("event") == "agent.started")
            assert ready["host"] and ready["logger"] == "orkestr.agent"
