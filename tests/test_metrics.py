"""/metrics and /readyz: what a Prometheus scrape shows after real traffic, and who may read them."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
import yaml

from tests.conftest import SECOND_CODE, Bridge, BridgeFactory, scrape, value
from tests.daemon_proc import free_port


def sale(click_id: str, **extra: Any) -> dict[str, Any]:
    return {"subid": click_id, "external_id": f"E.C.P.{click_id}", "status": "sale", "revenue": "9", **extra}


async def test_postbacks_are_counted_by_tracker_and_result(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(
        trackers={
            "locked": {"name": "locked", "key": "k-123", "params": {"click_id": "cid", "status": "status"}}
        }
    )
    before = await scrape(bridge)
    await bridge.postback("keitaro", **sale("p1"))
    await bridge.postback("keitaro", **sale("p1"))
    await bridge.postback("keitaro", subid="p2", status="trash")
    await bridge.postback("keitaro", status="sale")
    await bridge.postback("binom", clickid="b1", externalid="E.C.P.b", status="approved")
    await bridge.postback("locked", cid="c1", status="x", key="wrong")
    await bridge.postback("nosuch", subid="x")
    after = await scrape(bridge)

    def moved(tracker: str, result: str) -> float:
        name = "bridge_postbacks_total"
        return value(after, name, tracker=tracker, result=result) - value(
            before, name, tracker=tracker, result=result
        )

    assert moved("keitaro", "accepted") == 1
    assert moved("keitaro", "duplicate") == 1
    assert moved("keitaro", "ignored") == 1
    assert moved("keitaro", "rejected") == 1
    assert moved("binom", "accepted") == 1
    assert moved("locked", "forbidden") == 1
    assert moved("(unknown)", "unknown_tracker") == 1


async def test_click_registrations_are_counted(bridge: Bridge) -> None:
    before = await scrape(bridge)
    assert await bridge.click(click_id="c1", ttclid="E.C.P.1") == 204
    assert await bridge.click(click_id="c2") == 204
    assert await bridge.click(ttclid="no-click-id") == 400
    after = await scrape(bridge)

    name = "bridge_clicks_total"
    assert value(after, name, result="registered") - value(before, name, result="registered") == 2
    assert value(after, name, result="rejected") - value(before, name, result="rejected") == 1


async def test_delivery_attempts_are_counted_by_pixel_and_tiktok_code(bridge: Bridge) -> None:
    await bridge.postback("keitaro", **sale("a1"))
    await bridge.click(click_id="a2", ttclid="E.C.P.a2", pixel=SECOND_CODE)
    await bridge.postback("keitaro", **sale("a2"))
    bridge.fake.fail_next(1, "50002")
    await bridge.deliver()
    bridge.clock.advance(3600)
    await bridge.deliver()
    samples = await scrape(bridge)

    name = "bridge_delivery_attempts_total"
    attempts = {
        (pixel, code): value(samples, name, pixel=pixel, code=code)
        for pixel in ("main", "second")
        for code in ("0", "50002")
    }
    # One of the two first requests met the injected 50002; its events went again an hour later.
    assert sum(attempts.values()) == 3
    assert attempts[("main", "0")] == 1
    assert attempts[("second", "0")] == 1
    assert attempts[("main", "50002")] + attempts[("second", "50002")] == 1


async def test_delivery_attempts_label_a_timeout_apart_from_a_refused_connection(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await make_bridge(edit=lambda s: s["tiktok"].update(timeout=0.3))
    await bridge.postback("keitaro", **sale("n1"))
    bridge.fake.fail_next(1, "hang")
    await bridge.deliver()

    settings = yaml.safe_load(bridge.config.path.read_text())
    settings["tiktok"]["endpoint"] = f"http://127.0.0.1:{free_port()}/open_api/v1.3/event/track/"
    bridge.reload(settings)
    bridge.clock.advance(3600)
    await bridge.deliver()

    samples = await scrape(bridge)
    name = "bridge_delivery_attempts_total"
    assert {dict(labels)["code"]: v for (sample, labels), v in samples.items() if sample == name} == {
        "timeout": 1,
        "error": 1,
    }


async def test_events_finished_counts_an_event_once_when_it_finishes_never_its_retries(
    bridge: Bridge,
) -> None:
    await bridge.postback("keitaro", **sale("f1"))
    bridge.fake.fail_next(1, "50002")
    await bridge.deliver()

    name = "bridge_events_finished_total"
    samples = await scrape(bridge)
    assert [labels for sample, labels in samples if sample == name] == []

    bridge.clock.advance(3600)
    await bridge.deliver()
    samples = await scrape(bridge)
    assert {labels: v for (sample, labels), v in samples.items() if sample == name} == {
        frozenset({("pixel", "main"), ("state", "delivered")}): 1
    }


async def test_batch_size_histogram_counts_requests_and_events(bridge: Bridge) -> None:
    before = await scrape(bridge)
    for i in range(3):
        await bridge.postback("keitaro", **sale(f"h{i}"))
    await bridge.deliver()
    after = await scrape(bridge)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("bridge_batch_size_count") == 1
    assert moved("bridge_batch_size_sum") == 3
    assert moved("bridge_batch_size_bucket", le="5.0") == 1
    assert moved("bridge_batch_size_bucket", le="1.0") == 0


async def test_request_latency_histogram_counts_each_request_per_pixel(bridge: Bridge) -> None:
    await bridge.postback("keitaro", **sale("l1"))
    await bridge.deliver()
    samples = await scrape(bridge)
    assert value(samples, "bridge_tiktok_request_seconds_count", pixel="main") == 1
    assert value(samples, "bridge_tiktok_request_seconds_bucket", pixel="main", le="+Inf") == 1


async def test_conversions_are_counted_by_state(bridge: Bridge) -> None:
    await bridge.postback("keitaro", **sale("s1"))
    await bridge.postback("keitaro", **sale("s2"))
    await bridge.postback("keitaro", subid="s3", status="rejected")
    await bridge.postback("keitaro", subid="s4", status="lead")  # no match key at all
    await bridge.deliver()
    await bridge.postback("keitaro", **sale("s5"))
    samples = await scrape(bridge)

    name = "bridge_conversions"
    assert value(samples, name, state="delivered") == 2
    assert value(samples, name, state="ignored") == 1
    assert value(samples, name, state="unmatched") == 1
    assert value(samples, name, state="pending") == 1
    assert value(samples, name, state="failed") == 0
    assert (name, frozenset({("state", "failed")})) in samples


async def test_queue_depth_is_per_pixel_as_the_worker_routes_events(bridge: Bridge) -> None:
    await bridge.postback("keitaro", **sale("q1"))
    await bridge.postback("keitaro", **sale("q2"))
    await bridge.click(click_id="q3", pixel=SECOND_CODE)
    await bridge.postback("keitaro", **sale("q3"))
    samples = await scrape(bridge)

    assert value(samples, "bridge_queue_depth", pixel="main") == 2
    assert value(samples, "bridge_queue_depth", pixel="second") == 1

    await bridge.deliver()
    samples = await scrape(bridge)
    assert value(samples, "bridge_queue_depth", pixel="main") == 0
    assert value(samples, "bridge_queue_depth", pixel="second") == 0


async def test_a_pixel_the_config_lacks_never_becomes_a_label(bridge: Bridge) -> None:
    await bridge.click(click_id="u1", pixel="made-up-by-a-visitor")
    await bridge.postback("keitaro", **sale("u1"))
    samples = await scrape(bridge)

    assert value(samples, "bridge_queue_depth", pixel="main") == 1
    assert not any("made-up-by-a-visitor" in str(labels) for _, labels in samples)


async def test_oldest_pending_age_shows_how_long_an_event_has_waited(bridge: Bridge) -> None:
    _, body = await bridge.postback("keitaro", **sale("o1"))
    await bridge.postback("keitaro", **sale("o2"))
    db = sqlite3.connect(bridge.config.db_path)
    with db:
        db.execute(
            "UPDATE conversions SET received_at = received_at - 3600 WHERE id = ?", (body["conversion_id"],)
        )
    db.close()
    samples = await scrape(bridge)

    oldest = value(samples, "bridge_oldest_pending_seconds", pixel="main")
    assert 3600 <= oldest < 3700
    assert value(samples, "bridge_oldest_pending_seconds", pixel="second") == 0


async def test_pixel_health_drops_to_0_after_a_40001_and_returns_after_success(bridge: Bridge) -> None:
    samples = await scrape(bridge)
    assert value(samples, "bridge_pixel_healthy", pixel="main") == 1

    bridge.fake.set_token(bridge.config.pixel("main").code, "another-token")
    await bridge.postback("keitaro", **sale("t1"))
    await bridge.deliver()
    samples = await scrape(bridge)
    assert value(samples, "bridge_pixel_healthy", pixel="main") == 0
    assert value(samples, "bridge_pixel_healthy", pixel="second") == 1
    assert value(samples, "bridge_delivery_attempts_total", pixel="main", code="40001") == 1
    assert value(samples, "bridge_queue_depth", pixel="main") == 1

    bridge.fake.set_token(bridge.config.pixel("main").code, bridge.config.pixel("main").access_token)
    bridge.clock.advance(24 * 3600)
    await bridge.deliver()
    samples = await scrape(bridge)
    assert value(samples, "bridge_pixel_healthy", pixel="main") == 1
    assert value(samples, "bridge_queue_depth", pixel="main") == 0


@pytest.mark.parametrize("failure", ["50002", "502html", "reset"])
async def test_a_transient_failure_leaves_the_pixel_healthy(bridge: Bridge, failure: str) -> None:
    await bridge.postback("keitaro", **sale("w1"))
    bridge.fake.fail_next(1, failure)
    await bridge.deliver()

    samples = await scrape(bridge)
    assert value(samples, "bridge_queue_depth", pixel="main") == 1
    assert value(samples, "bridge_pixel_healthy", pixel="main") == 1


# -- who may read /metrics and /readyz ----------------------------------------------------------------

TOKEN = "scrape-token-0123456789"


def lock_down(settings: dict[str, Any]) -> None:
    # The test client connects from 127.0.0.1, so a network without it stands for "a stranger".
    settings["server"]["metrics_allow_ips"] = ["192.0.2.0/24"]
    settings["server"]["metrics_token"] = TOKEN


async def test_metrics_and_readyz_are_open_to_loopback_by_default(bridge: Bridge) -> None:
    assert (await bridge.client.get("/metrics")).status == 200
    assert (await bridge.client.get("/readyz")).status == 200


async def test_metrics_refused_outside_allow_ips_without_the_token(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(edit=lock_down)
    resp = await bridge.client.get("/metrics")
    assert resp.status == 403
    assert "bridge_" not in await resp.text()


async def test_readyz_refused_outside_allow_ips_without_the_token(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(edit=lock_down)
    assert (await bridge.client.get("/readyz")).status == 403


async def test_a_wrong_bearer_token_is_refused(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(edit=lock_down)
    for header in (f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer "):
        assert (await bridge.client.get("/metrics", headers={"Authorization": header})).status == 403
        assert (await bridge.client.get("/readyz", headers={"Authorization": header})).status == 403


async def test_the_bearer_token_opens_metrics_and_readyz(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(edit=lock_down)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    samples = await scrape(bridge, headers=auth)
    assert ("bridge_pixel_healthy", frozenset({("pixel", "main")})) in samples
    resp = await bridge.client.get("/readyz", headers=auth)
    assert resp.status == 200
    assert await resp.text() == "ready\n"


async def test_a_client_behind_a_trusted_proxy_is_judged_by_its_own_address(
    make_bridge: BridgeFactory,
) -> None:
    # nginx on the same host forwards the internet: the peer is loopback, the client is not.
    bridge = await make_bridge(edit=lambda s: s["server"].update(trusted_proxies=["127.0.0.1/32"]))
    forwarded = {"X-Forwarded-For": "203.0.113.50"}
    assert (await bridge.client.get("/metrics", headers=forwarded)).status == 403
    assert (await bridge.client.get("/readyz", headers=forwarded)).status == 403
    assert (await bridge.client.get("/metrics")).status == 200


async def test_healthz_stays_open_to_everyone(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge(edit=lock_down)
    assert (await bridge.client.get("/healthz")).status == 200


async def test_health_and_readiness_answer_head_requests(bridge: Bridge) -> None:
    # What uptime checkers often send.
    for path in ("/healthz", "/readyz"):
        resp = await bridge.client.head(path)
        assert resp.status == 200, path
    bridge.runtime.worker_running = False
    assert (await bridge.client.head("/readyz")).status == 503


# -- /readyz --------------------------------------------------------------------------------------------


async def test_readyz_is_503_naming_the_worker_when_it_is_not_running(bridge: Bridge) -> None:
    bridge.runtime.worker_running = False
    resp = await bridge.client.get("/readyz")
    assert resp.status == 503
    assert "worker" in await resp.text()


async def test_readyz_is_503_naming_the_database_when_it_is_closed(bridge: Bridge) -> None:
    await bridge.store.close()
    resp = await bridge.client.get("/readyz")
    assert resp.status == 503
    assert "database" in await resp.text()
