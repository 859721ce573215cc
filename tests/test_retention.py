"""Retention: old clicks and finished conversions go, in slices; pending conversions always stay."""

from __future__ import annotations

import sqlite3
import time

from bridge.store import PRUNE_SLICE
from tests.conftest import Bridge


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
