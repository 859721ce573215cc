"""Delivery that loses nothing: retries, rate limits, held pixels, bad events, outages, expiry, leases."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from structlog.testing import capture_logs
from yarl import URL

from bridge.pacing import Pacer
from bridge.retry import HELD_PIXEL_RETRY, RECOVERY_PROBE, Backoff
from bridge.runtime import Runtime
from bridge.stats import collect
from bridge.worker import LEASE_SECONDS, Worker
from tests.conftest import (
    MAIN_CODE,
    MAIN_TOKEN,
    SECOND_CODE,
    SECOND_TOKEN,
    Bridge,
    BridgeFactory,
    tiktok_stand_in,
)

# tiktok.timeout for these tests: a hanging TikTok is given up on quickly, and an answering one is
# still waited for long enough on a loaded machine.
TIMEOUT = 1.0


def short_timeout(settings: dict[str, Any]) -> None:
    settings["tiktok"]["timeout"] = TIMEOUT


async def lead(bridge: Bridge, click_id: str, pixel: str | None = None) -> int:
    """A conversion with a ttclid; `pixel` routes it through its click. Returns the conversion id."""
    if pixel is not None:
        assert await bridge.click(click_id=click_id, pixel=pixel) == 204
    status, body = await bridge.postback(
        "keitaro", subid=click_id, external_id=f"E.C.P.{click_id}", status="lead"
    )
    assert status == 200 and body["result"] == "accepted", body
    return body["conversion_id"]


async def retry_when_due(bridge: Bridge) -> None:
    """Move the clock to the next event's retry time and run the worker then."""
    due = await bridge.store.next_due_at()
    assert due is not None, "nothing is waiting"
    bridge.clock.advance(max(0.0, due - bridge.clock()) + 0.01)
    await bridge.deliver()


async def state_of(bridge: Bridge, conversion_id: int) -> str:
    return (await bridge.row(conversion_id))["state"]


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("50002", "Internal error"),
        ("40700", "retry later"),
        ("502html", "HTTP 502"),
        ("nonjson", "non-JSON body"),
        ("reset", "connection error"),
        ("hang", "timeout"),
    ],
)
async def test_transient_failure_is_retried_after_backoff_until_delivered(
    make_bridge: BridgeFactory, kind: str, error: str
) -> None:
    bridge = await make_bridge(edit=short_timeout)
    bridge.fake.hang_seconds = 10 * TIMEOUT
    bridge.fake.fail_next(2, kind)
    conversion_id = await lead(bridge, "t1")

    await bridge.deliver()
    row = await bridge.row(conversion_id)
    assert (row["state"], row["attempts"]) == ("pending", 1)
    assert error in row["last_error"]
    assert row["next_attempt_at"] > bridge.clock()

    await retry_when_due(bridge)
    assert (await bridge.row(conversion_id))["attempts"] == 2
    await retry_when_due(bridge)

    row = await bridge.row(conversion_id)
    assert (row["state"], row["attempts"], row["last_error"]) == ("delivered", 3, None)
    assert bridge.fake.event_ids() == ["t1_Lead"]


async def test_an_event_is_not_retried_before_its_backoff_has_passed(bridge: Bridge) -> None:
    bridge.fake.fail_next(1, "50002")
    conversion_id = await lead(bridge, "t2")
    bridge.clock.freeze()  # only the test moves time: a stall between the two cycles is no backoff
    await bridge.deliver()

    bridge.clock.advance(Backoff().delay(1, 0.5) / 2)
    await bridge.deliver()

    assert len(bridge.fake.requests) == 1
    assert await state_of(bridge, conversion_id) == "pending"


