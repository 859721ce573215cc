"""Logs: one JSON line per postback outcome and per batch, with the fields an admin greps for."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from bridge import logs
from tests.conftest import MAIN_CODE, MAIN_TOKEN, Bridge, BridgeFactory, Clock


class Captured(io.StringIO):
    """The stream the daemon would write to; `tty` makes it look like a terminal."""

    tty = False

    def isatty(self) -> bool:
        return self.tty

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.getvalue().splitlines()]

    def find(self, message: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line["event"] == message]


@pytest.fixture
def out() -> Iterator[Captured]:
    stream = Captured()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    logs.configure(stream=stream)
    yield stream
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


SALE = {
    "subid": "clk-77",
    "external_id": "E.C.P.logs",
    "status": "sale",
    "revenue": "12",
    "tid": "T-9",
}


async def test_postback_line_carries_tracker_click_id_event_and_event_id(
    bridge: Bridge, out: Captured
) -> None:
    _, body = await bridge.postback("keitaro", **SALE)

    [line] = out.find("postback")
    assert line["level"] == "info"
    assert line["tracker"] == "keitaro"
    assert line["click_id"] == "clk-77"
    assert line["tiktok_event"] == "Purchase"
    assert line["event_id"] == "clk-77_Purchase"
    assert line["result"] == "accepted"
    assert line["conversion_id"] == body["conversion_id"]
    assert line["timestamp"].endswith("Z")


async def test_duplicate_and_ignored_postbacks_get_a_line_each(bridge: Bridge, out: Captured) -> None:
    await bridge.postback("keitaro", **SALE)
    await bridge.postback("keitaro", **SALE)
    await bridge.postback("keitaro", subid="clk-78", status="trash")

    results = [(line["result"], line.get("reason")) for line in out.find("postback")]
    assert results == [("accepted", None), ("duplicate", None), ("ignored", "unmapped_status")]


async def test_refused_postbacks_say_why(bridge: Bridge, out: Captured) -> None:
    await bridge.postback("keitaro", status="sale")
    await bridge.postback("nosuch", subid="x")

    [rejected] = out.find("postback rejected")
    assert rejected["tracker"] == "keitaro"
    assert "click_id" in rejected["why"]
    [refused] = out.find("postback refused")
    assert refused["tracker"] == "nosuch"
    assert "unknown tracker" in refused["why"]


async def test_batch_line_carries_pixel_code_and_tiktoks_request_id(bridge: Bridge, out: Captured) -> None:
    await bridge.postback("keitaro", **SALE)
    await bridge.postback("keitaro", **{**SALE, "subid": "clk-79"})
    await bridge.deliver()

    [batch] = out.find("batch")
    assert batch["pixel"] == "main"
    assert batch["events"] == 2
    assert batch["result"] == "delivered"
    assert batch["code"] == 0
    assert batch["request_id"] == bridge.fake.received[0]["_request_id"]


async def test_a_refused_batch_line_carries_tiktoks_code_and_message(bridge: Bridge, out: Captured) -> None:
    bridge.fake.fail_next(1, "50002")
    await bridge.postback("keitaro", **SALE)
    await bridge.deliver()

    [batch] = out.find("batch")
    assert (batch["pixel"], batch["result"], batch["code"]) == ("main", "transient", 50002)
    assert batch["message"] == "Internal error"
    assert batch["request_id"]


async def test_an_event_that_ends_failed_gets_its_own_line(bridge: Bridge, out: Captured) -> None:
    bridge.fake.poison("clk-77_Purchase", "invalid value")
    _, body = await bridge.postback("keitaro", **SALE)
    await bridge.deliver()

    [line] = out.find("event not delivered")
    assert line["level"] == "warning"
    assert line["state"] == "failed"
    assert line["conversion_id"] == body["conversion_id"]
    assert (line["tracker"], line["click_id"]) == ("keitaro", "clk-77")
    assert (line["tiktok_event"], line["event_id"]) == ("Purchase", "clk-77_Purchase")
    assert (line["pixel"], line["code"]) == ("main", 40002)
    assert "invalid value" in line["why"]


async def test_an_unmatched_event_gets_its_own_line_saying_why(bridge: Bridge, out: Captured) -> None:
    await bridge.postback("keitaro", subid="bare", status="lead")
    await bridge.deliver()

    [line] = out.find("event not delivered")
    assert (line["state"], line["click_id"], line["event_id"]) == ("unmatched", "bare", "bare_Lead")
    assert "no match key" in line["why"]


async def test_delivered_events_share_their_batchs_line(bridge: Bridge, out: Captured) -> None:
    for i in range(5):
        await bridge.postback("keitaro", **{**SALE, "subid": f"many-{i}"})
    before = len(out.lines())
    await bridge.deliver()

    assert [line["event"] for line in out.lines()[before:]] == ["batch"]


def skipped_lines(out: Captured, kind: str) -> tuple[int, dict[str, int]]:
    """How many lines of `kind` the summaries say were skipped, in all and by label."""
    total, by = 0, Counter[str]()
    for summary in out.find("log lines skipped"):
        if summary["kind"] == kind:
            assert summary["level"] == "warning"
            total += summary["lines"]
            by.update(summary["by"])
    return total, dict(by)


async def test_a_burst_of_postbacks_writes_a_hundred_lines_a_second_and_counts_the_rest(
    bridge: Bridge, out: Captured
) -> None:
    # Over journald's default limit (10 000 lines in 30 s) it drops the service's lines, warnings too.
    clock = bridge.runtime.lines.clock = Clock()  # the budget's own: the bridge's runs on
    clock.freeze()  # the burst falls in one second of the budget, however slow the machine
    for i in range(logs.LINES_PER_SECOND + 20):
        await bridge.postback("keitaro", **{**SALE, "subid": f"burst-{i}"})
    for i in range(10):
        await bridge.postback("keitaro", **{**SALE, "subid": f"burst-{i}"})  # duplicates
    # Other kinds of lines have budgets of their own: the burst does not silence a refusal.
    await bridge.postback("nosuch", subid="x")
    assert len(out.find("postback refused")) == 1

    clock.advance(1.0)
    await bridge.postback("keitaro", **{**SALE, "subid": "after"})

    written = out.find("postback")
    assert len(written) == logs.LINES_PER_SECOND + 1
    assert written[-1]["click_id"] == "after"
    assert skipped_lines(out, "postback") == (30, {"accepted": 20, "duplicate": 10})
    assert skipped_lines(out, "postback refused") == (0, {})


async def test_lines_skipped_at_the_end_of_a_burst_are_summed_up_without_a_next_request(
    bridge: Bridge, out: Captured
) -> None:
    bridge.runtime.lines.clock = Clock()
    bridge.runtime.lines.clock.freeze()
    for i in range(logs.LINES_PER_SECOND + 5):
        # Nothing to match TikTok's user by: each becomes unmatched, with a line saying so.
        await bridge.postback("keitaro", subid=f"bare-{i}", status="lead")
    bridge.fake.poison("clk-77_Purchase")
    await bridge.postback("keitaro", **SALE)  # one that TikTok refuses: a warning of its own budget
    await bridge.deliver()
    not_delivered = out.find("event not delivered")
    assert len(not_delivered) == logs.LINES_PER_SECOND + 1
    assert [line["click_id"] for line in not_delivered if line["state"] == "failed"] == ["clk-77"]

    # Nothing more arrives; the summaries come a second later all the same.
    for _ in range(100):
        if skipped_lines(out, "event not delivered")[0]:
            break
        await asyncio.sleep(0.05)
    assert skipped_lines(out, "postback") == (6, {"accepted": 6})
    assert skipped_lines(out, "event not delivered") == (5, {"unmatched": 5})
    assert await bridge.states() == {"unmatched": logs.LINES_PER_SECOND + 5, "failed": 1}


async def test_requests_leave_no_access_log_lines(bridge: Bridge, out: Captured) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/bridge.js", "/click?click_id=a1"):
        await bridge.client.get(path)
    await bridge.client.options("/click")

    assert out.getvalue() == ""


async def test_keys_and_tokens_never_reach_the_log(make_bridge: BridgeFactory, out: Captured) -> None:
    key = "postback-key-do-not-log-4242"
    bridge = await make_bridge(
        trackers={
            "locked": {
                "name": "locked",
                "key": key,
                "params": {"click_id": "cid", "status": "status", "ttclid": "tt"},
                "events": {"sale": "Purchase"},
            }
        }
    )
    await bridge.postback("locked", cid="k1", status="sale", tt="E.C.P.k", key=key)
    await bridge.postback("locked", cid="k2", status="sale", tt="E.C.P.k", key=key + "-wrong")
    bridge.fake.set_token(MAIN_CODE, "the-token-tiktok-now-wants")
    await bridge.deliver()

    text = out.getvalue()
    assert out.find("postback refused")  # the refusal is logged ...
    assert any(line["level"] == "error" and line.get("code") == 40001 for line in out.lines())
    assert key not in text  # ... without the key it was given or the one expected
    assert MAIN_TOKEN not in text
    assert "the-token-tiktok-now-wants" not in text


async def test_raw_email_and_phone_never_reach_the_log(make_bridge: BridgeFactory, out: Captured) -> None:
    bridge = await make_bridge(
        edit=lambda s: s["tiktok"].update(dry_run=True),
        trackers={
            "crm": {
                "name": "crm",
                "params": {"click_id": "cid", "status": "status", "email": "mail", "phone": "tel"},
                "events": {"lead": "Lead"},
            }
        },
    )
    await bridge.postback("crm", cid="e1", status="lead", mail="Alice.Doe@Example.com", tel="+1 213 373 4253")
    await bridge.click(click_id="e2", email="bob@example.org", phone="2133734254")
    await bridge.postback("crm", cid="e2", status="lead")
    await bridge.deliver()

    text = out.getvalue().lower()
    assert out.find("postback") and out.find("dry run: batch not sent")
    for raw in ("alice.doe@example.com", "bob@example.org", "213 373 4253", "2133734253", "2133734254"):
        assert raw not in text


def test_secret_fields_are_redacted_whoever_logs_them(out: Captured) -> None:
    logs.get_logger("bridge.test").info(
        "oops",
        access_token="tok-1",
        key="key-1",
        Authorization="Bearer tok-2",
        params={"key": "key-2", "subid": "s1", "nested": [{"email": "a@b.c"}]},
    )
    [line] = out.find("oops")
    assert line["access_token"] == line["key"] == line["Authorization"] == "[redacted]"
    assert line["params"] == {"key": "[redacted]", "subid": "s1", "nested": [{"email": "[redacted]"}]}
    assert not any(secret in out.getvalue() for secret in ("tok-1", "tok-2", "key-1", "key-2", "a@b.c"))


def test_hashes_under_email_and_phone_are_shown_raw_values_are_not(out: Captured) -> None:
    digest = "848a771458438fc2ec420560d769fb9b9b86851ee338ec56517baabd79d3bb4f"
    logs.get_logger("bridge.test").info(
        "batch", payload={"data": [{"user": {"email": [digest], "phone": "+12133734253"}}]}
    )
    [line] = out.find("batch")
    assert line["payload"]["data"][0]["user"] == {"email": [digest], "phone": "[redacted]"}


def test_library_errors_come_out_as_json_lines_too(out: Captured) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request")

    [line] = out.find("Error handling request")
    assert line["level"] == "error"
    assert line["logger"] == "aiohttp.server"
    assert "ValueError: boom" in line["exception"]


def test_on_a_terminal_lines_are_readable_key_value(out: Captured) -> None:
    terminal = Captured()
    terminal.tty = True
    logs.configure(stream=terminal)
    logs.get_logger("bridge.test").info("postback", tracker="keitaro", click_id="abc", result="accepted")

    line = terminal.getvalue().strip()
    assert not line.startswith("{")
    assert "postback" in line
    for pair in ("tracker=keitaro", "click_id=abc", "result=accepted"):
        assert pair in line


def _without_time(text: str) -> list[Any]:
    """Each line without its timestamp: a JSON line's fields in order, a terminal line's text after it."""
    lines: list[Any] = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append([(k, v) for k, v in json.loads(line).items() if k != "timestamp"])
        else:
            lines.append(line[28:])
    return lines


@pytest.mark.parametrize("tty", [False, True], ids=["json", "terminal"])
def test_the_bridges_info_lines_are_the_lines_structlog_itself_writes(out: Captured, tty: bool) -> None:
    stream = Captured()
    stream.tty = tty
    logs.configure(stream=stream)
    fields: dict[str, Any] = {
        "tracker": "keitaro",
        "click_id": "abc",
        "reason": None,
        "dropped": ["ip"],
        "token": "tok-secret",
        "email": "someone@example.com",
        "conversion_id": 7,
    }
    logs.get_logger("bridge.test").info("postback", **fields)
    structlog.get_logger("bridge.test").info("postback", **fields)
    logs.flush()

    ours, structlogs = _without_time(stream.getvalue())
    assert ours == structlogs
    assert "tok-secret" not in ours and "someone@example.com" not in ours and "reason" not in ours


def test_info_lines_are_left_out_below_the_configured_level(out: Captured) -> None:
    logs.configure(stream=out, level=logging.WARNING)
    log = logs.get_logger("bridge.test")
    log.info("postback", click_id="abc")
    log.warning("postback refused", click_id="abc")
    logs.flush()

    assert [line["event"] for line in out.lines()] == ["postback refused"]


def test_a_test_capturing_structlogs_lines_sees_the_bridges_info_lines(out: Captured) -> None:
    with structlog.testing.capture_logs() as captured:
        logs.get_logger("bridge.test").info("postback", click_id="abc")
    logs.get_logger("bridge.test").info("after", click_id="abc")
    logs.flush()

    assert captured == [{"event": "postback", "click_id": "abc", "log_level": "info"}]
    assert [line["event"] for line in out.lines()] == ["after"]


def test_info_lines_go_where_structlog_sends_them_when_its_logger_factory_is_replaced(out: Captured) -> None:
    elsewhere = io.StringIO()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(elsewhere))
    logs.get_logger("bridge.test").info("postback", click_id="abc")
    structlog.get_logger("bridge.test").info("postback", click_id="abc")
    logs.flush()

    assert out.getvalue() == ""
    ours, structlogs = _without_time(elsewhere.getvalue())
    assert ours == structlogs


def test_info_lines_follow_a_level_filter_structlog_is_given_later(out: Captured) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logs.get_logger("bridge.test").info("postback", click_id="abc")
    logs.flush()

    assert out.getvalue() == ""
