"""Real agents over a TLS broker: signed desired states, two identities converging, and
a broker killed with -9 in the middle of 1,000 generations.

Every agent in this module connects to the broker's TLS listener with its own MQTT
identity and verifies desired states with the controller's public key; the controller
connects over TLS too.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas import topics
from schemas.codec import decode, encode
from schemas.messages import SCHEMA_VERSION, DesiredState, SignedDesiredState
from schemas.signed import Signer, Verifier
from tests.agent_fixtures import (
    TEST_PLANS,
    AgentProcess,
    Stack,
    container_state,
    create_addon,
    create_project,
    running_agent,
    wait_for,
    wait_phase,
)

pytest_plugins = ["tests.agent_fixtures"]


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[Stack]:
    s = Stack(TEST_PLANS, tls=True)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


def rejected_count(agent: AgentProcess, reason: str) -> float:
    url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {agent.metrics_token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # loopback only
        text = response.read().decode()
    prefix = f'orkestr_agent_desired_rejected_total{{reason="{reason}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


async def retained_desired(stack: Stack, host: str) -> bytes:
    peer = await stack.mosquitto.identity(f"peer.{secrets.token_hex(4)}", "peer")
    async with stack.mosquitto.client(peer, tls=True) as client:
        await client.subscribe(topics.desired(host), qos=1)
        message = await asyncio.wait_for(anext(aiter(client.messages)), 10)
        return bytes(message.payload)


async def test_unsigned_and_forged_states_are_refused_and_the_next_good_one_applied(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    project = await create_project(c, "team")
    first = await create_addon(c, project["id"], "kept", "redis")
    await wait_phase(c, project["id"], first["id"], "ready")
    db = f"orkestr-{first['id']}-db"
    container = container_state(db)

    # What a stolen credential or a broken broker could publish: an empty state (it would
    # tombstone nothing, but stop everything) with the highest generation, unsigned,
    # signed by another key, with a made-up signature under the controller's key id, and
    # the controller's real envelope with its payload altered.
    evil = encode(DesiredState(version=SCHEMA_VERSION, host=agent.host, generation=2**63 - 1))
    real = decode(await retained_desired(stack, agent.host), SignedDesiredState)
    forged_signature = SignedDesiredState(
        version=SCHEMA_VERSION,
        key_id=real.key_id,
        payload=evil,
        signature=secrets.token_bytes(64),
    )
    tampered = SignedDesiredState(
        version=SCHEMA_VERSION,
        key_id=real.key_id,
        payload=real.payload.replace(b'"generation":', b'"generation":9'),
        signature=real.signature,
    )
    attempts = {
        "Unsigned": evil,
        "UnknownKey": Signer(Ed25519PrivateKey.generate()).seal(evil),
        "BadSignature": encode(forged_signature),
    }
    before = {reason: rejected_count(agent, reason) for reason in attempts}
    peer = await stack.mosquitto.identity(f"peer.{secrets.token_hex(4)}", "peer")
    async with stack.mosquitto.client(peer, tls=True) as client:
        for payload in [*attempts.values(), encode(tampered)]:
            await client.publish(topics.desired(agent.host), payload, qos=1, retain=True)

    def all_refused() -> bool:
        # The tampered envelope is a second BadSignature, and may be read last.
        return all(rejected_count(agent, r) > before[r] for r in attempts) and (
            rejected_count(agent, "BadSignature") >= before["BadSignature"] + 2
        )

    await wait_for(all_refused, 30, "every forgery counted as rejected")
    assert rejected_count(agent, "BadSignature") >= before["BadSignature"] + 2  # + tampered
    log = agent.log_tail(400)
    for reason in attempts:
        assert f"desired.rejected reason={reason}" in log
    # Nothing was applied: the add-on runs on, in the same container.
    assert container_state(db)["Running"]
    assert container_state(db)["StartedAt"] == container["StartedAt"]

    # The next good state (a new add-on) is applied; the generation never left the
    # controller's sequence.
    second = await create_addon(c, project["id"], "next", "redis")
    await wait_phase(c, project["id"], second["id"], "ready")
    applied = decode((agent.state_dir / "desired.json").read_bytes(), DesiredState)
    assert applied.generation < 2**62
    assert {a.id for p in applied.projects for a in p.addons} >= {first["id"], second["id"]}


async def test_two_agents_with_their_own_identities_converge_over_tls(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    async with running_agent(stack) as other:
        assert agent.host != other.host
        projects = [await create_project(c, "team") for _ in range(2)]
        assert {p["host"] for p in projects} == {agent.host, other.host}
        addons = [await create_addon(c, p["id"], "cache", "redis") for p in projects]
        for project, made in zip(projects, addons, strict=True):
            view = await wait_phase(c, project["id"], made["id"], "ready")
            assert view["observed_generation"] > 0
        for proc in (agent, other):
            config = proc.config_path.read_text()
            assert f"port = {stack.mosquitto.tls_port}" in config and "ca_file" in config


async def published(c: Any) -> float:
    _, text = await c.api("GET", "/metrics")
    prefix = 'orkestr_controller_desired_published_total{result="published"} '
    return sum(float(x[len(prefix) :]) for x in text.splitlines() if x.startswith(prefix))


async def _paced(c: Any, mark: float, wait_s: float = 1.0) -> None:
    """Wait (at most `wait_s`) until the controller published once more after `mark`."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while await published(c) <= mark:
        if asyncio.get_running_loop().time() > deadline:
            return
        await asyncio.sleep(0.005)


