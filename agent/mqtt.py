"""The broker adapter: the only module of the agent that imports aiomqtt.

The broker knows this host by its username (the host name) and, with
`use_username_as_clientid`, uses it as client id, so no other identity can take over the
session. A persistent session (fixed client id, clean_session=False) with QoS 1 means a desired
state published while the agent was away is delivered when it returns; the desired topic
is also retained, so a brand-new agent gets the current snapshot at once. The presence
topic carries a last will, so the controller learns within a keepalive that we are gone.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aiomqtt

from schemas import topics
from schemas.codec import encode
from schemas.messages import MAX_MESSAGE_BYTES, SCHEMA_VERSION, Presence

log = logging.getLogger("orkestr.agent.mqtt")


class Broker:
    def __init__(
        self,
        host_name: str,
        hostname: str,
        port: int,
        on_desired: Callable[[bytes], Awaitable[None]],
        on_connect: Callable[[], Awaitable[None]],
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        keepalive_s: int = 30,
    ) -> None:
        self._host = host_name
        self._hostname = hostname
        self._port = port
        self._on_desired = on_desired
        self._on_connect = on_connect
        self._username = username
        self._password = password
        self._tls = tls
        self._keepalive = keepalive_s
        self._client: aiomqtt.Client | None = None
        self.connects = 0

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _presence(self, online: bool) -> bytes:
        return encode(
            Presence(version=SCHEMA_VERSION, host=self._host, online=online, at=datetime.now(UTC))
        )

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """Publish at QoS 1 if connected; False when not (the caller sends it again later)."""
        client = self._client
        if client is None:
            return False
        if len(payload) > MAX_MESSAGE_BYTES:
            # The controller would refuse it, and the broker drops a connection that sends
            # more than its max_packet_size: keep the connection, which desired states need.
            log.error("mqtt.message_too_large topic=%s bytes=%s", topic, len(payload))
            return False
        try:
            await client.publish(topic, payload, qos=1, retain=retain)
        except aiomqtt.MqttError as exc:
            log.warning("mqtt.publish_failed topic=%s error=%s", topic, exc)
            return False
        return True

    async def run(self) -> None:
        """Stay connected forever, reconnecting with capped, jittered backoff."""
        delay = 0.5
        while True:
            try:
                async with aiomqtt.Client(
                    self._hostname,
                    self._port,
                    identifier=f"orkestr-agent-{self._host}",
                    clean_session=False,
                    username=self._username,
                    password=self._password,
                    tls_context=self._tls,
                    keepalive=self._keepalive,
                    will=aiomqtt.Will(
                        topics.presence(self._host), self._presence(False), qos=1, retain=True
                    ),
                ) as client:
                    await client.subscribe(topics.desired(self._host), qos=1)
                    await client.publish(
                        topics.presence(self._host), self._presence(True), qos=1, retain=True
                    )
                    self._client = client
                    self.connects += 1
                    delay = 0.5
                    log.info("mqtt.connected broker=%s:%s", self._hostname, self._port)
                    await self._on_connect()
                    async for message in client.messages:
                        if isinstance(message.payload, bytes | bytearray):
                            await self._on_desired(bytes(message.payload))
                        else:
                            await self._on_desired(str(message.payload).encode())
            except aiomqtt.MqttError as exc:
                log.warning("mqtt.disconnected error=%s retry_in=%.1fs", exc, delay)
            finally:
                self._client = None
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 10.0)

    async def say_offline(self) -> None:
        """On a clean shutdown the will is not sent, so say it ourselves."""
        await self.publish(topics.presence(self._host), self._presence(False), retain=True)
