"""kill -9 at any moment loses no acknowledged conversion: the real daemon, killed twice under load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import base_settings, until, write_config
from tests.daemon_proc import DaemonProcess, free_port
from tests.fake_tiktok import FakeTikTok

POSTBACKS = 300
# The tracker starts one postback every SPACING seconds, so the kills land while postbacks still arrive.
SPACING = 0.02  # 300 postbacks over ~6 s: a restart never lets the whole rest arrive at once


@pytest.fixture
async def daemon(tmp_path: Path, fake: FakeTikTok) -> AsyncIterator[DaemonProcess]:
    port = free_port()
    settings = base_settings(fake.url)
    settings["server"]["port"] = port
    proc = DaemonProcess(write_config(tmp_path, settings), port)
    yield proc
    proc.stop()


class Tracker:
    """Sends postbacks the way a tracker does: each one again until the bridge acknowledges it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: dict[str, str] = {}  # event_id -> "accepted" | "duplicate"

    def accepted(self) -> set[str]:
        return {event_id for event_id, result in self.answers.items() if result == "accepted"}

    async def send_all(self, count: int, deadline: float) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            await asyncio.gather(*(self._send(session, i, deadline) for i in range(count)))

    async def _send(self, session: aiohttp.ClientSession, i: int, deadline: float) -> None:
        await asyncio.sleep(i * SPACING)  # its turn in the tracker's stream of postbacks
        click_id = f"k{i}"
        params = {"subid": click_id, "external_id": f"E.C.P.{click_id}", "status": "sale", "revenue": "9"}
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
    # The first batch TikTok gets hangs (until tiktok.timeout, 2 s): its events are leased when killed.
    fake.hang_seconds = 60
    fake.fail_next(1, "hang")
    daemon.start()
    await daemon.wait_ready()
    tracker = Tracker(daemon.url)
    sending = asyncio.create_task(tracker.send_all(POSTBACKS, time.monotonic() + 40))
    try:
        await until(lambda: fake.requests and len(tracker.answers) >= POSTBACKS // 3, 20, "a batch in flight")
        in_flight = fake.requests[0].event_ids
        first_kill_at = len(tracker.answers)
        daemon.kill()
        daemon.start()
        await daemon.wait_ready()

        # The second kill lands in the middle of ingest, wherever it happens to be.
        await until(lambda: len(tracker.answers) >= POSTBACKS * 2 // 3, 20, "more postbacks acknowledged")
        second_kill_at = len(tracker.answers)
        daemon.kill()
        daemon.start()
        await daemon.wait_ready()

        await sending
    finally:
        sending.cancel()

    # Both kills came while postbacks were still arriving, one while a batch was on its way to TikTok.
    assert first_kill_at < second_kill_at < POSTBACKS
    assert in_flight
    accepted = tracker.accepted()
    await fake.wait_for(lambda: accepted <= set(fake.event_ids()), timeout=20)
    assert set(in_flight) <= set(fake.event_ids())
    # The tracker retried what was not acknowledged; every postback it sent reached TikTok in the end.
    assert len(tracker.answers) == POSTBACKS
    await fake.wait_for(lambda: set(tracker.answers) <= set(fake.event_ids()), timeout=10)
