"""sd_notify: notifications arrive on a real AF_UNIX datagram socket, and nothing breaks without one."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A socket playing PID 1's notification socket, and the NOTIFY_SOCKET value naming it."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


@pytest.fixture
def from_env() -> Iterator[Callable[[dict[str, str]], Notifier]]:
    """Notifier.from_env, closing every notifier it made when the test ends."""
    made: list[Notifier] = []

    def make(env: dict[str, str]) -> Notifier:
        made.append(Notifier.from_env(env))
        return made[-1]

    yield make
    for n in made:
        n.close()


@pytest.fixture
def notifier(listener: tuple[socket.socket, str], from_env: Callable[[dict[str, str]], Notifier]) -> Notifier:
    return from_env({"NOTIFY_SOCKET": listener[1], "WATCHDOG_USEC": "30000000"})


def received(listener: tuple[socket.socket, str]) -> list[str]:
    return listener[0].recv(4096).decode().split("\n")


def test_ready_sends_ready_1(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    assert notifier.enabled
    notifier.ready()
    assert received(listener) == ["READY=1"]


def test_ready_with_status_sends_both_in_one_datagram(
    notifier: Notifier, listener: tuple[socket.socket, str]
) -> None:
    notifier.ready("listening on 127.0.0.1:8080")
    assert received(listener) == ["READY=1", "STATUS=listening on 127.0.0.1:8080"]


def test_newline_in_a_value_cannot_forge_another_assignment(
    notifier: Notifier, listener: tuple[socket.socket, str]
) -> None:
    notifier.notify("STATUS=bad\nREADY=1")
    assert received(listener) == ["STATUS=bad READY=1"]


def test_watchdog_sends_watchdog_1(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    notifier.watchdog()
    assert received(listener) == ["WATCHDOG=1"]


def test_stopping_sends_stopping_1(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    notifier.stopping()
    assert received(listener) == ["STOPPING=1"]


def test_reloading_carries_the_monotonic_clock_in_usec(
    notifier: Notifier, listener: tuple[socket.socket, str]
) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = received(listener)
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_reloaded_sends_ready_1(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    notifier.reloaded()
    assert received(listener) == ["READY=1"]


def test_reloaded_with_status_says_how_the_reload_went(
    notifier: Notifier, listener: tuple[socket.socket, str]
) -> None:
    notifier.reloaded("reload refused (1 problem(s), see the journal)")
    assert received(listener) == ["READY=1", "STATUS=reload refused (1 problem(s), see the journal)"]


def test_abstract_namespace_socket() -> None:
    name = f"postback-bridge-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        try:
            n.ready()
            assert sock.recv(4096) == b"READY=1"
        finally:
            n.close()


def test_watchdog_interval_is_half_of_watchdog_usec(notifier: Notifier) -> None:
    assert notifier.watchdog_interval() == 15.0


def test_watchdog_pid_of_this_process_keeps_the_watchdog(
    listener: tuple[socket.socket, str], from_env: Callable[[dict[str, str]], Notifier]
) -> None:
    env = {"NOTIFY_SOCKET": listener[1], "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert from_env(env).watchdog_interval() == 1.0


def test_watchdog_pid_of_another_process_disables_the_watchdog(
    listener: tuple[socket.socket, str], from_env: Callable[[dict[str, str]], Notifier]
) -> None:
    env = {"NOTIFY_SOCKET": listener[1], "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert from_env(env).watchdog_interval() is None


@pytest.mark.parametrize("usec", [None, "", "0", "-5", "not-a-number"])
def test_no_watchdog_without_a_positive_watchdog_usec(
    listener: tuple[socket.socket, str], from_env: Callable[[dict[str, str]], Notifier], usec: str | None
) -> None:
    env = {"NOTIFY_SOCKET": listener[1]}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    assert from_env(env).watchdog_interval() is None


def test_without_notify_socket_it_is_disabled_and_a_no_op() -> None:
    n = Notifier.from_env({"WATCHDOG_USEC": "30000000"})
    assert not n.enabled
    assert n.watchdog_interval() is None
    n.ready("ok")
    n.watchdog()
    n.reloading()
    n.reloaded()
    n.stopping()
    n.close()


def test_from_env_reads_os_environ_by_default(
    monkeypatch: pytest.MonkeyPatch, listener: tuple[socket.socket, str]
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener[1])
    n = Notifier.from_env()
    try:
        n.ready()
        assert received(listener) == ["READY=1"]
    finally:
        n.close()


def test_a_socket_nobody_listens_on_is_not_an_error(tmp_path: Path) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.enabled
    n.ready()
    n.watchdog()
    n.close()
    assert not n.enabled
    n.ready()  # after close: still nothing raised


def test_an_address_form_it_does_not_speak_disables_it() -> None:
    assert not Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
