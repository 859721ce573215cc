"""Every write of the store takes turns with ingest: none writes while an ingest group holds the turn.

An ingest group holds the write turn while it commits. A write that skipped the turn would go straight
to SQLite, and the next ingest group would wait for it in SQLite's busy handler, which sleeps in steps
of milliseconds: postbacks answered late while /readyz probed the disk or an hourly prune ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from bridge.mapping import Conversion
from bridge.store import Store
from tests.conftest import until

OLD = time.time() - 400 * 86400


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await Store(tmp_path / "bridge.db").open()
    with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as db:
        db.execute(
            "INSERT INTO clicks (click_id, created_at, updated_at) VALUES ('old-click', ?, ?)", (OLD, OLD)
        )
        # 1 waits an hour (a held pixel's event, say); 2 is a dead letter.
        for id_, state, next_attempt, finished in (
            (1, "pending", time.time() + 3600, None),
            (2, "failed", None, OLD),
        ):
            db.execute(
                "INSERT INTO conversions (id, tracker, click_id, status, event, event_id, event_time, state,"
                " next_attempt_at, sent_pixel, received_at, finished_at)"
                " VALUES (?, 'keitaro', ?, 'sale', 'Purchase', ?, ?, ?, ?, 'main', ?, ?)",
                (id_, f"c{id_}", f"c{id_}_Purchase", int(OLD), state, next_attempt, OLD, finished),
            )
    yield store
    await store.close()


@contextlib.contextmanager
def turn_held(store: Store) -> Iterator[None]:
    """Hold the store's write turn from another thread, as the ingest writer does during a commit."""
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store._write_lock:
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(10), "the write turn was never free"
    try:
        yield
    finally:
        release.set()
        holder.join()


def row(store: Store, sql: str) -> tuple[object, ...] | None:
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        return db.execute(sql).fetchone()


DUE_NOW = "SELECT next_attempt_at < strftime('%s', 'now') + 60 FROM conversions WHERE id = 1"
REQUEUED = "SELECT state = 'pending' FROM conversions WHERE id = 2"

WRITES: dict[str, tuple[Callable[[Store], Awaitable[object]], str]] = {
    "make_due": (lambda s: s.make_due(time.time()), DUE_NOW),
    "make_due of a pixel": (lambda s: s.make_due(time.time(), ["main"]), DUE_NOW),
    # An outage probe: the event waiting an hour becomes due now.
    "bring_forward": (lambda s: s.bring_forward(time.time(), "main"), DUE_NOW),
    "requeue_failed": (lambda s: s.requeue_failed(None, time.time(), 0.0), REQUEUED),
    "requeue_failed of ids": (lambda s: s.requeue_failed([2], time.time(), 0.0), REQUEUED),
    "prune": (lambda s: s.prune(time.time(), 30 * 86400, 30 * 86400), "SELECT COUNT(*) = 0 FROM clicks"),
    "set_pixel_status": (
        lambda s: s.set_pixel_status("main", False, 40001, "token", time.time()),
        "SELECT COUNT(*) = 1 FROM pixel_status",
    ),
}


@pytest.mark.parametrize("name", sorted(WRITES))
async def test_a_maintenance_write_waits_for_the_ingest_groups_turn(store: Store, name: str) -> None:
    write, written = WRITES[name]
    with turn_held(store):
        task = asyncio.create_task(write(store))
        await asyncio.sleep(0.3)
        waited = not task.done()
        unchanged = row(store, written) == (0,)
    await asyncio.wait_for(task, 10)

    assert waited and unchanged, f"{name} wrote while an ingest group held the turn"
    assert row(store, written) == (1,)


async def test_the_readiness_probe_waits_for_the_turn_and_then_reports_writable(store: Store) -> None:
    with turn_held(store):
        probe = asyncio.create_task(store.writable())
        await asyncio.sleep(0.3)
        waited = not probe.done()

    assert waited
    assert await asyncio.wait_for(probe, 10) is None


async def test_a_stalled_listener_process_makes_the_readiness_probe_fail_not_hang(tmp_path: Path) -> None:
    """With listener processes the turn is also an flock; one stopped while it holds it must not
    leave /readyz (and the maintenance writes) waiting without end: after the busy timeout they fail,
    as SQLite's own busy handler would."""
    store = await Store(tmp_path / "bridge.db", busy_timeout=0.5, shared=True).open()
    other_process = os.open(tmp_path / "bridge.db.writers", os.O_RDWR)
    try:
        fcntl.flock(other_process, fcntl.LOCK_EX)
        blocked = await asyncio.wait_for(store.writable(), 10)
        with pytest.raises(sqlite3.OperationalError, match="another bridge process"):
            await asyncio.wait_for(store.make_due(time.time()), 10)
        fcntl.flock(other_process, fcntl.LOCK_UN)
        free = await asyncio.wait_for(store.writable(), 10)
    finally:
        os.close(other_process)
        await store.close()

    assert blocked is not None and "another bridge process held the write turn" in blocked
    assert free is None


def sale(click_id: str) -> Conversion:
    return Conversion(
        tracker="keitaro",
        click_id=click_id,
        status="sale",
        event="Purchase",
        ignored_reason=None,
        transaction_id="",
        event_id=f"{click_id}_Purchase",
        event_time=int(time.time()),
    )


async def test_conversions_that_queue_while_the_turn_is_busy_join_the_group_waiting_for_it(
    store: Store,
) -> None:
    """Group commit: what arrives while another write holds the turn (the worker's outcomes, another
    process's group) is committed with the group that waits for it, in one transaction and one fsync,
    instead of waiting for one more commit after it."""
    writer = store._ingest
    assert writer is not None
    with turn_held(store):
        first = store.add_conversion(sale("first"))
        # Only the writer empties its queue: it has taken the first and waits for the turn with it.
        await until(writer._queue.empty, 10, "the writer took the first conversion")
        later = [store.add_conversion(sale(f"later-{n}")) for n in range(9)]
        assert not first.done()
    answers = await asyncio.wait_for(asyncio.gather(first, *later), 10)

    assert [answer.result for answer in answers] == ["accepted"] * 10
    rows = await store.fetchall("SELECT DISTINCT received_at FROM conversions WHERE received_at > ?", (OLD,))
    assert len(rows) == 1, "committed in more than one group"
