"""Refusals: unauthenticated, broken or oversized postbacks and clicks get a clear 4xx and leave no trace."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import ClientResponse
from yarl import URL

from bridge.cli import explain
from tests.conftest import Bridge, BridgeFactory, base_settings, until
from tests.daemon_proc import running_daemon

T = TypeVar("T")

KEY = "pk-7f3a9c51e2d84b06"
SALE = {"subid": "clk-refusal-1", "status": "sale", "revenue": "45", "currency": "USD", "tid": "T-1"}
GUARDED = {
    "name": "guarded",
    "allow_ips": ["10.0.0.0/8"],
    "params": {"click_id": "subid", "status": "status"},
    "events": {"sale": "Purchase"},
}
LOOPBACK_ONLY = {**GUARDED, "name": "local", "allow_ips": ["127.0.0.0/8"]}

# A tracker that sends the conversion's own time.
TIMED = {
    "name": "timed",
    "params": {"click_id": "subid", "status": "status", "ttclid": "ttclid", "event_time": "ts"},
    "events": {"sale": "Purchase", "rejected": None},
}


@pytest.fixture
async def keyed(make_bridge: BridgeFactory) -> Bridge:
    """The shipped trackers, with the Keitaro postback key set."""
    return await make_bridge(environ={"KEITARO_POSTBACK_KEY": KEY})


async def nothing_kept(bridge: Bridge) -> bool:
    """No conversion and no click in the database, and nothing sent to TikTok after a delivery run."""
    [row] = await bridge.store.fetchall(
        "SELECT (SELECT COUNT(*) FROM conversions) AS conversions, (SELECT COUNT(*) FROM clicks) AS clicks"
    )
    await bridge.deliver()
    return row["conversions"] == 0 and row["clicks"] == 0 and bridge.fake.requests == []


async def get_raw(bridge: Bridge, target: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """GET a path and query exactly as written: no re-encoding of `%ff` or a lone `%`."""
    url = URL(f"http://127.0.0.1:{bridge.client.port}{target}", encoded=True)
    async with bridge.client.session.get(url, headers=headers or {}) as resp:
        return resp.status, await resp.text()


async def post(
    bridge: Bridge, target: str, body: bytes, content_type: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    resp = await bridge.client.post(
        target, data=body, headers={"Content-Type": content_type, **(headers or {})}
    )
    return resp.status, await resp.json()


# -- authentication -----------------------------------------------------------------------------------


async def test_postback_without_the_key_is_refused_with_403(keyed: Bridge) -> None:
    status, body = await keyed.postback("keitaro", **SALE)

    assert status == 403
    assert body == {"error": "wrong or missing key"}
    assert await nothing_kept(keyed)


async def test_postback_with_a_wrong_key_is_refused_with_403(keyed: Bridge) -> None:
    status, _ = await keyed.postback("keitaro", key=KEY[:-1], **SALE)

    assert status == 403
    assert await nothing_kept(keyed)


async def test_key_in_the_query_is_accepted(keyed: Bridge) -> None:
    status, body = await keyed.postback("keitaro", key=KEY, **SALE)

    assert status == 200
    assert body["result"] == "accepted"


async def test_key_in_a_form_body_is_accepted(keyed: Bridge) -> None:
    status, body = await keyed.postback("keitaro", method="POST", key=KEY, **SALE)

    assert status == 200
    assert body["result"] == "accepted"


async def test_key_in_a_json_body_is_accepted(keyed: Bridge) -> None:
    status, body = await post(
        keyed, "/postback/keitaro", json.dumps({"key": KEY, **SALE}).encode(), "application/json"
    )

    assert status == 200
    assert body["result"] == "accepted"


async def test_sender_without_the_key_gets_403_even_when_its_parameters_are_broken(keyed: Bridge) -> None:
    # An unauthenticated sender learns nothing about what the bridge would have made of its request.
    status, text = await get_raw(keyed, "/postback/keitaro?subid=%ff&revenue=abc")

    assert status == 403
    assert json.loads(text) == {"error": "wrong or missing key"}
    assert await nothing_kept(keyed)


@pytest.mark.parametrize(
    ("raw", "content_type", "error"),
    [
        (b'{"subid": "clk-1", ', "application/json", "body: not valid JSON"),
        (b"status=sale&subid=\xff\xfe", "text/plain", "body: not valid UTF-8"),
    ],
    ids=["bad-json", "bad-utf8"],
)
async def test_key_in_the_query_with_an_unreadable_body_gets_the_400_naming_the_body(
    keyed: Bridge, raw: bytes, content_type: str, error: str
) -> None:
    status, body = await post(keyed, f"/postback/keitaro?key={KEY}", raw, content_type)

    assert (status, body) == (400, {"error": error})
    assert await nothing_kept(keyed)


async def test_answers_never_echo_the_key(keyed: Bridge) -> None:
    answers = [
        await keyed.postback("keitaro", key=KEY, **{**SALE, "revenue": "abc"}),
        await keyed.postback("keitaro", key=KEY, **{**SALE, "subid": "{subid}"}),
        await keyed.postback("keitaro", key=KEY + "x", **SALE),
        await keyed.postback("keitaro", key=KEY, **SALE),
    ]

    assert [status for status, _ in answers] == [400, 400, 403, 200]
    assert not any(KEY in json.dumps(body) for _, body in answers)


async def test_the_key_never_reaches_logs_or_metrics(keyed: Bridge, log_text: io.StringIO) -> None:
    wrong = "guess-" + KEY[:8]
    await keyed.postback("keitaro", key=KEY, **SALE)
    await keyed.postback("keitaro", key=wrong, **SALE)
    await keyed.postback("keitaro", key=KEY, **{**SALE, "revenue": "NaN"})
    await get_raw(keyed, f"/postback/keitaro?key={KEY}&subid=%ff")
    await keyed.send_raw(
        f"GET /postback/keitaro?key={KEY}&subid=\xff HTTP/1.1\r\nHost: x\r\n\r\n".encode("latin-1")
    )
    metrics = await (await keyed.client.get("/metrics")).text()

    logged = log_text.getvalue()
    assert "postback refused" in logged  # the refusals were logged, only without the key
    for secret in (KEY, wrong):
        assert secret not in logged
        assert secret not in metrics


async def test_source_outside_allow_ips_is_refused_with_403(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(trackers={"guarded": GUARDED})

    status, body = await bridge.postback("guarded", subid="clk-1", status="sale")

    assert status == 403
    assert body == {"error": "source address not allowed"}
    assert await nothing_kept(bridge)


async def test_source_inside_allow_ips_is_accepted(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(trackers={"local": LOOPBACK_ONLY})

    status, body = await bridge.postback("local", subid="clk-1", status="sale")

    assert status == 200
    assert body["result"] == "accepted"


async def test_allow_ips_written_as_ipv4_mapped_ipv6_still_allow_ipv4_sources(
    make_bridge: BridgeFactory,
) -> None:
    mapped = {**GUARDED, "name": "mapped", "allow_ips": ["::ffff:127.0.0.0/104"]}
    bridge = await make_bridge(trackers={"mapped": mapped})

    status, body = await bridge.postback("mapped", subid="clk-1", status="sale")

    assert status == 200
    assert body["result"] == "accepted"


@pytest.mark.parametrize(
    ("tracker", "forwarded_for", "status"),
    [("guarded", "10.1.2.3", 200), ("local", "203.0.113.9", 403)],
    ids=["client-inside", "client-outside"],
)
async def test_behind_a_trusted_proxy_allow_ips_judges_the_forwarded_client_not_the_proxy(
    make_bridge: BridgeFactory, tracker: str, forwarded_for: str, status: int
) -> None:
    # The proxy is on loopback: `local` allows it, `guarded` does not; only the client's address counts.
    bridge = await make_bridge(
        edit=lambda s: s["server"].update(trusted_proxies=["127.0.0.0/8"]),
        trackers={"guarded": GUARDED, "local": LOOPBACK_ONLY},
    )

    resp = await bridge.client.get(
        f"/postback/{tracker}",
        params={"subid": "clk-1", "status": "sale"},
        headers={"X-Forwarded-For": forwarded_for},
    )

    assert resp.status == status


async def test_unknown_tracker_is_404(bridge: Bridge) -> None:
    status, body = await bridge.postback("nosuch", **SALE)

    assert status == 404
    assert body == {"error": "unknown tracker"}
    assert await nothing_kept(bridge)


# -- parameters ---------------------------------------------------------------------------------------


async def test_missing_click_id_is_400_naming_it_and_the_trackers_parameter(bridge: Bridge) -> None:
    status, body = await bridge.postback("keitaro", status="sale", revenue="45")

    assert status == 400
    assert body["error"].startswith("click_id: missing")
    assert "'subid'" in body["error"]
    assert await nothing_kept(bridge)


@pytest.mark.parametrize("macro", ["{subid}", "{{subid}}", "${SUBID}", "__CLICKID__", "%7Bsubid%7D"])
async def test_unsubstituted_click_id_macro_is_400_saying_so(bridge: Bridge, macro: str) -> None:
    status, body = await bridge.postback("keitaro", **{**SALE, "subid": macro})

    assert status == 400
    assert body["error"].startswith("click_id: ")
    assert "unsubstituted macro" in body["error"]
    assert await nothing_kept(bridge)


@pytest.mark.parametrize("value", ["abc", "NaN", "nan", "inf", "-Infinity", "1e309", "-5", "12..5", "0x10"])
async def test_value_that_is_not_a_finite_amount_is_400_naming_value(bridge: Bridge, value: str) -> None:
    status, body = await bridge.postback("keitaro", **{**SALE, "revenue": value})

    assert status == 400
    assert body["error"].startswith("value: ")
    assert await nothing_kept(bridge)


async def test_json_true_is_no_value(bridge: Bridge) -> None:
    body = json.dumps({**SALE, "revenue": True}).encode()
    status, answer = await post(bridge, "/postback/keitaro", body, "application/json")

    assert status == 400
    assert answer == {"error": "value: not a number: 'true'"}
    assert await nothing_kept(bridge)


@pytest.mark.parametrize(
    ("status", "reason"), [("rejected", "status_not_sent"), ("chargeback", "unmapped_status")]
)
async def test_a_status_never_sent_is_recorded_without_the_fields_that_do_not_parse(
    bridge: Bridge, status: str, reason: str
) -> None:
    # A chargeback's revenue is negative; a 400 would only make the tracker resend it as failed.
    broken = {"revenue": "-45", "currency": "dollars", "event_time": "yesterday"}
    answer_status, answer = await bridge.postback("keitaro", **{**SALE, "status": status, **broken})

    assert (answer_status, answer) == (200, {"result": "ignored", "reason": reason})
    [row] = await bridge.store.fetchall("SELECT state, value, currency, status FROM conversions")
    assert tuple(row) == ("ignored", None, None, status)
    await bridge.deliver()
    assert bridge.fake.requests == []


@pytest.mark.parametrize(
    ("status", "reason"), [("rejected", "status_not_sent"), ("chargeback", "unmapped_status")]
)
async def test_a_status_never_sent_with_an_unreadable_event_time_is_recorded_at_its_arrival(
    make_bridge: BridgeFactory, status: str, reason: str
) -> None:
    bridge = await make_bridge(trackers={"timed": TIMED})

    before = int(time.time())
    answer = await bridge.postback("timed", subid="clk-1", status=status, ts="yesterday")
    after = int(time.time())

    assert answer == (200, {"result": "ignored", "reason": reason})
    [row] = await bridge.store.fetchall("SELECT state, event_time FROM conversions")
    assert row["state"] == "ignored"
    assert before <= row["event_time"] <= after


async def test_an_event_time_a_minute_ahead_of_the_bridges_clock_is_accepted(
    make_bridge: BridgeFactory,
) -> None:
    # The tracker's clock may run a little ahead of the bridge's.
    bridge = await make_bridge(trackers={"timed": TIMED})
    ahead = int(time.time()) + 60

    status, body = await bridge.postback("timed", subid="clk-1", status="sale", ts=str(ahead))

    assert (status, body["result"]) == (200, "accepted")
    assert (await bridge.row(body["conversion_id"]))["event_time"] == ahead


async def test_an_event_time_more_than_a_day_ahead_is_400_naming_it(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(trackers={"timed": TIMED})
    ahead = int(time.time()) + 2 * 86400

    status, body = await bridge.postback("timed", subid="clk-1", status="sale", ts=str(ahead))

    assert status == 400
    assert body["error"].startswith("event_time: out of range")
    assert await nothing_kept(bridge)


@pytest.mark.parametrize("currency", ["US", "USDT", "U$D", "123", "€€€", "dollars", "ZZZ", "usx"])
async def test_currency_that_is_not_three_letters_is_400_naming_currency(
    bridge: Bridge, currency: str
) -> None:
    status, body = await bridge.postback("keitaro", **{**SALE, "currency": currency})

    assert status == 400
    assert body["error"].startswith("currency: not a three-letter ISO 4217 code")
    assert await nothing_kept(bridge)


async def test_a_status_with_spaces_around_it_maps_like_the_plain_status(bridge: Bridge) -> None:
    status, body = await bridge.postback("keitaro", **{**SALE, "status": " sale "})

    assert (status, body["result"], body["event"]) == (200, "accepted", "Purchase")


async def test_a_click_id_of_only_spaces_is_400_as_missing(bridge: Bridge) -> None:
    status, body = await bridge.postback("keitaro", **{**SALE, "subid": "   "})

    assert status == 400
    assert body["error"].startswith("click_id: missing")
    assert await nothing_kept(bridge)


@pytest.mark.parametrize(
    ("param", "field", "limit"),
    [("subid", "click_id", 1024), ("user_agent", "user_agent", 1024), ("tid", "transaction_id", 256)],
)
async def test_field_over_its_length_limit_is_400_naming_it(
    bridge: Bridge, param: str, field: str, limit: int
) -> None:
    at_limit, _ = await bridge.postback("keitaro", **{**SALE, param: "a" * limit})
    status, body = await bridge.postback("keitaro", **{**SALE, "subid": "clk-2", param: "b" * (limit + 1)})

    assert at_limit == 200
    assert status == 400
    assert body == {"error": f"{field}: longer than {limit} characters"}
    assert len(await bridge.store.fetchall("SELECT id FROM conversions")) == 1


async def test_control_characters_in_a_value_are_400_naming_it(bridge: Bridge) -> None:
    status, body = await bridge.postback("keitaro", **{**SALE, "subid": "clk\x00-1"})

    assert status == 400
    assert body == {"error": "click_id: contains control characters"}
    assert await nothing_kept(bridge)


@pytest.mark.parametrize("encoded", ["%ff", "%e2%82", "%c3%28", "%ed%a0%80", "abc%80"])
async def test_invalid_utf8_in_the_query_is_400_naming_the_parameter(bridge: Bridge, encoded: str) -> None:
    # yarl would quietly turn these into U+FFFD; the tracker's value must not be stored mangled.
    status, text = await get_raw(bridge, f"/postback/keitaro?status=sale&subid={encoded}")

    assert status == 400
    assert json.loads(text) == {"error": "subid: not valid UTF-8"}
    assert await nothing_kept(bridge)


async def test_invalid_utf8_in_a_parameter_name_is_400(bridge: Bridge) -> None:
    status, text = await get_raw(bridge, "/postback/keitaro?subid=clk-1&status=sale&%ff=1")

    assert status == 400
    assert json.loads(text) == {"error": "query: a parameter name is not valid UTF-8"}
    assert await nothing_kept(bridge)


async def test_stray_percent_signs_are_taken_literally(bridge: Bridge) -> None:
    # `%zz` and a lone `%` are not escapes; like yarl, the bridge keeps them as they are.
    status, text = await get_raw(bridge, "/postback/keitaro?status=sale&subid=clk%zz%")

    assert status == 200
    [row] = await bridge.store.fetchall("SELECT click_id FROM conversions")
    assert row["click_id"] == "clk%zz%"
    assert json.loads(text)["event_id"] == "clk%zz%_Purchase"


@pytest.mark.parametrize(
    ("target", "body"),
    [
        ("/postback/keitaro?status=sale&subid=first&subid=second", b""),
        ("/postback/keitaro?status=sale", b"subid=first&subid=second"),
        ("/postback/keitaro?status=sale&subid=first", b"subid=second"),
    ],
    ids=["query", "body", "query-then-body"],
)
async def test_a_repeated_parameter_takes_its_first_value(bridge: Bridge, target: str, body: bytes) -> None:
    status, answer = await post(bridge, target, body, "application/x-www-form-urlencoded")

    assert (status, answer["event_id"]) == (200, "first_Purchase")
    [row] = await bridge.store.fetchall("SELECT click_id FROM conversions")
    assert row["click_id"] == "first"


async def test_raw_non_ascii_bytes_in_the_request_line_are_400_without_a_traceback(
    bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    answer = await bridge.send_raw(
        b"GET /postback/keitaro?subid=\xff\xfe&status=sale HTTP/1.1\r\nHost: x\r\n\r\n"
    )

    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400")
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert await nothing_kept(bridge)


async def test_form_body_with_invalid_utf8_is_400_naming_the_parameter(bridge: Bridge) -> None:
    status, body = await post(
        bridge, "/postback/keitaro", b"status=sale&subid=%ff", "application/x-www-form-urlencoded"
    )

    assert status == 400
    assert body == {"error": "subid: not valid UTF-8"}
    assert await nothing_kept(bridge)


async def test_body_bytes_that_are_not_utf8_are_400(bridge: Bridge) -> None:
    status, body = await post(bridge, "/postback/keitaro", b"status=sale&subid=\xff\xfe", "text/plain")

    assert status == 400
    assert body == {"error": "body: not valid UTF-8"}
    assert await nothing_kept(bridge)


async def test_json_body_with_a_lone_surrogate_is_400_naming_the_parameter(bridge: Bridge) -> None:
    # Valid JSON, but text no database can store: it must be refused, not break the commit for others.
    raw = b'{"subid": "clk-\\ud800", "status": "sale"}'
    status, body = await post(bridge, "/postback/keitaro", raw, "application/json")

    assert status == 400
    assert body == {"error": "subid: not valid UTF-8"}
    assert await nothing_kept(bridge)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b'{"subid": "clk-1", ', "body: not valid JSON"),
        (b"[" * 60_000, "body: not valid JSON"),
        (b'["subid", "clk-1"]', "body: JSON body must be an object"),
        (b'{"subid": {"nested": 1}}', "subid: must be a string or a number"),
    ],
    ids=["truncated", "nested-past-the-stack", "array", "nested-value"],
)
async def test_json_body_that_is_not_a_flat_object_is_400(bridge: Bridge, raw: bytes, error: str) -> None:
    status, body = await post(bridge, "/postback/keitaro", raw, "application/json")

    assert status == 400
    assert body == {"error": error}
    assert await nothing_kept(bridge)


async def test_body_of_an_unsupported_content_type_is_400(bridge: Bridge) -> None:
    status, body = await post(bridge, "/postback/keitaro", b"<xml/>", "application/xml")

    assert status == 400
    assert body == {"error": "body: unsupported content type 'application/xml'"}


async def test_more_than_100_parameters_is_400(bridge: Bridge) -> None:
    query = "&".join(f"p{i}=1" for i in range(101))
    status, text = await get_raw(bridge, f"/postback/keitaro?subid=clk-1&status=sale&{query}")

    assert status == 400
    assert json.loads(text) == {"error": "query: more than 100 parameters"}
    assert await nothing_kept(bridge)


async def test_the_parameter_limit_counts_the_query_and_the_body_together(bridge: Bridge) -> None:
    query = "&".join(f"q{i}=1" for i in range(60))
    body = "&".join(f"b{i}=1" for i in range(60)).encode()

    status, answer = await post(
        bridge,
        f"/postback/keitaro?subid=clk-1&status=sale&{query}",
        body,
        "application/x-www-form-urlencoded",
    )

    assert (status, answer) == (400, {"error": "query and body: more than 100 parameters together"})
    assert await nothing_kept(bridge)


# -- sizes --------------------------------------------------------------------------------------------


async def test_body_over_64_kib_is_413(bridge: Bridge) -> None:
    raw = b"status=sale&subid=clk-1&pad=" + b"x" * (64 * 1024)
    status, body = await post(bridge, "/postback/keitaro", raw, "application/x-www-form-urlencoded")

    assert status == 413
    assert body == {"error": "request body larger than 65536 bytes"}
    assert await nothing_kept(bridge)


async def test_click_body_over_64_kib_is_413_that_the_page_can_read(bridge: Bridge) -> None:
    raw = b"click_id=c413&pad=" + b"x" * (64 * 1024)
    resp = await bridge.client.post("/click", data=raw, headers={"Content-Type": "text/plain"})

    assert resp.status == 413
    assert await resp.json() == {"error": "request body larger than 65536 bytes"}
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert await nothing_kept(bridge)


async def test_compressed_body_that_inflates_past_64_kib_is_413(bridge: Bridge) -> None:
    bomb = gzip.compress(b"status=sale&subid=clk-1&pad=" + b"0" * 5_000_000)
    status, _ = await post(
        bridge, "/postback/keitaro", bomb, "application/x-www-form-urlencoded", {"Content-Encoding": "gzip"}
    )

    assert len(bomb) < 64 * 1024
    assert status == 413
    assert await nothing_kept(bridge)


async def test_body_with_broken_compression_is_400(bridge: Bridge) -> None:
    status, body = await post(
        bridge,
        "/postback/keitaro",
        b"not gzip at all",
        "application/x-www-form-urlencoded",
        {"Content-Encoding": "gzip"},
    )

    assert status == 400
    assert body["error"].startswith("body: cannot be read")
    assert await nothing_kept(bridge)


# -- clicks -------------------------------------------------------------------------------------------


async def test_click_without_click_id_is_400(bridge: Bridge) -> None:
    resp = await bridge.client.get("/click", params={"ttclid": "E.C.P.x"})

    assert resp.status == 400
    assert await resp.json() == {"error": "click_id: missing"}
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert await nothing_kept(bridge)


@pytest.mark.parametrize(("param", "limit"), [("click_id", 1024), ("ttclid", 1024), ("url", 2048)])
async def test_click_field_over_its_length_limit_is_400_naming_it(
    bridge: Bridge, param: str, limit: int
) -> None:
    resp = await bridge.client.get("/click", params={"click_id": "clk-1", param: "x" * (limit + 1)})

    assert resp.status == 400
    assert await resp.json() == {"error": f"{param}: longer than {limit} characters"}
    assert await nothing_kept(bridge)


async def test_click_with_invalid_utf8_is_400(bridge: Bridge) -> None:
    status, text = await get_raw(bridge, "/click?click_id=clk%ff")

    assert status == 400
    assert json.loads(text) == {"error": "click_id: not valid UTF-8"}
    assert await nothing_kept(bridge)


async def test_click_whose_user_agent_header_is_not_utf8_is_registered_without_it(bridge: Bridge) -> None:
    answer = await bridge.send_raw(
        b"GET /click?click_id=clk-ua&ttclid=E.C.P.ua HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"User-Agent: Mozilla/5.0 \xff\xfe\r\n\r\n",
    )

    assert answer.startswith(b"HTTP/1.1 204")
    [row] = await bridge.store.fetchall("SELECT click_id, ttclid, user_agent FROM clicks")
    assert tuple(row) == ("clk-ua", "E.C.P.ua", None)


async def test_click_whose_user_agent_header_is_past_1024_characters_is_registered_with_it_cut(
    bridge: Bridge,
) -> None:
    ua = "Mozilla/5.0 (Linux; Android 14) " + "x" * 2000

    assert await bridge.click({"User-Agent": ua}, click_id="clk-long-ua") == 204

    [row] = await bridge.store.fetchall("SELECT user_agent FROM clicks")
    assert row["user_agent"] == ua[:1024]


async def test_hostile_requests_sent_with_good_ones_do_not_spoil_their_commit(bridge: Bridge) -> None:
    # Requests that arrive together share one transaction: a value the database cannot take must be
    # refused at the door, or it would fail the commit of every postback beside it.
    hostile = b'{"subid": "clk-\\udc80", "status": "sale"}'
    answers = await asyncio.gather(
        *(bridge.postback("keitaro", **{**SALE, "subid": f"good-{i}"}) for i in range(5)),
        *(post(bridge, "/postback/keitaro", hostile, "application/json") for _ in range(3)),
    )

    assert [status for status, _ in answers] == [200] * 5 + [400] * 3
    [row] = await bridge.store.fetchall("SELECT COUNT(*) AS n FROM conversions")
    assert row["n"] == 5


async def test_explain_refuses_invalid_utf8_as_the_listener_does(bridge: Bridge) -> None:
    result = explain(bridge.config, "/postback/keitaro?status=sale&subid=%ff")

    assert result == {"result": "rejected", "status": 400, "why": "subid: not valid UTF-8"}


async def within_one_minute(send: Callable[[], Awaitable[T]]) -> T:
    """Run `send()` inside one clock minute (the limiter's window); again if the minute turned meanwhile."""
    for _ in range(3):
        window = int(time.time() // 60)
        result = await send()
        if int(time.time() // 60) == window:
            return result
    raise AssertionError("the clock minute turned three times in a row")


async def test_clicks_past_the_per_minute_limit_are_429_and_not_stored(make_bridge: BridgeFactory) -> None:
    def limit(settings: dict[str, Any]) -> None:
        settings["server"]["click_limit_per_minute"] = 5

    bridges: list[Bridge] = []

    async def flood() -> list[int]:
        bridge = await make_bridge(limit)
        bridges.append(bridge)
        return [await bridge.click(click_id=f"clk-{i}") for i in range(8)]

    statuses = await within_one_minute(flood)

    assert statuses == [204] * 5 + [429] * 3
    rows = await bridges[-1].store.fetchall("SELECT click_id FROM clicks ORDER BY click_id")
    assert [row["click_id"] for row in rows] == [f"clk-{i}" for i in range(5)]


async def test_a_429_says_when_to_retry(make_bridge: BridgeFactory) -> None:
    async def over_the_limit() -> ClientResponse:
        bridge = await make_bridge(lambda s: s["server"].update(click_limit_per_minute=1))
        await bridge.click(click_id="clk-1")
        return await bridge.client.get("/click", params={"click_id": "clk-2"})

    resp = await within_one_minute(over_the_limit)

    assert resp.status == 429
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_addresses_of_one_ipv6_64_share_one_click_budget(make_bridge: BridgeFactory) -> None:
    def settings(s: dict[str, Any]) -> None:
        s["server"].update(click_limit_per_minute=3, trusted_proxies=["127.0.0.1/32"])

    async def flood() -> tuple[list[int], int]:
        bridge = await make_bridge(settings)
        same_64 = [
            await bridge.click({"X-Forwarded-For": f"2001:db8:1:2::{i:x}"}, click_id=f"v6-{i}")
            for i in range(5)
        ]
        other = await bridge.click({"X-Forwarded-For": "203.0.113.9"}, click_id="v4-1")
        return same_64, other

    same_64, other = await within_one_minute(flood)

    assert same_64 == [204, 204, 204, 429, 429]
    assert other == 204


async def test_a_sender_that_hangs_up_halfway_through_its_body_is_one_info_line_not_an_error(
    tmp_path: Path,
) -> None:
    # Seen only with the daemon's own runner: aiohttp logged it as an error, with a traceback.
    form = b"Content-Type: application/x-www-form-urlencoded\r\n"
    sized = b"Content-Length: 1000\r\n" + form + b"\r\nsubid=x&st"
    chunked = b"Transfer-Encoding: chunked\r\n" + form + b"\r\n5\r\nsubid\r\n"
    async with running_daemon(tmp_path, base_settings()) as daemon:
        for framing in (sized, chunked):
            _, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
            writer.write(b"POST /postback/keitaro HTTP/1.1\r\nHost: x\r\n" + framing)
            await writer.drain()
            await asyncio.sleep(0.2)  # the listener has begun to read the body
            writer.close()
        await until(
            lambda: sum(line.get("event") == "postback rejected" for line in daemon.log_lines()) == 2,
            10,
            "both refusals logged",
        )

    lines = daemon.log_lines()
    assert [line["why"] for line in lines if line.get("event") == "postback rejected"] == [
        "body: cut short: the sender closed the connection"
    ] * 2
    assert [line for line in lines if line["level"] in ("error", "critical")] == []
