"""Wiring: open the clients, start the loops, stop gracefully.

One AsyncExitStack holds the database pool and the HTTP server; the MQTT link and the
publisher are named tasks in one TaskGroup. SIGTERM or SIGINT cancels the loops, then the
stack closes the HTTP server and the pool. If a loop dies the whole process exits
non-zero and its supervisor restarts it; state lives in PostgreSQL and the desired
states are republished on the next connect, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import AsyncExitStack

from controller import db, store
from controller.api import Api, serve, tls_context
from controller.backup_scheduler import BackupScheduler
from controller.config import Config
from controller.errors import ConfigError
from controller.ingest import Ingest
from controller.joboutput import OutputWatch
from controller.logs import log
from controller.metrics import Metrics
from controller.mqtt import MqttLink
from controller.plans import Plans
from controller.publisher import Publisher
from controller.retention import prune_jobs_forever

logger = logging.getLogger(__name__)


async def run(config: Config, plans: Plans) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = Metrics()
    metrics.start_plans(plans)
    async with AsyncExitStack() as stack:
        pool = await stack.enter_async_context(
            db.open_pool(
                config.database.url,
                config.database.min_connections,
                config.database.max_connections,
            )
        )
        await db.migrate(pool)
        sealed = await store.seal_plaintext_passwords(pool, config.sealer)
        if sealed:
            log(logger, "passwords_sealed", addons=sealed)
        missing = await store.plans_in_use(pool) - set(plans)
        if missing:
            raise ConfigError(
                f"projects use plans the plans file does not define: {sorted(missing)}"
            )
        # A plan shrunk under its add-ons: the agents would refuse their writes at once, and
        # a Redis restarted into less memory than its data crash-loops.
        outgrown = await store.plans_outgrown(pool, plans)
        if outgrown:
            raise ConfigError(
                "the plans file shrinks plans below what their add-ons hold: "
                + "; ".join(outgrown)
                + " (keep the plan's sizes, or move those projects to a plan they fit first)"
            )
        link = MqttLink(config.mqtt, metrics)
        publisher = Publisher(pool, link, plans, metrics, config.signer)
        watch = OutputWatch()
        ingest = Ingest(
            pool,
            publisher,
            metrics,
            watch,
            config.jobs.output_retain_chars,
            clear=link.clear_retained,
        )
        api = Api(config, pool, plans, publisher, metrics, watch)
        app = api.app()
        # The 5xx an alert divides by: present from the start, so its first one counts.
        metrics.start_routes(
            {
                (r.method, r.resource.canonical)
                for r in app.router.routes()
                if r.resource and r.method != "HEAD"
            },
            ("500", "503"),
        )
        tls = tls_context(*map(str, config.http.tls)) if config.http.tls else None
        await stack.enter_async_context(
            serve(
                app,
                config.http.host,
                config.http.port,
                tls,
                per_client=config.http.max_connections_per_client,
                idle_timeout_s=config.http.idle_timeout_s,
            )
        )
        scheduler = BackupScheduler(pool, plans, publisher, metrics, config.backups.schedule_tick_s)
        scheduler.start()
        stack.callback(scheduler.stop)
        log(logger, "controller_ready", plans=",".join(plans))
        async with asyncio.TaskGroup() as tasks:
            loops = [
                tasks.create_task(link.run(ingest.handle, publisher.mark_all), name="mqtt"),
                tasks.create_task(publisher.run(), name="publisher"),
                tasks.create_task(prune_jobs_forever(pool, config.jobs), name="jobs-pruner"),
            ]
            await stop.wait()
            log(logger, "controller_stopping")
            for task in loops:
                task.cancel()
    log(logger, "controller_stopped")
