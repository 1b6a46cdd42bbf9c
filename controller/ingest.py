"""Handling what agents report over MQTT: host status, presence, job results and output.

Each message is decoded strictly (`schemas.codec.decode`); a rejected message is logged
with its topic and reason and changes nothing. A host may only speak for itself (the
topic's host must match the payload's) and only about projects placed on it (enforced
in the SQL of store.py). While the database is down a message is retried with backoff,
holding back its acknowledgement, so nothing an agent sent is dropped.

Results reach the controller through its persistent session (QoS 1), never as retained
messages; but the ACL lets a host publish retained ones on any of its own `jobs/<id>/...`
and `backups/<id>/result` topics, and the broker would keep them all. So once a result is
handled (stored, a redelivery, or refused) its topic is cleared (an empty retained
publish); an output chunk is cleared when it is refused, stale or was delivered as
retained. A host keeps at most one retained output chunk per job of its own, until the
controller next subscribes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from controller import backup_queries, joboutput, reports
from controller.backoff import Backoff
from controller.db import Pool
from controller.dirty_hosts import DirtyHosts
from controller.errors import BrokerUnavailable, DatabaseUnavailable
from controller.logs import log
from controller.metrics import Metrics
from controller.mqtt import Incoming
from schemas import topics
from schemas.codec import MessageRejected, decode
from schemas.messages import (
    MAX_OUTPUT_MESSAGE_BYTES,
    BackupResult,
    HostStatus,
    JobOutput,
    JobResult,
    Presence,
)

logger = logging.getLogger(__name__)

Kind = Literal["status", "presence", "job_result", "job_output", "backup_result"]
# Publishes an empty retained message on a topic (MqttLink.clear_retained).
Clear = Callable[[str], Awaitable[None]]


def topics_to_clear(
    kind: Kind, host: str, key: str | None, outcome: str, retained: bool
) -> list[str]:
    """The topics to clear once a message on a job or backup topic was handled.

    `outcome`: "accepted", "stale", "rejected" or "error". Status and presence stay
    retained (they are the host's current state).
    """
    if key is None:
        return []
    if kind == "job_result":
        # Not the job's output topic: clearing it as the result came lost the job's last
        # chunk now and then (the README's `orkestr run` printed only psql's first line in
        # 2 of 10 runs, in 0 of 8 without this clear). A chunk a host left retained is
        # cleared when it comes retained (the controller's next subscription) or refused.
        return [topics.job_result(host, key)]
    if kind == "backup_result":
        return [topics.backup_result(host, key)]
    if kind == "job_output" and (outcome != "accepted" or retained):
        return [topics.job_output(host, key)]
    return []


def classify(topic: str) -> tuple[Kind, str, str | None] | None:
    """(kind, host, job id) for one of the agents' topics, else None."""
    host = topics.host_of(topic)
    if host is None:
        return None
    if topic == topics.status(host):
        return "status", host, None
    if topic == topics.presence(host):
        return "presence", host, None
    parts = topic.split("/")
    if len(parts) == 7 and parts[4] == "jobs" and topic == topics.job_result(host, parts[5]):
        return "job_result", host, parts[5]
    if len(parts) == 7 and parts[4] == "jobs" and topic == topics.job_output(host, parts[5]):
        return "job_output", host, parts[5]
    if len(parts) == 7 and parts[4] == "backups" and topic == topics.backup_result(host, parts[5]):
        return "backup_result", host, parts[5]
    return None


class Ingest:
    def __init__(
        self,
        pool: Pool,
        dirty: DirtyHosts,
        metrics: Metrics,
        watch: joboutput.OutputWatch | None = None,
        output_retain_chars: int = 65536,
        clear: Clear | None = None,
    ) -> None:
        self._clear = clear
        self._pool = pool
        self._dirty = dirty
        self._metrics = metrics
        self._watch = watch or joboutput.OutputWatch()
        self._retain_chars = output_retain_chars

    async def handle(self, message: Incoming) -> None:
        """Apply one message; never raises except on cancellation."""
        found = classify(message.topic)
        if found is None:
            self._reject(message, "UnknownTopic", "not an agent topic", "unknown")
            return
        kind, host, job_id = found
        if not message.payload:
            # A zero-length publish clears a retained message (ours among them): nothing
            # to apply, nothing to clear.
            log(logger, "mqtt_empty_message", logging.DEBUG, topic=message.topic)
            return
        outcome = await self._handle(kind, host, job_id, message)
        for topic in topics_to_clear(kind, host, job_id, outcome, message.retained):
            await self._clear_retained(topic, outcome)

    async def _clear_retained(self, topic: str, outcome: str) -> None:
        if self._clear is None:
            return
        try:
            await self._clear(topic)
        except BrokerUnavailable as exc:
            # Cleared with the next message on the topic, or when the result is redelivered.
            log(logger, "mqtt_clear_failed", logging.WARNING, topic=topic, error=exc)
            return
        log(logger, "mqtt_retained_cleared", logging.DEBUG, topic=topic, outcome=outcome)

    async def _handle(self, kind: Kind, host: str, job_id: str | None, message: Incoming) -> str:
        backoff = Backoff(first=0.5, cap=10.0)
        while True:
            try:
                result = await self._apply(kind, host, job_id, message)
            except MessageRejected as exc:
                self._reject(message, exc.reason, exc.message, kind)
                return "rejected"
            except DatabaseUnavailable as exc:
                delay = backoff.next()
                log(
                    logger,
                    "mqtt_message_retry",
                    logging.WARNING,
                    topic=message.topic,
                    reason=exc,
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
                continue
            except Exception:
                # A bug must not turn one message into a crash loop (it would be redelivered).
                logger.exception("mqtt_message_failed topic=%s", message.topic)
                self._metrics.mqtt_messages.labels(kind, "error").inc()
                return "error"
            self._metrics.mqtt_messages.labels(kind, result).inc()
            return result

    def _reject(self, message: Incoming, reason: str, text: str, kind: str) -> None:
        self._metrics.mqtt_messages.labels(kind, "rejected").inc()
        log(
            logger,
            "mqtt_message_rejected",
            logging.WARNING,
            topic=message.topic,
            reason=reason,
            message=text[:500],
            bytes=len(message.payload),
        )

    async def _apply(self, kind: Kind, host: str, job_id: str | None, message: Incoming) -> str:
        if kind == "status":
            status = decode(message.payload, HostStatus)
            # The schema bounds every number to what the columns and sequence hold.
            _same_host(status.host, host)
            outcome = await reports.record_host_status(self._pool, status)
            if outcome is None:
                return "stale"
            self._metrics.host_applied_generation.labels(host).set(status.applied_generation)
            if outcome.purged:
                log(logger, "addons_purged", host=host, addons=",".join(outcome.purged))
            if outcome.over_ceiling is not None:
                (cpus, memory_mb), (max_cpus, max_memory_mb) = outcome.over_ceiling
                log(
                    logger,
                    "host_capacity_over_ceiling",
                    logging.WARNING,
                    host=host,
                    cpus=cpus,
                    memory_mb=memory_mb,
                    ceiling_cpus="" if max_cpus is None else max_cpus,
                    ceiling_memory_mb="" if max_memory_mb is None else max_memory_mb,
                )
            if outcome.purged or outcome.inserted or outcome.generation_behind:
                # New host, fewer tombstones, or an agent ahead of our sequence (restored
                # database): the host needs a fresh snapshot.
                self._dirty.mark(host)
            return "accepted"
        if kind == "presence":
            presence = decode(message.payload, Presence)
            _same_host(presence.host, host)
            if await reports.record_presence(self._pool, presence):
                self._dirty.mark(host)  # a new host gets its (empty) desired state at once
            log(
                logger,
                "host_presence",
                host=host,
                online=presence.online,
                retained=message.retained,
            )
            return "accepted"
        if kind == "backup_result":
            return await self._backup_result(host, job_id, message)
        if kind == "job_output":
            return await self._job_output(host, job_id, message)
        result = decode(message.payload, JobResult)
        _same_host(result.host, host)
        if result.job_id != job_id:
            raise MessageRejected(
                "JobMismatch", f"topic names job {job_id}, payload {result.job_id}"
            )
        if await reports.record_job_result(self._pool, result):
            log(
                logger,
                "job_finished",
                host=host,
                job=result.job_id,
                exit_code=result.exit_code,
                error=result.error or "",
            )
            self._dirty.mark(host)
            self._watch.changed(result.job_id)
            return "accepted"
        return "stale"  # unknown, foreign or already finished (a redelivery)

    async def _job_output(self, host: str, job_id: str | None, message: Incoming) -> str:
        chunk = decode(message.payload, JobOutput, MAX_OUTPUT_MESSAGE_BYTES)
        _same_host(chunk.host, host)
        if chunk.job_id != job_id:
            raise MessageRejected(
                "JobMismatch", f"topic names job {job_id}, payload {chunk.job_id}"
            )
        outcome, missing = await joboutput.record_chunk(self._pool, chunk, self._retain_chars)
        if outcome == "foreign":
            # The broker's ACL lets a host publish only under its own name; the job must
            # also be one of a project placed on it.
            raise MessageRejected(
                "ForeignJob",
                f"job {chunk.job_id} of project {chunk.project_id} is not placed on host {host}",
            )
        if missing:
            self._metrics.job_output_gaps.inc(missing)
            log(
                logger,
                "job_output_gap",
                logging.WARNING,
                host=host,
                job=chunk.job_id,
                seq=chunk.seq,
                missing=missing,
            )
        if outcome != "accepted":
            return "stale"  # a redelivery, or a job already pruned
        self._watch.changed(chunk.job_id)
        return "accepted"

    async def _backup_result(self, host: str, key: str | None, message: Incoming) -> str:
        outcome = decode(message.payload, BackupResult)
        _same_host(outcome.host, host)
        if key != f"{outcome.op}-{outcome.id}":
            raise MessageRejected(
                "OperationMismatch", f"topic names {key}, payload {outcome.op}-{outcome.id}"
            )
        if outcome.size_bytes is not None and not 0 <= outcome.size_bytes < 2**63:
            raise MessageRejected("OutOfRange", f"size_bytes {outcome.size_bytes} is out of range")
        if not await backup_queries.record_result(self._pool, outcome):
            return "stale"
        log(
            logger,
            "backup_operation_finished",
            host=host,
            op=outcome.op,
            addon=outcome.addon_id,
            backup=outcome.backup_id,
            ok=outcome.ok,
            verified="" if outcome.verified is None else outcome.verified,
            error=outcome.error or outcome.verify_error or "",
        )
        self._metrics.backup_results.labels(
            outcome.op,
            "ok" if outcome.ok else "failed",
            "" if outcome.verified is None else ("verified" if outcome.verified else "failed"),
        ).inc()
        self._dirty.mark(host)
        return "accepted"


def _same_host(payload_host: str, topic_host: str) -> None:
    if payload_host != topic_host:
        raise MessageRejected(
            "HostMismatch", f"published on host {topic_host}'s topic but names host {payload_host}"
        )
