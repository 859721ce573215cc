"""`stats` and `failed list | retry`: what an operator sees of delivery, and how dead letters go back."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from typing import Any

import pytest
import yaml
from aiohttp import web

from bridge.cli import main
from bridge.config import load_config
from bridge.retry import HELD_PIXEL_RETRY
from tests.conftest import SECOND_CODE, Bridge, BridgeFactory, tiktok_stand_in


async def cli(capsys: pytest.CaptureFixture[str], bridge: Bridge, *args: str) -> tuple[int, str, str]:
    """Run the real command line against the bridge's config (in a thread: it runs its own loop)."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, [*args, "-c", str(bridge.config.path)])
    out, err = capsys.readouterr()
    return code, out, err


async def lead(bridge: Bridge, click_id: str, pixel: str | None = None) -> int:
    if pixel is not None:
        assert await bridge.click(click_id=click_id, pixel=pixel) == 204
    _, body = await bridge.postback("keitaro", subid=click_id, external_id=f"E.C.P.{click_id}", status="lead")
    assert body["result"] == "accepted", body
    return body["conversion_id"]


async def mixed(bridge: Bridge) -> dict[str, Any]:
    """Two delivered and one dead letter on main; two held on second (TikTok refuses its token)."""
    bridge.fake.set_token(SECOND_CODE, "the-token-tiktok-expects-now")
    ids = {
        "delivered": [await lead(bridge, "d1"), await lead(bridge, "d2")],
        "failed": [await lead(bridge, "bad")],
        "held": [await lead(bridge, "h1", SECOND_CODE), await lead(bridge, "h2", SECOND_CODE)],
    }
    bridge.fake.poison("bad_Lead", "value must be a number")
    await bridge.deliver()
    return ids


async def dead_letters(make_bridge: BridgeFactory, n: int) -> tuple[Bridge, list[int]]:
    """A bridge whose first n events failed for good (one attempt allowed, TikTok was down)."""
    bridge = await make_bridge(edit=lambda s: s.update(delivery={"max_attempts": 1}))
    ids = [await lead(bridge, f"f{i}") for i in range(n)]
    bridge.fake.fail_next(1, "50002")
    await bridge.deliver()
    assert await bridge.states() == {"failed": n}
    return bridge, ids


