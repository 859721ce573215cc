"""End to end: tracker postbacks -> SQLite -> the (fake) TikTok Events API."""

from __future__ import annotations

import time
from typing import Any

import pytest

from bridge.matching import sha256_hex
from tests.conftest import MAIN_CODE, SECOND_CODE, Bridge, BridgeFactory

KEITARO_SALE = {
    "subid": "1dad2cg1br22spja1",
    "external_id": "E.C.P.CqgBqkM2fX",
    "status": "sale",
    "revenue": "45",
    "currency": "usd",
    "tid": "78124",
    "ip": "177.12.34.56",
    "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)",
}

# A tracker that sends the conversion's own time, and builds its event_id from the status.
ACME = {
    "name": "acme",
    "params": {"click_id": "cid", "status": "st", "ttclid": "ttclid", "event_time": "ts"},
    "events": {"sale": "Purchase"},
    "event_id": "{click_id}_{status}",
}


async def test_keitaro_sale_is_accepted_and_delivered_with_its_event_id(bridge: Bridge) -> None:
    status, body = await bridge.postback("keitaro", **KEITARO_SALE)

    assert status == 200
    assert body == {
        "result": "accepted",
        "conversion_id": body["conversion_id"],
        "event": "Purchase",
        "event_id": "1dad2cg1br22spja1_Purchase",
    }
    await bridge.deliver()
    [event] = bridge.fake.received
    assert event["event"] == "Purchase"
    assert event["event_id"] == "1dad2cg1br22spja1_Purchase"
    assert event["_pixel"] == MAIN_CODE
    assert event["user"] == {
        "ttclid": "E.C.P.CqgBqkM2fX",
        "ip": "177.12.34.56",
        "user_agent": KEITARO_SALE["user_agent"],
    }
    assert event["properties"] == {"value": 45, "currency": "USD"}
    row = await bridge.row(body["conversion_id"])
    assert row["state"] == "delivered"
    assert row["request_id"] == event["_request_id"]


