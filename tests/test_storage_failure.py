"""Storage failures: a locked database or a full disk answers 503 (never 200), keeps nothing half-written,
and the bridge takes postbacks again once the cause is gone."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.config import load_config
from bridge.runtime import Runtime
from bridge.store import Store
from bridge.web import create_app
from bridge.worker import LEASE_SECONDS, Worker
from tests.conftest import REPO, Bridge, Clock, base_settings, write_config
from tests.daemon_proc import free_port
from tests.fake_tiktok import FakeTikTok

UNAVAILABLE = {"error": "temporarily unavailable, retry later"}


def sale(click_id: str) -> dict[str, str]:
    return {"subid": click_id, "status": "sale", "revenue": "10", "tid": "T-1", "external_id": "E.C.P.x"}


@pytest.fixture
async def impatient(tmp_path: Path, fake: FakeTikTok) -> AsyncIterator[Bridge]:
    """A bridge whose writes give up on a lock held elsewhere after 0.2 s instead of 5 s."""
    config = load_config(write_config(tmp_path / "bridge", base_settings(fake.url)), environ={})
    store = await Store(config.db_path, busy_timeout=0.2).open()
    runtime = Runtime(config=config, store=store, worker_running=True)
    session = aiohttp.ClientSession()
    clock = Clock()
    worker = Worker(runtime, session, clock=clock, rand=lambda: 0.5)
    client = TestClient(TestServer(create_app(runtime), host="127.0.0.1"))
    await client.start_server()
    yield Bridge(config, store, runtime, worker, client, fake, clock)
    await client.close()
    await session.close()
    await store.close()


@contextlib.contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """Another writer holding the database, as a stuck `sqlite3` shell or a backup tool would."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        yield
        other.execute("ROLLBACK")
    finally:
        other.close()


async def rows(bridge: Bridge) -> tuple[list[str], list[str]]:
    conversions = await bridge.store.fetchall("SELECT click_id FROM conversions ORDER BY click_id")
    clicks = await bridge.store.fetchall("SELECT click_id FROM clicks ORDER BY click_id")
    return [r["click_id"] for r in conversions], [r["click_id"] for r in clicks]


# -- a database locked by another process ---------------------------------------------------------------


async def test_postback_while_the_database_is_locked_is_503_and_not_stored(impatient: Bridge) -> None:
    with write_lock(impatient.config.db_path):
        status, body = await impatient.postback("keitaro", **sale("clk-locked"))

    assert status == 503
    assert body == UNAVAILABLE
    assert await rows(impatient) == ([], [])


async def test_click_while_the_database_is_locked_is_503_and_not_stored(impatient: Bridge) -> None:
    with write_lock(impatient.config.db_path):
        status = await impatient.click(click_id="clk-locked", ttclid="E.C.P.x")

    assert status == 503
    assert await rows(impatient) == ([], [])


async def test_readyz_is_503_while_the_database_is_locked(impatient: Bridge) -> None:
    with write_lock(impatient.config.db_path):
        resp = await impatient.client.get("/readyz")
        text = await resp.text()

    assert resp.status == 503
    assert text.startswith("not ready: database is not writable")


async def test_a_refused_group_leaves_none_of_its_postbacks_or_clicks_behind(impatient: Bridge) -> None:
    # Concurrent requests share one commit; when it fails, every one of them is refused and none is kept.
    with write_lock(impatient.config.db_path):
        answers = await asyncio.gather(
            *(impatient.postback("keitaro", **sale(f"clk-{i}")) for i in range(6)),
            *(impatient.click(click_id=f"clk-{i}", ttclid="E.C.P.x") for i in range(3)),
        )

    assert [a[0] if isinstance(a, tuple) else a for a in answers] == [503] * 9
    assert await rows(impatient) == ([], [])


async def test_postbacks_are_accepted_again_once_the_lock_is_released(impatient: Bridge) -> None:
    with write_lock(impatient.config.db_path):
        refused, _ = await impatient.postback("keitaro", **sale("clk-retry"))

    status, body = await impatient.postback("keitaro", **sale("clk-retry"))
    ready = await impatient.client.get("/readyz")
    await impatient.deliver()

    assert (refused, status, body["result"]) == (503, 200, "accepted")
    assert ready.status == 200
    assert await rows(impatient) == (["clk-retry"], [])
    assert impatient.fake.event_ids() == ["clk-retry_Purchase"]


