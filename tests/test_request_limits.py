"""Oversized requests: a URL or header past the bridge's limits is a 413 in JSON, as an oversized body is."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Bridge, BridgeFactory, base_settings, scrape, value
from tests.daemon_proc import running_daemon
from tests.fake_tiktok import FakeTikTok

KEY = "pk-limits-5b1e07c3d9"
SALE = {"subid": "clk-limits-1", "status": "sale", "revenue": "45", "currency": "USD"}


@pytest.fixture
async def keyed(make_bridge: BridgeFactory) -> Bridge:
    """The shipped trackers, with the Keitaro postback key set."""
    return await make_bridge(environ={"KEITARO_POSTBACK_KEY": KEY})


async def nothing_stored(bridge: Bridge) -> bool:
    [row] = await bridge.store.fetchall(
        "SELECT (SELECT COUNT(*) FROM conversions) AS conversions, (SELECT COUNT(*) FROM clicks) AS clicks"
    )
    return row["conversions"] == 0 and row["clicks"] == 0


def padded(target: str, length: int) -> str:
    """`target` with a `pad` parameter that makes the whole request target `length` bytes long."""
    return f"{target}&pad=" + "x" * (length - len(target) - len("&pad="))


async def test_postback_whose_url_is_past_8_kib_is_413_naming_the_url(keyed: Bridge) -> None:
    resp = await keyed.client.get("/postback/keitaro", params={"key": KEY, **SALE, "subid": "x" * 9000})

    assert resp.status == 413
    assert resp.content_type == "application/json"
    assert await resp.json() == {"error": "request URL longer than 8192 bytes"}
    assert await nothing_stored(keyed)


async def test_postback_with_a_header_past_8_kib_is_413_naming_the_header(keyed: Bridge) -> None:
    resp = await keyed.client.get(
        "/postback/keitaro", params={"key": KEY, **SALE}, headers={"X-Padding": "x" * 9000}
    )

    assert resp.status == 413
    assert await resp.json() == {"error": "request header X-Padding longer than 8192 bytes"}
    assert await nothing_stored(keyed)


async def test_click_whose_url_is_past_8_kib_is_413_that_the_page_can_read(bridge: Bridge) -> None:
    resp = await bridge.client.get("/click", params={"click_id": "clk-1", "url": "x" * 9000})

    assert resp.status == 413
    assert await resp.json() == {"error": "request URL longer than 8192 bytes"}
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert await nothing_stored(bridge)


async def test_click_with_a_header_past_8_kib_is_413_that_the_page_can_read(bridge: Bridge) -> None:
    resp = await bridge.client.get("/click", params={"click_id": "clk-1"}, headers={"Cookie": "x" * 9000})

    assert resp.status == 413
    assert await resp.json() == {"error": "request header Cookie longer than 8192 bytes"}
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert await nothing_stored(bridge)


async def test_postback_whose_url_is_exactly_at_the_limit_is_accepted(keyed: Bridge) -> None:
    target = padded(f"/postback/keitaro?key={KEY}&subid=clk-limits-1&status=sale", 8192)
    async with keyed.client.session.get(f"http://127.0.0.1:{keyed.client.port}{target}") as resp:
        assert resp.status == 200
        assert (await resp.json())["result"] == "accepted"


async def test_ordinary_postback_is_still_accepted_and_delivered(keyed: Bridge) -> None:
    status, body = await keyed.postback("keitaro", key=KEY, external_id="E.C.P.limits", **SALE)

    assert (status, body["result"]) == (200, "accepted")
    await keyed.deliver()
    assert keyed.fake.event_ids() == ["clk-limits-1_Purchase"]


async def test_an_oversized_url_is_refused_without_logging_it_or_the_key(
    keyed: Bridge, log_text: io.StringIO
) -> None:
    resp = await keyed.client.get("/postback/keitaro", params={"key": KEY, **SALE, "pad": "y" * 9000})

    assert resp.status == 413
    assert KEY not in log_text.getvalue()
    assert "yyyy" not in log_text.getvalue()


async def test_a_url_past_the_parsers_own_limit_is_aiohttps_400_logged_without_the_url_or_key(
    keyed: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    target = padded(f"/postback/keitaro?key={KEY}&subid=clk-limits-1", 32 * 1024 + 1)
    answer = await keyed.send_raw(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())

    assert answer.split(b" ", 2)[1] == b"400"
    logged = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert logged
    assert all(r.levelno <= logging.WARNING and not r.exc_info for r in logged)
    assert not [r for r in logged if KEY in r.getMessage() or "xxxx" in r.getMessage()]
    assert await nothing_stored(keyed)


async def test_the_daemon_answers_an_oversized_url_with_413_too(tmp_path: Path, fake: FakeTikTok) -> None:
    # The runner the daemon builds, not the test server's: its parser must let the URL through to the app.
    async with (
        running_daemon(tmp_path, base_settings(fake.url)) as daemon,
        aiohttp.ClientSession() as session,
        session.get(f"{daemon.url}/postback/keitaro", params={**SALE, "subid": "x" * 9000}) as resp,
    ):
        assert (resp.status, await resp.json()) == (413, {"error": "request URL longer than 8192 bytes"})


async def test_a_postback_refused_as_too_large_is_counted_and_logged_as_rejected(
    keyed: Bridge, log_text: io.StringIO
) -> None:
    # A tracker whose URLs outgrow the limit must show somewhere an operator looks.
    before = await scrape(keyed)

    assert (
        await keyed.client.get("/postback/keitaro", params={"key": KEY, **SALE, "pad": "y" * 9000})
    ).status == 413
    big_body = {"key": KEY, **SALE, "pad": "z" * (70 * 1024)}
    assert (await keyed.client.post("/postback/keitaro", data=big_body)).status == 413
    assert (await keyed.client.get("/postback/nosuch", params={"pad": "y" * 9000})).status == 413

    after = await scrape(keyed)
    name = "bridge_postbacks_total"

    def moved(tracker: str) -> float:
        return value(after, name, tracker=tracker, result="rejected") - value(
            before, name, tracker=tracker, result="rejected"
        )

    assert (moved("keitaro"), moved("(unknown)")) == (2, 1)
    lines = [json.loads(line) for line in log_text.getvalue().splitlines()]
    assert [(line["tracker"], line["why"]) for line in lines if line["event"] == "postback rejected"] == [
        ("keitaro", "request URL longer than 8192 bytes"),
        ("keitaro", "request body larger than 65536 bytes"),
        ("nosuch", "request URL longer than 8192 bytes"),
    ]
