"""Fake TikTok Events API 2.0 server for tests and the benchmark: validates payloads and injects failures.

It speaks the real protocol (HTTP 200 with a JSON `code` also for errors, see
/work/shared/reference/tiktok-events-api.md), so a client that only looks at the HTTP status fails against it.

Use in tests::

    fake = FakeTikTok(tokens={"PIXEL1": "secret"})
    url = await fake.start()
    ...
    await fake.wait_for(lambda: len(fake.received) == 3)
    await fake.close()

Standalone (benchmark)::

    python tests/fake_tiktok.py --port 0 --host 127.0.0.1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import re
import signal
import socket
import struct
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PATH = "/open_api/v1.3/event/track/"

MAX_EVENTS = 1000
# Bounds that tell unix seconds from milliseconds: the most common mistake of integrations is sending ms.
MIN_EVENT_TIME = 10**9
MAX_EVENT_TIME = 10**11

FAILURE_KINDS = frozenset({"50002", "40700", "40100", "429", "502html", "nonjson", "hang", "reset"})

_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
_HASHED_USER_FIELDS = ("email", "phone", "external_id")
_STRING_USER_FIELDS = ("ttclid", "ttp", "ip", "user_agent", "locale")

_GATEWAY_PAGE = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>Tengine</center>\r\n</body>\r\n</html>\r\n"
)


@dataclass(frozen=True)
class Request:
    """One request as the fake saw and answered it (also rejected and failure-injected ones).

    `answer_code` is None when the answer had no JSON code (HTML, plain text, reset);
    `http_status` is 0 when the connection was reset without an answer.
    """

    pixel: str | None
    token: str | None
    body: dict | None
    event_ids: list[str] = field(default_factory=list)
    answer_code: int | None = None
    http_status: int = 200
    at: float = 0.0  # when it arrived, by time.monotonic()


class _Invalid(Exception):
    """A payload TikTok would refuse; `args[0]` is the answer message."""


def _is_int(value: object) -> bool:
    # bool is an int subclass in Python but JSON true/false is not a number to TikTok.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _optional_str(obj: dict, key: str, where: str) -> None:
    # null is treated like an absent field, as TikTok's typed request model does.
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _Invalid(f"{where}{key}: not a valid string")


def _validate_user(user: object, where: str) -> None:
    if user is None:
        return
    if not isinstance(user, dict):
        raise _Invalid(f"{where}user: not a valid object")
    for key in _HASHED_USER_FIELDS:
        value = user.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        for item in values:
            # Raw identifiers (a plain email, uppercase hex) mean the client did not normalise and hash them.
            if not isinstance(item, str) or not _HASH_RE.match(item):
                raise _Invalid(f"{where}user.{key}: must be a SHA-256 lowercase hex string or a list of them")
    for key in _STRING_USER_FIELDS:
        _optional_str(user, key, f"{where}user.")


def _validate_properties(props: object, where: str) -> None:
    if props is None:
        return
    if not isinstance(props, dict):
        raise _Invalid(f"{where}properties: not a valid object")
    value = props.get("value")
    if value is not None and not _is_number(value):
        raise _Invalid(f"{where}properties.value: not a valid number")
    currency = props.get("currency")
    if currency is not None and not (isinstance(currency, str) and _CURRENCY_RE.match(currency)):
        raise _Invalid(f"{where}properties.currency: invalid currency code")


def _validate_page(page: object, where: str) -> None:
    if page is None:
        return
    if not isinstance(page, dict):
        raise _Invalid(f"{where}page: not a valid object")
    _optional_str(page, "url", f"{where}page.")
    _optional_str(page, "referrer", f"{where}page.")


def _validate_event(event: object, index: int) -> None:
    where = f"Batch.{index}."
    if not isinstance(event, dict):
        raise _Invalid(f"Batch.{index}: not a valid object")
    name = event.get("event")
    if not isinstance(name, str) or not name:
        raise _Invalid(f"{where}event: required, must be a non-empty string")
    event_time = event.get("event_time")
    if not _is_int(event_time):
        raise _Invalid(f"{where}event_time: required, must be an integer unix timestamp in seconds")
    if event_time > MAX_EVENT_TIME:
        raise _Invalid(f"{where}event_time: must be in seconds, got {event_time} (milliseconds?)")
    if event_time < MIN_EVENT_TIME:
        raise _Invalid(f"{where}event_time: invalid timestamp {event_time}")
    _optional_str(event, "event_id", where)
    if "test_event_code" in event:
        raise _Invalid(f"{where}test_event_code: not allowed in an event, send it at the top level")
    _validate_user(event.get("user"), where)
    _validate_properties(event.get("properties"), where)
    _validate_page(event.get("page"), where)
    ldu = event.get("limited_data_use")
    if ldu is not None and not isinstance(ldu, bool):
        raise _Invalid(f"{where}limited_data_use: not a valid boolean")


def _validate_top(body: dict) -> None:
    if body.get("event_source") != "web":
        raise _Invalid("event_source: must be 'web'")
    pixel = body.get("event_source_id")
    if not isinstance(pixel, str) or not pixel:
        raise _Invalid("event_source_id: required, must be a non-empty string")
    _optional_str(body, "partner_name", "")
    _optional_str(body, "test_event_code", "")
    data = body.get("data")
    if not isinstance(data, list) or not data:
        raise _Invalid("data: required, must be a non-empty list of events")
    if len(data) > MAX_EVENTS:
        raise _Invalid(f"data: at most {MAX_EVENTS} events per request, got {len(data)}")


def _reject_constant(name: str) -> float:
    # Python's json accepts NaN/Infinity; real JSON parsers (and TikTok) do not.
    raise ValueError(f"invalid JSON constant {name}")


def _event_ids_of(body: dict | None) -> list[str]:
    data = body.get("data") if body else None
    if not isinstance(data, list):
        return []
    return [e["event_id"] for e in data if isinstance(e, dict) and isinstance(e.get("event_id"), str)]


class FakeTikTok:
    """In-process fake of `POST /open_api/v1.3/event/track/` that records what it received."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens: dict[str, str] = dict(tokens or {})
        self.requests: list[Request] = []
        self.received: list[dict] = []
        self.hang_seconds: float = 30.0
        self.url: str = ""
        self._failures: deque[str] = deque()
        self._failing: dict[int, str] = {}  # by the index the request will have in self.requests
        self._poisoned: dict[str, str] = {}
        self._hanging: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count(1)
        self.app = web.Application()
        self.app.router.add_post(PATH, self._handle)

    # -- control -------------------------------------------------------------------------------------------

    def set_token(self, pixel_code: str, token: str) -> None:
        self.tokens[pixel_code] = token

    def fail_next(self, n: int, kind: str) -> None:
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}, expected one of {sorted(FAILURE_KINDS)}")
        self._failures.extend([kind] * n)

    def fail_request(self, number: int, kind: str) -> None:
        """Fail the `number`-th request from now (1: the next one), answering the others as usual."""
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}, expected one of {sorted(FAILURE_KINDS)}")
        self._failing[len(self.requests) + number - 1] = kind

    def poison(self, event_id: str, message: str = "invalid value") -> None:
        self._poisoned[event_id] = message

    def event_ids(self) -> list[str]:
        return [e["event_id"] for e in self.received if isinstance(e.get("event_id"), str)]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() >= deadline:
                last = [(r.http_status, r.answer_code) for r in self.requests[-5:]]
                name = getattr(predicate, "__qualname__", repr(predicate))
                raise AssertionError(
                    f"condition {name} still false after {timeout}s: "
                    f"{len(self.requests)} requests (last (http, code): {last}), "
                    f"{len(self.received)} events received, {len(self._failures)} injected failures pending"
                )
            await asyncio.sleep(0.01)

    # -- lifetime ------------------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        # A short shutdown timeout: close() cancels hanging handlers itself, nothing else should linger.
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        shown_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown_host}:{bound_port}{PATH}"
        return self.url

    async def close(self) -> None:
        # aiohttp would wait shutdown_timeout for a handler sleeping in a "hang"; cancel them instead.
        for task in list(self._hanging):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- protocol ------------------------------------------------------------------------------------------

    def _request_id(self) -> str:
        # Shaped like TikTok's: a timestamp followed by opaque hex, unique per answer.
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        return f"{stamp}{next(self._ids):06d}{uuid.uuid4().hex[:12].upper()}"

    def _json(self, code: int, message: str, request_id: str, status: int = 200) -> web.Response:
        return web.json_response(
            {"code": code, "message": message, "request_id": request_id, "data": {}}, status=status
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        raw = await request.read()
        token = request.headers.get("Access-Token")
        body: dict | None = None
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            parsed = json.loads(raw, parse_constant=_reject_constant)
            if isinstance(parsed, dict):
                body = parsed
        pixel = body.get("event_source_id") if body else None
        pixel = pixel if isinstance(pixel, str) else None

        def record(answer_code: int | None, http_status: int) -> None:
            self.requests.append(
                Request(pixel, token, body, _event_ids_of(body), answer_code, http_status, arrived)
            )

        request_id = self._request_id()
        # Injected failures come before validation: a gateway or an overloaded backend never reads the body.
        scheduled = self._failing.pop(len(self.requests), None)
        if scheduled is not None:
            return await self._fail(request, scheduled, request_id, record)
        if self._failures:
            return await self._fail(request, self._failures.popleft(), request_id, record)

        code, message = self._check(body, raw, token)
        record(code, 200)
        if code != 0:
            return self._json(code, message, request_id)
        assert body is not None and pixel is not None
        test_event_code = body.get("test_event_code")
        for event in body["data"]:
            self.received.append(
                {**event, "_pixel": pixel, "_test_event_code": test_event_code, "_request_id": request_id}
            )
        return self._json(0, "OK", request_id)

    def _check(self, body: dict | None, raw: bytes, token: str | None) -> tuple[int, str]:
        """The (code, message) TikTok would answer for this request."""
        if not token:
            return 40001, "Access-Token header is required"
        if body is None:
            what = "request body is not valid JSON" if raw else "request body is empty"
            return 40002, f"{what}, or not a JSON object"
        try:
            _validate_top(body)
        except _Invalid as exc:
            return 40002, str(exc)
        pixel = body["event_source_id"]
        expected = self.tokens.get(pixel)
        if expected is not None and token != expected:
            return 40001, f"No permission to operate pixel {pixel}: access token is not authorized for it"
        try:
            for index, event in enumerate(body["data"]):
                _validate_event(event, index)
        except _Invalid as exc:
            return 40002, str(exc)
        for index, event in enumerate(body["data"]):
            event_id = event.get("event_id")
            if isinstance(event_id, str) and event_id in self._poisoned:
                return 40002, f"Batch.{index}.properties.value: {self._poisoned[event_id]}"
        return 0, "OK"

    async def _fail(
        self,
        request: web.Request,
        kind: str,
        request_id: str,
        record: Callable[[int | None, int], None],
    ) -> web.StreamResponse:
        if kind == "50002":
            record(50002, 200)
            return self._json(50002, "Internal error", request_id)
        if kind == "40700":
            record(40700, 200)
            return self._json(40700, "Request failed, please retry later", request_id)
        if kind == "40100":
            record(40100, 200)
            return self._json(40100, "Too many requests", request_id)
        if kind == "429":
            record(40100, 429)
            return self._json(40100, "Too many requests", request_id, status=429)
        if kind == "502html":
            record(None, 502)
            return web.Response(status=502, text=_GATEWAY_PAGE, content_type="text/html")
        if kind == "nonjson":
            record(None, 200)
            return web.Response(status=200, text="upstream error", content_type="text/plain")
        if kind == "hang":
            # Recorded before sleeping so a test can wait for the request while the client is still waiting.
            record(0, 200)
            task = asyncio.current_task()
            assert task is not None
            self._hanging.add(task)
            try:
                await asyncio.sleep(self.hang_seconds)
            finally:
                self._hanging.discard(task)
            # Answered OK but deliberately not recorded: the client is expected to have given up by now.
            return self._json(0, "OK", request_id)
        # "reset": RST instead of FIN (linger 0), the way a crashed load balancer drops a connection.
        record(None, 0)
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        # aiohttp swallows the ConnectionError from writing this to the aborted transport.
        return web.Response(status=500)


async def _serve(host: str, port: int, tokens: dict[str, str]) -> dict[str, int]:
    fake = FakeTikTok(tokens)
    url = await fake.start(host, port)
    print(url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await fake.close()
    ids = fake.event_ids()
    return {"requests": len(fake.requests), "events": len(fake.received), "unique_event_ids": len(set(ids))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake TikTok Events API server (tests, benchmark).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port; the URL is printed")
    parser.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="PIXEL=TOKEN",
        help="only accept TOKEN for PIXEL (repeatable); other pixels accept any non-empty token",
    )
    args = parser.parse_args(argv)
    tokens: dict[str, str] = {}
    for item in args.token:
        pixel, sep, token = item.partition("=")
        if not sep or not pixel or not token:
            parser.error(f"--token expects PIXEL=TOKEN, got {item!r}")
        tokens[pixel] = token
    summary = asyncio.run(_serve(args.host, args.port, tokens))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
