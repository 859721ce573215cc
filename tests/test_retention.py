"""Retention: old clicks and finished conversions go, in slices; pending conversions always stay."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

from bridge.mapping import Click
from bridge.store import PRUNE_SLICE, Store
from tests.conftest import SECOND_CODE, Bridge, BridgeFactory, base_settings, write_config
from tests.daemon_proc import DaemonProcess, free_port


async def test_prune_removes_more_than_one_slice_and_keeps_pending(bridge: Bridge) -> None:
    old = time.time() - 40 * 86400
    many = PRUNE_SLICE * 2 + 17
    db = sqlite3.connect(bridge.config.db_path)
    with db:
        db.executemany(
            "INSERT INTO clicks (click_id, created_at, updated_at) VALUES (?, ?, ?)",
            [(f"old{i}", old, old) for i in range(many)],
        )
        db.executemany(
            "INSERT INTO conversions (tracker, click_id, status, event, event_time, state, received_at, "
            "finished_at) VALUES ('keitaro', ?, 'sale', 'Purchase', ?, ?, ?, ?)",
            [(f"old{i}", int(old), "delivered", old, old) for i in range(many)]
            + [("stuck", int(old), "pending", old, None)],
        )
    db.close()
    await bridge.click(click_id="fresh", ttclid="E.C.P.f")

    clicks, conversions = await bridge.store.prune(time.time(), 30 * 86400, 30 * 86400)

    assert (clicks, conversions) == (many, many)
    assert await bridge.states() == {"pending": 1}
    rows = await bridge.store.fetchall("SELECT click_id FROM clicks")
    assert [r["click_id"] for r in rows] == ["fresh"]


async def test_prune_keeps_the_click_of_a_conversion_still_waiting_to_be_sent(bridge: Bridge) -> None:
    await bridge.click(click_id="w1", ttclid="E.C.P.w1", pixel="second")
    await bridge.postback("keitaro", subid="w1", status="lead")
    bridge.fake.fail_next(1, "50002")
    await bridge.deliver()
    assert await bridge.states() == {"pending": 1}
    age_every_click(bridge, 40 * 86400)

    assert await bridge.store.prune(time.time(), 30 * 86400, 30 * 86400) == (0, 0)

    # The click still fills in the event: its ttclid, and the pixel it named.
    bridge.clock.advance(3600)
    await bridge.deliver()
    assert await bridge.states() == {"delivered": 1}
    sent = [(r.pixel, [e["user"]["ttclid"] for e in r.body["data"]]) for r in bridge.fake.requests]
    assert sent[-1] == (SECOND_CODE, ["E.C.P.w1"])
    # Sent: now the click goes like any other past retention.
    assert await bridge.store.prune(time.time(), 30 * 86400, 30 * 86400) == (1, 0)


async def test_a_conversion_id_is_never_given_again_after_pruning(bridge: Bridge) -> None:
    ids = []
    for click_id in ("a", "b"):
        _, body = await bridge.postback(
            "keitaro", subid=click_id, external_id=f"E.C.P.{click_id}", status="lead"
        )
        ids.append(body["conversion_id"])
    await bridge.deliver()

    # Everything is past retention; the newest row stays, so the next id is still new.
    assert await bridge.store.prune(time.time() + 100 * 86400, 30 * 86400, 30 * 86400) == (0, 1)
    _, body = await bridge.postback("keitaro", subid="c", external_id="E.C.P.c", status="lead")
    assert body["conversion_id"] not in ids and body["conversion_id"] > max(ids)


async def test_an_ignored_conversion_is_pruned_once_past_retention(bridge: Bridge) -> None:
    _, ignored = await bridge.postback("keitaro", subid="i1", status="rejected")
    assert ignored == {"result": "ignored", "reason": "status_not_sent"}
    # A newer conversion, since the newest row is always kept.
    await bridge.postback("keitaro", subid="i2", external_id="E.C.P.i2", status="lead")

    assert await bridge.store.prune(time.time() + 31 * 86400, 30 * 86400, 30 * 86400) == (0, 1)
    assert await bridge.states() == {"pending": 1}


async def test_prune_keeps_the_click_of_a_dead_letter_that_failed_retry_may_send_again(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await make_bridge(edit=lambda s: s.update(delivery={"max_attempts": 1}))
    await bridge.click(click_id="f1", ttclid="E.C.P.f1", pixel="second")
    await bridge.postback("keitaro", subid="f1", status="lead")
    bridge.fake.fail_next(1, "50002")
    await bridge.deliver()
    assert await bridge.states() == {"failed": 1}
    age_every_click(bridge, 40 * 86400)

    assert await bridge.store.prune(time.time(), 30 * 86400, 30 * 86400) == (0, 0)
    rows = await bridge.store.fetchall("SELECT click_id, pixel FROM clicks")
    assert [tuple(r) for r in rows] == [("f1", "second")]


async def test_prune_waits_out_the_checkpoint_of_a_wal_that_a_reader_held_back(tmp_path: Path) -> None:
    """A reader's open transaction (a slow `stats`, a monitoring script) keeps the WAL from being copied
    back; once it ends, the next commit copies it all in its automatic checkpoint, holding the write
    turn longer than the busy timeout. Prune waits for it rather than failing until the next hour."""
    store = await Store(tmp_path / "bridge.db", busy_timeout=0.01).open()
    try:
        old = time.time() - 40 * 86400
        with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT COUNT(*) FROM clicks").fetchone()
            # About 90 MB of WAL that the open read keeps from being copied back.
            with contextlib.closing(sqlite3.connect(store.path)) as other, other:
                other.executemany(
                    "INSERT INTO clicks (click_id, url, created_at, updated_at) VALUES (?, ?, ?, ?)",
                    [(f"old{i}", "u" * 1000, old, old) for i in range(20000)],
                )
            reader.execute("COMMIT")

        ingest = store.add_click(Click(click_id="fresh"))
        deadline = time.monotonic() + 10
        while not store._write_lock._thread_lock.locked():  # its commit is checkpointing
            assert time.monotonic() < deadline, "the ingest group never took the write turn"
            await asyncio.sleep(0.001)
        pruned = await store.prune(time.time(), 30 * 86400, 30 * 86400)
        await ingest
    finally:
        await store.close()

    assert pruned == (20000, 0)


def age_every_click(bridge: Bridge, seconds: float) -> None:
    """Every stored click registered `seconds` ago."""
    db = sqlite3.connect(bridge.config.db_path)
    with db:
        db.execute("UPDATE clicks SET created_at = ?", (time.time() - seconds,))
    db.close()


async def test_the_daemon_prunes_at_start_each_kind_at_its_own_retention(tmp_path: Path) -> None:
    settings = base_settings()
    settings["server"]["port"] = free_port()
    settings["tiktok"]["dry_run"] = True
    settings["retention"] = {"clicks": 10 * 86400, "finished_conversions": 40 * 86400}
    config = write_config(tmp_path, settings)
    store = await Store(tmp_path / "bridge.db").open()
    await store.close()
    now = time.time()
    with contextlib.closing(sqlite3.connect(tmp_path / "bridge.db", isolation_level=None)) as db:
        for click_id, days in (("c20", 20), ("c1", 1)):
            at = now - days * 86400
            db.execute(
                "INSERT INTO clicks (click_id, created_at, updated_at) VALUES (?, ?, ?)", (click_id, at, at)
            )
        # 1 finished 50 days ago, 2 finished 20 days ago, 3 still waits to be sent.
        for id_, days, state in ((1, 50, "delivered"), (2, 20, "delivered"), (3, 0, "pending")):
            at = now - days * 86400
            finished = None if state == "pending" else at
            db.execute(
                "INSERT INTO conversions (id, tracker, click_id, status, event, event_id, event_time,"
                " state, next_attempt_at, received_at, finished_at)"
                " VALUES (?, 'keitaro', ?, 'sale', 'Purchase', ?, ?, ?, ?, ?, ?)",
                (id_, f"x{id_}", f"x{id_}_Purchase", int(at), state, now + 3600, at, finished),
            )
    daemon = DaemonProcess(config, settings["server"]["port"])
    daemon.start()
    try:
        pruned = await daemon.wait_log(lambda line: line.get("event") == "pruned")
    finally:
        daemon.stop()

    assert (pruned["clicks"], pruned["conversions"]) == (1, 1)
    with contextlib.closing(sqlite3.connect(tmp_path / "bridge.db")) as db:
        assert [r[0] for r in db.execute("SELECT click_id FROM clicks")] == ["c1"]
        assert [r[0] for r in db.execute("SELECT id FROM conversions ORDER BY id")] == [2, 3]
