"""kill -9 at any moment loses no acknowledged conversion: the real daemon, killed twice under load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import base_settings, write_config
from tests.daemon_proc import DaemonProcess, free_port
from tests.fake_tiktok import FakeTikTok

POSTBACKS = 300
CONCURRENCY = 16


@pytest.fixture
async def daemon(tmp_path: Path, fake: FakeTikTok) -> AsyncIterator[DaemonProcess]:
    port = free_port()
    settings = base_settings(fake.url)
    settings["server"]["port"] = port
    proc = DaemonProcess(write_config(tmp_path, settings), port)
    yield proc
    proc.stop()


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not true after {timeout}s")
        await asyncio.sleep(0.01)


class Tracker:
    """Sends postbacks the way a tracker does: each one again until the bridge acknowledges it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: dict[str, str] = {}  # event_id -> "accepted" | "duplicate"

    def accepted(self) -> set[str]:
        return {event_id for event_id, result in self.answers.items() if result == "accepted"}

    async def send_all(self, count: int, deadline: float) -> None:
        limit = asyncio.Semaphore(CONCURRENCY)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            await asyncio.gather(*(self._send(session, limit, f"k{i}", deadline) for i in range(count)))

    async def _send(
        self, session: aiohttp.ClientSession, limit: asyncio.Semaphore, click_id: str, deadline: float
    ) -> None:
        params = {"subid": click_id, "external_id": f"E.C.P.{click_id}", "status": "sale", "revenue": "9"}
        async with limit:
            while time.monotonic() < deadline:
                try:
                    async with session.get(f"{self.url}/postback/keitaro", params=params) as resp:
                        body = await resp.json() if resp.status == 200 else None
                except (aiohttp.ClientError, TimeoutError):
                    body = None  # the bridge is down: a tracker retries later
                if body is not None:
                    self.answers[f"{click_id}_Purchase"] = body["result"]
                    return
                await asyncio.sleep(0.05)
        raise AssertionError(f"postback {click_id} was never acknowledged")


async def test_every_acknowledged_postback_reaches_tiktok_across_two_kill_9s(
    daemon: DaemonProcess, fake: FakeTikTok
) -> None:
    daemon.start()
    await daemon.wait_ready()
    tracker = Tracker(daemon.url)
    sending = asyncio.create_task(tracker.send_all(POSTBACKS, time.monotonic() + 40))
    try:
        # First kill: while a batch is on its way to TikTok (the request hangs, its events are leased).
        await until(lambda: len(tracker.answers) >= POSTBACKS // 5, 20, "first postbacks acknowledged")
        fake.hang_seconds = 60
        first_hang = len(fake.requests)
        fake.fail_next(1, "hang")
        await until(lambda: len(fake.requests) > first_hang, 10, "a batch in flight")
        in_flight = fake.requests[first_hang].event_ids
        daemon.kill()
        daemon.start()
        await daemon.wait_ready()

        # Second kill: in the middle of ingest, wherever it happens to be.
        await until(lambda: len(tracker.answers) >= POSTBACKS * 3 // 5, 20, "more postbacks acknowledged")
        daemon.kill()
        daemon.start()
        await daemon.wait_ready()

        await sending
    finally:
        sending.cancel()

    accepted = tracker.accepted()
    await fake.wait_for(lambda: accepted <= set(fake.event_ids()), timeout=20)
    assert in_flight and set(in_flight) <= set(fake.event_ids())
    # A tracker that retried every postback got each of them to TikTok, acknowledged or not the first time.
    assert len(tracker.answers) == POSTBACKS
    await fake.wait_for(lambda: set(tracker.answers) <= set(fake.event_ids()), timeout=10)