async def test_accepted_is_answered_only_once_committed(bridge: Bridge) -> None:
    import asyncio
    import sqlite3

    # Another connection holds the write lock: the bridge cannot commit, so it must not answer yet.
    other = sqlite3.connect(bridge.config.db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    answer = asyncio.ensure_future(bridge.postback("keitaro", **KEITARO_SALE))
    done, _ = await asyncio.wait({answer}, timeout=0.5)
    assert not done, "answered while the commit could not have happened"
    other.execute("ROLLBACK")

    status, body = await answer
    assert (status, body["result"]) == (200, "accepted")
    state = other.execute("SELECT state FROM conversions WHERE id = ?", (body["conversion_id"],)).fetchone()
    other.close()
    assert state == ("pending",)


async def test_event_time_is_in_seconds(bridge: Bridge) -> None:
    await bridge.postback("keitaro", **KEITARO_SALE)
    await bridge.deliver()
    [event] = bridge.fake.received
    assert 1_000_000_000 < event["event_time"] < 10_000_000_000


async def test_event_time_in_milliseconds_is_stored_and_sent_in_seconds(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(trackers={"acme": ACME})
    seconds = int(time.time()) - 3600

    _, body = await bridge.postback(
        "acme", cid="ms1", ttclid="E.C.P.ms1", st="sale", ts=str(seconds * 1000 + 250)
    )
    await bridge.deliver()

    assert (await bridge.row(body["conversion_id"]))["event_time"] == seconds
    [event] = bridge.fake.received
    assert event["event_time"] == seconds


async def test_repeated_postback_is_a_duplicate_and_sent_once(bridge: Bridge) -> None:
    _, first = await bridge.postback("keitaro", **KEITARO_SALE)
    status, second = await bridge.postback("keitaro", **KEITARO_SALE)
    await bridge.deliver()
    _, third = await bridge.postback("keitaro", **KEITARO_SALE)
    await bridge.deliver()

    assert status == 200
    assert second == {"result": "duplicate", "conversion_id": first["conversion_id"]}
    assert third == {"result": "duplicate", "conversion_id": first["conversion_id"]}
    assert bridge.fake.event_ids() == ["1dad2cg1br22spja1_Purchase"]


async def test_lead_then_sale_then_rejected_for_one_click(bridge: Bridge) -> None:
    click = {"subid": "click42", "external_id": "E.C.P.lead", "tid": "t1"}
    _, lead = await bridge.postback("keitaro", status="lead", **click)
    _, sale = await bridge.postback("keitaro", status="sale", revenue="30", **click)
    _, rejected = await bridge.postback("keitaro", status="rejected", **click)
    await bridge.deliver()

    assert lead["result"] == "accepted" and lead["event"] == "Lead"
    assert sale["result"] == "accepted" and sale["event"] == "Purchase"
    assert rejected == {"result": "ignored", "reason": "status_not_sent"}
    assert sorted(bridge.fake.event_ids()) == ["click42_Lead", "click42_Purchase"]
    assert await bridge.states() == {"delivered": 2, "ignored": 1}


async def test_rebill_with_new_transaction_id_gets_its_own_event_id(bridge: Bridge) -> None:
    base = {"subid": "sub9", "external_id": "E.C.P.r", "revenue": "10"}
    _, sale = await bridge.postback("keitaro", status="sale", tid="T1", **base)
    _, rebill = await bridge.postback("keitaro", status="rebill", tid="T2", **base)
    _, again = await bridge.postback("keitaro", status="rebill", tid="T2", **base)
    await bridge.deliver()

    assert sale["event_id"] == "sub9_Purchase"
    assert rebill["result"] == "accepted"
    assert rebill["event_id"] == "sub9_Purchase_T2"
    assert again == {"result": "duplicate", "conversion_id": rebill["conversion_id"]}
    assert sorted(bridge.fake.event_ids()) == ["sub9_Purchase", "sub9_Purchase_T2"]


@pytest.mark.parametrize("status", ["sale", "Sale", " SALE "])
async def test_an_event_id_template_with_the_status_uses_it_lowercased_and_trimmed(
    make_bridge: BridgeFactory, status: str
) -> None:
    # The landing page writes the status as the tracker's events table does; the network may not.
    bridge = await make_bridge(trackers={"acme": ACME})

    _, body = await bridge.postback("acme", cid="st1", ttclid="E.C.P.st1", st=status)
    await bridge.deliver()

    assert body["event_id"] == "st1_sale"
    assert bridge.fake.event_ids() == ["st1_sale"]


async def test_unmapped_status_is_recorded_as_ignored(bridge: Bridge) -> None:
    status, body = await bridge.postback("keitaro", subid="c1", status="trash")
    await bridge.deliver()

    assert (status, body) == (200, {"result": "ignored", "reason": "unmapped_status"})
    rows = await bridge.store.fetchall("SELECT state, reason, status FROM conversions")
    assert [tuple(r) for r in rows] == [("ignored", "unmapped_status", "trash")]
    assert bridge.fake.requests == []


async def test_upper_case_status_matches_case_insensitively(bridge: Bridge) -> None:
    _, body = await bridge.postback("keitaro", subid="c2", external_id="E.C.P.u", status="SALE")
    assert body["result"] == "accepted"
    assert body["event"] == "Purchase"


async def test_post_form_body(bridge: Bridge) -> None:
    status, body = await bridge.postback("keitaro", method="POST", **KEITARO_SALE)
    assert status == 200 and body["result"] == "accepted"
    await bridge.deliver()
    assert bridge.fake.event_ids() == ["1dad2cg1br22spja1_Purchase"]


async def test_post_json_body(bridge: Bridge) -> None:
    payload: dict[str, Any] = {**KEITARO_SALE, "revenue": 45.5}
    resp = await bridge.client.post("/postback/keitaro", json=payload)
    body = await resp.json()
    assert resp.status == 200 and body["result"] == "accepted"
    await bridge.deliver()
    assert bridge.fake.received[0]["properties"] == {"value": 45.5, "currency": "USD"}


async def test_value_formats_and_lowercase_currency(bridge: Bridge) -> None:
    for i, revenue in enumerate(["45", "45.00", "45,50"]):
        await bridge.postback(
            "keitaro", subid=f"v{i}", external_id="E.C.P.v", status="sale", revenue=revenue, currency="eur"
        )
    await bridge.deliver()
    values = sorted((e["properties"]["value"], e["properties"]["currency"]) for e in bridge.fake.received)
    assert values == [(45, "EUR"), (45, "EUR"), (45.5, "EUR")]


async def test_a_zero_payout_is_accepted_and_sent_with_value_0(bridge: Bridge) -> None:
    status, body = await bridge.postback("keitaro", **{**KEITARO_SALE, "status": "lead", "revenue": "0"})
    await bridge.deliver()

    assert (status, body["result"]) == (200, "accepted")
    [event] = bridge.fake.received
    assert event["properties"] == {"value": 0, "currency": "USD"}


async def test_an_event_without_a_value_still_carries_its_currency(bridge: Bridge) -> None:
    await bridge.postback("keitaro", subid="cur1", external_id="E.C.P.cur1", status="lead", currency="eur")
    await bridge.deliver()

    [event] = bridge.fake.received
    assert event["properties"] == {"currency": "EUR"}


@pytest.mark.parametrize("ip", ["unknown", "1.2.3.4, 5.6.7.8", "1.2.3.256", "177.12.34.56x"])
async def test_a_postback_ip_that_is_not_one_address_is_neither_stored_nor_sent(
    bridge: Bridge, ip: str
) -> None:
    _, body = await bridge.postback("keitaro", **{**KEITARO_SALE, "ip": ip})
    await bridge.deliver()

    assert body["result"] == "accepted"
    assert (await bridge.row(body["conversion_id"]))["ip"] is None
    [event] = bridge.fake.received
    assert event["user"] == {"ttclid": KEITARO_SALE["external_id"], "user_agent": KEITARO_SALE["user_agent"]}


async def test_binom_postback_format(bridge: Bridge) -> None:
    _, body = await bridge.postback(
        "binom",
        clickid="81e60haa86o0b7",
        externalid="E.C.P.CqgBqkM2fX",
        status="approved",
        payout="12.5",
        currency="USD",
        ip="177.12.34.56",
    )
    await bridge.deliver()
    assert body["result"] == "accepted" and body["event"] == "Purchase"
    [event] = bridge.fake.received
    assert event["event_id"] == "81e60haa86o0b7_Purchase"
    assert event["user"]["ttclid"] == "E.C.P.CqgBqkM2fX"
    assert event["properties"] == {"value": 12.5, "currency": "USD"}


async def test_binom_mixed_case_approved(bridge: Bridge) -> None:
    _, body = await bridge.postback(
        "binom", clickid="b2", externalid="E.C.P.b", status="Approved", payout="1"
    )
    assert body["result"] == "accepted"


async def test_bemob_postback_uses_ttclid_as_click_id(bridge: Bridge) -> None:
    _, body = await bridge.postback("bemob", externalid="E.C.P.CqgBqkM2fX", payout="30", status="confirm")
    await bridge.deliver()
    assert body["event_id"] == "E.C.P.CqgBqkM2fX_Purchase"
    [event] = bridge.fake.received
    assert event["user"] == {"ttclid": "E.C.P.CqgBqkM2fX"}
    assert event["properties"] == {"value": 30, "currency": "USD"}


async def test_bemob_with_a_ttclid_of_real_length_as_click_id_is_registered_and_delivered(
    bridge: Bridge,
) -> None:
    # Real ttclids run to 300 characters and more; BeMob's click id is the ttclid itself.
    ttclid = "E.C.P." + "CsQBQ3fsZ9" * 33
    assert await bridge.click(click_id=ttclid, ttclid=ttclid, ttp="ttp-cookie-9") == 204
    _, body = await bridge.postback("bemob", externalid=ttclid, payout="30", status="confirm")
    assert body["result"] == "accepted"
    await bridge.deliver()
    [event] = bridge.fake.received
    assert event["event_id"] == f"{ttclid}_Purchase"
    assert (event["user"]["ttclid"], event["user"]["ttp"]) == (ttclid, "ttp-cookie-9")


@pytest.mark.parametrize("status", ["decline", "charge"])
async def test_bemob_decline_and_chargeback_are_not_sent(bridge: Bridge, status: str) -> None:
    # `charge` is BeMob's chargeback: sending it as a Purchase would count a sale that was taken back.
    _, body = await bridge.postback("bemob", externalid="E.C.P.x", payout="0", status=status)
    assert body == {"result": "ignored", "reason": "status_not_sent"}


async def test_click_enriches_the_conversion(bridge: Bridge) -> None:
    ua = "Mozilla/5.0 (Linux; Android 14)"
    assert (
        await bridge.click(
            click_id="k1",
            ttclid="E.C.P.fromclick",
            ttp="ttp-cookie-1",
            url="https://lp.example/offer",
            headers={"User-Agent": ua},
        )
        == 204
    )
    await bridge.postback("keitaro", subid="k1", status="lead")
    await bridge.deliver()

    [event] = bridge.fake.received
    assert event["user"] == {
        "ttclid": "E.C.P.fromclick",
        "ttp": "ttp-cookie-1",
        "ip": "127.0.0.1",
        "user_agent": ua,
    }
    assert event["page"] == {"url": "https://lp.example/offer"}


async def test_the_event_is_the_postback_merged_with_its_click_and_nothing_empty(bridge: Bridge) -> None:
    await bridge.click(
        click_id="full",
        ttclid="E.C.P.click",
        ttp="ttp-full",
        url="https://lp.example/offer?sub=7",
        email=" Alice@Example.com ",
        phone="+1 213 373 4253",
        headers={"User-Agent": "UA/1"},
    )
    # Empty parameters in the postback are missing values: the click's stand in for them.
    _, body = await bridge.postback(
        "keitaro", subid="full", status="sale", revenue="12,50", currency="eur", external_id="", ip=""
    )
    await bridge.deliver()

    [received] = bridge.fake.received
    event = {name: value for name, value in received.items() if not name.startswith("_")}  # the fake's notes
    assert isinstance(event.pop("event_time"), int)
    assert event == {
        "event": "Purchase",
        "event_id": "full_Purchase",
        "user": {
            "ttclid": "E.C.P.click",
            "ttp": "ttp-full",
            "ip": "127.0.0.1",
            "user_agent": "UA/1",
            "email": [sha256_hex("alice@example.com")],
            "phone": [sha256_hex("+12133734253")],
        },
        "properties": {"value": 12.5, "currency": "EUR"},
        "page": {"url": "https://lp.example/offer?sub=7"},
    }
    assert (await bridge.row(body["conversion_id"]))["match_keys"] == "ttclid,ttp,ip_ua,email,phone"


async def test_an_event_without_a_click_carries_only_what_the_postback_had(bridge: Bridge) -> None:
    _, body = await bridge.postback("keitaro", subid="bare", status="lead", ip="198.51.100.4")
    await bridge.deliver()

    # No click, no user agent: an ip alone is no match key, so nothing is sent and the row says so.
    assert bridge.fake.received == []
    row = await bridge.row(body["conversion_id"])
    assert (row["state"], row["match_keys"]) == ("unmatched", "")


async def test_postback_values_win_over_the_click(bridge: Bridge) -> None:
    await bridge.click(click_id="k2", ttclid="E.C.P.click", ttp="ttp-2")
    await bridge.postback("keitaro", subid="k2", status="lead", external_id="E.C.P.postback")
    await bridge.deliver()
    [event] = bridge.fake.received
    assert event["user"]["ttclid"] == "E.C.P.postback"
    assert event["user"]["ttp"] == "ttp-2"


async def test_click_registered_after_the_postback_still_enriches_before_first_send(bridge: Bridge) -> None:
    await bridge.postback("keitaro", subid="late", status="lead")
    await bridge.click(click_id="late", ttclid="E.C.P.late")
    await bridge.deliver()
    [event] = bridge.fake.received
    assert event["user"]["ttclid"] == "E.C.P.late"


async def test_events_are_batched_per_pixel(bridge: Bridge) -> None:
    for i in range(5):
        await bridge.click(click_id=f"m{i}", ttclid=f"E.C.P.m{i}")
        await bridge.postback("keitaro", subid=f"m{i}", status="lead")
    for i in range(3):
        await bridge.click(click_id=f"s{i}", ttclid=f"E.C.P.s{i}", pixel=SECOND_CODE)
        await bridge.postback("keitaro", subid=f"s{i}", status="lead")
    await bridge.deliver()

    by_pixel = sorted((r.pixel, len(r.event_ids)) for r in bridge.fake.requests)
    assert by_pixel == [(MAIN_CODE, 5), (SECOND_CODE, 3)]
    assert len(bridge.fake.received) == 8


async def test_batches_never_exceed_batch_size(make_bridge: Any) -> None:
    bridge = await make_bridge(edit=lambda s: s["tiktok"].update(batch_size=3))
    for i in range(7):
        await bridge.postback("keitaro", subid=f"b{i}", external_id="E.C.P.b", status="lead")
    await bridge.deliver()
    assert sorted(len(r.event_ids) for r in bridge.fake.requests) == [1, 3, 3]
    assert len(set(bridge.fake.event_ids())) == 7


async def test_dry_run_marks_delivered_dry_run_and_sends_nothing(make_bridge: Any) -> None:
    bridge = await make_bridge(edit=lambda s: s["tiktok"].update(dry_run=True))
    _, body = await bridge.postback("keitaro", **KEITARO_SALE)
    await bridge.deliver()
    assert (await bridge.row(body["conversion_id"]))["state"] == "delivered_dry_run"
    assert bridge.fake.requests == []


async def test_a_dry_run_delivery_counts_no_attempt(make_bridge: Any) -> None:
    bridge = await make_bridge(edit=lambda s: s["tiktok"].update(dry_run=True))
    _, body = await bridge.postback("keitaro", **KEITARO_SALE)
    await bridge.deliver()
    row = await bridge.row(body["conversion_id"])
    assert (row["state"], row["attempts"]) == ("delivered_dry_run", 0)


@pytest.mark.parametrize(("partner_name", "head"), [("acme-media", {"partner_name": "acme-media"}), ("", {})])
async def test_the_configured_partner_name_is_the_payloads_and_an_empty_one_is_left_out(
    make_bridge: Any, partner_name: str, head: dict[str, str]
) -> None:
    bridge = await make_bridge(edit=lambda s: s["tiktok"].update(partner_name=partner_name))
    await bridge.postback("keitaro", **KEITARO_SALE)
    await bridge.deliver()
    [request] = bridge.fake.requests
    assert request.answer_code == 0
    assert {key: v for key, v in request.body.items() if key == "partner_name"} == head


async def test_unknown_tracker_is_404(bridge: Bridge) -> None:
    status, body = await bridge.postback("nosuch", subid="x", status="sale")
    assert status == 404
    assert body == {"error": "unknown tracker"}


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_postback_url_with_a_trailing_slash_is_taken_the_same(bridge: Bridge, method: str) -> None:
    # `/postback/keitaro/?subid=...` is an easy slip in a tracker's postback field.
    if method == "GET":
        resp = await bridge.client.get("/postback/keitaro/", params=KEITARO_SALE)
    else:
        resp = await bridge.client.post("/postback/keitaro/", data=KEITARO_SALE)
    body = await resp.json()
    assert (resp.status, body["result"]) == (200, "accepted")
    await bridge.deliver()
    assert bridge.fake.event_ids() == ["1dad2cg1br22spja1_Purchase"]


async def test_missing_click_id_is_400_naming_it_and_stores_nothing(bridge: Bridge) -> None:
    status, body = await bridge.postback("keitaro", status="sale")
    assert status == 400
    assert "click_id" in body["error"] and "subid" in body["error"]
    assert await bridge.states() == {}


async def test_healthz(bridge: Bridge) -> None:
    resp = await bridge.client.get("/healthz")
    assert resp.status == 200


async def test_conversion_without_transaction_id_after_one_with_is_a_duplicate(bridge: Bridge) -> None:
    base = {"subid": "e1", "external_id": "E.C.P.e"}
    _, first = await bridge.postback("keitaro", status="sale", tid="A", **base)
    _, bare = await bridge.postback("keitaro", status="sale", **base)
    _, rebill = await bridge.postback("keitaro", status="rebill", tid="B", **base)
    await bridge.deliver()

    # Without a transaction id it cannot be told from a repeat; TikTok would merge it anyway.
    assert bare == {"result": "duplicate", "conversion_id": first["conversion_id"]}
    assert rebill["event_id"] == "e1_Purchase_B"
    assert sorted(bridge.fake.event_ids()) == ["e1_Purchase", "e1_Purchase_B"]


async def test_transaction_id_after_one_without_gets_its_own_event_id(bridge: Bridge) -> None:
    base = {"subid": "e2", "external_id": "E.C.P.e"}
    _, bare = await bridge.postback("keitaro", status="sale", **base)
    _, with_tid = await bridge.postback("keitaro", status="rebill", tid="B", **base)
    _, bare_again = await bridge.postback("keitaro", status="sale", **base)

    assert bare["event_id"] == "e2_Purchase"
    assert with_tid["event_id"] == "e2_Purchase_B"
    assert bare_again == {"result": "duplicate", "conversion_id": bare["conversion_id"]}


async def test_thousands_comma_is_refused_rather_than_guessed(bridge: Bridge) -> None:
    status, body = await bridge.postback("keitaro", subid="t1", status="sale", revenue="1,000")
    assert status == 400
    assert body["error"].startswith("value: ambiguous comma")
    assert await bridge.states() == {}
