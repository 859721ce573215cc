"""TikTok answers: classification, payload building, and the HTTP client against a real local server."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from bridge.tiktok import MAX_EVENTS_PER_REQUEST, Answer, Kind, TikTokClient, build_payload, classify

PATH = "/open_api/v1.3/event/track/"
TOKEN = "s3cr3t-token-0c9f2d7e51ab"
EVENT = {"event": "Purchase", "event_time": 1700000000, "event_id": "c1_Purchase"}
PAYLOAD = json.dumps({"event_source": "web", "event_source_id": "CPIXEL", "data": [EVENT]}).encode()


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def tiktok(code: int, message: str = "msg", request_id: str = "req-1") -> bytes:
    return body({"code": code, "message": message, "request_id": request_id, "data": {}})


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("http_status", "raw", "kind"),
    [
        pytest.param(200, tiktok(0, "OK"), Kind.DELIVERED, id="code 0 is delivered"),
        pytest.param(200, tiktok(20001), Kind.DELIVERED, id="code 20001 is delivered"),
        pytest.param(200, tiktok(40100), Kind.RATE_LIMITED, id="code 40100 is rate limited"),
        pytest.param(429, b"", Kind.RATE_LIMITED, id="HTTP 429 without body is rate limited"),
        pytest.param(
            429, b"<html>slow down</html>", Kind.RATE_LIMITED, id="HTTP 429 with HTML is rate limited"
        ),
        pytest.param(200, tiktok(40001), Kind.AUTH, id="code 40001 no permission is auth"),
        pytest.param(200, tiktok(40003), Kind.AUTH, id="code 40003 is auth"),
        pytest.param(200, tiktok(40104), Kind.AUTH, id="code 40104 empty token is auth"),
        pytest.param(200, tiktok(40105), Kind.AUTH, id="code 40105 revoked token is auth"),
        pytest.param(
            200, tiktok(40131, "Access token has expired"), Kind.AUTH, id="unknown 4xxxx about the token"
        ),
        pytest.param(200, tiktok(40002), Kind.BAD_REQUEST, id="code 40002 is a bad request"),
        pytest.param(200, tiktok(40700), Kind.TRANSIENT, id="code 40700 is transient"),
        pytest.param(200, tiktok(50002), Kind.TRANSIENT, id="code 50002 is transient"),
        pytest.param(200, tiktok(51234), Kind.TRANSIENT, id="any 5xxxx code is transient"),
        pytest.param(200, tiktok(40999), Kind.TRANSIENT, id="unknown 4xxxx code is transient"),
        pytest.param(502, b"<html><body>502 Bad Gateway</body></html>", Kind.TRANSIENT, id="HTML 502"),
        pytest.param(503, b"", Kind.TRANSIENT, id="empty 503"),
        pytest.param(200, b"", Kind.TRANSIENT, id="empty 200"),
        pytest.param(200, b"<html>maintenance</html>", Kind.TRANSIENT, id="HTML 200"),
        pytest.param(200, body({"message": "OK"}), Kind.TRANSIENT, id="JSON without code"),
        pytest.param(200, body({"code": "0"}), Kind.TRANSIENT, id="string code"),
        pytest.param(200, body({"code": True}), Kind.TRANSIENT, id="boolean code"),
        pytest.param(200, body({"code": False}), Kind.TRANSIENT, id="boolean false code is not code 0"),
        pytest.param(200, body([0]), Kind.TRANSIENT, id="JSON list"),
        pytest.param(404, b"not found", Kind.TRANSIENT, id="non-JSON 404"),
        pytest.param(500, tiktok(0), Kind.DELIVERED, id="body code 0 beats HTTP 500"),
        pytest.param(429, tiktok(0), Kind.DELIVERED, id="body code 0 beats HTTP 429"),
        pytest.param(200, tiktok(40100), Kind.RATE_LIMITED, id="body code 40100 beats HTTP 200"),
        pytest.param(502, tiktok(40002), Kind.BAD_REQUEST, id="body code 40002 beats HTTP 502"),
    ],
)
def test_each_answer_maps_to_its_kind(http_status: int, raw: bytes, kind: Kind) -> None:
    assert classify(http_status, raw).kind is kind


@pytest.mark.parametrize("code", [50000, 50002, 51234])
@pytest.mark.parametrize("message", ["Access token service unavailable", "access_token check timed out"])
def test_a_5xxxx_answer_that_mentions_the_access_token_is_transient_not_a_hold(
    code: int, message: str
) -> None:
    assert classify(200, tiktok(code, message)).kind is Kind.TRANSIENT


def test_delivered_answer_keeps_tiktoks_request_id_and_code() -> None:
    answer = classify(200, tiktok(0, "OK", "2024ABC"))
    assert answer == Answer(Kind.DELIVERED, 0, "OK", "2024ABC", 200)


def test_html_502_is_described_by_its_status() -> None:
    answer = classify(502, b"<html><body>502 Bad Gateway</body></html>")
    assert (answer.code, answer.message, answer.http_status) == (None, "HTTP 502", 502)


def test_non_json_200_says_so() -> None:
    assert classify(200, b"<html>").message == "non-JSON body"


def test_empty_body_says_so() -> None:
    assert classify(200, b"").message == "empty body"


def test_json_without_code_says_so() -> None:
    assert classify(200, body({"message": "OK"})).message == "JSON body without an integer code"


def test_non_json_4xx_names_the_status() -> None:
    assert classify(404, b"nope").message == "HTTP 404, non-JSON body"


def test_unknown_code_is_kept_for_the_operator() -> None:
    answer = classify(200, tiktok(40999, "something new"))
    assert (answer.kind, answer.code, answer.message) == (Kind.TRANSIENT, 40999, "something new")


def test_body_code_without_message_is_described_by_the_code() -> None:
    assert classify(200, body({"code": 50002})).message == "code 50002"


def test_timeout_is_transient_without_http_status() -> None:
    assert classify(None, None, "timeout") == Answer(Kind.TRANSIENT, None, "timeout", None, None)


def test_bad_request_names_the_events_tiktoks_message_points_at() -> None:
    message = (
        "Batch.3.properties.value: not a number; Batch.0.event_id: not a valid string; batch.3.page.url: bad"
    )
    assert classify(200, tiktok(40002, message)).bad_indices == (0, 3)


def test_bad_request_without_named_events_has_no_indices() -> None:
    assert classify(200, tiktok(40002, "Invalid parameters")).bad_indices == ()


def test_indices_are_only_read_from_bad_request_answers() -> None:
    assert classify(200, tiktok(50002, "Batch.1 timed out")).bad_indices == ()


def test_very_long_messages_are_shortened() -> None:
    assert len(classify(200, tiktok(40002, "x" * 50_000)).message) <= 1000


known_kinds = {0: Kind.DELIVERED, 20001: Kind.DELIVERED, 40100: Kind.RATE_LIMITED, 40001: Kind.AUTH}
known_kinds |= {40002: Kind.BAD_REQUEST, 40700: Kind.TRANSIENT, 50002: Kind.TRANSIENT}


@given(code=st.sampled_from(sorted(known_kinds)), http_status=st.integers(min_value=100, max_value=599))
def test_body_code_decides_whatever_the_http_status(code: int, http_status: int) -> None:
    answer = classify(http_status, tiktok(code))
    assert (answer.kind, answer.code, answer.http_status) == (known_kinds[code], code, http_status)


@given(
    code=st.integers().filter(lambda c: c not in {0, 20001, 40001, 40002, 40003, 40100, 40104, 40105}),
    http_status=st.integers(min_value=100, max_value=599),
)
def test_unknown_codes_are_retried_not_dropped(code: int, http_status: int) -> None:
    assert classify(http_status, tiktok(code, "unexpected")).kind is Kind.TRANSIENT


@given(error=st.text(min_size=1, max_size=200), http_status=st.none() | st.integers(100, 599))
def test_any_error_means_transient(error: str, http_status: int | None) -> None:
    answer = classify(http_status, tiktok(0), error)
    assert (answer.kind, answer.message) == (Kind.TRANSIENT, error)


@given(http_status=st.none() | st.integers(min_value=100, max_value=599), raw=st.binary(max_size=300))
def test_classify_accepts_any_bytes(http_status: int | None, raw: bytes) -> None:
    assert isinstance(classify(http_status, raw), Answer)


@given(indices=st.sets(st.integers(min_value=0, max_value=999), min_size=1, max_size=20))
def test_every_named_bad_index_is_found(indices: set[int]) -> None:
    message = "; ".join(f"Batch.{i}.properties.value: invalid" for i in indices)
    assert classify(200, tiktok(40002, message)).bad_indices == tuple(sorted(indices))


# ---------------------------------------------------------------- payload


def payload(events: list[dict[str, Any]], partner_name: str | None, test_event_code: str | None) -> Any:
    """What TikTok reads in the body built from these events (each encoded as the worker's query does)."""
    return json.loads(build_payload("CPIXEL", [json.dumps(e) for e in events], partner_name, test_event_code))


def test_payload_carries_source_pixel_partner_and_events() -> None:
    assert payload([EVENT, {**EVENT, "event_id": "c2_Purchase"}], "postback-bridge", None) == {
        "event_source": "web",
        "event_source_id": "CPIXEL",
        "partner_name": "postback-bridge",
        "data": [EVENT, {**EVENT, "event_id": "c2_Purchase"}],
    }


def test_payload_is_compact_json_with_the_events_as_given() -> None:
    event = '{"event":"Lead","event_id":"é_Lead"}'
    assert (
        build_payload("CPIXEL", [event, event], None, None)
        == ('{"event_source":"web","event_source_id":"CPIXEL","data":[' + event + "," + event + "]}").encode()
    )


def test_test_event_code_goes_at_the_top_level_only() -> None:
    body = payload([EVENT], None, "TEST123")
    assert body["test_event_code"] == "TEST123"
    assert "test_event_code" not in body["data"][0]


@pytest.mark.parametrize("test_event_code", ["", None])
def test_empty_test_event_code_is_left_out(test_event_code: str | None) -> None:
    assert "test_event_code" not in payload([EVENT], "p", test_event_code)


@pytest.mark.parametrize("partner_name", ["", None])
def test_missing_partner_name_is_left_out(partner_name: str | None) -> None:
    assert "partner_name" not in payload([EVENT], partner_name, None)


def test_payload_refuses_more_events_than_tiktok_accepts() -> None:
    with pytest.raises(ValueError, match="at most 1000"):
        build_payload("CPIXEL", [json.dumps(EVENT)] * (MAX_EVENTS_PER_REQUEST + 1), None, None)


def test_payload_refuses_an_empty_batch() -> None:
    with pytest.raises(ValueError):
        build_payload("CPIXEL", [], None, None)


# ---------------------------------------------------------------- client against a local server

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def client_for(aiohttp_server: Any, session: aiohttp.ClientSession) -> Callable[..., Awaitable[TikTokClient]]:
    """A TikTokClient pointed at an aiohttp app on 127.0.0.1 whose track endpoint is `handler`."""

    async def make(
        handler: Handler, timeout: float = 5.0, app: web.Application | None = None
    ) -> TikTokClient:
        app = app or web.Application()
        app.router.add_post(PATH, handler)
        server = await aiohttp_server(app, host="127.0.0.1")
        return TikTokClient(session, str(server.make_url(PATH)), timeout)

    return make


@pytest.fixture
async def raw_client_for(
    session: aiohttp.ClientSession,
) -> AsyncIterator[Callable[[RawHandler], Awaitable[TikTokClient]]]:
    """A TikTokClient pointed at a bare TCP server, for answers no well-behaved HTTP server gives."""
    servers: list[asyncio.Server] = []

    async def make(on_connect: RawHandler) -> TikTokClient:
        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return TikTokClient(session, f"http://127.0.0.1:{port}{PATH}", 5.0)

    yield make
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> None:
    """Consume one request, so closing the socket sends a clean FIN rather than a reset."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            await reader.readexactly(int(value))


async def test_send_carries_token_and_json_content_type(client_for: Any) -> None:
    seen: dict[str, str | None] = {}

    async def handler(request: web.Request) -> web.Response:
        seen["token"] = request.headers.get("Access-Token")
        seen["content_type"] = request.headers.get("Content-Type")
        return web.json_response({"code": 0, "message": "OK", "request_id": "r1", "data": {}})

    client = await client_for(handler)
    await client.send(TOKEN, PAYLOAD)
    assert seen == {"token": TOKEN, "content_type": "application/json"}


async def test_send_posts_the_body_as_given(client_for: Any) -> None:
    received: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response({"code": 0, "message": "OK", "request_id": "r1", "data": {}})

    client = await client_for(handler)
    await client.send(TOKEN, PAYLOAD)
    assert received == [PAYLOAD]


async def test_send_returns_tiktoks_json_answer(client_for: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"code": 0, "message": "OK", "request_id": "202401010000ABC", "data": {}})

    client = await client_for(handler)
    assert await client.send(TOKEN, PAYLOAD) == Answer(Kind.DELIVERED, 0, "OK", "202401010000ABC", 200)


async def test_send_reads_rate_limit_from_the_body_of_an_http_200(client_for: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(
            {"code": 40100, "message": "Too many requests", "request_id": "r", "data": {}}
        )

    client = await client_for(handler)
    assert (await client.send(TOKEN, PAYLOAD)).kind is Kind.RATE_LIMITED


async def test_server_that_hangs_past_the_timeout_is_a_transient_timeout(client_for: Any) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"code": 0})

    client = await client_for(handler, timeout=0.2)
    try:
        answer = await client.send(TOKEN, PAYLOAD)
    finally:
        release.set()
    assert answer == Answer(Kind.TRANSIENT, None, "timeout", None, None)


async def test_server_closing_the_connection_is_transient(raw_client_for: Any) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    client = await raw_client_for(hang_up)
    answer = await client.send(TOKEN, PAYLOAD)
    assert (answer.kind, answer.http_status) == (Kind.TRANSIENT, None)
    assert answer.message.startswith("connection error: ")


async def test_answer_cut_off_mid_body_is_transient_not_delivered(raw_client_for: Any) -> None:
    async def cut_off(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"code":0'
        )
        await writer.drain()
        writer.close()

    client = await raw_client_for(cut_off)
    answer = await client.send(TOKEN, PAYLOAD)
    assert (answer.kind, answer.http_status) == (Kind.TRANSIENT, None)


async def test_refused_connection_is_transient(session: aiohttp.ClientSession) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago, with nobody listening now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = TikTokClient(session, f"http://127.0.0.1:{port}{PATH}", 5.0)
    answer = await client.send(TOKEN, PAYLOAD)
    assert answer.kind is Kind.TRANSIENT
    assert answer.message.startswith("connection error: ")


async def test_unresolvable_host_is_transient(session: aiohttp.ClientSession) -> None:
    client = TikTokClient(session, f"http://tiktok-endpoint.invalid{PATH}", 5.0)
    assert (await client.send(TOKEN, PAYLOAD)).kind is Kind.TRANSIENT


async def test_redirect_is_not_followed_so_the_token_stays_put(client_for: Any) -> None:
    elsewhere: list[str | None] = []

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/elsewhere")

    async def record(request: web.Request) -> web.Response:
        elsewhere.append(request.headers.get("Access-Token"))
        return web.json_response({"code": 0})

    app = web.Application()
    app.router.add_post("/elsewhere", record)
    client = await client_for(redirect, app=app)
    answer = await client.send(TOKEN, PAYLOAD)
    assert (answer.kind, answer.http_status, elsewhere) == (Kind.TRANSIENT, 307, [])


async def test_token_echoed_by_the_server_never_reaches_the_message(client_for: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        token = request.headers["Access-Token"]
        return web.json_response({"code": 40105, "message": f"Access token {token} is incorrect", "data": {}})

    client = await client_for(handler)
    answer = await client.send(TOKEN, PAYLOAD)
    assert answer.kind is Kind.AUTH
    assert TOKEN not in answer.message


async def test_empty_token_is_an_auth_answer_without_a_request(client_for: Any) -> None:
    calls: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(1)
        return web.json_response({"code": 0})

    client = await client_for(handler)
    answer = await client.send("", PAYLOAD)
    assert (answer.kind, calls) == (Kind.AUTH, [])


async def test_token_that_cannot_be_a_header_is_auth_and_not_quoted(client_for: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"code": 0})

    client = await client_for(handler)
    bad_token = "abc\r\nX-Injected: 1"
    answer = await client.send(bad_token, PAYLOAD)
    assert answer.kind is Kind.AUTH
    assert bad_token not in answer.message
