"""Which pixel an event goes to, what each request carries, whose address is the user's, unmatched events."""

from __future__ import annotations

import io
import json
import socket
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from bridge.retry import HELD_PIXEL_RETRY
from bridge.stats import collect, format_stats
from bridge.web import create_app
from tests.conftest import MAIN_CODE, MAIN_TOKEN, SECOND_CODE, SECOND_TOKEN, Bridge, BridgeFactory

# A tracker that maps a pixel parameter and routes one status to the second pixel; it names no
# pixel of its own, so anything left unrouted goes to default_pixel.
ACME = {
    "name": "acme",
    "params": {"click_id": "cid", "status": "status", "ttclid": "ttclid", "pixel": "px"},
    "events": {"lead": "Lead", "sale": {"event": "Purchase", "pixel": "second"}},
}


async def acme_bridge(make_bridge: BridgeFactory, edit: Any = None, **tracker: Any) -> Bridge:
    return await make_bridge(edit=edit, trackers={"acme": {**ACME, **tracker}})


def sent_to(bridge: Bridge) -> dict[str, tuple[str, str | None]]:
    """event_id -> (pixel code, Access-Token) of the request that delivered it."""
    return {
        event_id: (request.pixel, request.token)
        for request in bridge.fake.requests
        if request.answer_code == 0
        for event_id in request.event_ids
    }


# -- pixel routing --------------------------------------------------------------------------------


async def test_click_pixel_given_by_name_routes_the_event_with_that_pixels_token(bridge: Bridge) -> None:
    await bridge.click(click_id="c1", ttclid="E.C.P.c1", pixel="second")
    await bridge.postback("keitaro", subid="c1", status="lead")
    await bridge.deliver()
    assert sent_to(bridge) == {"c1_Lead": (SECOND_CODE, SECOND_TOKEN)}


async def test_click_pixel_given_by_code_routes_the_event(bridge: Bridge) -> None:
    await bridge.click(click_id="c2", ttclid="E.C.P.c2", pixel=SECOND_CODE)
    await bridge.postback("keitaro", subid="c2", status="lead")
    await bridge.deliver()
    assert sent_to(bridge) == {"c2_Lead": (SECOND_CODE, SECOND_TOKEN)}


async def test_postback_pixel_parameter_routes_the_event(make_bridge: BridgeFactory) -> None:
    bridge = await acme_bridge(make_bridge)
    await bridge.postback("acme", cid="p1", status="lead", ttclid="E.C.P.p1", px=SECOND_CODE)
    await bridge.deliver()
    assert sent_to(bridge) == {"p1_Lead": (SECOND_CODE, SECOND_TOKEN)}


async def test_click_pixel_wins_over_the_postback_pixel(make_bridge: BridgeFactory) -> None:
    bridge = await acme_bridge(make_bridge)
    await bridge.click(click_id="p2", pixel="main")
    await bridge.postback("acme", cid="p2", status="lead", ttclid="E.C.P.p2", px="second")
    await bridge.deliver()
    assert sent_to(bridge) == {"p2_Lead": (MAIN_CODE, MAIN_TOKEN)}


async def test_status_route_pixel_routes_that_status_only(make_bridge: BridgeFactory) -> None:
    bridge = await acme_bridge(make_bridge)
    await bridge.postback("acme", cid="r1", status="lead", ttclid="E.C.P.r1")
    await bridge.postback("acme", cid="r1", status="sale", ttclid="E.C.P.r1")
    await bridge.deliver()
    assert sent_to(bridge) == {
        "r1_Lead": (MAIN_CODE, MAIN_TOKEN),
        "r1_Purchase": (SECOND_CODE, SECOND_TOKEN),
    }


async def test_postback_pixel_wins_over_the_status_route_pixel(make_bridge: BridgeFactory) -> None:
    bridge = await acme_bridge(make_bridge)
    await bridge.postback("acme", cid="r2", status="sale", ttclid="E.C.P.r2", px="main")
    await bridge.deliver()
    assert sent_to(bridge) == {"r2_Purchase": (MAIN_CODE, MAIN_TOKEN)}


