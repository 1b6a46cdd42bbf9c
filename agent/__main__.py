"""`python -m agent --config agent.toml`: run the host agent until SIGTERM.

SIGTERM drains: loops stop, the broker hears we are offline, and every add-on container
keeps running (they belong to the host, not to this process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
from pathlib import Path

from agent import config as config_mod
from agent import metrics_http
from agent.backup_store import BackupStore
from agent.controller_client import ControllerClient
from agent.docker import Docker
from agent.runtime import Agent
from agent.sdnotify import notify
from agent.state import StateDir
from agent.watchdog import interval_from_env
from schemas import logs
from schemas.signed import Verifier

log = logging.getLogger("orkestr.agent")


async def main(
    config: config_mod.AgentConfig, verifier: Verifier, tls: ssl.SSLContext | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        docker = await stack.enter_async_context(
            Docker(config.agent.host, config.docker.url, config.docker.max_in_flight)
        )
        controller = await stack.enter_async_context(
            ControllerClient(
                config.controller.url, config.controller.token, config.controller.ca_file
            )
        )
        agent = Agent(config, docker, controller, verifier, tls)
        stack.push_async_callback(agent.applier.close)
        stack.push_async_callback(agent.backups.close)
        stack.push_async_callback(agent.close_sleepers)
        stack.push_async_callback(agent.workers.close)
        runner = await metrics_http.serve(
            config.metrics.listen, config.metrics.token_file, config.agent.state_dir
        )
        stack.push_async_callback(runner.cleanup)
        log.info("agent.started host=%s state_dir=%s", config.agent.host, config.agent.state_dir)
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(agent.broker.run(), name="mqtt"),
                    tg.create_task(agent.reconcile_loop(), name="reconcile"),
                    tg.create_task(agent.events_loop(), name="docker-events"),
                    tg.create_task(agent.heartbeat_loop(), name="heartbeat"),
                    tg.create_task(agent.quota_guard_loop(), name="quota-guard"),
                    tg.create_task(agent.sleep.loop(), name="sleep"),
                    tg.create_task(agent.pool.run(), name="holder-pool"),
                ]
                if (timeout_s := interval_from_env()) is not None:
                    tasks.append(tg.create_task(agent.watchdog.run(timeout_s), name="watchdog"))
                await stop.wait()
                notify("STOPPING=1")
                log.info("agent.stopping")
                await agent.broker.say_offline()
                for task in tasks:
                    task.cancel()
        except* asyncio.CancelledError:
            pass


def run() -> None:
    parser = argparse.ArgumentParser(prog="orkestr-agent")
    parser.add_argument(
        "--config", default=os.environ.get("ORKESTR_AGENT_CONFIG", "/etc/orkestr/agent.toml")
    )
    args = parser.parse_args()
    try:
        config = config_mod.load(Path(args.config))
        verifier = config_mod.verifier(config)
        tls = config_mod.tls_context(config)
        config.mqtt.password()
    except OSError as exc:
        print(f"orkestr-agent: bad configuration: mqtt.password_file: {exc}", file=sys.stderr)
        sys.exit(2)
    except config_mod.ConfigError as exc:
        print(f"orkestr-agent: bad configuration: {exc}", file=sys.stderr)
        sys.exit(2)
    # The directories the agent writes, made (with their modes) as the agent makes them:
    # one it cannot use stopped it with a traceback, or blamed metrics.token_file.
    state_dir = Path(config.agent.state_dir)
    backups_dir = config.backups.root(config.agent.state_dir)
    for key, make in (
        ("agent.state_dir", lambda: StateDir(state_dir)),
        ("backups.dir", lambda: BackupStore(backups_dir).ensure_root()),
    ):
        try:
            make()
        except OSError as exc:
            where = exc.filename or (state_dir if key == "agent.state_dir" else backups_dir)
            print(
                f"orkestr-agent: bad configuration: {key}: cannot use {where}: {exc.strerror}",
                file=sys.stderr,
            )
            sys.exit(2)
    try:
        metrics_http.ScrapeToken(
            str(metrics_http.token_path(config.metrics.token_file, config.agent.state_dir))
        )
    except (OSError, ValueError) as exc:
        print(f"orkestr-agent: bad configuration: metrics.token_file: {exc}", file=sys.stderr)
        sys.exit(2)
    # ORKESTR_LOG_LEVEL overrides log.level (a one-off DEBUG run without editing the file).
    logs.configure(os.environ.get("ORKESTR_LOG_LEVEL", config.log.level), config.log.format)
    asyncio.run(main(config, verifier, tls))


if __name__ == "__main__":
    run()
