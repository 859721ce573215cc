"""`postback-bridge prune` and `postback-bridge test-event`, run as an admin runs them, on real files."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import MAIN_CODE, REPO, SECOND_CODE, Bridge, BridgeFactory, base_settings, write_config
from tests.fake_tiktok import FakeTikTok

DAY = 86400.0


async def cli(*args: str) -> tuple[int, str, str]:
    """Run the command in a child process; the fake TikTok keeps serving on this loop meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:  # timed out: the command must not outlive the test
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def execute(db_path: Path, sql: str, *params: Any) -> None:
    db = sqlite3.connect(db_path)
    with db:
        db.execute(sql, params)
    db.close()


def click_ids(db_path: Path, table: str) -> list[str]:
    db = sqlite3.connect(db_path)
    try:
        return sorted(row[0] for row in db.execute(f"SELECT click_id FROM {table}"))  # noqa: S608
    finally:
        db.close()


# -- prune -------------------------------------------------------------------------------------------------


async def old_and_new_leads(make_bridge: BridgeFactory, **retention: int) -> Bridge:
    """A bridge with this retention and two clicks, `old` and `new`, each with a lead."""
    bridge = await make_bridge(edit=lambda s: s.update(retention=retention))
    for click_id in ("old", "new"):
        await bridge.click(click_id=click_id, ttclid=f"E.C.P.{click_id}")
        await bridge.postback("keitaro", subid=click_id, status="lead")
    return bridge


async def test_prune_deletes_old_clicks_and_finished_conversions_and_keeps_pending(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await old_and_new_leads(make_bridge, clicks=10 * DAY, finished_conversions=20 * DAY)
    await bridge.postback("keitaro", subid="rej", status="rejected")
    await bridge.deliver()
    await bridge.postback("keitaro", subid="waiting", external_id="E.C.P.w", status="lead")
    db = bridge.config.db_path
    long_ago = time.time() - 30 * DAY
    execute(db, "UPDATE clicks SET created_at = ? WHERE click_id = 'old'", long_ago)
    execute(db, "UPDATE conversions SET finished_at = ? WHERE click_id IN ('old', 'rej')", long_ago)
    execute(db, "UPDATE conversions SET received_at = ? WHERE click_id = 'waiting'", long_ago)

    code, out, err = await cli("prune", "-c", str(bridge.config.path))

    assert (code, err) == (0, "")
    assert out.strip() == "pruned 1 click(s) and 2 finished conversion(s)"
    assert click_ids(db, "clicks") == ["new"]
    assert click_ids(db, "conversions") == ["new", "waiting"]


async def test_prune_keeps_clicks_for_retention_clicks_and_conversions_for_retention_finished_conversions(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await old_and_new_leads(make_bridge, clicks=10 * DAY, finished_conversions=40 * DAY)
    await bridge.deliver()
    db = bridge.config.db_path
    twenty_days_ago = time.time() - 20 * DAY
    execute(db, "UPDATE clicks SET created_at = ? WHERE click_id = 'old'", twenty_days_ago)
    execute(db, "UPDATE conversions SET finished_at = ? WHERE click_id = 'old'", twenty_days_ago)

    code, out, _ = await cli("prune", "-c", str(bridge.config.path))

    assert code == 0
    assert out.strip() == "pruned 1 click(s) and 0 finished conversion(s)"
    assert click_ids(db, "clicks") == ["new"]
    assert click_ids(db, "conversions") == ["new", "old"]


async def test_prune_keeps_what_is_within_retention(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge()
    await bridge.click(click_id="c1", ttclid="E.C.P.1")
    await bridge.postback("keitaro", subid="c1", status="lead")
    await bridge.deliver()

    code, out, _ = await cli("prune", "-c", str(bridge.config.path))

    assert code == 0
    assert out.strip() == "pruned 0 click(s) and 0 finished conversion(s)"
    assert click_ids(bridge.config.db_path, "conversions") == ["c1"]


async def test_prune_without_a_database_says_so_in_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, base_settings())

    code, out, err = await cli("prune", "-c", str(config))

    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert "no database" in err and "Traceback" not in err


# -- test-event ------------------------------------------------------------------------------------------


def with_test_code(settings: dict[str, Any]) -> None:
    settings["pixels"]["main"]["test_event_code"] = "TEST12345"


async def test_event_goes_to_the_pixel_with_test_event_code_at_the_top_level(
    tmp_path: Path, fake: FakeTikTok
) -> None:
    settings = base_settings(fake.url)
    with_test_code(settings)
    config = write_config(tmp_path, settings)

    code, _, err = await cli("test-event", "-c", str(config), "--pixel", "main")

    assert (code, err) == (0, "")
    [request] = fake.requests
    assert request.pixel == MAIN_CODE
    assert request.body is not None
    assert request.body["test_event_code"] == "TEST12345"
    assert all("test_event_code" not in event for event in request.body["data"])
    [event] = fake.received
    assert event["_test_event_code"] == "TEST12345"


async def test_event_prints_tiktoks_answer(tmp_path: Path, fake: FakeTikTok) -> None:
    settings = base_settings(fake.url)
    with_test_code(settings)
    config = write_config(tmp_path, settings)

    _, out, _ = await cli("test-event", "-c", str(config), "--pixel", "main")

    answer = json.loads(out)
    assert answer["pixel"] == "main"
    assert (answer["result"], answer["code"], answer["message"]) == ("delivered", 0, "OK")
    assert answer["request_id"] == fake.received[0]["_request_id"]


async def test_event_finds_the_pixel_by_its_code(tmp_path: Path, fake: FakeTikTok) -> None:
    settings = base_settings(fake.url)
    settings["pixels"]["second"]["test_event_code"] = "TEST2"
    config = write_config(tmp_path, settings)

    code, out, _ = await cli("test-event", "-c", str(config), "--pixel", SECOND_CODE)

    assert code == 0
    assert json.loads(out)["pixel"] == "second"
    assert [r.pixel for r in fake.requests] == [SECOND_CODE]


async def test_event_refused_by_tiktok_prints_the_answer_and_exits_1(
    tmp_path: Path, fake: FakeTikTok
) -> None:
    settings = base_settings(fake.url)
    with_test_code(settings)
    settings["pixels"]["main"]["access_token"] = "a-token-tiktok-does-not-know"
    config = write_config(tmp_path, settings)

    code, out, _ = await cli("test-event", "-c", str(config), "--pixel", "main")

    assert code == 1
    answer = json.loads(out)
    assert (answer["result"], answer["code"]) == ("auth", 40001)
    assert "No permission" in answer["message"]
    assert "a-token-tiktok-does-not-know" not in out
    assert fake.received == []


async def test_event_without_a_test_event_code_sends_nothing(tmp_path: Path, fake: FakeTikTok) -> None:
    config = write_config(tmp_path, base_settings(fake.url))

    code, out, err = await cli("test-event", "-c", str(config), "--pixel", "main")

    assert (code, out) == (1, "")
    assert "test_event_code is empty" in err and err.count("\n") == 1
    assert fake.requests == []


async def test_event_for_an_unknown_pixel_names_the_known_ones(tmp_path: Path, fake: FakeTikTok) -> None:
    config = write_config(tmp_path, base_settings(fake.url))

    code, _, err = await cli("test-event", "-c", str(config), "--pixel", "nosuch")

    assert code == 1
    assert "unknown pixel 'nosuch'" in err and "main, second" in err
    assert fake.requests == []