async def test_stats_json_counts_events_by_state_and_pixel(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    await mixed(bridge)

    code, out, _ = await cli(capsys, bridge, "stats", "--json")

    stats = json.loads(out)
    assert code == 0
    assert {k: v for k, v in stats["totals"].items() if v} == {"delivered": 2, "failed": 1, "pending": 2}
    assert {k: v for k, v in stats["pixels"]["main"]["states"].items() if v} == {"delivered": 2, "failed": 1}
    assert {k: v for k, v in stats["pixels"]["second"]["states"].items() if v} == {"pending": 2}


async def test_stats_counts_ignored_postbacks_by_reason_not_under_a_pixel(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    await lead(bridge, "d1")
    await bridge.postback("keitaro", subid="r1", status="rejected")
    await bridge.postback("keitaro", subid="r2", status="trash")
    await bridge.deliver()

    code, out, _ = await cli(capsys, bridge, "stats", "--json")
    stats = json.loads(out)
    assert code == 0
    assert {k: v for k, v in stats["totals"].items() if v} == {"delivered": 1, "ignored": 2}
    assert stats["ignored_reasons"] == {"status_not_sent": 1, "unmapped_status": 1}
    assert list(stats["pixels"]) == ["main"]
    _, text, _ = await cli(capsys, bridge, "stats")
    assert "ignored: status_not_sent 1, unmapped_status 1" in text
    assert "not yet routed" not in text


async def test_stats_says_a_pixel_sends_test_events_while_its_test_event_code_is_set(
    make_bridge: BridgeFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge = await make_bridge(edit=lambda s: s["pixels"]["main"].update(test_event_code="TEST12345"))
    await lead(bridge, "t1")
    await bridge.deliver()
    assert bridge.fake.requests[0].body["test_event_code"] == "TEST12345"

    _, text, _ = await cli(capsys, bridge, "stats")
    assert "TEST EVENTS for main: test_event_code is set in the config" in text
    _, out, _ = await cli(capsys, bridge, "stats", "--json")
    assert json.loads(out)["test_event_pixels"] == ["main"]


async def test_stats_json_shows_a_held_pixel_unhealthy_with_its_last_error(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    await mixed(bridge)

    _, out, _ = await cli(capsys, bridge, "stats", "--json")

    pixels = json.loads(out)["pixels"]
    assert pixels["main"]["healthy"] is True
    assert pixels["second"]["healthy"] is False
    assert pixels["second"]["last_code"] == 40001
    assert "No permission" in pixels["second"]["last_error"]


async def test_stats_json_shows_oldest_pending_age_and_match_key_coverage(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    await mixed(bridge)
    await asyncio.to_thread(_received_an_hour_earlier, bridge, "h1")

    _, out, _ = await cli(capsys, bridge, "stats", "--json")

    second = json.loads(out)["pixels"]["second"]
    assert 3600 <= second["oldest_pending_seconds"] < 3600 + 600
    assert second["coverage"]["ttclid"] == 1.0
    assert second["coverage"]["email"] == 0.0


async def test_stats_text_names_the_held_pixel_and_why(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    await mixed(bridge)

    code, out, _ = await cli(capsys, bridge, "stats")

    assert code == 0
    assert "pixel second: HELD" in out
    assert "reload if the token is in the config file, or restart if it comes from the environment" in out
    assert "[40001]" in out and "No permission" in out
    assert "pixel main: healthy" in out


async def test_stats_names_a_pixel_gone_from_the_config_whose_events_wait_for_it(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    await lead(bridge, "g1", "second")
    settings = yaml.safe_load(bridge.config.path.read_text())
    del settings["pixels"]["second"]
    bridge.config.path.write_text(yaml.safe_dump(settings))
    bridge.runtime.config = load_config(bridge.config.path, environ={})
    await bridge.deliver()

    _, text, _ = await cli(capsys, bridge, "stats")
    assert "pixel second: NOT IN THE CONFIG, its pending events wait for it" in text
    assert "put a pixel with this name or code back in the config and reload" in text
    _, out, _ = await cli(capsys, bridge, "stats", "--json")
    stats = json.loads(out)
    assert stats["unconfigured_pixels"] == ["second"]
    assert stats["pixels"]["second"]["states"]["pending"] == 1


async def test_stats_shows_a_pixel_healthy_again_after_its_token_is_accepted(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    await mixed(bridge)
    bridge.fake.set_token(SECOND_CODE, "token-second-0123456789")
    bridge.clock.advance(3600)
    await bridge.deliver()

    _, out, _ = await cli(capsys, bridge, "stats", "--json")

    second = json.loads(out)["pixels"]["second"]
    assert second["healthy"] is True
    assert {k: v for k, v in second["states"].items() if v} == {"delivered": 2}
    # What held it stays as the last error, its code beside its own message (not the 0 that freed it).
    assert second["last_code"] == 40001
    assert "permission" in second["last_error"].lower()


@pytest.mark.parametrize("failure", ["50002", "502html", "reset"])
async def test_stats_keeps_a_pixel_healthy_through_a_transient_failure_and_never_blames_its_token(
    bridge: Bridge, capsys: pytest.CaptureFixture[str], failure: str
) -> None:
    await lead(bridge, "t1")
    bridge.fake.fail_next(1, failure)
    await bridge.deliver()

    _, out, _ = await cli(capsys, bridge, "stats", "--json")
    main = json.loads(out)["pixels"]["main"]
    assert (main["healthy"], main["states"]["pending"]) == (True, 1)
    _, text, _ = await cli(capsys, bridge, "stats")
    assert "pixel main: healthy" in text
    assert "HELD" not in text and "token" not in text


async def test_stats_shows_the_latest_refusal_of_a_held_pixel_refused_again_for_another_reason(
    make_bridge: BridgeFactory, aiohttp_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # TikTok refuses the pixel's rights first, then (on the slow retry of the held pixel) its token.
    answers = [
        (40001, "No permission to operate pixel"),
        (40105, "Access token is incorrect or has been revoked"),
    ]

    async def track(request: web.Request) -> web.Response:
        code, message = answers.pop(0)
        return web.json_response({"code": code, "message": message, "request_id": "r1", "data": {}})

    endpoint = await tiktok_stand_in(aiohttp_server, track)
    bridge = await make_bridge(edit=lambda s: s["tiktok"].update(endpoint=endpoint))
    await lead(bridge, "h1")
    await bridge.deliver()
    bridge.clock.advance(HELD_PIXEL_RETRY)
    await bridge.deliver()
    assert answers == []

    _, out, _ = await cli(capsys, bridge, "stats", "--json")
    main = json.loads(out)["pixels"]["main"]
    assert (main["healthy"], main["last_code"]) == (False, 40105)
    assert main["last_error"] == "Access token is incorrect or has been revoked"


async def test_stats_never_pairs_a_hold_without_a_code_with_an_earlier_code(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    store, now = bridge.store, bridge.clock()
    await store.set_pixel_status("second", False, 40001, "No permission to operate pixel", now)
    # Then a token that cannot even be sent: held again, by an answer that has no code.
    unsendable = "access token has characters that cannot be sent in an HTTP header"
    await store.set_pixel_status("second", False, None, unsendable, now + 1)
    await store.set_pixel_status("second", True, None, None, now + 2)

    _, out, _ = await cli(capsys, bridge, "stats", "--json")

    second = json.loads(out)["pixels"]["second"]
    assert (second["healthy"], second["last_code"], second["last_error"]) == (True, None, unsendable)


async def test_stats_shows_a_pixel_held_before_a_restart_healthy_once_it_delivers_again(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    # What the previous run of the daemon recorded before it stopped; this run starts afresh.
    await bridge.store.set_pixel_status("second", False, 40001, "No permission", bridge.clock())
    await lead(bridge, "back", SECOND_CODE)
    await bridge.deliver()

    _, out, _ = await cli(capsys, bridge, "stats", "--json")

    assert json.loads(out)["pixels"]["second"]["healthy"] is True


async def test_failed_list_json_shows_dead_letters_with_tiktoks_message(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await mixed(bridge)

    code, out, _ = await cli(capsys, bridge, "failed", "list", "--json")

    [item] = json.loads(out)
    assert code == 0
    assert item["id"] == ids["failed"][0]
    assert (item["event"], item["event_id"], item["sent_pixel"]) == ("Lead", "bad_Lead", "main")
    assert item["last_code"] == 40002
    assert "value must be a number" in item["last_error"]


async def test_failed_list_text_shows_one_line_per_dead_letter(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await mixed(bridge)

    _, out, _ = await cli(capsys, bridge, "failed", "list")

    [line] = out.splitlines()
    assert line.startswith(f"{ids['failed'][0]}\t")
    assert "bad_Lead" in line and "[40002]" in line and "value must be a number" in line


async def test_failed_list_says_so_when_there_are_none(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    await lead(bridge, "ok")
    await bridge.deliver()

    code, out, _ = await cli(capsys, bridge, "failed", "list")

    assert (code, out.strip()) == (0, "no failed events")


async def test_failed_retry_id_requeues_it_and_it_is_delivered(
    make_bridge: BridgeFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge, ids = await dead_letters(make_bridge, 2)

    code, out, _ = await cli(capsys, bridge, "failed", "retry", str(ids[0]))
    await bridge.deliver()

    assert code == 0 and "requeued 1" in out
    assert bridge.fake.event_ids() == ["f0_Lead"]
    assert [(await bridge.row(i))["state"] for i in ids] == ["delivered", "failed"]


async def test_failed_retry_all_requeues_every_dead_letter(
    make_bridge: BridgeFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge, _ = await dead_letters(make_bridge, 3)

    code, out, _ = await cli(capsys, bridge, "failed", "retry", "--all")
    await bridge.deliver()

    assert code == 0 and "requeued 3" in out
    assert sorted(bridge.fake.event_ids()) == ["f0_Lead", "f1_Lead", "f2_Lead"]
    assert await bridge.states() == {"delivered": 3}


async def test_a_requeued_event_gets_its_max_attempts_again(
    make_bridge: BridgeFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge = await make_bridge(edit=lambda s: s.update(delivery={"max_attempts": 2}))
    conversion_id = await lead(bridge, "again")
    bridge.fake.fail_next(3, "50002")
    await bridge.deliver()
    bridge.clock.advance(60)
    await bridge.deliver()
    assert (await bridge.row(conversion_id))["state"] == "failed"

    await cli(capsys, bridge, "failed", "retry", str(conversion_id))
    await bridge.deliver()
    assert (await bridge.row(conversion_id))["state"] == "pending"
    bridge.clock.advance(60)
    await bridge.deliver()

    assert (await bridge.row(conversion_id))["state"] == "delivered"
    assert bridge.fake.event_ids() == ["again_Lead"]


async def test_retrying_an_id_that_is_not_failed_exits_non_zero_with_one_line(
    make_bridge: BridgeFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge, ids = await dead_letters(make_bridge, 1)
    delivered = await lead(bridge, "fine")
    await bridge.deliver()

    code, out, err = await cli(capsys, bridge, "failed", "retry", str(ids[0]), str(delivered), "999999")

    assert code != 0
    assert out == ""
    [line] = err.splitlines()
    assert f"{delivered} is delivered" in line and "999999 does not exist" in line
    # Nothing was requeued, not even the id that was failed.
    assert (await bridge.row(ids[0]))["state"] == "failed"


async def test_a_dead_letter_too_old_to_send_is_not_requeued_and_the_operator_is_told(
    make_bridge: BridgeFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge, ids = await dead_letters(make_bridge, 2)
    week_ago = time.time() - bridge.config.settings.delivery.max_event_age - 60
    await asyncio.to_thread(_set_event_time, bridge, ids[0], week_ago)

    code, out, err = await cli(capsys, bridge, "failed", "retry", str(ids[0]), str(ids[1]))
    assert code != 0 and out == ""
    assert f"{ids[0]} is older than delivery.max_event_age (604800 s), so it would only expire" in err
    assert await bridge.states() == {"failed": 2}

    code, out, _ = await cli(capsys, bridge, "failed", "retry", "--all")
    assert code == 0
    assert out.splitlines() == [
        "requeued 1 event(s); the running daemon sends them within a second",
        "left 1 failed: each is older than delivery.max_event_age (604800 s), so it would only expire",
    ]
    assert ((await bridge.row(ids[0]))["state"], (await bridge.row(ids[1]))["state"]) == ("failed", "pending")


def _received_an_hour_earlier(bridge: Bridge, click_id: str) -> None:
    db = sqlite3.connect(bridge.config.db_path)
    with db:
        db.execute("UPDATE conversions SET received_at = received_at - 3600 WHERE click_id = ?", (click_id,))
    db.close()


def _set_event_time(bridge: Bridge, conversion_id: int, event_time: float) -> None:
    db = sqlite3.connect(bridge.config.db_path)
    with db:
        db.execute("UPDATE conversions SET event_time = ? WHERE id = ?", (int(event_time), conversion_id))
    db.close()


async def test_failed_retry_needs_ids_or_all(bridge: Bridge, capsys: pytest.CaptureFixture[str]) -> None:
    await lead(bridge, "x")

    code, _, err = await cli(capsys, bridge, "failed", "retry")

    assert code != 0
    assert (
        err == "postback-bridge: failed retry: give the conversion IDs to retry (see failed list), or --all\n"
    )
    code, _, err = await cli(capsys, bridge, "failed", "retry", "--all", "1")
    assert code != 0
    assert err == "postback-bridge: failed retry: give conversion IDs or --all, not both\n"


async def test_retrying_an_id_beyond_what_the_database_can_hold_says_it_does_not_exist(
    make_bridge: BridgeFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge, ids = await dead_letters(make_bridge, 1)
    too_large, too_small = str(2**63), "-99999999999999999999"  # one past SQLite's INTEGER, and far below it

    code, out, err = await cli(capsys, bridge, "failed", "retry", str(ids[0]), too_large, too_small)

    assert (code, out) == (1, "")
    assert "Traceback" not in err
    assert err == (
        "postback-bridge: failed retry: nothing requeued: "
        f"{too_small} does not exist; {too_large} does not exist\n"
    )
    assert (await bridge.row(ids[0]))["state"] == "failed"
