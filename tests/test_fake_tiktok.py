"""Tests that the fake TikTok Events API validates and fails the way the other tests rely on."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fake_tiktok import PATH, FakeTikTok

PIXEL = "CPIXEL0001"
TOKEN = "token-1"
EMAIL_HASH = hashlib.sha256(b"alice@example.com").hexdigest()


def make_event(i: int = 0, **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event": "Purchase",
        "event_time": 1_700_000_000 + i,
        "event_id": f"click{i}_Purchase",
        "user": {"ttclid": f"ttclid{i}", "email": [EMAIL_HASH], "ip": "203.0.113.7", "user_agent": "UA"},
        "properties": {"value": 9.5, "currency": "USD"},
        "page": {"url": "https://lander.example/"},
    }
    event.update(overrides)
    return event


def make_payload(events: list[dict[str, Any]], pixel: str = PIXEL, **top: Any) -> dict[str, Any]:
    return {
        "event_source": "web",
        "event_source_id": pixel,
        "partner_name": "postback-bridge",
        "data": events,
        **top,
    }


@pytest.fixture
async def fake() -> AsyncIterator[FakeTikTok]:
    server = FakeTikTok(tokens={PIXEL: TOKEN})
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def post(
    session: aiohttp.ClientSession, fake: FakeTikTok, body: Any, token: str | None = TOKEN
) -> tuple[int, dict[str, Any]]:
    headers = {"Access-Token": token} if token is not None else {}
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    async with session.post(
        fake.url, data=data, headers={**headers, "Content-Type": "application/json"}
    ) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_valid_batch_is_accepted_and_recorded(fake: FakeTikTok, session: aiohttp.ClientSession) -> None:
    assert fake.url.endswith(PATH)
    status, answer = await post(
        session, fake, make_payload([make_event(0), make_event(1)], test_event_code="TEST123")
    )
    assert status == 200
    assert answer["code"] == 0 and answer["message"] == "OK" and answer["data"] == {}
    assert fake.event_ids() == ["click0_Purchase", "click1_Purchase"]
    first = fake.received[0]
    assert first["_pixel"] == PIXEL
    assert first["_test_event_code"] == "TEST123"
    assert first["_request_id"] == answer["request_id"]
    assert fake.requests[0].answer_code == 0
    assert fake.requests[0].event_ids == ["click0_Purchase", "click1_Purchase"]


async def test_request_ids_are_unique(fake: FakeTikTok, session: aiohttp.ClientSession) -> None:
    ids = set()
    for i in range(5):
        _, answer = await post(session, fake, make_payload([make_event(i)]))
        ids.add(answer["request_id"])
    assert len(ids) == 5


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"event_time": 1_700_000_000_000}, "Batch.1.event_time"),  # milliseconds
        ({"event_time": 1_700_000_000.5}, "Batch.1.event_time"),
        ({"event_time": True}, "Batch.1.event_time"),
        ({"event_time": 12345}, "Batch.1.event_time"),
        ({"event": ""}, "Batch.1.event"),
        ({"event_id": 12345}, "Batch.1.event_id: not a valid string"),
        ({"test_event_code": "TEST123"}, "Batch.1.test_event_code"),
        ({"user": {"email": "alice@example.com"}}, "Batch.1.user.email"),
        ({"user": {"phone": [EMAIL_HASH.upper()]}}, "Batch.1.user.phone"),
        ({"user": {"ttclid": 42}}, "Batch.1.user.ttclid"),
        ({"properties": {"value": "9.50"}}, "Batch.1.properties.value"),
        ({"properties": {"value": True}}, "Batch.1.properties.value"),
        ({"properties": {"value": 1, "currency": "usd"}}, "Batch.1.properties.currency"),
        ({"page": {"url": 7}}, "Batch.1.page.url"),
    ],
)
async def test_one_invalid_event_rejects_the_whole_batch(
    fake: FakeTikTok, session: aiohttp.ClientSession, overrides: dict[str, Any], field: str
) -> None:
    status, answer = await post(session, fake, make_payload([make_event(0), make_event(1, **overrides)]))
    assert status == 200
    assert answer["code"] == 40002
    assert answer["message"].startswith(field)
    assert fake.received == []
    assert fake.requests[0].answer_code == 40002


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (make_payload([make_event()], event_source="app"), "event_source"),
        (make_payload([make_event()], pixel=""), "event_source_id"),
        (make_payload([]), "data"),
        (make_payload([make_event(i) for i in range(1001)]), "data"),
        (make_payload([make_event()], partner_name=5), "partner_name"),
        (make_payload([make_event()], test_event_code=5), "test_event_code"),
    ],
)
async def test_invalid_top_level_is_rejected(
    fake: FakeTikTok, session: aiohttp.ClientSession, body: dict[str, Any], field: str
) -> None:
    status, answer = await post(session, fake, body)
    assert (status, answer["code"]) == (200, 40002)
    assert answer["message"].startswith(field)
    assert fake.received == []


async def test_thousand_events_is_the_limit(fake: FakeTikTok, session: aiohttp.ClientSession) -> None:
    _, answer = await post(session, fake, make_payload([make_event(i) for i in range(1000)]))
    assert answer["code"] == 0
    assert len(fake.received) == 1000


async def test_invalid_json_is_40002_with_http_200(fake: FakeTikTok, session: aiohttp.ClientSession) -> None:
    for body in ('{"event_source": "web",', '{"data": NaN}', "[1, 2]"):
        status, answer = await post(session, fake, body)
        assert (status, answer["code"]) == (200, 40002)
    assert [r.body for r in fake.requests] == [None, None, None]


async def test_token_is_checked_per_pixel(fake: FakeTikTok, session: aiohttp.ClientSession) -> None:
    _, answer = await post(session, fake, make_payload([make_event()]), token="wrong")
    assert answer["code"] == 40001
    assert "No permission to operate pixel" in answer["message"]
    _, answer = await post(session, fake, make_payload([make_event()]), token=None)
    assert answer["code"] == 40001
    _, answer = await post(session, fake, make_payload([make_event()], pixel="OTHERPIXEL"), token="anything")
    assert answer["code"] == 0
    assert fake.event_ids() == ["click0_Purchase"]
    assert [r.answer_code for r in fake.requests] == [40001, 40001, 0]
    assert fake.requests[0].token == "wrong" and fake.requests[1].token is None

    fake.set_token(PIXEL, "rotated")
    _, answer = await post(session, fake, make_payload([make_event()]), token="rotated")
    assert answer["code"] == 0


async def test_poison_rejects_the_batch_naming_the_event_index(
    fake: FakeTikTok, session: aiohttp.ClientSession
) -> None:
    fake.poison("click2_Purchase")
    fake.poison("click9_Purchase", "value too large")
    _, answer = await post(session, fake, make_payload([make_event(i) for i in range(4)]))
    assert answer["code"] == 40002
    assert answer["message"] == "Batch.2.properties.value: invalid value"
    _, answer = await post(session, fake, make_payload([make_event(9)]))
    assert answer["message"] == "Batch.0.properties.value: value too large"
    assert fake.received == []

    _, answer = await post(session, fake, make_payload([make_event(0), make_event(1), make_event(3)]))
    assert answer["code"] == 0
    assert fake.event_ids() == ["click0_Purchase", "click1_Purchase", "click3_Purchase"]


async def test_failures_are_served_in_queue_order_before_validation(
    fake: FakeTikTok, session: aiohttp.ClientSession
) -> None:
    fake.fail_next(2, "50002")
    fake.fail_next(1, "40700")
    fake.fail_next(1, "40100")
    fake.fail_next(1, "429")
    fake.fail_next(1, "502html")
    fake.fail_next(1, "nonjson")
    seen = []
    wrong_token = {"Access-Token": "x"}
    for i in range(8):
        # A wrong token would be 40001 if validation ran first; injected failures win.
        async with session.post(fake.url, json=make_payload([make_event(i)]), headers=wrong_token) as r:
            text = await r.text()
            code = json.loads(text)["code"] if r.content_type == "application/json" else None
            seen.append((r.status, r.content_type, code))
    assert seen == [
        (200, "application/json", 50002),
        (200, "application/json", 50002),
        (200, "application/json", 40700),
        (200, "application/json", 40100),
        (429, "application/json", 40100),
        (502, "text/html", None),
        (200, "text/plain", None),
        (200, "application/json", 40001),
    ]
    assert [(r.http_status, r.answer_code) for r in fake.requests] == [(s, c) for s, _, c in seen]
    assert fake.received == []


async def test_reset_drops_the_connection(fake: FakeTikTok, session: aiohttp.ClientSession) -> None:
    fake.fail_next(1, "reset")
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, fake, make_payload([make_event(0)]))
    assert fake.requests[0].http_status == 0
    _, answer = await post(session, fake, make_payload([make_event(1)]))
    assert answer["code"] == 0
    assert fake.event_ids() == ["click1_Purchase"]


async def test_hang_times_out_the_client_and_records_nothing(
    fake: FakeTikTok, session: aiohttp.ClientSession
) -> None:
    fake.fail_next(1, "hang")
    with pytest.raises(asyncio.TimeoutError):
        await session.post(
            fake.url,
            json=make_payload([make_event(0)]),
            headers={"Access-Token": TOKEN},
            timeout=aiohttp.ClientTimeout(total=0.2),
        )
    assert len(fake.requests) == 1
    assert fake.received == []


async def test_close_cancels_a_hanging_request(session: aiohttp.ClientSession) -> None:
    server = FakeTikTok()
    await server.start()
    server.fail_next(1, "hang")
    client = asyncio.create_task(post(session, server, make_payload([make_event()])))
    await server.wait_for(lambda: len(server.requests) == 1)
    async with asyncio.timeout(5):  # far below hang_seconds (30)
        await server.close()
        with pytest.raises(aiohttp.ClientConnectionError):
            await client
    assert server.received == []


async def test_wait_for_fails_with_a_useful_message(fake: FakeTikTok) -> None:
    with pytest.raises(AssertionError, match="0 events received"):
        await fake.wait_for(lambda: len(fake.received) > 0, timeout=0.05)


async def test_standalone_prints_url_and_summary(session: aiohttp.ClientSession) -> None:
    script = Path(__file__).with_name("fake_tiktok.py")
    args = ["--port", "0", "--host", "127.0.0.1", "--token", f"{PIXEL}={TOKEN}"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        *args,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            url = (await proc.stdout.readline()).decode().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith(PATH)
        for events in ([make_event(0), make_event(1)], [make_event(1)]):
            async with session.post(url, json=make_payload(events), headers={"Access-Token": TOKEN}) as r:
                assert (await r.json())["code"] == 0
        async with session.post(url, json=make_payload([make_event(2)]), headers={"Access-Token": "no"}) as r:
            assert (await r.json())["code"] == 40001
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            rest, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert json.loads(rest.decode().strip()) == {"requests": 3, "events": 3, "unique_event_ids": 2}
