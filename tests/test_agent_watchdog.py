"""systemd's watchdog protocol, without systemd: a datagram socket stands in for it."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.watchdog import Watchdog, interval_from_env
from tests.agent_fixtures import AgentProcess, remove_host_objects
from tests.docker_leaks import host_name
from tests.services import ControllerProcess, Mosquitto


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()


def received(sock: socket.socket) -> list[bytes]:
    out: list[bytes] = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


def test_stalled_names_the_loop_that_stopped() -> None:
    clock = Clock()
    dog = Watchdog(("reconcile", "sleep"), stall_s=10, clock=clock)
    assert dog.stalled() == []
    clock.now += 9
    dog.beat("sleep")
    clock.now += 2  # reconcile: 11 s since its last beat
    assert dog.stalled() == ["reconcile"]
    dog.beat("reconcile")
    assert dog.stalled() == []
    clock.now += 10.5
    assert dog.stalled() == ["reconcile", "sleep"]


def test_watchdog_is_petted_only_while_every_loop_progresses(
    notify_socket: socket.socket,
) -> None:
    clock = Clock()
    dog = Watchdog(("reconcile", "sleep"), stall_s=5, clock=clock)
    assert dog.tick() and received(notify_socket) == [b"WATCHDOG=1"]
    # The reconcile loop hangs: the sleep loop still ticks, and no pet is sent.
    clock.now += 6
    dog.beat("sleep")
    assert not dog.tick() and received(notify_socket) == []
    # It finishes a pass: pets resume.
    dog.beat("reconcile")
    assert dog.tick() and received(notify_socket) == [b"WATCHDOG=1"]


async def test_run_pets_at_half_the_timeout(notify_socket: socket.socket) -> None:
    dog = Watchdog(("reconcile",), stall_s=60)
    task = asyncio.create_task(dog.run(timeout_s=0.2))
    try:
        loop = asyncio.get_running_loop()
        first = await asyncio.wait_for(loop.sock_recv(notify_socket, 64), 5)
        started = loop.time()
        second = await asyncio.wait_for(loop.sock_recv(notify_socket, 64), 5)
        assert first == second == b"WATCHDOG=1"
        assert 0.05 <= loop.time() - started <= 1.0  # about timeout/2, not a busy loop
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_interval_comes_from_systemd_and_only_for_this_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert interval_from_env() is None
    monkeypatch.setenv("WATCHDOG_USEC", "180000000")
    assert interval_from_env() == 180.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert interval_from_env() == 180.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert interval_from_env() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert interval_from_env() is None


def test_unit_sets_a_watchdog() -> None:
    unit = (Path(__file__).parents[1] / "systemd" / "orkestr-agent.service").read_text()
    assert "Type=notify" in unit
    assert "WatchdogSec=180" in unit


async def test_real_agent_signals_ready_then_pets_the_watchdog(
    notify_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
    mosquitto: Mosquitto,
    controller: ControllerProcess,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # 1 s: a pet every 0.5 s
    host = host_name("w")
    token = await controller.new_agent_token(host)
    agent = AgentProcess(
        host, mosquitto, controller.url, token, public_key_file=controller.public_key_file
    )
    loop = asyncio.get_running_loop()
    try:
        await agent.start()
        seen: list[bytes] = []
        while seen.count(b"WATCHDOG=1") < 3:
            seen.append(await asyncio.wait_for(loop.sock_recv(notify_socket, 64), 15))
        assert b"READY=1" in seen, seen
    finally:
        await agent.close()
        remove_host_objects(host)
        shutil.rmtree(agent.dir, ignore_errors=True)
