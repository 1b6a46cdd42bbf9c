"""Automatic backups and retention, driven by APScheduler in the controller.

APScheduler only supplies the tick (an interval job on the asyncio loop); what is owed is
decided from PostgreSQL on every tick (`backup_queries.run_due`): each owed run is a row
with a unique (add-on, slot), so a restarted controller, or two running at once, neither
loses nor doubles a run, and a slot missed while every controller was down is run once
when one is back. Each tick also applies retention and refreshes the staleness gauge.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from controller import backup_queries
from controller.db import Pool
from controller.dirty_hosts import DirtyHosts
from controller.errors import Transient
from controller.logs import log
from controller.metrics import Metrics
from controller.plans import Plans

logger = logging.getLogger(__name__)


class BackupScheduler:
    def __init__(
        self, pool: Pool, plans: Plans, dirty: DirtyHosts, metrics: Metrics, tick_s: float
    ) -> None:
        self._pool = pool
        self._plans = plans
        self._dirty = dirty
        self._metrics = metrics
        self._tick_s = tick_s
        self._scheduler = AsyncIOScheduler(timezone="UTC")
        self._gauged: set[tuple[str, str]] = set()

    def start(self) -> None:
        # coalesce + max_instances=1: a slow tick is never run twice at once or caught up.
        self._scheduler.add_job(
            self.tick,
            IntervalTrigger(seconds=self._tick_s),
            id="backups",
            coalesce=True,
            max_instances=1,
            next_run_time=datetime.now(UTC),  # the first tick at once: owed runs first
        )
        self._scheduler.start()

    def stop(self) -> None:
        self._scheduler.shutdown(wait=False)

    async def tick(self) -> None:
        try:
            due = await backup_queries.run_due(self._pool, self._plans)
            pruned = await backup_queries.prune(self._pool, self._plans)
            ages = await backup_queries.last_verified(self._pool)
        except Transient as exc:
            self._metrics.backup_scheduler_runs.labels("error").inc()
            log(logger, "backup_tick_failed", logging.WARNING, reason=exc)
            return
        if due or pruned:
            self._dirty.mark(*due, *pruned)
            log(logger, "backup_tick", scheduled=len(due), prune_hosts=len(pruned))
        labels = set()
        for addon, project, epoch in ages:
            self._metrics.backup_last_verified.labels(addon, project).set(epoch)
            labels.add((addon, project))
        for stale in self._gauged - labels:
            self._metrics.backup_last_verified.remove(*stale)
        self._gauged = labels
        self._metrics.backup_scheduler_runs.labels("ok").inc()