def project_ids(raw: bytes) -> set[str]:
    return {p.id for p in decode(raw, DesiredState).projects}


async def test_broker_killed_while_1000_generations_are_published(
    stack: Stack, agent: AgentProcess
) -> None:
    c = stack.controller
    assert c is not None
    verifier = Verifier.from_pem(c.public_key_file.read_bytes())
    async with running_agent(stack) as other:
        agents = {agent.host: agent, other.host: other}
        placed: dict[str, set[str]] = {agent.host: set(), other.host: set()}
        changes, refused = 0, 0
        broker = stack.mosquitto
        while changes < 1000:
            # Killed three times in mid-stream; back after 20 changes, the last time only
            # after the loop.
            if changes in (300, 700, 990) and broker.running:
                await broker.kill()  # SIGKILL: no will, no save
            elif changes in (320, 720) and not broker.running:
                await broker.start()
            mark = await published(c)
            status, body = await c.api(
                "POST",
                "/v1/projects",
                {"name": f"g{changes}-{secrets.token_hex(3)}", "plan": "team"},
            )
            if status == 503:  # both hosts looked offline for a moment: try again
                refused += 1
                await asyncio.sleep(0.1)
                continue
            assert status == 201, body
            if body["host"] not in placed:
                # A host of an earlier test in this module that still looks online for a
                # moment: its projects are not this test's concern.
                changes += 1
                continue
            placed[body["host"]].add(body["id"])
            changes += 1
            if broker.running:
                # Paced so that each change is a generation of its own while the broker is
                # up (the publisher coalesces marks that arrive during a publish).
                await _paced(c, mark)
        assert all(placed.values()), placed
        if not broker.running:
            await broker.start()

        async def converged() -> bool:
            for host, proc in agents.items():
                state_file = proc.state_dir / "desired.json"
                if not state_file.exists() or project_ids(state_file.read_bytes()) != placed[host]:
                    return False
            return True

        await wait_for(converged, 120, "every agent applying a state with all its projects")
        # And what each agent applied is what the broker now holds: the latest generation.
        for host, proc in agents.items():
            latest = decode(verifier.open(await retained_desired(stack, host)), DesiredState)
            applied = decode((proc.state_dir / "desired.json").read_bytes(), DesiredState)

            async def caught_up(host: str = host, latest: DesiredState = latest) -> Any:
                _, body = await c.api("GET", "/v1/hosts")
                seen = {h["name"]: h["applied_generation"] for h in body["hosts"]}
                return seen.get(host) == latest.generation

            await wait_for(caught_up, 60, f"{host} reporting generation {latest.generation}")
            applied = decode((proc.state_dir / "desired.json").read_bytes(), DesiredState)
            assert applied.generation == latest.generation
            assert {p.id for p in applied.projects} == placed[host]
        log = c.log_text()
        figures: dict[str, Any] = {
            "changes": changes,
            "refused_while_hosts_offline": refused,
            "published": log.count("desired_published host="),
            "controller_connects": log.count("mqtt_connected "),
            "latest": {
                h: decode(verifier.open(await retained_desired(stack, h)), DesiredState).generation
                for h in agents
            },
        }
        print(json.dumps(figures))
        assert figures["controller_connects"] >= 4  # the kills really cut it off
        assert figures["published"] >= 900
