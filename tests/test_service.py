"""The daemon as systemd runs it: sd_notify, SIGHUP reload, SIGTERM, retention pruning."""

from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bridge.mapping import build_click
from bridge.store import Store
from tests.conftest import base_settings, write_config
from tests.daemon_proc import DaemonProcess, free_port
from tests.fake_tiktok import FakeTikTok

WATCHDOG_USEC = 400_000  # pings every 0.2 s


class NotifySocket:
    """An AF_UNIX datagram socket playing PID 1's notification socket; keeps every message it got."""

    def __init__(self, directory: Path) -> None:
        # sockaddr_un holds 108 bytes: a deep tmp_path would not fit.
        if len(str(directory / "notify")) > 100:
            directory = Path(tempfile.mkdtemp(prefix="pb-notify-"))
        self.path = directory / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.messages: list[list[str]] = []

    async def expect(self, predicate: Callable[[list[str]], bool], timeout: float = 20.0) -> list[str]:
        """The first message not yet taken that satisfies `predicate`; earlier ones are taken too."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no matching notification within {timeout}s; got {self.messages}")
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), remaining)
            except TimeoutError:
                continue
            message = data.decode().split("\n")
            self.messages.append(message)
            if predicate(message):
                return message

    def close(self) -> None:
        self.sock.close()


def has(assignment: str) -> Callable[[list[str]], bool]:
    return lambda message: assignment in message


NEW_TRACKER = {
    "name": "newtracker",
    "params": {"click_id": "cid", "status": "status", "ttclid": "ttclid"},
    "events": {"sale": "Purchase"},
}


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()


@pytest.fixture
async def daemon(tmp_path: Path, fake: FakeTikTok, notify: NotifySocket) -> AsyncIterator[DaemonProcess]:
    """The daemon under a pretend systemd (NOTIFY_SOCKET, WATCHDOG_USEC), not yet started."""
    port = free_port()
    settings = base_settings(fake.url)
    settings["server"]["port"] = port
    config = write_config(tmp_path, settings)
    proc = DaemonProcess(
        config, port, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    )
    yield proc
    proc.stop()


async def start(daemon: DaemonProcess, notify: NotifySocket) -> None:
    daemon.start()
    await notify.expect(has("READY=1"))


async def get(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status


def postback_url(daemon: DaemonProcess, tracker: str) -> str:
    # Each tracker's click id parameter (newtracker's, keitaro's, binom's): any of them finds its own.
    ids = "cid=c1&subid=c1&clickid=c1&ttclid=E.C.P.1&external_id=E.C.P.1&externalid=E.C.P.1"
    return f"{daemon.url}/postback/{tracker}?{ids}&status=sale"


async def reload(daemon: DaemonProcess, notify: NotifySocket) -> list[str]:
    """SIGHUP, then wait for systemd's view of it: RELOADING=1, then READY=1 (and a STATUS) when over."""
    daemon.signal(signal.SIGHUP)
    await notify.expect(has("RELOADING=1"))
    return await notify.expect(has("READY=1"))


async def test_ready_is_sent_once_it_listens_and_is_ready(
    daemon: DaemonProcess, notify: NotifySocket
) -> None:
    daemon.start()
    ready = await notify.expect(has("READY=1"))

    assert f"STATUS=listening on 127.0.0.1:{daemon.port}" in ready
    # Nothing to wait for after READY=1: systemd starts dependent units at this point.
    assert await get(f"{daemon.url}/readyz") == 200


async def test_watchdog_pings_repeat_while_it_runs(daemon: DaemonProcess, notify: NotifySocket) -> None:
    await start(daemon, notify)
    for _ in range(4):
        await notify.expect(has("WATCHDOG=1"), timeout=5)
    assert daemon.proc is not None and daemon.proc.poll() is None


async def test_sigterm_sends_stopping_and_exits_0(daemon: DaemonProcess, notify: NotifySocket) -> None:
    await start(daemon, notify)
    daemon.signal(signal.SIGTERM)

    await notify.expect(has("STOPPING=1"))
    assert await daemon.wait_exit() == 0
    assert any(line["event"] == "stopped" for line in daemon.log_lines())


