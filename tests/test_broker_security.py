"""The broker as an attacker meets it: real mosquitto with the production ACL, the real
controller, and hosts speaking the real protocol (tests/services.py).

"Never sees it" is checked with a peer that may read every orkestr topic (what the
controller or any other subscriber could get): a message the broker refused to route
cannot reach it. A sentinel published after the attempt bounds the wait, since the broker
routes one connection's messages, and acknowledged ones across connections, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.mqtt import Broker
from controller import db
from controller.config import MqttConfig
from controller.metrics import Metrics
from controller.mqtt import Incoming, MqttLink
from controller.plans import load_plans
from controller.publisher import Publisher
from schemas import topics
from schemas.codec import encode
from schemas.messages import (
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    Capacity,
    DesiredState,
    HostStatus,
    JobResult,
    Presence,
)
from schemas.signed import Signer
from tests.services import (
    LOOPBACK,
    ControllerProcess,
    DesiredWatcher,
    FakeAgent,
    Mosquitto,
    MqttIdentity,
    now,
)


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


class Recorder:
    """Everything the broker routes on `topic_filter` to a subscriber that may read it all."""

    def __init__(self, broker: Mosquitto, topic_filter: str) -> None:
        self.broker = broker
        self.topic_filter = topic_filter
        self.seen: list[tuple[str, bytes]] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._changed = asyncio.Condition()

    async def _run(self, identity: MqttIdentity) -> None:
        async with self.broker.client(identity) as client:
            await client.subscribe(self.topic_filter, qos=1)
            self._ready.set()
            async for message in client.messages:
                async with self._changed:
                    self.seen.append((message.topic.value, bytes(message.payload)))
                    self._changed.notify_all()

    async def wait_for(self, payload: bytes, wait_s: float = 10.0) -> None:
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: any(p == payload for _, p in self.seen)), wait_s
            )

    async def __aenter__(self) -> Recorder:
        identity = await self.broker.identity(unique("recorder"), "peer")
        self._task = asyncio.create_task(self._run(identity), name="recorder")
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def connected(
    broker: Mosquitto, identity: MqttIdentity, **kw: Any
) -> AsyncIterator[aiomqtt.Client]:
    async with broker.client(identity, **kw) as client:
        yield client


def status_of(host: str, memory_mb: int) -> bytes:
    return encode(
        HostStatus(
            version=SCHEMA_VERSION,
            host=host,
            sent_at=now(),
            applied_generation=0,
            capacity=Capacity(cpus=1, memory_mb=memory_mb),
        )
    )


async def test_anonymous_and_wrong_passwords_are_refused(mosquitto: Mosquitto) -> None:
    with pytest.raises(aiomqtt.MqttError, match=r"[Nn]ot authori[sz]ed"):
        async with mosquitto.client(None, identifier="anonymous"):
            pass
    host = await mosquitto.identity(unique("h"))
    with pytest.raises(
        aiomqtt.MqttError, match=r"[Nn]ot authori[sz]ed|[Bb]ad user name or password"
    ):
        async with mosquitto.client(host, password="wrong-" + host.password):
            pass
    async with mosquitto.client(host):  # the right password works
        pass


async def _attempt_everything(client: aiomqtt.Client, victim: str, marker: int) -> None:
    """Publish as if we were `victim`, and as the controller towards it."""
    forged_desired = encode(DesiredState(version=SCHEMA_VERSION, host=victim, generation=2**63 - 1))
    await client.publish(topics.status(victim), status_of(victim, marker), qos=1, retain=True)
    await client.publish(
        topics.presence(victim),
        encode(Presence(version=SCHEMA_VERSION, host=victim, online=False, at=now())),
        qos=1,
        retain=True,
    )
    await client.publish(topics.job_result(victim, "a" * 32), b"forged", qos=1)
    await client.publish(topics.job_output(victim, "a" * 32), b"forged", qos=1)
    await client.publish(topics.desired(victim), forged_desired, qos=1, retain=True)


@pytest.mark.parametrize("attacker_name", ["host", "#", "+", "orkestr/v1/hosts/+"])
async def test_a_host_can_neither_read_nor_publish_another_hosts_topics(
    controller: ControllerProcess, mosquitto: Mosquitto, attacker_name: str
) -> None:
    name = unique("a") if attacker_name == "host" else attacker_name
    attacker = await mosquitto.identity(name, probe=False)
    await mosquitto.identity(unique("after"))  # its reload comes after the attacker's
    if "#" in name:
        # mosquitto refuses such a client id (the username, here) outright.
        with pytest.raises(aiomqtt.MqttError, match=r"[Nn]ot authori[sz]ed"):
            async with mosquitto.client(attacker):
                pass
        return
    async with FakeAgent(unique("b"), mosquitto) as victim:
        await controller.wait_host_online(victim.host)
        async with (
            Recorder(mosquitto, f"{topics.PREFIX}/#") as recorder,
            connected(mosquitto, attacker) as client,
            DesiredWatcher(victim.host, mosquitto, controller.public_key_file) as watcher,
        ):
            for pattern in (
                topics.desired(victim.host),
                topics.STATUS_ALL,
                f"{topics.PREFIX}/#",
                "#",
            ):
                await client.subscribe(pattern, qos=1)
            received: list[str] = []

            async def read() -> None:
                async for message in client.messages:
                    received.append(message.topic.value)

            reader = asyncio.create_task(read())
            try:
                marker = 10_000 + secrets.randbelow(10_000)
                await _attempt_everything(client, victim.host, marker)
                # Traffic the attacker would love to read: a desired state for the victim
                # (a new project placed there) and the victim's own status.
                status, project = await controller.api(
                    "POST", "/v1/projects", {"name": unique("p"), "plan": "team"}
                )
                assert status == 201, project
                assert project["host"] == victim.host
                await watcher.wait_for(lambda s: any(p.id == project["id"] for p in s.projects))
                sentinel = status_of(victim.host, 5)
                await victim.publish(topics.status(victim.host), sentinel, retain=True)
                await recorder.wait_for(sentinel)
                await asyncio.sleep(0.5)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            assert received == [], f"{attacker.username!r} read {received}"
            forged = [t for t, p in recorder.seen if b"forged" in p or str(marker).encode() in p]
            assert forged == [], f"{attacker.username!r} published {forged}"
            assert not any(
                t == topics.desired(victim.host) and b"9223372036854775807" in p
                for t, p in recorder.seen
            )
            # The controller still sees the victim as it is, and its desired state is the
            # controller's (the watcher verified every signature).
            await controller.wait_host_online(victim.host)
            assert all(s.generation < 2**62 for s in watcher.states)


async def test_a_host_cannot_push_an_oversized_message_through_the_broker(
    mosquitto: Mosquitto,
) -> None:
    """Its own status topic, retained: within the ACL, but 4 MiB, where no message of ours
    exceeds 1 MiB. The broker drops the connection; nobody receives it, nothing retains it."""
    host = unique("oversized")
    identity = await mosquitto.identity(host)
    async with Recorder(mosquitto, f"{topics.PREFIX}/#") as recorder:
        huge = b"x" * (4 * 1024 * 1024)
        with contextlib.suppress(aiomqtt.MqttError):
            async with connected(mosquitto, identity) as client:
                await client.publish(topics.status(host), huge, qos=1, retain=True, timeout=10)
        # An offline presence: a status would make it an online host that takes projects.
        sentinel = encode(Presence(version=SCHEMA_VERSION, host=host, online=False, at=now()))
        async with connected(mosquitto, identity) as client:
            await client.publish(topics.presence(host), sentinel, qos=1)
        await recorder.wait_for(sentinel)
        assert max(len(p) for _, p in recorder.seen) < 1024 * 1024, "an oversized message passed"
    # Nothing retained for a late subscriber either.
    async with Recorder(mosquitto, topics.status(host)) as late:
        await asyncio.sleep(1)
        assert all(len(p) < 1024 * 1024 for _, p in late.seen), "an oversized message is retained"


async def test_an_agent_keeps_its_connection_when_a_message_of_its_own_is_too_large(
    mosquitto: Mosquitto,
) -> None:
    """The broker drops a client that sends a packet past max_packet_size, and with it the
    agent's desired states: the agent refuses to send such a message itself."""
    host = unique("agent")
    identity = await mosquitto.identity(host)

    async def nothing(*_: object) -> None:
        return None

    broker = Broker(host, LOOPBACK, mosquitto.port, nothing, nothing,
                    identity.username, identity.password)  # fmt: skip
    runner = asyncio.create_task(broker.run())
    try:
        async with Recorder(mosquitto, topics.job_output(host, "0" * 32)) as recorder:
            for _ in range(100):
                if broker.connected:
                    break
                await asyncio.sleep(0.1)
            assert broker.connected
            connects = broker.connects
            topic = topics.job_output(host, "0" * 32)
            assert not await broker.publish(topic, b"x" * (MAX_MESSAGE_BYTES + 1))
            assert await broker.publish(topic, b"small")
            await recorder.wait_for(b"small")
            assert broker.connected and broker.connects == connects
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def test_no_host_can_take_over_another_hosts_session(mosquitto: Mosquitto) -> None:
    victim_id = await mosquitto.identity(unique("v"))
    attacker = await mosquitto.identity(unique("a"))
    writer = await mosquitto.identity(unique("ctl"), "controller")
    desired = topics.desired(victim_id.username)
    async with connected(mosquitto, victim_id, clean_session=False) as victim:
        await victim.subscribe(desired, qos=1)
        for client_id in (victim_id.username, f"orkestr-agent-{victim_id.username}"):
            async with connected(mosquitto, attacker, identifier=client_id):
                await asyncio.sleep(0.2)
        async with connected(mosquitto, writer) as w:
            await w.publish(desired, b"still-here", qos=1)
        # The victim's connection was never closed: the message arrives on it.
        message = await asyncio.wait_for(anext(aiter(victim.messages)), 10)
        assert message.payload == b"still-here"
    assert f"Client {victim_id.username} already connected" not in mosquitto.log_text()


