"""Pruning finished jobs: their rows and outputs go `jobs.retention_s` after they finish,
or sooner once a project has more than `jobs.keep_per_project` finished jobs (the oldest).

One loop in the controller's TaskGroup; a database outage only postpones a pass.
"""

from __future__ import annotations

import asyncio
import logging

from controller import store
from controller.config import JobsSection
from controller.db import Pool
from controller.errors import Transient
from controller.logs import log

logger = logging.getLogger(__name__)


async def prune_jobs_forever(pool: Pool, jobs: JobsSection) -> None:
    while True:
        try:
            pruned = await store.prune_jobs(pool, jobs.retention_s, jobs.keep_per_project)
        except Transient as exc:
            log(logger, "jobs_prune_deferred", logging.WARNING, reason=exc)
        else:
            if pruned:
                log(
                    logger,
                    "jobs_pruned",
                    jobs=pruned,
                    retention_s=jobs.retention_s,
                    keep_per_project=jobs.keep_per_project,
                )
        await asyncio.sleep(jobs.prune_interval_s)
