"""Session fixtures shared by all tests: one broker, one controller database, one
controller process, and a guard that fails any test leaving asyncio tasks behind.

Fixtures that run real host agents live in their own module, listed in `pytest_plugins`
below; add further fixture modules there rather than growing this file.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Any

import pytest

from tests.services import ControllerProcess, FakeAgent, Mosquitto, create_database, drop_database

pytest_plugins = [
    "tests.docker_leaks",  # fails the run if it left a container, network or volume
    "tests.agent_fixtures",  # real host agents against dockerd (the agent's tests)
    "tests.timeline",  # ORKESTR_TEST_TIMELINE: each test's worker and times, for balancing
]

# Plans for tests: the packaged limits with sleep timeouts short enough to observe.
TEST_PLANS = """
[starter]
max_addons = 1
cpus = 0.5
memory_mb = 256
sleep = { enabled = true, light_after_s = 2, deep_after_s = 5 }

[pro]
max_addons = 2
cpus = 1.0
memory_mb = 1024
sleep = { enabled = true, light_after_s = 3, deep_after_s = 8 }

[team]
max_addons = 5
cpus = 2.0
memory_mb = 2048
sleep = { enabled = false }
"""


@pytest.fixture(scope="session")
async def mosquitto() -> AsyncIterator[Mosquitto]:
    broker = Mosquitto()
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()


@pytest.fixture(scope="session")
async def controller_db() -> AsyncIterator[str]:
    dsn = await create_database("orkestr_test")
    try:
        yield dsn
    finally:
        await drop_database(dsn)


@pytest.fixture(scope="session")
def plans_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plans") / "plans.toml"
    path.write_text(TEST_PLANS)
    return path


@pytest.fixture(scope="session")
async def controller(
    mosquitto: Mosquitto, controller_db: str, plans_file: Path
) -> AsyncIterator[ControllerProcess]:
    process = ControllerProcess(
        database_url=controller_db,
        broker=mosquitto,
        plans_file=plans_file,
        offline_after_s=5.0,
    )
    await process.start()
    try:
        yield process
    finally:
        await process.close()


@pytest.fixture
async def fake_agent(
    mosquitto: Mosquitto, controller: ControllerProcess
) -> AsyncIterator[FakeAgent]:
    """A fresh online host (via the real protocol) so projects can be placed."""
    async with FakeAgent(f"h-{secrets.token_hex(5)}", mosquitto) as agent:
        await controller.wait_host_online(agent.host)
        yield agent


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running (a missing cancel or await)."""
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()
    deadline = asyncio.get_running_loop().time() + 2.0
    while True:
        leaked = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
        if not leaked or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)  # cancelled tasks need a loop turn or two to finish
    assert not leaked, "test leaked asyncio tasks:\n" + "\n".join(
        f"{t.get_name()}: {t.get_coro()!r}" for t in leaked
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the controller's log tail to a failed test's report."""
    report = yield
    process = getattr(item, "funcargs", {}).get("controller")
    if report.failed and isinstance(process, ControllerProcess):
        tail = "\n".join(process.log_text().splitlines()[-80:])
        report.sections.append(("controller log (last 80 lines)", tail))
    return report


# --- Two workers (pytest-xdist; deploy/test.sh runs `-n 2`) ---------------------------------
# Most of a test's time is spent waiting: on idle timers, on dockerd, on a restarting agent.
# Two workers overlap those waits on 2 cores. A test file runs whole on one worker, in
# order, with its module's controller, as it does alone.
# The files that time the agent (an add-on asleep on time, a wake beside a slow one, probes
# with a 2 s timeout, a neighbour's latency beside hogs) form one unit, run in this order on
# one worker, so that none of them runs beside another; the other worker takes the
# remaining files meanwhile, the longest first.
ONE_WORKER = (
    "test_sleep.py",
    "test_wake_relay.py",
    "test_wake_queue.py",
    "test_slow_addon.py",
    "test_egress.py",
    "test_neighbours.py",
)
# The files that load the machine most and time nothing (250 networks, schemathesis, kill
# -9 rounds, 1000 generations) never run beside that unit either: the scheduler hands them
# out last, each to the unit's own worker or, once the unit is done, to any worker, so two
# of them may run side by side at the end (they were the unit's tail, one after another).
AFTER_THE_UNIT = (
    "test_docker_networks.py",
    "test_wire_security.py",
    "test_openapi_fuzz.py",
    "test_crash_anywhere.py",
)
# Fast files of pure logic, handed out last. A worker runs a test only once it holds the
# next one (or is told none will come), so a worker left with the one test of a heavy file
# used to take the next heavy file as its next test, and ran both while the other worker
# went idle (openapi_fuzz then crash_anywhere on one worker, the other idle 285 s at the end
# of a run at b805b8c). Such a worker now gets one of these instead, and the next heavy
# file goes to whichever worker is free first.
CARRIERS = (
    "test_workqueue.py",
    "test_wire_units.py",
    "test_plans_logic.py",
    "test_write_budget.py",
)
LONGEST_FIRST = (
    *ONE_WORKER,
    "test_backups.py",
    "test_plans_hold.py",
    "test_groups.py",
    "test_cli.py",
    "test_e2e.py",
    "test_readme.py",
    "test_backup_resume.py",
    "test_job_output.py",
    "test_deleted_backups.py",
    "test_tenant_fence.py",
    "test_controller_auth.py",
)
UNIT = "ONE_WORKER"  # the unit's scope name in the scheduler


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # In a module on one shared agent (tests/agent_fixtures.py), the tests that need a fresh
    # one run last: the shared agent then starts once and stops once.
    files: dict[str, int] = {}
    for item in items:
        files.setdefault(str(item.fspath), len(files))

    def own_agent_last(item: pytest.Item) -> tuple[int, bool]:
        own = item.get_closest_marker("shared_agent") and item.get_closest_marker("own_agent")
        return files[str(item.fspath)], bool(own)

    items.sort(key=own_agent_last)  # stable: each file's two groups keep its order
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # alone: the files' own order

    def rank(item: pytest.Item) -> int:
        name = Path(str(item.fspath)).name
        if name in AFTER_THE_UNIT:
            return len(LONGEST_FIRST) + 1 + AFTER_THE_UNIT.index(name)
        if name in CARRIERS:
            return len(LONGEST_FIRST) + 1 + len(AFTER_THE_UNIT)
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a file's tests keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getoption("dist") != "loadfile":
        return None  # xdist's own
    from xdist.scheduler import LoadFileScheduling

    class ByFile(LoadFileScheduling):  # type: ignore[misc]  # xdist ships no type hints
        """`--dist loadfile`, with the ONE_WORKER files as one unit, in collection order,
        and the AFTER_THE_UNIT files never on another worker while the unit runs."""

        def __init__(self, config: pytest.Config, log: Any = None) -> None:
            super().__init__(config, log)
            config.option.loadscopereorder = False  # LONGEST_FIRST, not by test count

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return UNIT if Path(path).name in ONE_WORKER else path

        def _unit_running_elsewhere(self, node: Any) -> bool:
            if UNIT in self.workqueue:
                return True  # not handed out yet
            for other, work in self.assigned_work.items():
                if UNIT in work:
                    return other is not node and not all(work[UNIT].values())
            return False  # no unit in this run

        def _assign_work_unit(self, node: Any) -> None:
            head = next(iter(self.workqueue))
            if Path(head).name in AFTER_THE_UNIT:
                if self._unit_running_elsewhere(node):
                    return  # held back: the unit's last test hands it out (below)
                carrier = next((s for s in self.workqueue if Path(s).name in CARRIERS), None)
                if carrier is not None and self._pending(node) == 1:
                    self.workqueue.move_to_end(carrier, last=False)  # its next test
            super()._assign_work_unit(node)

        def _pending(self, node: Any) -> int:
            return int(self._pending_of(self.assigned_work.get(node, {})))

        def _reschedule(self, node: Any) -> None:
            # xdist's, until the worker holds two tests: it runs one only once it has the
            # next (or is told no more come), so a file of one test would wait for the next.
            while True:
                left = len(self.workqueue)
                super()._reschedule(node)
                if len(self.workqueue) == left or self._pending(node) > 1:
                    return

        def mark_test_complete(self, node: Any, item_index: int, duration: float = 0) -> None:
            nodeid = self.registered_collections[node][item_index]
            self.assigned_work[node][self._split_scope(nodeid)][nodeid] = True
            # Every worker, the idlest first: one held back above may go now.
            for each in sorted(self.nodes, key=self._pending):
                self._reschedule(each)

    return ByFile(config, log)