async def test_one_hosts_publish_failure_does_not_stop_the_others(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    controller_db: str,
    plans_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The controller's own publisher, in this process, on the real database and broker,
    with plans lacking "team": the host with a Team project cannot get a snapshot."""
    x = FakeAgent(unique("x"), mosquitto, memory_mb=900_000)
    y = FakeAgent(unique("y"), mosquitto, memory_mb=1_000)
    async with x, y:
        await controller.wait_host_online(x.host)
        await controller.wait_host_online(y.host)
        _, on_x = await controller.api(
            "POST", "/v1/projects", {"name": unique("p"), "plan": "team"}
        )
        _, on_y = await controller.api("POST", "/v1/projects", {"name": unique("p"), "plan": "pro"})
        assert (on_x["host"], on_y["host"]) == (x.host, y.host)

    key = Ed25519PrivateKey.generate()
    public = tmp_path / "publisher.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    plans = {k: v for k, v in load_plans(plans_file).items() if k != "team"}
    identity = await mosquitto.identity(f"publisher.{secrets.token_hex(3)}", "controller")
    config = MqttConfig(
        host="127.0.0.1",
        port=mosquitto.port,
        client_id=identity.username,
        username=identity.username,
        password=identity.password,
        tls=None,
        keepalive_s=30,
    )
    metrics = Metrics()
    link = MqttLink(config, metrics)

    async def ignore(_: Incoming) -> None:
        return None

    async with (
        db.open_pool(controller_db, 1, 2) as pool,
        DesiredWatcher(x.host, mosquitto, public) as watch_x,
        DesiredWatcher(y.host, mosquitto, public) as watch_y,
    ):
        publisher = Publisher(pool, link, plans, metrics, Signer(key))
        tasks = [
            asyncio.create_task(link.run(ignore, publisher.mark_all), name="link"),
            asyncio.create_task(publisher.run(), name="publisher"),
        ]
        try:
            # mark_all on connect: y is published although x fails; then x keeps failing
            # on its own backoff while y gets new states.
            first = await watch_y.wait_for(lambda s: any(p.id == on_y["id"] for p in s.projects))
            publisher.mark(x.host, y.host)
            await watch_y.wait_for(lambda s: s.generation > first.generation)
            assert not any(t.done() for t in tasks)
            assert watch_x.states == []  # nothing from this publisher for x
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    failed = metrics.desired_published.labels("failed")._value.get()
    assert failed >= 1
    assert f'desired_publish_failed host={x.host} reason="KeyError' in caplog.text


async def retained_under(broker: Mosquitto, host: str) -> dict[str, bytes]:
    """What the broker holds retained under a host's topics, as a new subscriber gets it."""
    async with Recorder(broker, f"{topics.PREFIX}/hosts/{host}/#") as late:
        await asyncio.sleep(1.0)  # retained messages come at once on subscribe
        return {t: p for t, p in late.seen if p}


async def test_a_hosts_retained_job_and_backup_messages_are_cleared(
    controller: ControllerProcess, mosquitto: Mosquitto
) -> None:
    """A host may publish retained messages on any of its own jobs/<id>/... and
    backups/<id>/result topics; the controller clears each once handled (stored, a
    redelivery or refused), so the broker does not keep them. The agent's own flow (QoS 1
    through the controller's persistent session, not retained) survives a restart."""
    async with FakeAgent(unique("ret"), mosquitto, memory_mb=900_000) as host:
        await controller.wait_host_online(host.host)
        status, project = await controller.api(
            "POST", "/v1/projects", {"name": unique("p"), "plan": "team"}
        )
        assert status == 201 and project["host"] == host.host, project
        pid = project["id"]
        jobs = []
        for _ in range(2):
            status, job = await controller.api(
                "POST", f"/v1/projects/{pid}/jobs", {"image": "debian:12", "command": ["true"]}
            )
            assert status == 201, job
            jobs.append(job["id"])

        def result(job_id: str, project_id: str = pid) -> bytes:
            return encode(
                JobResult(
                    version=SCHEMA_VERSION,
                    host=host.host,
                    job_id=job_id,
                    project_id=project_id,
                    exit_code=0,
                    output="ok\n",
                    started_at=now(),
                    finished_at=now(),
                )
            )

        fake = [secrets.token_hex(16) for _ in range(3)]
        floods = {
            # Its own real job, retained: stored, then cleared.
            topics.job_result(host.host, jobs[0]): result(jobs[0]),
            # Jobs that are not placed on it (unknown ids), and junk.
            topics.job_result(host.host, fake[0]): result(fake[0], secrets.token_hex(16)),
            topics.job_output(host.host, fake[1]): b"\x00junk",
            topics.backup_result(host.host, f"backup-{fake[2]}"): b"x" * 1000,
        }
        for topic, payload in floods.items():
            await host.publish(topic, payload, retain=True)

        async def stored(job_id: str) -> bool:
            _, body = await controller.api("GET", f"/v1/projects/{pid}/jobs/{job_id}")
            return bool(body["state"] == "succeeded")

        await wait_until(lambda: stored(jobs[0]), 20, "the retained result stored")

        left: dict[str, bytes] = {}

        async def cleared() -> bool:
            left.clear()
            left.update(await retained_under(mosquitto, host.host))
            for kept in (
                topics.status(host.host),
                topics.presence(host.host),
                topics.desired(host.host),
            ):
                left.pop(kept, None)
            return not left

        await wait_until(cleared, 30, "the host's retained job and backup messages cleared", left)

        # Through a controller restart: a result sent (as the agent does, not retained)
        # while the controller is away waits in its session; one left retained meanwhile
        # comes back on its subscription and is cleared too.
        await controller.stop()
        try:
            await host.job_result(jobs[1], pid, 0, "later\n")
            await host.publish(
                topics.job_output(host.host, secrets.token_hex(16)), b"junk", retain=True
            )
        finally:
            await controller.start()
        await wait_until(lambda: stored(jobs[1]), 30, "the result sent while it was away")
        await wait_until(cleared, 30, "what was retained while it was away cleared", left)


async def wait_until(
    check: Callable[[], Awaitable[bool]], wait_s: float, what: str, seen: object = None
) -> None:
    deadline = asyncio.get_running_loop().time() + wait_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {wait_s}s waiting for {what}: {seen}")
        await asyncio.sleep(0.3)
