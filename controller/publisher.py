"""Publishing each host's desired state: a full, retained snapshot per host.

Handlers `mark` hosts whose desired state changed; one task coalesces the marks and
publishes a fresh snapshot (with a new generation from a database sequence) per dirty
host. On every (re)connect to the broker every known host is published again, so a
change made while the broker was down, or a lost retained message, heals by itself.
"""

from __future__ import annotations

import asyncio
import logging

from controller import snapshot, store
from controller.backoff import Backoff
from controller.db import Pool
from controller.errors import Transient
from controller.logs import log
from controller.metrics import Metrics
from controller.mqtt import MqttLink
from controller.plans import Plans
from schemas import topics
from schemas.codec import encode
from schemas.messages import MAX_MESSAGE_BYTES

logger = logging.getLogger(__name__)


class Publisher:
    def __init__(self, pool: Pool, link: MqttLink, plans: Plans, metrics: Metrics) -> None:
        self._pool = pool
        self._link = link
        self._plans = plans
        self._metrics = metrics
        self._dirty: set[str] = set()
        self._all = False
        self._wake = asyncio.Event()

    def mark(self, *hosts: str) -> None:
        self._dirty.update(hosts)
        self._wake.set()

    def mark_all(self) -> None:
        self._all = True
        self._wake.set()

    async def run(self) -> None:
        backoff = Backoff(first=0.5, cap=10.0)
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._link.wait_connected()
            try:
                await self._flush()
            except Transient as exc:
                delay = backoff.next()
                log(
                    logger,
                    "publish_deferred",
                    logging.WARNING,
                    reason=exc,
                    dirty=len(self._dirty),
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
                self._wake.set()
            else:
                backoff.reset()

    async def _flush(self) -> None:
        if self._all:
            self._all = False
            try:
                self._dirty.update(await store.host_names(self._pool))
            except Transient:
                self._all = True
                raise
        while self._dirty:
            host = min(self._dirty)
            self._dirty.discard(host)
            try:
                await self._publish(host)
            except Transient:
                self._dirty.add(host)
                self._metrics.desired_published.labels("failed").inc()
                raise

    async def _publish(self, host: str) -> None:
        state = await snapshot.desired_state(self._pool, host, self._plans)
        payload = encode(state)
        if len(payload) > MAX_MESSAGE_BYTES:
            # The agent would refuse it; keep the last good snapshot retained instead.
            self._metrics.desired_published.labels("too_large").inc()
            log(logger, "desired_state_too_large", logging.ERROR, host=host, bytes=len(payload))
            return
        await self._link.publish_retained(topics.desired(host), payload)
        self._metrics.desired_published.labels("published").inc()
        self._metrics.last_generation.set(state.generation)
        log(
            logger,
            "desired_published",
            host=host,
            generation=state.generation,
            projects=len(state.projects),
            bytes=len(payload),
        )