async def test_tracker_pixel_routes_when_neither_click_nor_postback_names_one(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await acme_bridge(make_bridge, pixel="second")
    await bridge.postback("acme", cid="t1", status="lead", ttclid="E.C.P.t1")
    await bridge.deliver()
    assert sent_to(bridge) == {"t1_Lead": (SECOND_CODE, SECOND_TOKEN)}


async def test_default_pixel_routes_when_nothing_names_one(make_bridge: BridgeFactory) -> None:
    bridge = await acme_bridge(make_bridge, edit=lambda s: s.update(default_pixel="second"))
    await bridge.postback("acme", cid="d1", status="lead", ttclid="E.C.P.d1")
    await bridge.deliver()
    assert sent_to(bridge) == {"d1_Lead": (SECOND_CODE, SECOND_TOKEN)}


async def test_click_naming_an_unknown_pixel_falls_back_along_the_chain(bridge: Bridge) -> None:
    await bridge.click(click_id="u1", ttclid="E.C.P.u1", pixel="CNOSUCHPIXEL")
    _, body = await bridge.postback("keitaro", subid="u1", status="lead")
    await bridge.deliver()
    row = await bridge.row(body["conversion_id"])
    assert row["state"] == "delivered"
    assert sent_to(bridge) == {"u1_Lead": (MAIN_CODE, MAIN_TOKEN)}
    metrics = await (await bridge.client.get("/metrics")).text()
    assert 'bridge_identifiers_dropped_total{field="pixel"} 1.0' in metrics


async def test_an_event_whose_pixel_left_the_config_waits_for_it_and_goes_nowhere_else(
    bridge: Bridge,
) -> None:
    await bridge.click(click_id="u2", ttclid="E.C.P.u2", pixel="second")
    _, body = await bridge.postback("keitaro", subid="u2", status="lead")
    settings = yaml.safe_load(bridge.config.path.read_text())
    bridge.reload({**settings, "pixels": {"main": settings["pixels"]["main"]}})

    await bridge.deliver()
    row = await bridge.row(body["conversion_id"])
    assert (row["state"], row["sent_pixel"], row["attempts"]) == ("pending", "second", 0)
    assert row["last_error"] == "its pixel is not in the config"
    assert bridge.fake.requests == []

    bridge.reload(settings)
    bridge.clock.advance(HELD_PIXEL_RETRY)
    await bridge.deliver()
    assert sent_to(bridge) == {"u2_Lead": (SECOND_CODE, SECOND_TOKEN)}


async def test_events_whose_pixel_left_the_config_are_looked_at_again_only_every_held_pixel_retry(
    bridge: Bridge, log_text: io.StringIO
) -> None:
    await bridge.click(click_id="u3", ttclid="E.C.P.u3", pixel="second")
    await bridge.postback("keitaro", subid="u3", status="lead")
    settings = yaml.safe_load(bridge.config.path.read_text())
    bridge.reload({**settings, "pixels": {"main": settings["pixels"]["main"]}})
    bridge.clock.freeze()

    assert await bridge.deliver() == 1
    bridge.clock.advance(HELD_PIXEL_RETRY - 1)
    assert await bridge.deliver() == 0
    bridge.clock.advance(2)
    assert await bridge.deliver() == 1

    lines = [json.loads(line) for line in log_text.getvalue().splitlines()]
    waits = [line for line in lines if line["event"] == "events wait: their pixel is not in the config"]
    assert [(line["pixel"], line["events"], line["retry_in"]) for line in waits] == [
        ("second", 1, HELD_PIXEL_RETRY)
    ] * 2


async def test_postback_naming_an_unknown_pixel_is_400(make_bridge: Any) -> None:
    tracker = {
        "name": "net",
        "params": {"click_id": "cid", "status": "st", "ttclid": "tt", "pixel": "px"},
        "events": {"ok": "Lead"},
    }
    bridge = await make_bridge(trackers={"net": tracker})
    status, body = await bridge.postback("net", cid="p1", st="ok", tt="E.C.P.p", px="CNOSUCHPIXEL")
    assert status == 400
    assert body["error"].startswith("pixel:")
    assert await bridge.states() == {}


# -- test_event_code and batches ----------------------------------------------------------------------


def with_test_code(settings: dict[str, Any]) -> None:
    settings["pixels"]["second"]["test_event_code"] = "TEST42"


async def test_test_event_code_is_sent_at_the_top_level_for_its_pixel_only(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await make_bridge(edit=with_test_code)
    await bridge.click(click_id="m1", ttclid="E.C.P.m1", pixel="main")
    await bridge.click(click_id="s1", ttclid="E.C.P.s1", pixel="second")
    for click_id in ("m1", "s1"):
        await bridge.postback("keitaro", subid=click_id, status="lead")
    await bridge.deliver()

    bodies = {request.pixel: request.body for request in bridge.fake.requests}
    assert bodies[SECOND_CODE]["test_event_code"] == "TEST42"
    assert "test_event_code" not in bodies[MAIN_CODE]
    assert all("test_event_code" not in event for body in bodies.values() for event in body["data"])


async def test_a_batch_never_mixes_pixels_or_test_codes(make_bridge: BridgeFactory) -> None:
    def edit(settings: dict[str, Any]) -> None:
        # Same pixel code as main, but test events: they must travel in requests of their own.
        settings["pixels"]["main_test"] = {
            "code": MAIN_CODE,
            "access_token": MAIN_TOKEN,
            "test_event_code": "TEST42",
        }

    bridge = await make_bridge(edit=edit)
    routes = {"main": (MAIN_CODE, None), "second": (SECOND_CODE, None), "main_test": (MAIN_CODE, "TEST42")}
    expected: dict[str, tuple[str, str | None]] = {}
    for i in range(12):
        pixel = ("main", "second", "main_test")[i % 3]
        await bridge.click(click_id=f"x{i}", ttclid=f"E.C.P.x{i}", pixel=pixel)
        await bridge.postback("keitaro", subid=f"x{i}", status="lead")
        expected[f"x{i}_Lead"] = routes[pixel]
    await bridge.deliver()

    sent = [(request.pixel, request.body.get("test_event_code")) for request in bridge.fake.requests]
    assert sorted(sent, key=str) == sorted(routes.values(), key=str)
    for request in bridge.fake.requests:
        route = (request.pixel, request.body.get("test_event_code"))
        assert {expected[event_id] for event_id in request.event_ids} == {route}
    assert len(bridge.fake.received) == 12


# -- whose address is the user's -------------------------------------------------------------------


async def click_ip(bridge: Bridge, click_id: str, headers: Any) -> str | None:
    resp = await bridge.client.get("/click", params={"click_id": click_id}, headers=headers)
    assert resp.status == 204
    [row] = await bridge.store.fetchall("SELECT ip FROM clicks WHERE click_id = ?", (click_id,))
    return row["ip"]


def trust_loopback(settings: dict[str, Any]) -> None:
    settings["server"]["trusted_proxies"] = ["127.0.0.0/8"]


async def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(bridge: Bridge) -> None:
    ip = await click_ip(bridge, "f1", {"X-Forwarded-For": "203.0.113.9"})
    assert ip == "127.0.0.1"


async def test_x_forwarded_for_from_a_trusted_proxy_gives_the_clients_address(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await make_bridge(edit=trust_loopback)
    assert await click_ip(bridge, "f2", {"X-Forwarded-For": "203.0.113.9"}) == "203.0.113.9"


async def test_address_a_client_prepends_to_x_forwarded_for_is_not_believed(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await make_bridge(edit=trust_loopback)
    # The client sent "6.6.6.6"; the proxy appended the address it really saw.
    assert await click_ip(bridge, "f3", {"X-Forwarded-For": "6.6.6.6, 203.0.113.9"}) == "203.0.113.9"


async def test_forged_x_forwarded_for_line_before_the_proxys_line_is_not_believed(
    make_bridge: BridgeFactory,
) -> None:
    from multidict import CIMultiDict

    bridge = await make_bridge(edit=trust_loopback)
    headers = CIMultiDict([("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "203.0.113.9")])
    assert await click_ip(bridge, "f4", headers) == "203.0.113.9"


@pytest.mark.parametrize("first_hop", ["10.0.0.7", "::ffff:10.0.0.7"])
async def test_when_every_forwarded_hop_is_a_trusted_proxy_the_first_hop_is_the_client(
    make_bridge: BridgeFactory, first_hop: str
) -> None:
    # A visitor on the proxies' own network (an office behind them, a health check).
    def trust(settings: dict[str, Any]) -> None:
        settings["server"]["trusted_proxies"] = ["127.0.0.0/8", "10.0.0.0/8"]

    bridge = await make_bridge(edit=trust)
    assert await click_ip(bridge, "t1", {"X-Forwarded-For": f"{first_hop}, 10.0.0.5"}) == "10.0.0.7"


async def test_ipv4_addresses_written_as_ipv6_count_as_ipv4(make_bridge: BridgeFactory) -> None:
    # What a proxy listening on a dual-stack socket writes for an IPv4 client: `::ffff:a.b.c.d`.
    def trust(settings: dict[str, Any]) -> None:
        settings["server"]["trusted_proxies"] = ["127.0.0.0/8", "10.0.0.0/8"]

    bridge = await make_bridge(edit=trust)
    assert await click_ip(bridge, "m1", {"X-Forwarded-For": "::ffff:203.0.113.9"}) == "203.0.113.9"
    # A trusted proxy's own hop, written so, is still a trusted proxy's and skipped.
    chain = {"X-Forwarded-For": "203.0.113.7, ::ffff:10.0.0.5"}
    assert await click_ip(bridge, "m2", chain) == "203.0.113.7"

    await bridge.postback("keitaro", subid="m3", status="lead", ip="::ffff:198.51.100.4", user_agent="UA")
    await bridge.deliver()
    [event] = bridge.fake.received
    assert event["user"]["ip"] == "198.51.100.4"


def dual_stack_socket(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
    """An IPv6 socket that takes IPv4 connections too, as a listener on `::` does by default on Linux."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, port))
    return sock


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="the kernel has no IPv6")
async def test_a_click_an_ipv4_client_sends_to_a_dual_stack_listener_is_stored_with_its_ipv4_address(
    bridge: Bridge,
) -> None:
    # The socket reports the client as ::ffff:127.0.0.1.
    server = TestServer(create_app(bridge.runtime), host="::ffff:127.0.0.1", socket_factory=dual_stack_socket)
    async with TestClient(server) as client:
        url = f"http://127.0.0.1:{client.port}/click"
        async with client.session.get(url, params={"click_id": "ds1", "ttclid": "E.C.P.ds1"}) as resp:
            assert resp.status == 204

    [row] = await bridge.store.fetchall("SELECT ip FROM clicks WHERE click_id = 'ds1'")
    assert row["ip"] == "127.0.0.1"


async def test_postback_source_address_is_never_the_users_ip(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(edit=trust_loopback)
    await bridge.client.get(
        "/postback/keitaro",
        params={"subid": "s1", "status": "lead", "external_id": "E.C.P.s1"},
        headers={"X-Forwarded-For": "203.0.113.9", "User-Agent": "Keitaro-cron"},
    )
    await bridge.deliver()
    [event] = bridge.fake.received
    assert event["user"] == {"ttclid": "E.C.P.s1"}


# -- a click never overwrites what an earlier registration set ---------------------------------------


async def test_second_registration_of_a_click_does_not_overwrite_earlier_fields(bridge: Bridge) -> None:
    await bridge.click(
        click_id="w1",
        ttclid="E.C.P.first",
        ttp="ttp-first",
        pixel="second",
        url="https://lp.example/first",
        headers={"User-Agent": "UA first"},
    )
    await bridge.click(
        click_id="w1",
        ttclid="E.C.P.second",
        ttp="ttp-second",
        pixel="main",
        url="https://lp.example/second",
        headers={"User-Agent": "UA second"},
    )
    [row] = await bridge.store.fetchall(
        "SELECT ttclid, ttp, pixel, url, user_agent FROM clicks WHERE click_id = 'w1'"
    )
    assert tuple(row) == ("E.C.P.first", "ttp-first", "second", "https://lp.example/first", "UA first")


async def test_later_registration_fills_fields_the_first_left_empty(bridge: Bridge) -> None:
    await bridge.click(click_id="w2", ttclid="E.C.P.w2")
    # The TikTok pixel set _ttp only after the first beacon went out.
    await bridge.click(click_id="w2", ttclid="E.C.P.other", ttp="ttp-later")
    [row] = await bridge.store.fetchall("SELECT ttclid, ttp FROM clicks WHERE click_id = 'w2'")
    assert tuple(row) == ("E.C.P.w2", "ttp-later")


# -- events without any match key ----------------------------------------------------------------------


async def test_event_without_any_match_key_is_unmatched_and_not_sent(bridge: Bridge) -> None:
    _, body = await bridge.postback("keitaro", subid="n1", status="lead")
    await bridge.deliver()
    assert (await bridge.row(body["conversion_id"]))["state"] == "unmatched"
    assert bridge.fake.requests == []


async def test_an_unmatched_event_counts_no_attempt(bridge: Bridge) -> None:
    _, body = await bridge.postback("keitaro", subid="n6", status="lead")
    await bridge.deliver()
    row = await bridge.row(body["conversion_id"])
    assert (row["state"], row["attempts"]) == ("unmatched", 0)


async def test_ip_without_user_agent_is_not_a_match_key(bridge: Bridge) -> None:
    _, body = await bridge.postback("keitaro", subid="n2", status="lead", ip="177.12.34.56")
    await bridge.deliver()
    assert (await bridge.row(body["conversion_id"]))["state"] == "unmatched"


async def test_unmatched_events_are_counted_per_pixel_in_stats(bridge: Bridge) -> None:
    await bridge.postback("keitaro", subid="n3", status="lead")
    await bridge.postback("keitaro", subid="n4", status="lead")
    await bridge.postback("keitaro", subid="ok", status="lead", external_id="E.C.P.ok")
    await bridge.deliver()

    summary = await collect(bridge.store)
    assert summary["pixels"]["main"]["states"]["unmatched"] == 2
    assert summary["totals"]["unmatched"] == 2
    assert "unmatched (no match key at all): 2" in format_stats(summary)


async def test_unmatched_events_are_counted_in_metrics(bridge: Bridge) -> None:
    await bridge.postback("keitaro", subid="n5", status="lead")
    await bridge.deliver()
    text = await (await bridge.client.get("/metrics")).text()
    assert 'bridge_events_finished_total{pixel="main",state="unmatched"} 1.0' in text


# -- match-key coverage in stats -----------------------------------------------------------------------


async def test_stats_shows_per_pixel_share_of_events_carrying_each_match_key(bridge: Bridge) -> None:
    ua = {"User-Agent": "Mozilla/5.0 (iPhone)"}
    await bridge.click(click_id="k1", ttclid="E.C.P.k1", ttp="ttp-k1", headers=ua)
    await bridge.click(click_id="k2", ttclid="E.C.P.k2", email="k2@example.com", headers=ua)
    # k3's click comes without a User-Agent header: its ip alone is no key.
    resp = await bridge.client.get(
        "/click",
        params={"click_id": "k3", "phone": "+1 213 373 4253", "external_id": "user-3", "pixel": "second"},
        skip_auto_headers=["User-Agent"],
    )
    assert resp.status == 204
    for click_id in ("k1", "k2", "k3"):
        await bridge.postback("keitaro", subid=click_id, status="lead")
    await bridge.postback("keitaro", subid="k4", status="lead")  # no click, no key: unmatched
    await bridge.deliver()

    pixels = (await collect(bridge.store))["pixels"]
    assert pixels["main"]["coverage"] == {
        "ttclid": 0.6667,
        "ttp": 0.3333,
        "ip_ua": 0.6667,
        "email": 0.3333,
        "phone": 0.0,
        "external_id": 0.0,
    }
    assert pixels["main"]["events_examined"] == 3
    assert pixels["main"]["states"]["unmatched"] == 1
    assert pixels["second"]["coverage"] == {
        "ttclid": 0.0,
        "ttp": 0.0,
        "ip_ua": 0.0,
        "email": 0.0,
        "phone": 1.0,
        "external_id": 1.0,
    }
