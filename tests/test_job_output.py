"""Live job output end to end: a real agent streams a running job's output through the
broker to the controller, which relays it to a follower (the long poll of
`GET .../jobs/{id}/output` and `orkestr run`) before the job ends.

The wire is checked against a real controller and broker with a protocol-level agent
(tests.services.FakeAgent): duplicates, gaps, another host's job, malformed and
oversized chunks are refused or counted, with a metric, and nothing breaks.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import msgspec
import pytest

from schemas import topics
from schemas.codec import encode
from schemas.messages import MAX_OUTPUT_CHUNK_CHARS, SCHEMA_VERSION, JobOutput
from tests.agent_fixtures import (
    TOOLBOX,
    AgentProcess,
    Stack,
    agent_metric,
    create_project,
    wait_for,
)
from tests.services import ControllerProcess, FakeAgent
from tests.test_controller_api import eventually, metric, new_project, speaking_for

pytest_plugins = ["tests.agent_fixtures"]
# One agent for the module; a fresh one for a test marked `own_agent` (tests/agent_fixtures.py).
pytestmark = pytest.mark.shared_agent

SCRIPT = "echo first; sleep 3; echo second; exit 3"


async def start_job(c: ControllerProcess, project_id: str, script: str) -> str:
    status, job = await c.api(
        "POST",
        f"/v1/projects/{project_id}/jobs",
        {"image": TOOLBOX, "command": ["sh", "-c", script], "timeout_s": 60},
    )
    assert status == 201, job
    return str(job["id"])


async def follow(
    c: ControllerProcess, project_id: str, job_id: str, token: str | None = None
) -> list[tuple[float, dict[str, Any]]]:
    """Every non-empty answer of the long poll, and the complete one, timed."""
    seen: list[tuple[float, dict[str, Any]]] = []
    after = 0
    while True:
        status, page = await c.api(
            "GET",
            f"/v1/projects/{project_id}/jobs/{job_id}/output?after={after}&wait=10",
            token=token,
            timeout_s=40,
        )
        assert status == 200, page
        assert page["offset"] == after
        if page["output"] or page["lost"] or page["complete"]:
            seen.append((time.monotonic(), page))
        after = page["next_offset"]
        if page["complete"]:
            return seen


async def test_output_arrives_while_the_job_runs(stack: Stack, agent: AgentProcess) -> None:
    c = stack.controller
    assert c is not None
    project = (await create_project(c, "team"))["id"]
    token = await c.new_project_token(project)
    job_id = await start_job(c, project, SCRIPT)
    pages = await asyncio.wait_for(follow(c, project, job_id, token), 120)
    first = next((t, p) for t, p in pages if "first" in p["output"])
    second = next((t, p) for t, p in pages if "second" in p["output"])
    # "first" came while the job still ran, about 3 s before "second".
    assert first[1]["state"] == "pending" and "second" not in first[1]["output"], pages
    assert second[0] - first[0] > 2.0, pages
    print(f"api follow: 'second' {second[0] - first[0]:.2f}s after 'first'")
    text = "".join(p["output"] for _, p in pages)
    assert text == "first\nsecond\n" and all(p["lost"] == 0 for _, p in pages), pages
    done = pages[-1][1]
    assert done["complete"] and done["state"] == "failed" and done["exit_code"] == 3, done
    # The job's own view still has the (capped) output, as before.
    status, job = await c.api("GET", f"/v1/projects/{project}/jobs/{job_id}")
    assert status == 200 and job["output"] == "first\nsecond\n", job
    # Following from the end answers at once: nothing more, complete.
    status, tail = await c.api(
        "GET",
        f"/v1/projects/{project}/jobs/{job_id}/output?after={done['next_offset']}&wait=10",
    )
    assert status == 200 and tail["output"] == "" and tail["complete"], tail
    # Another project's token cannot follow it.
    other = (await create_project(c, "team"))["id"]
    other_token = await c.new_project_token(other)
    status, body = await c.api(
        "GET", f"/v1/projects/{project}/jobs/{job_id}/output", token=other_token
    )
    assert status == 404, body
    status, body = await c.api(
        "GET", f"/v1/projects/{other}/jobs/{job_id}/output", token=other_token
    )
    assert status == 404, body
    for bad in ("after=-1", "after=x", "wait=11", "after=1&after=2"):
        status, body = await c.api("GET", f"/v1/projects/{project}/jobs/{job_id}/output?{bad}")
        assert status == 400 and body["error"] == "bad_request", (bad, body)


async def test_lines_reach_a_follower_within_a_second_or_two(
    stack: Stack, agent: AgentProcess
) -> None:
    """Each line carries the time it was printed; the follower notes when it got it (one
    clock: the same machine)."""
    c = stack.controller
    assert c is not None
    project = (await create_project(c, "team"))["id"]
    script = "for i in 1 2 3 4 5 6 7 8 9 10; do date +%s.%N; sleep 0.5; done"
    job_id = await start_job(c, project, script)
    delays: list[float] = []
    after, buffered = 0, ""
    while True:
        status, page = await c.api(
            "GET",
            f"/v1/projects/{project}/jobs/{job_id}/output?after={after}&wait=10",
            timeout_s=40,
        )
        assert status == 200, page
        got = time.time()
        buffered += page["output"]
        *lines, buffered = buffered.split("\n")
        delays += [got - float(line) for line in lines]
        after = page["next_offset"]
        if page["complete"]:
            break
    assert len(delays) == 10, delays
    delays.sort()
    median, worst = delays[len(delays) // 2], delays[-1]
    print(
        f"print-to-follower delay: median {median:.3f}s, max {worst:.3f}s, load {os.getloadavg()[0]:.1f}"
    )
    assert median < 2.0, delays


async def test_orkestr_run_streams_and_exits_with_the_code(
    stack: Stack, agent: AgentProcess, tmp_path: Any
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    env = {
        **os.environ,
        "ORKESTR_API": c.url,
        "ORKESTR_TOKEN": c.operator_token,
        "ORKESTR_CONFIG": str(tmp_path / "cli.json"),
    }
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli",
        "run",
        "--project",
        project["name"],
        "--",
        "sh",
        "-c",
        SCRIPT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    lines: list[tuple[float, bytes]] = []
    try:
        async with asyncio.timeout(120):
            while line := await proc.stdout.readline():
                lines.append((time.monotonic() - started, line))
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode()
    assert [line for _, line in lines] == [b"first\n", b"second\n"], (lines, err)
    assert lines[1][0] - lines[0][0] > 2.0, lines  # printed as it came, not at the end
    print(f"orkestr run: first line at {lines[0][0]:.2f}s, second at {lines[1][0]:.2f}s")
    assert code == 3, err


@pytest.mark.own_agent
async def test_a_restarted_agent_resumes_the_stream_without_repeating(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = (await create_project(c, "team"))["id"]
    job_id = await start_job(c, project, "echo one; sleep 4; echo two; sleep 2; echo three")

    async def first() -> Any:
        _, page = await c.api("GET", f"/v1/projects/{project}/jobs/{job_id}/output?wait=5")
        return page if page["output"] else None

    await wait_for(first, 60, "the first line")
    await agent.kill9()  # mid-job: "two" comes while no agent runs
    await asyncio.sleep(2)
    await agent.start()
    pages = await asyncio.wait_for(follow(c, project, job_id), 90)
    text = "".join(p["output"] for _, p in pages)
    assert text == "one\ntwo\nthree\n", pages
    assert all(p["lost"] == 0 for _, p in pages), pages
    assert pages[-1][1]["exit_code"] == 0


async def test_a_flood_is_bounded_and_says_what_it_lost(stack: Stack, agent: AgentProcess) -> None:
    c = stack.controller
    assert c is not None
    project = (await create_project(c, "team"))["id"]
    size = 300_000  # far past four 16 Ki chunks at once, and past the 64 Ki kept
    job_id = await start_job(c, project, f"head -c {size} /dev/zero | tr '\\0' x; echo; echo end")
    pages = await asyncio.wait_for(follow(c, project, job_id), 90)
    text = "".join(p["output"] for _, p in pages)
    lost = sum(p["lost"] for _, p in pages)
    assert text.endswith("x\nend\n"), text[-50:]
    assert set(text[:-5]) == {"x"}
    assert len(text) + lost == size + 5, (len(text), lost)
    assert 0 < len(text) < size and lost > 0  # the agent's rate limit dropped the rest
    # What the controller keeps is capped: a late follower gets the newest 64 Ki.
    late = await asyncio.wait_for(follow(c, project, job_id), 30)
    kept = "".join(p["output"] for _, p in late)
    assert 0 < len(kept) <= 65536 and kept.endswith("x\nend\n"), len(kept)
    assert len(kept) + sum(p["lost"] for _, p in late) == size + 5
    # The agent counted what its rate limit dropped.
    dropped = await agent_metric(agent, 'orkestr_agent_job_output_chars_total{kind="dropped"}')
    assert dropped is not None and dropped > 0


async def test_the_end_of_a_flood_of_short_lines_arrives(stack: Stack, agent: AgentProcess) -> None:
    # 3.5 MB of short lines is 12 MB of Docker's JSON log: past one 10 MB file, and
    # Docker 20.10's follow ended at the end of the rotated file, 2.8 MB in, so the
    # follower never got the last lines, often the ones that say what failed (the
    # agent reads on from the last timestamp: agent/logmark.py). It also takes Docker
    # seconds to stream after the container exited, longer than a fixed flush waited.
    c = stack.controller
    assert c is not None
    project = (await create_project(c, "team"))["id"]
    size = 3_500_000
    script = f"yes abcdefghijklmnopqrstuvwxyz | head -c {size}; echo; echo END"
    job_id = await start_job(c, project, script)
    pages = await asyncio.wait_for(follow(c, project, job_id), 90)
    text = "".join(p["output"] for _, p in pages)
    lost = sum(p["lost"] for _, p in pages)
    assert text.endswith("\nEND\n"), text[-50:]
    assert len(text) + lost == size + 5, (len(text), lost)


# --- the wire, with a protocol-level agent -------------------------------------------------


def chunk(host: str, job_id: str, project_id: str, seq: int, offset: int, data: str) -> bytes:
    return encode(
        JobOutput(
            version=SCHEMA_VERSION,
            host=host,
            job_id=job_id,
            project_id=project_id,
            seq=seq,
            offset=offset,
            data=data,
        )
    )


async def test_chunks_are_checked_ordered_and_deduplicated(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    project = await new_project(controller, "team")
    pid = project["id"]
    status, job = await controller.api(
        "POST", f"/v1/projects/{pid}/jobs", {"image": "debian:12", "command": ["true"]}
    )
    assert status == 201, job
    jid = job["id"]
    series = 'orkestr_controller_mqtt_messages_total{{kind="job_output",result="{}"}}'
    gaps = "orkestr_controller_job_output_gaps_total"
    before = {
        r: await metric(controller, series.format(r)) for r in ("accepted", "stale", "rejected")
    }
    gaps_before = await metric(controller, gaps)

    async def counted(result: str, n: int) -> bool:
        return await metric(controller, series.format(result)) >= before[result] + n

    async with speaking_for(project["host"], fake_agent) as agent:
        topic = topics.job_output(agent.host, jid)
        # In order, then a redelivery, then seq 3 (seq 2 never comes), then seq 2 late.
        await agent.publish(topic, chunk(agent.host, jid, pid, 0, 0, "one\n"))
        await agent.publish(topic, chunk(agent.host, jid, pid, 1, 4, "two\n"))
        await agent.publish(topic, chunk(agent.host, jid, pid, 1, 4, "two\n"))
        await agent.publish(topic, chunk(agent.host, jid, pid, 3, 12, "four\n"))
        await eventually(lambda: counted("accepted", 3), "three chunks accepted")
        await eventually(lambda: counted("stale", 1), "the duplicate counted as stale")
        assert await metric(controller, gaps) == gaps_before + 1
        status, page = await controller.api("GET", f"/v1/projects/{pid}/jobs/{jid}/output")
        assert status == 200, page
        assert (page["output"], page["lost"], page["next_offset"]) == ("one\ntwo\nfour\n", 4, 17)
        assert not page["complete"]
        await agent.publish(topic, chunk(agent.host, jid, pid, 2, 8, "thr\n"))
        await eventually(lambda: counted("accepted", 4), "the late chunk accepted")
        status, page = await controller.api("GET", f"/v1/projects/{pid}/jobs/{jid}/output?after=2")
        assert (page["output"], page["lost"]) == ("e\ntwo\nthr\nfour\n", 0), page

        # What is refused, each with a log line and the rejected metric, and nothing
        # changes: another job in the topic, another host in the payload, garbage, a
        # chunk over the size limit, and a job that is not on this host.
        other_job = "0" * 32
        bad = [
            (topics.job_output(agent.host, other_job), chunk(agent.host, jid, pid, 9, 17, "x")),
            (topic, chunk("someone-else", jid, pid, 9, 17, "x")),
            (topic, b"{not json"),
            (topic, b'{"version": 1, "host": "' + agent.host.encode() + b'"}'),
            (
                topic,
                msgspec.json.encode(
                    {
                        "version": 1,
                        "host": agent.host,
                        "job_id": jid,
                        "project_id": pid,
                        "seq": 9,
                        "offset": 17,
                        "data": "x" * (MAX_OUTPUT_CHUNK_CHARS + 1),
                    }
                ),
            ),
            (topic, b"x" * 200_000),
        ]
        for t, payload in bad:
            await agent.publish(t, payload)
        await eventually(lambda: counted("rejected", len(bad)), "every bad chunk rejected")

    # A job of a project placed on another host: the ACL lets this host publish under its
    # own name only, and the controller refuses a job that is not placed there.
    async with FakeAgent(f"h-{os.urandom(4).hex()}", fake_agent.broker) as intruder:
        await controller.wait_host_online(intruder.host)
        await intruder.publish(
            topics.job_output(intruder.host, jid), chunk(intruder.host, jid, pid, 9, 17, "evil")
        )
        await eventually(lambda: counted("rejected", len(bad) + 1), "the foreign chunk rejected")
    assert "ForeignJob" in controller.log_text()
    status, page = await controller.api("GET", f"/v1/projects/{pid}/jobs/{jid}/output")
    assert status == 200 and page["output"] == "one\ntwo\nthr\nfour\n", page
    status, _ = await controller.api("GET", "/healthz")
    assert status == 200


async def test_a_long_poll_wakes_when_a_chunk_arrives(
    controller: ControllerProcess, fake_agent: FakeAgent
) -> None:
    project = await new_project(controller, "team")
    pid = project["id"]
    status, job = await controller.api(
        "POST", f"/v1/projects/{pid}/jobs", {"image": "debian:12", "command": ["true"]}
    )
    jid = job["id"]
    async with speaking_for(project["host"], fake_agent) as agent:
        started = time.monotonic()
        poll = asyncio.create_task(
            controller.api("GET", f"/v1/projects/{pid}/jobs/{jid}/output?wait=10", timeout_s=40)
        )
        await asyncio.sleep(1.0)
        assert not poll.done()  # nothing yet: it waits
        await agent.publish(
            topics.job_output(agent.host, jid), chunk(agent.host, jid, pid, 0, 0, "hi\n")
        )
        status, page = await poll
        assert status == 200 and page["output"] == "hi\n", page
        assert time.monotonic() - started < 10
        # With nothing new, `wait` bounds the answer: empty, not complete.
        started = time.monotonic()
        status, page = await controller.api(
            "GET", f"/v1/projects/{pid}/jobs/{jid}/output?after=3&wait=1"
        )
        assert status == 200 and page["output"] == "" and not page["complete"], page
        assert 0.9 < time.monotonic() - started < 5
        # Once the result is in and the stream read to its end, it is complete.
        await agent.job_result(jid, pid, 0, "hi\n")

        async def complete() -> Any:
            _, page = await controller.api("GET", f"/v1/projects/{pid}/jobs/{jid}/output?after=3")
            return page["complete"]

        await wait_for(complete, 10, "complete")