async def test_an_answer_the_database_refused_is_recorded_later_and_the_event_never_sent_twice(
    impatient: Bridge,
) -> None:
    _, body = await impatient.postback("keitaro", **sale("clk-sent"))
    with write_lock(impatient.config.db_path):
        # Claiming only reads, so the event goes out; recording TikTok's answer is refused.
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await impatient.worker.run_once()
        # Long past the claim's lease, with the database still refusing: nothing is sent again.
        impatient.clock.advance(LEASE_SECONDS + 1)
        for _ in range(3):
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                await impatient.worker.run_once()
        assert impatient.fake.event_ids() == ["clk-sent_Purchase"]
        assert (await impatient.row(body["conversion_id"]))["state"] == "pending"

    _, later = await impatient.postback("keitaro", **sale("clk-later"))
    await impatient.deliver()

    assert impatient.fake.event_ids() == ["clk-sent_Purchase", "clk-later_Purchase"]
    for conversion_id in (body["conversion_id"], later["conversion_id"]):
        row = await impatient.row(conversion_id)
        assert (row["state"], row["attempts"]) == ("delivered", 1)


# -- a full disk, under the real daemon ---------------------------------------------------------------------

# RLIMIT_FSIZE stands in for a full disk: writes past it fail in the kernel as writes to a full disk do
# (EFBIG or a short write instead of ENOSPC), needing neither root nor a mount, and it can be lifted
# from outside while the daemon runs.
needs_prlimit = pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs Linux prlimit")


class Daemon:
    """`postback-bridge run` with its output on a pipe: a log file would hit the size limit too."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        settings = base_settings()
        settings["server"]["port"] = self.port
        settings["storage"]["path"] = "data/bridge.db"
        settings["tiktok"]["dry_run"] = True
        self.config = write_config(directory, settings)
        self.data = directory / "data"
        self.url = f"http://127.0.0.1:{self.port}"
        self.output: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "run",
            "-c",
            str(self.config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=REPO,
        )
        self._reader = asyncio.create_task(self._read())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.returncode is None, "".join(self.output)
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{self.url}/healthz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise AssertionError("daemon not ready:\n" + "".join(self.output))

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.output.append(line.decode(errors="replace"))

    def limit_file_size(self, size: int) -> None:
        assert self.proc is not None
        resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))

    def largest_file(self) -> int:
        return max(path.stat().st_size for path in self.data.iterdir())

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), 20)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            if self._reader is not None:
                await self._reader
        return code


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    proc = Daemon(tmp_path / "daemon")
    yield proc
    if proc.proc is not None and proc.proc.returncode is None:
        proc.proc.kill()
        await proc.proc.wait()


def stored_click_ids(data: Path) -> list[str]:
    db = sqlite3.connect(data / "bridge.db")
    try:
        return [row[0] for row in db.execute("SELECT click_id FROM conversions ORDER BY id")]
    finally:
        db.close()


@needs_prlimit
async def test_full_disk_answers_503_keeps_only_what_was_acknowledged_and_recovers(daemon: Daemon) -> None:
    big = "x" * 1000  # large rows fill the allowance in a few commits
    acknowledged: list[str] = []
    refused: str | None = None
    async with aiohttp.ClientSession() as session:
        await daemon.start(session)

        async def send(click_id: str) -> tuple[int, Any]:
            params = {**sale(click_id), "user_agent": big, "external_id": "E.C.P." + big}
            async with session.get(f"{daemon.url}/postback/keitaro", params=params) as resp:
                return resp.status, await resp.json()

        daemon.limit_file_size(daemon.largest_file() + 64 * 1024)
        for i in range(400):
            status, body = await send(f"clk-{i:03d}")
            if status == 200:
                acknowledged.append(f"clk-{i:03d}")
                continue
            assert (status, body) == (503, UNAVAILABLE)
            refused = f"clk-{i:03d}"
            break
        assert refused is not None, "the disk never filled up"
        assert stored_click_ids(daemon.data) == acknowledged

        daemon.limit_file_size(resource.RLIM_INFINITY)
        status, body = await send(refused)
        async with session.get(f"{daemon.url}/readyz") as resp:
            ready = resp.status

        assert (status, body["result"]) == (200, "accepted")
        assert ready == 200
        code = await daemon.stop()

    assert code == 0
    assert stored_click_ids(daemon.data) == [*acknowledged, refused]
    db = sqlite3.connect(daemon.data / "bridge.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()
    assert "Traceback" not in "".join(daemon.output)