async def test_sighup_makes_a_new_tracker_file_live(daemon: DaemonProcess, notify: NotifySocket) -> None:
    await start(daemon, notify)
    assert await get(postback_url(daemon, "newtracker")) == 404

    (daemon.config.parent / "trackers" / "newtracker.yaml").write_text(yaml.safe_dump(NEW_TRACKER))
    ready = await reload(daemon, notify)

    assert await get(postback_url(daemon, "newtracker")) == 200
    reloaded = await daemon.wait_log(lambda line: line["event"] == "reloaded")
    assert "newtracker" in reloaded["trackers"]
    assert f"STATUS=listening on 127.0.0.1:{daemon.port}; config reloaded" in ready


async def test_sighup_makes_a_removed_tracker_file_404(daemon: DaemonProcess, notify: NotifySocket) -> None:
    await start(daemon, notify)
    assert await get(postback_url(daemon, "binom")) == 200

    (daemon.config.parent / "trackers" / "binom.yaml").unlink()
    await reload(daemon, notify)

    assert await get(postback_url(daemon, "binom")) == 404
    assert await get(postback_url(daemon, "keitaro")) == 200


async def test_sighup_with_a_broken_tracker_file_keeps_the_old_config_and_says_why(
    daemon: DaemonProcess, notify: NotifySocket
) -> None:
    await start(daemon, notify)
    trackers = daemon.config.parent / "trackers"
    (trackers / "newtracker.yaml").write_text("name: newtracker\nparams: {click_id: cid}\nevnets: {}\n")
    (trackers / "binom.yaml").unlink()
    ready = await reload(daemon, notify)

    # What `systemctl status` shows, since `systemctl reload` returns before the outcome is known.
    assert any(a.startswith("STATUS=reload refused") for a in ready)
    refused = await daemon.wait_log(lambda line: line["event"].startswith("reload refused"))
    assert refused["level"] == "error"
    assert "newtracker.yaml" in refused["problem"] and "evnets" in refused["problem"]
    # Still the old trackers: the broken file's is not live, the removed file's still is.
    assert await get(postback_url(daemon, "newtracker")) == 404
    assert await get(postback_url(daemon, "binom")) == 200
    assert not any(line["event"] == "reloaded" for line in daemon.log_lines())


async def test_it_prunes_what_retention_lets_go_and_keeps_pending(
    daemon: DaemonProcess, notify: NotifySocket
) -> None:
    settings = _settings_of(daemon)
    settings["retention"] = {"clicks": 86400, "finished_conversions": 86400}
    write_config(daemon.config.parent, settings, shipped=False)
    db_path = daemon.config.parent / "bridge.db"
    await _seed(db_path)

    await start(daemon, notify)
    pruned = await daemon.wait_log(lambda line: line["event"] == "pruned")

    assert (pruned["clicks"], pruned["conversions"]) == (1, 1)
    db = sqlite3.connect(db_path)
    try:
        clicks = sorted(row[0] for row in db.execute("SELECT click_id FROM clicks"))
        states = sorted(row[0] for row in db.execute("SELECT click_id FROM conversions"))
    finally:
        db.close()
    assert clicks == ["fresh"]
    assert states == ["fresh", "old-pending"]


# -- helpers ------------------------------------------------------------------------------------------


def _settings_of(daemon: DaemonProcess) -> dict[str, Any]:
    return yaml.safe_load(daemon.config.read_text())


async def _seed(db_path: Path) -> None:
    """Two days old: a click, a delivered and a pending conversion; and a fresh click and conversion."""
    store = await Store(db_path).open()
    try:
        for click_id in ("old", "fresh"):
            await store.add_click(build_click({"click_id": click_id}, "198.51.100.7", "UA", "US"))
    finally:
        await store.close()
    two_days_ago = time.time() - 2 * 86400
    db = sqlite3.connect(db_path)
    with db:
        db.execute("UPDATE clicks SET created_at = ? WHERE click_id = 'old'", (two_days_ago,))
        for click_id, state, finished in (
            ("old-delivered", "delivered", two_days_ago),
            ("old-pending", "pending", None),
            ("fresh", "delivered", time.time()),
        ):
            db.execute(
                "INSERT INTO conversions (tracker, click_id, status, event, event_id, event_time, state, "
                "next_attempt_at, received_at, finished_at) VALUES ('keitaro', ?, 'sale', 'Purchase', ?, ?, "
                "?, ?, ?, ?)",
                (
                    click_id,
                    f"{click_id}_Purchase",
                    int(two_days_ago),
                    state,
                    time.time() + 86400,
                    two_days_ago,
                    finished,
                ),
            )
    db.close()