async def test_after_max_attempts_the_event_fails_with_the_last_error(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(edit=lambda s: s.update(delivery={"max_attempts": 3}))
    bridge.fake.fail_next(2, "502html")
    bridge.fake.fail_next(5, "50002")
    conversion_id = await lead(bridge, "t3")

    await bridge.deliver()
    for _ in range(2):
        await retry_when_due(bridge)

    row = await bridge.row(conversion_id)
    assert (row["state"], row["attempts"], row["last_code"]) == ("failed", 3, 50002)
    assert row["last_error"] == "gave up after 3 attempts: Internal error"
    assert await bridge.store.next_due_at() is None
    assert bridge.fake.received == []


async def test_a_dead_letter_keeps_the_code_and_message_of_one_answer(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(edit=lambda s: s.update(delivery={"max_attempts": 2}))
    bridge.fake.fail_next(1, "50002")
    bridge.fake.fail_next(1, "502html")  # the last answer has no code of TikTok's
    conversion_id = await lead(bridge, "t4")

    await bridge.deliver()
    await retry_when_due(bridge)

    row = await bridge.row(conversion_id)
    assert (row["state"], row["last_code"]) == ("failed", None)
    assert row["last_error"] == "gave up after 2 attempts: HTTP 502"


async def test_a_refusal_that_also_names_a_number_too_long_to_be_an_index_still_fails_only_the_bad_event(
    bridge: Bridge,
) -> None:
    bad = await lead(bridge, "c1")
    good = await lead(bridge, "c2")
    # Past 4300 digits Python refuses to read a number at all: the answer must still be read.
    bridge.fake.poison("c1_Lead", "see Batch." + "9" * 5000)

    await bridge.deliver()

    row = await bridge.row(bad)
    assert (row["state"], row["attempts"], row["last_code"]) == ("failed", 1, 40002)
    assert row["last_error"].startswith("Batch.0.properties.value: see Batch.999")
    assert await state_of(bridge, good) == "delivered"


async def test_a_pixel_held_before_a_restart_is_tried_again_at_once(bridge: Bridge) -> None:
    bridge.fake.set_token(SECOND_CODE, "the-token-tiktok-expects-now")
    held = [await lead(bridge, f"r{i}", pixel=SECOND_CODE) for i in range(2)]
    await bridge.deliver()
    assert bridge.fake.event_ids() == []

    # The token is fixed in the environment file and the daemon restarted: a new process, whose
    # worker knows only what the database says.
    bridge.fake.set_token(SECOND_CODE, SECOND_TOKEN)
    async with aiohttp.ClientSession() as session:
        restarted = Worker(Runtime(config=bridge.config, store=bridge.store), session, clock=bridge.clock)
        await restarted.run_once()

    assert sorted(bridge.fake.event_ids()) == ["r0_Lead", "r1_Lead"]
    assert [await state_of(bridge, i) for i in held] == ["delivered"] * 2
    assert restarted.runtime.pixel_health("second").healthy


async def test_rate_limit_answers_never_use_up_attempts(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(edit=lambda s: s.update(delivery={"max_attempts": 2}))
    bridge.fake.fail_next(3, "40100")
    bridge.fake.fail_next(2, "429")
    conversion_id = await lead(bridge, "r1")

    await bridge.deliver()
    for _ in range(5):
        row = await bridge.row(conversion_id)
        assert (row["state"], row["attempts"]) == ("pending", 0)
        await retry_when_due(bridge)

    assert (await bridge.row(conversion_id))["state"] == "delivered"
    assert bridge.fake.event_ids() == ["r1_Lead"]


async def test_a_rate_limited_pixel_waits_before_its_next_request(bridge: Bridge) -> None:
    # Postbacks are stamped with real time: the worker's clock runs a minute ahead, so they are due
    # at once, and stands still, so the time the requests take on a busy machine is not counted as
    # the pixel having waited.
    bridge.clock.advance(60)
    bridge.clock.freeze()
    bridge.fake.fail_next(1, "40100")
    await lead(bridge, "r2")
    await bridge.deliver()
    await lead(bridge, "r3")

    # A moment later (0.02 s: with the worker's 0.05 s slack, past an unslowed pixel's spacing of
    # 1/20 s and short of a slowed one's 1/10 s), r3 is due, and waits.
    bridge.clock.advance(0.02)
    assert await bridge.store.next_due_at() <= bridge.clock()
    await bridge.deliver()
    assert len(bridge.fake.requests) == 1

    bridge.clock.advance(5)
    await bridge.deliver()
    assert sorted(bridge.fake.event_ids()) == ["r2_Lead", "r3_Lead"]


@pytest.mark.parametrize("kind", ["40100", "429"])
async def test_a_rate_limited_batch_is_not_sent_again_within_a_second(bridge: Bridge, kind: str) -> None:
    conversion_id = await lead(bridge, "r4")
    bridge.clock.advance(60)  # the postback is due; then only the test moves time
    bridge.clock.freeze()
    bridge.fake.fail_next(1, kind)
    await bridge.deliver()

    bridge.clock.advance(0.9)
    await bridge.deliver()
    assert len(bridge.fake.requests) == 1

    bridge.clock.advance(0.2)
    await bridge.deliver()
    assert len(bridge.fake.requests) == 2
    assert await state_of(bridge, conversion_id) == "delivered"


async def test_a_rate_limit_on_one_pixel_does_not_slow_the_other(bridge: Bridge) -> None:
    await lead(bridge, "m1")
    bridge.clock.advance(60)
    bridge.clock.freeze()
    bridge.fake.fail_next(1, "40100")
    await bridge.deliver()

    # At the same moment, a conversion for the other pixel goes at once.
    other = await lead(bridge, "s1", pixel=SECOND_CODE)
    await bridge.deliver()

    assert [r.pixel for r in bridge.fake.requests] == [MAIN_CODE, SECOND_CODE]
    assert await state_of(bridge, other) == "delivered"


async def test_a_rate_limited_pixel_does_not_send_the_rest_of_its_queue_at_once(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await make_bridge(edit=lambda s: s["tiktok"].update(batch_size=2))
    for i in range(6):
        await lead(bridge, f"q{i}")
    bridge.fake.fail_next(1, "40100")
    # The slowed pixel's next request is 0.1 s away: on a loaded machine more than that could pass
    # in real time between two cycles, and the next request would rightly go.
    bridge.clock.freeze()

    await bridge.deliver()

    assert len(bridge.fake.requests) == 1
    assert await bridge.states() == {"pending": 6}


async def test_a_rate_limited_pixel_speeds_up_again_as_requests_succeed(bridge: Bridge) -> None:
    bridge.fake.fail_next(3, "40100")
    await lead(bridge, "s0")
    await bridge.deliver()
    for _ in range(2):
        await retry_when_due(bridge)
    pacer = bridge.worker.pacers["main"]
    slowest = pacer.rate

    for i in range(1, 6):
        bridge.clock.advance(1 / pacer.rate)
        await lead(bridge, f"s{i}")
        await bridge.deliver()

    assert len(set(bridge.fake.event_ids())) == 6
    assert pacer.rate > slowest


async def test_a_token_error_holds_that_pixel_while_the_other_keeps_delivering(bridge: Bridge) -> None:
    bridge.fake.set_token(SECOND_CODE, "the-token-tiktok-expects-now")
    held = [await lead(bridge, f"h{i}", pixel=SECOND_CODE) for i in range(3)]
    await lead(bridge, "m1")

    await bridge.deliver()
    await lead(bridge, "m2")
    await bridge.deliver()

    assert sorted(bridge.fake.event_ids()) == ["m1_Lead", "m2_Lead"]
    for conversion_id in held:
        row = await bridge.row(conversion_id)
        assert (row["state"], row["attempts"], row["last_code"]) == ("pending", 0, 40001)
        assert "No permission" in row["last_error"]


async def test_a_held_pixel_is_probed_slowly_and_its_events_never_fail(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(edit=lambda s: s.update(delivery={"max_attempts": 2}))
    bridge.fake.set_token(SECOND_CODE, "the-token-tiktok-expects-now")
    conversion_id = await lead(bridge, "h1", pixel=SECOND_CODE)

    hour = 3600
    for _ in range(hour // 30):
        await bridge.deliver()
        bridge.clock.advance(30)

    probes = [r for r in bridge.fake.requests if r.pixel == SECOND_CODE]
    assert hour / HELD_PIXEL_RETRY - 1 <= len(probes) <= hour / HELD_PIXEL_RETRY + 1
    assert {r.answer_code for r in probes} == {40001}
    row = await bridge.row(conversion_id)
    assert (row["state"], row["attempts"]) == ("pending", 0)


async def test_new_conversions_for_a_held_pixel_wait_for_its_next_probe(bridge: Bridge) -> None:
    bridge.fake.set_token(SECOND_CODE, "the-token-tiktok-expects-now")
    await lead(bridge, "h0", pixel=SECOND_CODE)
    await bridge.deliver()

    # Conversions keep coming for four minutes: TikTok is not asked again with each of them.
    for i in range(1, 5):
        bridge.clock.advance(60)
        await lead(bridge, f"h{i}", pixel=SECOND_CODE)
        await bridge.deliver()
    assert len([r for r in bridge.fake.requests if r.pixel == SECOND_CODE]) == 1

    bridge.clock.advance(HELD_PIXEL_RETRY - 4 * 60)
    await bridge.deliver()
    probes = [r for r in bridge.fake.requests if r.pixel == SECOND_CODE]
    assert len(probes) == 2
    assert sorted(probes[1].event_ids) == [f"h{i}_Lead" for i in range(5)]


async def test_a_held_pixel_delivers_what_it_held_once_tiktok_accepts_the_token(bridge: Bridge) -> None:
    bridge.fake.set_token(SECOND_CODE, "the-token-tiktok-expects-now")
    held = [await lead(bridge, f"h{i}", pixel=SECOND_CODE) for i in range(3)]
    await bridge.deliver()

    # The advertiser grants the token its rights again in TikTok's Events Manager.
    bridge.fake.set_token(SECOND_CODE, SECOND_TOKEN)
    bridge.clock.advance(HELD_PIXEL_RETRY)
    await bridge.deliver()

    assert sorted(bridge.fake.event_ids()) == ["h0_Lead", "h1_Lead", "h2_Lead"]
    assert [await state_of(bridge, i) for i in held] == ["delivered"] * 3


async def test_a_held_pixel_is_logged_as_an_error_without_its_token(bridge: Bridge) -> None:
    bridge.fake.set_token(SECOND_CODE, "the-token-tiktok-expects-now")
    await lead(bridge, "h1", pixel=SECOND_CODE)

    with capture_logs() as logs:
        await bridge.deliver()

    [held] = [line for line in logs if line["event"].startswith("pixel held")]
    assert held["log_level"] == "error"
    assert (held["pixel"], held["code"]) == ("second", 40001)
    # A token fixed in the environment file is read only at a start: a reload alone would change nothing.
    assert "restart if it comes from the environment file" in held["fix"]
    assert SECOND_TOKEN not in repr(logs) and MAIN_TOKEN not in repr(logs)


async def test_a_bad_event_fails_alone_with_tiktoks_message_and_its_batch_is_delivered(
    bridge: Bridge,
) -> None:
    ids = [await lead(bridge, f"b{i}") for i in range(8)]
    bridge.fake.poison("b5_Lead", "value must be a number")

    await bridge.deliver()

    assert sorted(bridge.fake.event_ids()) == sorted(f"b{i}_Lead" for i in range(8) if i != 5)
    bad = await bridge.row(ids[5])
    assert (bad["state"], bad["last_code"]) == ("failed", 40002)
    assert "value must be a number" in bad["last_error"]
    assert await bridge.states() == {"delivered": 7, "failed": 1}


async def test_two_bad_events_in_one_batch_both_fail_and_only_they(bridge: Bridge) -> None:
    for i in range(10):
        await lead(bridge, f"b{i}")
    bridge.fake.poison("b2_Lead")
    bridge.fake.poison("b7_Lead")

    await bridge.deliver()

    failed = await bridge.store.fetchall("SELECT event_id FROM conversions WHERE state = 'failed'")
    assert sorted(row["event_id"] for row in failed) == ["b2_Lead", "b7_Lead"]
    assert len(set(bridge.fake.event_ids())) == 8


async def tiktok_refusing(
    aiohttp_server: Any, bad: set[str], message: Callable[[list[int]], str]
) -> tuple[str, list[str]]:
    """A TikTok that refuses a request carrying any of the `bad` event ids with 40002 and the message
    `message(their indices in the request)`, and accepts the others. Returns its endpoint and the
    event ids it accepted."""
    received: list[str] = []

    async def track(request: web.Request) -> web.Response:
        ids = [event["event_id"] for event in (await request.json())["data"]]
        refused = [i for i, event_id in enumerate(ids) if event_id in bad]
        if refused:
            return web.json_response({"code": 40002, "message": message(refused), "request_id": "r"})
        received.extend(ids)
        return web.json_response({"code": 0, "message": "OK", "request_id": "r"})

    return await tiktok_stand_in(aiohttp_server, track), received


async def test_a_bad_event_is_found_by_splitting_when_tiktok_does_not_say_which(
    make_bridge: BridgeFactory, aiohttp_server: Any
) -> None:
    # A TikTok whose 40002 names no event: only splitting the batch can find the bad one.
    endpoint, received = await tiktok_refusing(aiohttp_server, {"b3_Lead"}, lambda _: "Invalid parameter")
    bridge = await make_bridge(edit=lambda s: s["tiktok"].update(endpoint=endpoint))
    for i in range(9):
        await lead(bridge, f"b{i}")

    await bridge.deliver()

    assert sorted(received) == sorted(f"b{i}_Lead" for i in range(9) if i != 3)
    assert await bridge.states() == {"delivered": 8, "failed": 1}


async def test_a_refusal_naming_every_event_of_its_batch_fails_each_with_tiktoks_message(
    make_bridge: BridgeFactory, aiohttp_server: Any
) -> None:
    def every_one(indices: list[int]) -> str:
        return "; ".join(f"Batch.{i}.properties.value: invalid value" for i in indices)

    bad = {f"e{i}_Lead" for i in range(3)}
    endpoint, received = await tiktok_refusing(aiohttp_server, bad, every_one)
    bridge = await make_bridge(edit=lambda s: s["tiktok"].update(endpoint=endpoint))
    ids = [await lead(bridge, f"e{i}") for i in range(3)]

    await bridge.deliver()

    rows = [await bridge.row(i) for i in ids]
    assert [(r["state"], r["attempts"], r["last_code"]) for r in rows] == [("failed", 1, 40002)] * 3
    assert [r["last_error"] for r in rows] == ["Batch.0.properties.value: invalid value"] * 3
    assert received == []


async def test_a_refusal_naming_an_event_the_batch_does_not_have_still_finds_the_bad_one(
    make_bridge: BridgeFactory, aiohttp_server: Any
) -> None:
    # TikTok's index is read from its message: here it points past the end of a batch of three.
    wrong = "Batch.7.properties.value: invalid value"
    endpoint, received = await tiktok_refusing(aiohttp_server, {"y1_Lead"}, lambda _: wrong)
    bridge = await make_bridge(edit=lambda s: s["tiktok"].update(endpoint=endpoint))
    ids = [await lead(bridge, f"y{i}") for i in range(3)]

    await bridge.deliver()

    assert sorted(received) == ["y0_Lead", "y2_Lead"]
    bad = await bridge.row(ids[1])
    assert (bad["state"], bad["last_code"], bad["last_error"]) == ("failed", 40002, wrong)
    assert await bridge.states() == {"delivered": 2, "failed": 1}


async def test_a_batch_refused_event_by_event_is_split_at_the_pixels_pace(bridge: Bridge) -> None:
    ids = [await lead(bridge, f"w{i}") for i in range(6)]
    for i in range(6):
        bridge.fake.poison(f"w{i}_Lead")

    await bridge.deliver()

    # Every event was refused alone too, which took 2n - 1 requests ...
    assert await bridge.states() == {"failed": 6}
    assert [(await bridge.row(i))["last_code"] for i in ids] == [40002] * 6
    arrivals = [r.at for r in bridge.fake.requests]
    assert len(arrivals) == 11
    # ... spaced as the pixel's pacing spaces any requests, not sent back to back. (Less than
    # the spacing is allowed: it is kept between the requests' starts, and this measures arrivals.)
    spacing = 1 / Pacer().rate
    assert min(b - a for a, b in itertools.pairwise(arrivals)) >= spacing * 0.5


async def test_a_long_split_gives_the_cycle_back_and_goes_on_in_the_next(bridge: Bridge) -> None:
    ids = [await lead(bridge, f"v{i}") for i in range(8)]
    for i in range(8):
        bridge.fake.poison(f"v{i}_Lead")
    # Paced at 20 requests a second, a split of 8 events refused one by one takes 15 requests, 0.7 s.
    bridge.worker.split_budget = 0.4

    await bridge.worker.run_once()

    # The cycle ended with part of the batch judged and the rest due again, none of it charged.
    states = await bridge.states()
    assert 0 < states["failed"] < 8 and states["pending"] == 8 - states["failed"]
    waiting = [await bridge.row(i) for i in ids]
    assert all(row["attempts"] == 0 for row in waiting if row["state"] == "pending")
    assert await bridge.store.next_due_at() <= bridge.clock()

    await bridge.deliver()
    assert await bridge.states() == {"failed": 8}


async def test_a_split_at_a_slow_pace_waits_it_out_rather_than_starting_over_each_cycle(
    bridge: Bridge,
) -> None:
    ids = [await lead(bridge, f"q{i}") for i in range(4)]
    bridge.fake.poison("q1_Lead")
    # Rate limits have slowed the pixel to a request every 1.25 s.
    bridge.worker.pacers["main"] = Pacer(rate=0.8, min_rate=0.2)

    await bridge.worker.run_once()

    assert await bridge.states() == {"delivered": 3, "failed": 1}
    assert (await bridge.row(ids[1]))["state"] == "failed"
    assert len(bridge.fake.requests) == 3  # the batch, the bad event alone, the rest


async def test_a_pixel_taken_out_while_its_batch_is_split_leaves_what_was_answered_alone(
    bridge: Bridge,
) -> None:
    for i in range(3):
        await bridge.click(click_id=f"r{i}", ttclid=f"E.C.P.r{i}", pixel="second")
    ids = [await lead(bridge, f"r{i}") for i in range(3)]
    bridge.fake.poison("r0_Lead")
    bridge.worker.pacers["second"] = Pacer(rate=1.0, min_rate=0.2)  # a second between requests
    settings = yaml.safe_load(bridge.config.path.read_text())

    cycle = asyncio.create_task(bridge.worker.run_once())
    await bridge.fake.wait_for(lambda: len(bridge.fake.requests) == 2)  # the bad event, sent alone
    # The rest waits for its turn; meanwhile a reload takes the pixel out.
    bridge.reload({**settings, "pixels": {"main": settings["pixels"]["main"]}})
    await cycle

    rows = [await bridge.row(i) for i in ids]
    assert (rows[0]["state"], rows[0]["last_code"]) == ("failed", 40002)
    assert [(r["state"], r["attempts"], r["last_error"]) for r in rows[1:]] == [
        ("pending", 0, "its pixel is not in the config")
    ] * 2
    assert len(bridge.fake.requests) == 2


async def test_a_transient_answer_while_splitting_leaves_the_rest_of_the_batch_for_later(
    bridge: Bridge,
) -> None:
    ids = [await lead(bridge, f"t{i}") for i in range(4)]
    bridge.fake.poison("t1_Lead")
    bridge.fake.fail_request(2, "50002")  # the bad event, sent alone, meets an outage

    await bridge.deliver()

    # Nothing more was sent after the failure; the rest waits, and only the event that was sent
    # used an attempt.
    assert len(bridge.fake.requests) == 2
    assert [(await bridge.row(i))["attempts"] for i in ids] == [0, 1, 0, 0]
    assert await bridge.states() == {"pending": 4}

    await retry_when_due(bridge)
    assert sorted(bridge.fake.event_ids()) == ["t0_Lead", "t2_Lead", "t3_Lead"]
    assert await bridge.states() == {"delivered": 3, "failed": 1}


async def test_an_event_too_old_when_due_expires_and_is_never_sent(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(edit=lambda s: s.update(delivery={"max_event_age": 3600}))
    conversion_id = await lead(bridge, "old")
    bridge.clock.advance(3601)

    await bridge.deliver()

    row = await bridge.row(conversion_id)
    assert row["state"] == "expired"
    assert "max_event_age" in row["last_error"]
    assert bridge.fake.requests == []


async def test_an_expired_event_counts_under_the_pixel_it_was_meant_for(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(edit=lambda s: s.update(delivery={"max_event_age": 3600}))
    await lead(bridge, "late", pixel=SECOND_CODE)
    bridge.clock.advance(3601)

    await bridge.deliver()

    pixels = (await collect(bridge.store))["pixels"]
    assert pixels["second"]["states"]["expired"] == 1
    assert "(not yet routed)" not in pixels
    text = await (await bridge.client.get("/metrics")).text()
    assert 'bridge_events_finished_total{pixel="second",state="expired"} 1.0' in text


async def test_an_event_that_grows_too_old_while_retrying_expires(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(edit=lambda s: s.update(delivery={"max_event_age": 60}))
    bridge.fake.fail_next(1, "50002")
    conversion_id = await lead(bridge, "aging")
    await bridge.deliver()

    bridge.clock.advance(61)
    await bridge.deliver()

    assert await state_of(bridge, conversion_id) == "expired"
    assert len(bridge.fake.requests) == 1
    # The last answer's code stays beside the expiry: the one clue to why it never went through.
    row = await bridge.row(conversion_id)
    assert (row["last_code"], row["last_error"]) == (50002, "older than delivery.max_event_age")


async def test_an_outage_probe_does_not_bring_forward_an_event_already_on_its_way(bridge: Bridge) -> None:
    bridge.fake.fail_next(1, "50002")
    conversion_id = await lead(bridge, "onitsway")
    await bridge.deliver()  # failed once: waits for its retry, as probes look for
    # A probe seen from a minute ago finds it waiting, and makes it due.
    earlier = bridge.clock() - 60
    assert (await bridge.store.bring_forward(earlier, "main"))[0] == conversion_id

    [claimed] = await bridge.store.claim_due(bridge.clock(), 10, LEASE_SECONDS)

    assert claimed["id"] == conversion_id
    assert await bridge.store.bring_forward(earlier - 10, "main") is None


async def two_failed_requests_in_a_row(bridge: Bridge) -> tuple[int, int]:
    """TikTok fails two requests in a row to main, then answers again; the clock stands still after
    the first. Returns (twice, once): the event in both requests, now waiting out its second backoff
    (4 s), and one that arrived after the first failure and is due again in 2 s."""
    bridge.fake.fail_next(2, "50002")
    twice = await lead(bridge, "x1")
    bridge.clock.advance(60)
    bridge.clock.freeze()
    await bridge.deliver()
    once = await lead(bridge, "x2")
    await bridge.deliver()  # waits for the failing pixel's next request
    await retry_when_due(bridge)
    assert len(bridge.fake.requests) == 2
    assert [(await bridge.row(i))["attempts"] for i in (twice, once)] == [2, 1]
    return twice, once


async def test_the_first_success_after_two_failed_requests_sends_everything_waiting(bridge: Bridge) -> None:
    twice, once = await two_failed_requests_in_a_row(bridge)
    waiting_until = (await bridge.row(twice))["next_attempt_at"]

    await retry_when_due(bridge)  # `once` is due again, and TikTok takes it

    assert bridge.clock() < waiting_until - 1
    assert [await state_of(bridge, i) for i in (once, twice)] == ["delivered", "delivered"]
    assert sorted(bridge.fake.event_ids()) == ["x1_Lead", "x2_Lead"]


async def test_after_an_outage_ends_a_rate_limited_event_still_waits_its_second(bridge: Bridge) -> None:
    await two_failed_requests_in_a_row(bridge)
    await retry_when_due(bridge)
    assert await bridge.states() == {"delivered": 2}

    bridge.clock.advance(0.1)
    bridge.fake.fail_next(1, "40100")
    limited = await lead(bridge, "x3")
    await bridge.deliver()
    # Other conversions keep going through while it waits.
    for i in range(4):
        bridge.clock.advance(0.2)
        await lead(bridge, f"n{i}")
        await bridge.deliver()

    assert {f"n{i}_Lead" for i in range(4)} <= set(bridge.fake.event_ids())
    assert [r.answer_code for r in bridge.fake.requests if "x3_Lead" in r.event_ids] == [40100]
    assert await state_of(bridge, limited) == "pending"
    bridge.clock.advance(0.3)
    await bridge.deliver()
    assert await state_of(bridge, limited) == "delivered"


async def test_a_backlog_larger_than_a_request_is_sent_in_the_order_it_fell_due(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await make_bridge(edit=lambda s: s["tiktok"].update(batch_size=2))
    await lead(bridge, "o0")
    bridge.clock.advance(60)
    bridge.clock.freeze()
    bridge.fake.fail_next(1, "40100")
    await bridge.deliver()  # o0 is due again in a second
    # Four more arrive; each is due when it arrives, before o0.
    for i in range(1, 5):
        await lead(bridge, f"o{i}")

    bridge.clock.advance(2)
    await bridge.worker.run_once()

    assert sorted(bridge.fake.requests[1].event_ids) == ["o1_Lead", "o2_Lead"]


async def test_a_leased_event_is_sent_again_once_its_lease_runs_out(bridge: Bridge) -> None:
    conversion_id = await lead(bridge, "lease")
    # A worker claimed it and died before recording anything.
    [claimed] = await bridge.store.claim_due(bridge.clock(), 10, LEASE_SECONDS)
    assert claimed["id"] == conversion_id

    await bridge.deliver()
    assert bridge.fake.requests == []

    bridge.clock.advance(LEASE_SECONDS)
    await bridge.deliver()
    assert bridge.fake.event_ids() == ["lease_Lead"]
    assert await state_of(bridge, conversion_id) == "delivered"


def attempts_made(bridge: Bridge) -> float:
    """Requests sent to TikTok so far, as /metrics counts them."""
    return sum(
        sample.value
        for metric in bridge.runtime.metrics.attempts.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


async def test_a_fifteen_minute_outage_drains_within_a_minute_of_recovery(bridge: Bridge) -> None:
    bridge.worker.rand = random.Random(15).random
    fake = bridge.fake
    port = URL(fake.url).port
    start = bridge.clock()
    recovery = start + 15 * 60
    step = 1.0
    conversions: list[int] = []
    request_times: list[float] = []

    await fake.close()  # TikTok unreachable: every request is refused
    down = True
    while bridge.clock() < recovery + 5 * 60 and len(fake.received) < 20:
        elapsed = bridge.clock() - start
        # Conversions keep arriving during the first ten minutes of the outage.
        if len(conversions) < 20 and elapsed >= len(conversions) * 30:
            conversions.append(await lead(bridge, f"o{len(conversions)}"))
        if down and bridge.clock() >= recovery:
            await fake.start("127.0.0.1", port)
            down = False
        before = attempts_made(bridge)
        await bridge.deliver()
        if attempts_made(bridge) > before:
            request_times.append(bridge.clock())
        bridge.clock.advance(step)

    assert sorted(fake.event_ids()) == sorted(f"o{i}_Lead" for i in range(20))
    assert await bridge.states() == {"delivered": 20}
    # While TikTok was down it was asked again at least every RECOVERY_PROBE.cap seconds ...
    gaps = [b - a for a, b in itertools.pairwise(request_times)]
    assert max(gaps) <= RECOVERY_PROBE.cap + step
    # ... so everything waiting went out within a minute of its recovery,
    assert request_times[-1] - recovery <= RECOVERY_PROBE.cap + step
    # ... and no event came near its max_attempts (20 by default).
    rows = await bridge.store.fetchall("SELECT MAX(attempts) AS most FROM conversions")
    assert rows[0]["most"] <= most_tries(recovery - start) < 20


async def test_a_tiktok_that_is_down_is_not_asked_again_with_every_new_conversion(bridge: Bridge) -> None:
    bridge.worker.rand = random.Random(7).random
    fake = bridge.fake
    port = URL(fake.url).port
    await fake.close()  # TikTok unreachable: every request is refused at once
    bridge.clock.freeze()
    start = bridge.clock()
    arrived: list[int] = []
    request_times: list[float] = []

    # For two minutes a conversion arrives every half second, and the worker runs four times a second.
    while bridge.clock() < start + 120:
        if bridge.clock() >= start + len(arrived) * 0.5:
            arrived.append(await lead(bridge, f"d{len(arrived)}"))
        before = attempts_made(bridge)
        await bridge.deliver()
        if attempts_made(bridge) > before:
            request_times.append(bridge.clock())
        bridge.clock.advance(0.25)

    # TikTok was asked when the first event of the last failed request was due again, with everything
    # due by then: never sooner than the shortest first retry, not with each new conversion.
    shortest_retry = Backoff().delay(1, 0.0)
    assert min(b - a for a, b in itertools.pairwise(request_times)) >= shortest_retry
    assert len(request_times) <= 120 / shortest_retry + 1

    await fake.start("127.0.0.1", port)
    for _ in range(int(RECOVERY_PROBE.cap) + 2):
        await bridge.deliver()
        bridge.clock.advance(1)
    assert await bridge.states() == {"delivered": len(arrived)}
    assert sorted(fake.event_ids()) == sorted(f"d{i}_Lead" for i in range(len(arrived)))


async def test_a_failing_pixels_backlog_is_looked_at_once_per_probe_not_at_every_request(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await make_bridge(edit=lambda s: s["tiktok"].update(batch_size=10))
    await bridge.fake.close()  # TikTok unreachable
    bridge.clock.freeze()
    start = bridge.clock()
    for i in range(100):
        await lead(bridge, f"k{i}")
    looked_at = 0
    # Ten minutes down, a new conversion every 2 s keeping the failed events' first retries (2 s) coming.
    while bridge.clock() < start + 600:
        if bridge.clock() >= start + 300:
            looked_at += await bridge.deliver()  # claimed, whether sent or put back to wait
        else:
            await bridge.deliver()
        if round(bridge.clock() - start) % 2 == 0:
            await lead(bridge, f"n{round(bridge.clock() - start)}")
        bridge.clock.advance(1)

    # Over the last five minutes (probes a minute apart by then), the 400 waiting events were each
    # read about five times, at the probes, not at every request (every 2 to 4 s: three times as often).
    waiting = (await bridge.states())["pending"]
    assert looked_at <= waiting * 300 / (RECOVERY_PROBE.cap * (1 - RECOVERY_PROBE.jitter)) + 300
    rows = await bridge.store.fetchall("SELECT MAX(attempts) AS most FROM conversions")
    assert rows[0]["most"] < 20  # and waiting used up no attempts


def most_tries(seconds: float) -> int:
    """How many times one event can be tried in `seconds` when every try fails, at the shortest jitter."""
    backoff, at, tries = Backoff(), 0.0, 1
    while at + backoff.delay(tries, 0.0) <= seconds:
        at += backoff.delay(tries, 0.0)
        tries += 1
    return tries + 1  # and the one that succeeds


async def test_outage_probes_leave_an_events_own_retries_and_attempts_alone(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await make_bridge(edit=lambda s: s.update(delivery={"max_attempts": 8}))
    await bridge.fake.close()  # TikTok unreachable, for good
    conversion_id = await lead(bridge, "p")
    bridge.clock.freeze()  # the retries are scheduled by the test's clock alone, however slow the cycles
    start = bridge.clock()
    # The worker's jitter is pinned to its midpoint: the 8th and last try comes after these delays.
    last_try = sum(Backoff().delay(n, 0.5) for n in range(1, 8))

    while bridge.clock() < start + last_try - 1:
        await bridge.deliver()
        bridge.clock.advance(1)
    row = await bridge.row(conversion_id)
    assert (row["state"], row["attempts"]) == ("pending", 7)
    # TikTok was probed between the event's own tries, at no cost to it.
    assert attempts_made(bridge) > 7

    bridge.clock.advance(2)
    await bridge.deliver()
    row = await bridge.row(conversion_id)
    assert (row["state"], row["attempts"]) == ("failed", 8)
    assert row["last_error"].startswith("gave up after 8 attempts: connection error")
