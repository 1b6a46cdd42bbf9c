"""Publishing each host's desired state: a full, signed, retained snapshot per host.

Handlers `mark` hosts whose desired state changed; one task coalesces the marks and
publishes a fresh snapshot (with a new generation from a database sequence) per dirty
host, signed with the controller's key (schemas/signed.py). On every (re)connect to the
broker every known host is published again, so a change made while the broker was down,
or a lost retained message, heals by itself.

Failures are contained per host: a host whose snapshot cannot be built or published is
retried after its own capped backoff while the others go on. Only an unavailable
database or a lost broker connection pause the whole round, since every host needs both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from controller import snapshot, store
from controller.backoff import Backoff
from controller.db import Pool
from controller.errors import BrokerUnavailable, DatabaseUnavailable, Transient
from controller.logs import log
from controller.metrics import Metrics
from controller.mqtt import MqttLink
from controller.plans import Plans
from schemas import topics
from schemas.codec import encode
from schemas.messages import MAX_MESSAGE_BYTES
from schemas.signed import Signer

logger = logging.getLogger(__name__)


class Publisher:
    def __init__(
        self, pool: Pool, link: MqttLink, plans: Plans, metrics: Metrics, signer: Signer
    ) -> None:
        self._pool = pool
        self._link = link
        self._plans = plans
        self._metrics = metrics
        self._signer = signer
        self._dirty: set[str] = set()
        self._all = False
        self._wake = asyncio.Event()
        # Hosts whose last attempt failed: their backoff and when they are due again.
        self._backoff: dict[str, Backoff] = {}
        self._due: dict[str, float] = {}

    def mark(self, *hosts: str) -> None:
        self._dirty.update(hosts)
        self._wake.set()

    def mark_all(self) -> None:
        self._all = True
        self._wake.set()

    async def run(self) -> None:
        backoff = Backoff(first=0.5, cap=10.0)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._next_retry_in())
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

    def _next_retry_in(self) -> float | None:
        pending = [self._due[h] for h in self._dirty if h in self._due]
        if not pending:
            return None
        return max(0.0, min(pending) - asyncio.get_running_loop().time())

    async def _flush(self) -> None:
        if self._all:
            self._all = False
            try:
                self._dirty.update(await store.host_names(self._pool))
            except Transient:
                self._all = True
                raise
        now = asyncio.get_running_loop().time()
        for host in sorted(h for h in self._dirty if self._due.get(h, 0.0) <= now):
            if not self._link.connected:
                return  # the rest waits for the reconnect, which republishes everything
            self._dirty.discard(host)
            try:
                await self._publish(host)
            except DatabaseUnavailable:
                self._dirty.add(host)
                self._metrics.desired_published.labels("failed").inc()
                raise
            except BrokerUnavailable as exc:
                self._dirty.add(host)
                self._metrics.desired_published.labels("failed").inc()
                if self._link.connected:  # this host's publish failed, not the link
                    self._host_failed(host, exc, now)
            # Contained: whatever breaks one host's snapshot must not stop the others.
            except Exception as exc:
                self._dirty.add(host)
                self._metrics.desired_published.labels("failed").inc()
                self._host_failed(host, exc, now, trace=True)
            else:
                self._backoff.pop(host, None)
                self._due.pop(host, None)

    def _host_failed(self, host: str, exc: Exception, now: float, trace: bool = False) -> None:
        delay = self._backoff.setdefault(host, Backoff(first=1.0, cap=60.0)).next()
        self._due[host] = now + delay
        log(
            logger,
            "desired_publish_failed",
            logging.ERROR,
            host=host,
            reason=f"{type(exc).__name__}: {exc}",
            retry_in_s=round(delay, 2),
        )
        if trace:  # not one of ours: a bug, so keep the traceback
            logger.error("desired_publish_failed_traceback host=%s", host, exc_info=exc)

    async def _publish(self, host: str) -> None:
        state = await snapshot.desired_state(self._pool, host, self._plans)
        payload = self._signer.seal(encode(state))
        if len(payload) > MAX_MESSAGE_BYTES:
            # The agent would refuse it; keep the last good snapshot retained instead.
            self._metrics.desired_published.labels("too_large").inc()
            log(logger, "desired_state_too_large", logging.ERROR, host=host, bytes=len(payload))
            return
        await self._link.publish_retained(topics.desired(host), payload)
        self._metrics.desired_published.labels("published").inc()
        self._metrics.last_generation.set(state.generation)
        self._metrics.host_desired_generation.labels(host).set(state.generation)
        log(
            logger,
            "desired_published",
            host=host,
            generation=state.generation,
            projects=len(state.projects),
            bytes=len(payload),
        )
