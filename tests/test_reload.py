"""SIGHUP reloads (a fixed token frees a held pixel, a broken config is refused); SIGTERM stops cleanly."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from bridge.daemon import Daemon
from bridge.sdnotify import Notifier
from bridge.worker import LEASE_SECONDS, Worker
from tests.conftest import (
    MAIN_CODE,
    SECOND_CODE,
    SECOND_TOKEN,
    Bridge,
    BridgeFactory,
    base_settings,
    tiktok_stand_in,
    until,
    write_config,
)
from tests.daemon_proc import DaemonProcess, free_port
from tests.fake_tiktok import FakeTikTok

WRONG_TOKEN = "a-token-tiktok-refuses-0000"
ROTATED_TOKEN = "token-main-rotated-0123456789"


async def sighup(bridge: Bridge, edit: Callable[[dict[str, Any]], Any]) -> None:
    """The operator edits the config file and reloads, as SIGHUP does."""
    settings = yaml.safe_load(bridge.config.path.read_text())
    edit(settings)
    bridge.config.path.write_text(yaml.safe_dump(settings))
    daemon = Daemon(bridge.config, notifier=Notifier.from_env({}))
    daemon.runtime, daemon.worker = bridge.runtime, bridge.worker
    assert await daemon.reload()


async def sighup_with_token(bridge: Bridge, pixel: str, token: str) -> None:
    """The operator puts a new access token into the config file and reloads."""
    await sighup(bridge, lambda settings: settings["pixels"][pixel].update(access_token=token))


@pytest.fixture
def settings(fake: FakeTikTok) -> dict[str, Any]:
    settings = base_settings(fake.url)
    settings["server"]["port"] = free_port()
    return settings


@pytest.fixture
async def daemon(tmp_path: Path, settings: dict[str, Any]) -> AsyncIterator[DaemonProcess]:
    """The daemon, not yet started; its config is written when the test starts it."""
    proc = DaemonProcess(tmp_path / "bridge.yaml", settings["server"]["port"])
    yield proc
    proc.stop()


async def start(daemon: DaemonProcess, settings: dict[str, Any]) -> None:
    write_config(daemon.config.parent, settings)
    daemon.start()
    await daemon.wait_ready()


def rewrite(daemon: DaemonProcess, settings: dict[str, Any]) -> None:
    daemon.config.write_text(yaml.safe_dump(settings))


async def lead(daemon: DaemonProcess, click_id: str, pixel: str | None = None) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        if pixel is not None:
            async with session.get(
                f"{daemon.url}/click", params={"click_id": click_id, "pixel": pixel}
            ) as resp:
                assert resp.status == 204
        params = {"subid": click_id, "external_id": f"E.C.P.{click_id}", "status": "lead"}
        async with session.get(f"{daemon.url}/postback/keitaro", params=params) as resp:
            assert resp.status == 200
            return await resp.json()


def rows(daemon: DaemonProcess) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(daemon.config.parent / "bridge.db")
    try:
        return db.execute("SELECT event_id, state FROM conversions ORDER BY id").fetchall()
    finally:
        db.close()


async def start_with_second_held(
    daemon: DaemonProcess, settings: dict[str, Any], click_ids: list[str], pixel: str
) -> None:
    """Start with a token TikTok refuses for pixel `second`, and a lead per click id routed to it
    (`pixel` names it, by name or code) that TikTok has refused: the pixel is held."""
    settings["pixels"]["second"]["access_token"] = WRONG_TOKEN
    await start(daemon, settings)
    for click_id in click_ids:
        await lead(daemon, click_id, pixel=pixel)
    await daemon.wait_log(lambda line: line["event"].startswith("pixel held"))


async def test_a_held_pixel_delivers_everything_it_held_once_sighup_loads_a_fixed_token(
    daemon: DaemonProcess, settings: dict[str, Any], fake: FakeTikTok
) -> None:
    await start_with_second_held(daemon, settings, [f"h{i}" for i in range(3)], SECOND_CODE)

    settings["pixels"]["second"]["access_token"] = SECOND_TOKEN
    rewrite(daemon, settings)
    daemon.signal(signal.SIGHUP)

    # Promptly: well before the next slow probe of the held pixel (HELD_PIXEL_RETRY, 5 minutes).
    await fake.wait_for(lambda: {"h0_Lead", "h1_Lead", "h2_Lead"} <= set(fake.event_ids()), timeout=10)
    assert {r.token for r in fake.requests if r.pixel == SECOND_CODE} == {WRONG_TOKEN, SECOND_TOKEN}


async def test_an_invalid_config_on_sighup_is_refused_with_its_reason_and_the_old_one_keeps_running(
    daemon: DaemonProcess, settings: dict[str, Any], fake: FakeTikTok
) -> None:
    await start(daemon, settings)
    broken = {**settings, "tiktok": {**settings["tiktok"], "timout": 5}}
    rewrite(daemon, broken)
    daemon.signal(signal.SIGHUP)

    refused = await daemon.wait_log(lambda line: line["event"].startswith("reload refused"))
    assert refused["level"] == "error"
    assert "tiktok.timout" in refused["problem"] and "unknown key" in refused["problem"]
    body = await lead(daemon, "after")
    assert body["result"] == "accepted"
    await fake.wait_for(lambda: "after_Lead" in fake.event_ids())


async def test_sigterm_lets_an_in_flight_send_end_then_exits_0_with_the_event_still_waiting(
    daemon: DaemonProcess, settings: dict[str, Any], fake: FakeTikTok
) -> None:
    # TikTok hangs; the request gives up after tiktok.timeout (2 s), within the stop grace.
    fake.hang_seconds = 30
    fake.fail_next(1, "hang")
    await start(daemon, settings)
    await lead(daemon, "inflight")
    await fake.wait_for(lambda: len(fake.requests) == 1)

    daemon.signal(signal.SIGTERM)

    assert await daemon.wait_exit(timeout=20) == 0
    assert rows(daemon) == [("inflight_Lead", "pending")]


async def test_a_send_still_hanging_at_shutdown_has_its_lease_released(
    make_bridge: BridgeFactory, fake: FakeTikTok
) -> None:
    bridge = await make_bridge(edit=lambda s: s["tiktok"].update(timeout=60))
    bridge.worker.stop_grace = 0.2
    fake.hang_seconds = 60
    fake.fail_next(1, "hang")
    bridge.worker.start()
    _, body = await bridge.postback("keitaro", subid="stuck", external_id="E.C.P.stuck", status="lead")
    await fake.wait_for(lambda: len(fake.requests) == 1)

    await bridge.worker.stop()

    row = await bridge.row(body["conversion_id"])
    assert (row["state"], row["attempts"]) == ("pending", 0)
    assert row["next_attempt_at"] <= bridge.clock()
    # Released: the next claim takes it at once instead of waiting out the lease.
    [claimed] = await bridge.store.claim_due(bridge.clock(), 10, LEASE_SECONDS)
    assert claimed["id"] == body["conversion_id"]


async def test_answers_tiktok_gave_are_recorded_when_the_worker_stops_so_a_restart_sends_nothing_again(
    bridge: Bridge,
) -> None:
    _, body = await bridge.postback("keitaro", subid="done", external_id="E.C.P.done", status="lead")
    # Another writer holds the database: TikTok accepts the event, recording its answer is refused.
    other = sqlite3.connect(bridge.config.db_path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await bridge.worker.run_once()
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert bridge.fake.event_ids() == ["done_Lead"]

    # SIGTERM before the worker's next cycle (Daemon.run stops the worker so).
    bridge.worker.start()
    await bridge.worker.stop()

    row = await bridge.row(body["conversion_id"])
    assert (row["state"], row["attempts"], row["request_id"]) == (
        "delivered",
        1,
        bridge.fake.received[0]["_request_id"],
    )
    restarted = Worker(bridge.runtime, bridge.worker.session, clock=bridge.clock)
    assert await restarted.run_once() == 0
    assert bridge.fake.event_ids() == ["done_Lead"]


async def test_a_reload_that_changes_a_failing_pixel_tries_it_at_once_not_after_the_outage_wait(
    bridge: Bridge, fake: FakeTikTok
) -> None:
    await bridge.postback("keitaro", subid="out", external_id="E.C.P.out", status="lead")
    # TikTok fails four times in a row: the pixel's next request waits 16 s (its next probe).
    fake.fail_next(4, "502html")
    await bridge.deliver()
    for _ in range(3):
        bridge.clock.advance(3600)
        await bridge.deliver()
    assert [r.http_status for r in fake.requests] == [502] * 4

    fake.set_token(MAIN_CODE, ROTATED_TOKEN)
    await sighup_with_token(bridge, "main", ROTATED_TOKEN)
    await bridge.deliver()

    assert [(r.token, r.answer_code) for r in fake.requests[4:]] == [(ROTATED_TOKEN, 0)]
    assert fake.event_ids() == ["out_Lead"]


async def test_a_token_fixed_while_a_request_with_the_old_one_is_out_is_used_at_once(
    make_bridge: BridgeFactory, aiohttp_server: Any
) -> None:
    # A TikTok that answers the wrong token's request only after the test has reloaded the config.
    arrived, answer = asyncio.Event(), asyncio.Event()
    received: list[str] = []

    async def track(request: web.Request) -> web.Response:
        ids = [event["event_id"] for event in (await request.json())["data"]]
        if request.headers["Access-Token"] != SECOND_TOKEN:
            arrived.set()
            await answer.wait()
            return web.json_response({"code": 40001, "message": "No permission", "request_id": "r1"})
        received.extend(ids)
        return web.json_response({"code": 0, "message": "OK", "request_id": "r2"})

    endpoint = await tiktok_stand_in(aiohttp_server, track)

    def wrong_token(settings: dict[str, Any]) -> None:
        settings["tiktok"]["endpoint"] = endpoint
        settings["pixels"]["second"]["access_token"] = WRONG_TOKEN

    bridge = await make_bridge(edit=wrong_token)
    await bridge.click(click_id="race", pixel=SECOND_CODE)
    await bridge.postback("keitaro", subid="race", external_id="E.C.P.race", status="lead")
    sending = asyncio.create_task(bridge.deliver())
    await asyncio.wait_for(arrived.wait(), 10)

    await sighup_with_token(bridge, "second", SECOND_TOKEN)
    answer.set()
    await sending

    # The 40001 was for the old token: no five-minute hold, the new token is tried at once.
    await bridge.deliver()
    assert received == ["race_Lead"]


async def test_a_pixel_taken_out_by_sighup_keeps_its_events_until_sighup_puts_it_back(
    daemon: DaemonProcess, settings: dict[str, Any], fake: FakeTikTok
) -> None:
    await start_with_second_held(daemon, settings, ["r0"], "second")

    second = settings["pixels"].pop("second")
    rewrite(daemon, settings)
    daemon.signal(signal.SIGHUP)
    waiting = await daemon.wait_log(
        lambda line: line["event"] == "events wait: their pixel is not in the config"
    )
    assert (waiting["pixel"], waiting["events"]) == ("second", 1)

    settings["pixels"]["second"] = {**second, "access_token": SECOND_TOKEN}
    rewrite(daemon, settings)
    daemon.signal(signal.SIGHUP)
    # Promptly, not after the wait of HELD_PIXEL_RETRY; and only ever to the pixel the click named.
    await fake.wait_for(lambda: any(r.answer_code == 0 for r in fake.requests), timeout=10)
    assert [(r.pixel, r.token, r.answer_code) for r in fake.requests] == [
        (SECOND_CODE, WRONG_TOKEN, 40001),
        (SECOND_CODE, SECOND_TOKEN, 0),
    ]
    # TikTok's answer is recorded just after it arrives.
    deadline = time.monotonic() + 10
    while rows(daemon) != [("r0_Lead", "delivered")]:
        assert time.monotonic() < deadline, rows(daemon)
        await asyncio.sleep(0.05)


async def test_sighup_that_turns_dry_run_on_warns_with_the_events_it_will_not_send(
    daemon: DaemonProcess, settings: dict[str, Any], fake: FakeTikTok
) -> None:
    await start_with_second_held(daemon, settings, ["d0", "d1"], "second")

    rewrite(daemon, {**settings, "tiktok": {**settings["tiktok"], "dry_run": True}})
    daemon.signal(signal.SIGHUP)
    warning = await daemon.wait_log(lambda line: line["event"].startswith("DRY RUN"))
    assert (warning["level"], warning["pending_events"]) == ("warning", 2)

    rewrite(daemon, settings)
    daemon.signal(signal.SIGHUP)
    await daemon.wait_log(lambda line: line["event"].startswith("tiktok.dry_run is false"))


async def a_tiktok_refusing_mains_old_token_and_holding_seconds_answer(
    aiohttp_server: Any, second_out: asyncio.Event, answer_second: asyncio.Event, accepted: list[str]
) -> str:
    """Refuses pixel main's requests until its token is rotated; answers pixel second's only once the
    test says so (a slow answer: the worker's cycle is still out meanwhile)."""

    async def track(request: web.Request) -> web.Response:
        body = await request.json()
        if body["event_source_id"] == MAIN_CODE and request.headers["Access-Token"] != ROTATED_TOKEN:
            return web.json_response({"code": 40001, "message": "No permission", "request_id": "r-held"})
        if body["event_source_id"] == SECOND_CODE:
            second_out.set()
            await answer_second.wait()
        accepted.extend(event["event_id"] for event in body["data"])
        return web.json_response({"code": 0, "message": "OK", "request_id": f"r-{len(accepted)}"})

    return await tiktok_stand_in(aiohttp_server, track)


@pytest.mark.parametrize("refused", ["in an earlier cycle", "in the same cycle"])
async def test_events_of_a_held_pixel_decided_before_a_token_fixing_reload_are_sent_at_once(
    make_bridge: BridgeFactory, aiohttp_server: Any, refused: str
) -> None:
    # The cycle decides main's events (held, or gated by the hold) before the reload lands and records
    # them after it: they must not wait out the old token's 5-minute hold.
    second_out, answer_second, accepted = asyncio.Event(), asyncio.Event(), []
    endpoint = await a_tiktok_refusing_mains_old_token_and_holding_seconds_answer(
        aiohttp_server, second_out, answer_second, accepted
    )

    def edit(settings: dict[str, Any]) -> None:
        settings["tiktok"]["endpoint"] = endpoint

    bridge = await make_bridge(edit=edit)
    await bridge.postback("keitaro", subid="a1", external_id="E.C.P.a1", status="lead")
    if refused == "in an earlier cycle":
        await bridge.deliver()
        assert "main" in bridge.worker.held_until
        await bridge.postback("keitaro", subid="a2", external_id="E.C.P.a2", status="lead")
    assert await bridge.click(click_id="b1", pixel="second") == 204
    await bridge.postback("keitaro", subid="b1", external_id="E.C.P.b1", status="lead")
    cycle = asyncio.create_task(bridge.worker.run_once())
    await asyncio.wait_for(second_out.wait(), 10)
    await until(lambda: "main" in bridge.worker.held_until, 10, "main held")

    await sighup_with_token(bridge, "main", ROTATED_TOKEN)
    answer_second.set()
    await asyncio.wait_for(cycle, 10)
    await bridge.deliver()

    expected = ["a1_Lead", "b1_Lead"] if refused == "in the same cycle" else ["a1_Lead", "a2_Lead", "b1_Lead"]
    assert sorted(accepted) == expected


async def test_events_decided_as_waiting_for_a_removed_pixel_are_sent_at_once_when_a_reload_puts_it_back(
    make_bridge: BridgeFactory, aiohttp_server: Any
) -> None:
    # The cycle decides second's event (its pixel is gone) while main's request is out; the reload that
    # puts second back lands before the cycle records it.
    main_out, answer_main, accepted = asyncio.Event(), asyncio.Event(), []

    async def track(request: web.Request) -> web.Response:
        body = await request.json()
        if body["event_source_id"] == MAIN_CODE:
            main_out.set()
            await answer_main.wait()
        accepted.extend(event["event_id"] for event in body["data"])
        return web.json_response({"code": 0, "message": "OK", "request_id": f"r-{len(accepted)}"})

    endpoint = await tiktok_stand_in(aiohttp_server, track)

    def edit(settings: dict[str, Any]) -> None:
        settings["tiktok"]["endpoint"] = endpoint

    bridge = await make_bridge(edit=edit)
    second = bridge.config.settings.pixels["second"].model_dump()
    assert await bridge.click(click_id="b1", pixel="second") == 204
    await sighup(bridge, lambda settings: settings["pixels"].pop("second"))
    await bridge.postback("keitaro", subid="b1", external_id="E.C.P.b1", status="lead")
    await bridge.postback("keitaro", subid="a1", external_id="E.C.P.a1", status="lead")
    cycle = asyncio.create_task(bridge.worker.run_once())
    await asyncio.wait_for(main_out.wait(), 10)

    await sighup(bridge, lambda settings: settings["pixels"].update(second=second))
    answer_main.set()
    await asyncio.wait_for(cycle, 10)
    await bridge.deliver()

    assert sorted(accepted) == ["a1_Lead", "b1_Lead"]
