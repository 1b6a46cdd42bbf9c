"""The MQTT adapter: the only module that imports aiomqtt.

`MqttLink.run` connects forever with a persistent session (clean_session=False, fixed
client id, so QoS 1 messages sent while the controller is away wait at the broker),
subscribes to the agents' topics and hands each message to a handler. A message is
acknowledged only after the handler returned, so a report is not lost when the
controller dies mid-way; handlers must therefore be idempotent. aiomqtt errors leave
this module as `BrokerUnavailable`.

The aiomqtt client is an async context manager, but its lifetime is one connection, so
it is opened inside the reconnect loop rather than in the application's exit stack.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiomqtt
from msgspec import Struct

from controller.backoff import Backoff
from controller.config import MqttConfig
from controller.errors import BrokerUnavailable
from controller.logs import log
from controller.metrics import Metrics
from schemas import topics

logger = logging.getLogger(__name__)

SUBSCRIPTIONS = (
    topics.STATUS_ALL,
    topics.PRESENCE_ALL,
    topics.JOB_RESULT_ALL,
    topics.JOB_OUTPUT_ALL,
    topics.BACKUP_RESULT_ALL,
)


class Incoming(Struct, frozen=True):
    topic: str
    payload: bytes
    # Set for a retained message delivered because we (re)subscribed: it may be old.
    retained: bool


Handler = Callable[[Incoming], Awaitable[None]]


class MqttLink:
    def __init__(self, config: MqttConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def publish_retained(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1, retained; returns once the broker acknowledged it."""
        client = self._client
        if client is None:
            raise BrokerUnavailable("not connected to the MQTT broker")
        try:
            await client.publish(topic, payload, qos=1, retain=True)
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(f"publish to {topic} failed: {exc}") from None

    async def clear_retained(self, topic: str) -> None:
        """Drop the retained message on `topic` (an empty retained publish) at QoS 0: no
        round trip holds up the message loop, and one lost with the connection is sent
        again when the retained message comes back on the next subscription."""
        client = self._client
        if client is None:
            raise BrokerUnavailable("not connected to the MQTT broker")
        try:
            await client.publish(topic, b"", qos=0, retain=True)
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(f"clearing {topic} failed: {exc}") from None

    async def run(self, handle: Handler, on_connect: Callable[[], None]) -> None:
        """Stay connected until cancelled; `on_connect` runs after every subscribe."""
        backoff = Backoff(first=0.5, cap=10.0)
        c = self._config
        while True:
            client = aiomqtt.Client(
                c.host,
                c.port,
                identifier=c.client_id,
                clean_session=False,
                username=c.username,
                password=c.password,
                tls_context=c.tls,
                keepalive=c.keepalive_s,
                logger=logging.getLogger("mqtt"),
            )
            # Acknowledge after handling, not on receipt (paho's default).
            client._client.manual_ack_set(True)
            event = "mqtt_connect_failed"
            try:
                async with client:
                    await self._subscribe(client)
                    self._client = client
                    self._connected.set()
                    event = "mqtt_disconnected"
                    self._metrics.mqtt_connected.set(1)
                    self._metrics.mqtt_connects.inc()
                    backoff.reset()
                    log(logger, "mqtt_connected", host=c.host, port=c.port, client_id=c.client_id)
                    on_connect()
                    async for message in client.messages:
                        payload = message.payload
                        if not isinstance(payload, bytes | bytearray):
                            payload = str(payload).encode()
                        await handle(Incoming(message.topic.value, bytes(payload), message.retain))
                        if message.qos > 0:
                            client._client.ack(message.mid, message.qos)
            except aiomqtt.MqttError as exc:
                reason = str(exc)
            else:
                reason = "message stream ended"
            finally:
                self._client = None
                self._connected.clear()
                self._metrics.mqtt_connected.set(0)
            delay = backoff.next()
            log(logger, event, logging.WARNING, reason=reason, retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        granted = await client.subscribe([(t, 1) for t in SUBSCRIPTIONS])
        codes = [getattr(g, "value", g) for g in granted]
        if any(code >= 0x80 for code in codes):
            raise aiomqtt.MqttError(f"broker refused subscriptions: {codes}")
