"""The HTTP listener: app factory, routes, handlers. Postbacks and clicks enter the bridge here."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib import resources
from typing import Any
from urllib.parse import unquote_to_bytes

from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam

from bridge.config import Network, TrackerConfig
from bridge.listeners import from_listener_process
from bridge.logs import get_logger
from bridge.mapping import BadParameter, build_click, build_conversion, check_pixel, plain_address
from bridge.metrics import CONTENT_TYPE
from bridge.runtime import Runtime
from bridge.stats import refresh_gauges
from bridge.store import StoreUnavailable

RUNTIME = web.AppKey("runtime", Runtime)
MAX_BODY = 64 * 1024
MAX_URL = 8 * 1024  # the request target, path and query
MAX_HEADER = 8 * 1024  # one header line, name and value
MAX_PARAMS = 100
BODY_TOO_LARGE = f"request body larger than {MAX_BODY} bytes"
URL_TOO_LARGE = f"request URL longer than {MAX_URL} bytes"
# For aiohttp's parser, through the runner: web.AppRunner(app, **PARSER_LIMITS). The parser refuses a
# longer URL or header line itself, with a plain-text 400 that quotes the request line; set above the
# bridge's own limits, it lets a merely oversized URL or header through to the handlers, which refuse it
# with a 413 in JSON, as they do an oversized body. Past these, the parser's 400 still stands.
PARSER_LIMITS = {"max_line_size": 4 * MAX_URL, "max_field_size": 4 * MAX_HEADER}

log = get_logger("bridge.web")

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type",
    "Access-Control-Max-Age": "86400",
}


def _json(status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/json", headers=headers
    )


def _ip_in(address: str | None, networks: Sequence[Network]) -> bool:
    if not address:
        return False
    try:
        ip = plain_address(ipaddress.ip_address(address))
    except ValueError:
        return False
    return any(ip in net for net in networks)


def _plain(address: str | None) -> str | None:
    if address is None or ":" not in address:  # IPv4, as most clients are: nothing to unwrap
        return address
    try:
        return str(plain_address(ipaddress.ip_address(address)))
    except ValueError:
        return address


def client_ip(request: web.Request, trusted_proxies: Sequence[Network]) -> str | None:
    """The client's address; X-Forwarded-For is believed only when the peer is a trusted proxy.

    Walks X-Forwarded-For from the right, skipping trusted proxies, so a client cannot
    prepend a forged address.
    """
    peer = _plain(request.remote)
    if not trusted_proxies or not _ip_in(peer, trusted_proxies):
        return peer
    # Every X-Forwarded-For line, in order: a proxy that adds its own line instead of appending to
    # the client's would otherwise leave the client's forged first line as the only one read.
    forwarded = ",".join(request.headers.getall("X-Forwarded-For", ()))
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer
        if not _ip_in(hop, trusted_proxies):
            return _plain(hop)
    return _plain(hops[0]) if hops else peer


async def read_params(request: web.Request) -> dict[str, str]:
    """Query parameters, plus a form or JSON body on POST; the first value of a repeated name wins."""
    params: dict[str, str] = {}
    # Not request.query: yarl turns invalid UTF-8 such as %ff into U+FFFD without a word, and the
    # mangled value would be stored and sent as if the tracker had sent it.
    pairs = decode_pairs(request.rel_url.raw_query_string, "query")
    if request.method == "POST" and request.body_exists:
        pairs.extend(await _body_params(request))
    if len(pairs) > MAX_PARAMS:  # each part alone is within the limit, decode_pairs saw to that
        raise BadParameter("query and body", f"more than {MAX_PARAMS} parameters together")
    for name, value in pairs:
        params.setdefault(name, value)
    return params


async def _body_params(request: web.Request) -> list[tuple[str, str]]:
    try:
        raw = await request.read()  # raises 413 past client_max_size
    except (web.RequestPayloadError, HttpProcessingError):
        # A broken chunked encoding or compressed body: the sender's fault, not a 500.
        raise BadParameter("body", "cannot be read (malformed chunked encoding or compression)") from None
    except ConnectionResetError:
        # The sender hung up halfway through its body: refused like any unreadable body, which no one
        # reads; not aiohttp's error-level traceback in the journal.
        raise BadParameter("body", "cut short: the sender closed the connection") from None
    if not raw:
        return []
    ctype = request.content_type
    if ctype == "multipart/form-data":
        return await _multipart_params(request, raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadParameter("body", "not valid UTF-8") from None
    if ctype == "application/json":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: `[[[[...` nested past the stack
            raise BadParameter("body", "not valid JSON") from None
        if not isinstance(data, dict):
            raise BadParameter("body", "JSON body must be an object")
        pairs = [(str(k), _scalar(k, v)) for k, v in data.items() if v is not None]
        for name, value in pairs:
            # JSON may escape lone surrogates ("\ud800"): text no database or log can encode.
            if not _encodable(name):
                raise BadParameter("body", "a parameter name is not valid UTF-8")
            if not _encodable(value):
                raise BadParameter(name[:64], "not valid UTF-8")
        return pairs
    if ctype in ("application/x-www-form-urlencoded", "text/plain", "application/octet-stream", ""):
        return decode_pairs(text, "body")
    raise BadParameter("body", f"unsupported content type {ctype[:64]!r}")


_IDENTITY_ENCODINGS = ("binary", "8bit", "7bit")


async def _multipart_params(request: web.Request, raw: bytes) -> list[tuple[str, str]]:
    """The text fields of a multipart/form-data body, by aiohttp's multipart reader; a file is a 400.

    The body is read whole first, as a form body is (within MAX_BODY, decompressed), and the reader
    parses it from memory: reading from the connection, it would read any preamble before the first
    boundary to its end, however long, before MAX_BODY could be checked.
    """
    content = StreamReader(request.protocol, MAX_BODY, loop=asyncio.get_running_loop())
    content.feed_data(raw)
    content.feed_eof()
    fields: list[tuple[str, str]] = []
    try:
        reader = MultipartReader(request.headers, content, max_field_size=MAX_HEADER)
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadParameter("body", "a nested multipart part is not accepted")
            if part.name is None:
                raise BadParameter("body", "a multipart part without a name")
            if not _encodable(part.name):  # header bytes that are not UTF-8 come as surrogates
                raise BadParameter("body", "a parameter name is not valid UTF-8")
            if part.filename is not None:
                raise BadParameter(part.name[:64], "a file; only form fields are accepted")
            # RFC 7578 forbids a transfer encoding in HTTP, and no browser or HTTP library sends one.
            if part.headers.get("Content-Transfer-Encoding", "binary").lower() not in _IDENTITY_ENCODINGS:
                raise BadParameter(part.name[:64], "a Content-Transfer-Encoding is not accepted")
            if len(fields) == MAX_PARAMS:
                raise BadParameter("body", f"more than {MAX_PARAMS} parameters")
            value = await part.read()
            try:  # strict UTF-8, as in a form body or the query, whatever charset the part declares
                fields.append((part.name, value.decode("utf-8")))
            except UnicodeDecodeError:
                raise BadParameter(part.name[:64], "not valid UTF-8") from None
    except BadParameter:
        raise
    except (ValueError, RuntimeError, HttpProcessingError):  # no boundary, broken framing or part headers
        raise BadParameter("body", "not valid multipart/form-data") from None
    return fields


def decode_pairs(text: str, where: str) -> list[tuple[str, str]]:
    """`a=1&b=%C3%A9` -> pairs, percent-decoded as strict UTF-8; a value that is not is a 400 naming it."""
    pairs: list[tuple[str, str]] = []
    for chunk in text.split("&"):
        if not chunk:
            continue
        if len(pairs) == MAX_PARAMS:
            raise BadParameter(where, f"more than {MAX_PARAMS} parameters")
        raw_name, _, raw_value = chunk.partition("=")
        name = _unquote(raw_name)
        if name is None:
            raise BadParameter(where, "a parameter name is not valid UTF-8")
        value = _unquote(raw_value)
        if value is None:
            raise BadParameter(name[:64], "not valid UTF-8")
        pairs.append((name, value))
    return pairs


def _unquote(text: str) -> str | None:
    if text.isascii() and "%" not in text and "+" not in text:
        return text  # nothing to decode: most names and many values
    try:
        return unquote_to_bytes(text.replace("+", " ")).decode("utf-8")
    except UnicodeError:  # invalid UTF-8 after decoding, or raw bytes the parser let through
        return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _scalar(name: Any, value: Any) -> str:
    if isinstance(value, bool):
        # As JSON writes it: `true` is no number, and must not pass as a value of 1.
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise BadParameter(str(name)[:64], "must be a string or a number")


def _too_large(request: web.Request) -> str | None:
    """Why the request's URL or headers are past the bridge's limits, if they are: the 413 message.

    Names neither the URL nor a header's value, which may carry the postback key.
    """
    if len(request.raw_path) > MAX_URL:  # characters, which a valid URL (ASCII) has as many as bytes
        return URL_TOO_LARGE
    for name, value in request.raw_headers:
        if len(name) + len(value) > MAX_HEADER:
            return f"request header {name[:64].decode('ascii', 'replace')} longer than {MAX_HEADER} bytes"
    return None


def _key_ok(tracker: TrackerConfig, given: str | None) -> bool:
    if not tracker.key:
        return True
    # Constant time, so the key cannot be guessed byte by byte from response times; digests of equal
    # length, so the time does not tell the key's length either.
    given_digest = hashlib.sha256((given or "").encode("utf-8", "replace")).digest()
    return hmac.compare_digest(given_digest, hashlib.sha256(tracker.key.encode()).digest())


def _postback_too_large(runtime: Runtime, name: str, known: bool, why: str) -> web.Response:
    """A 413, counted and logged like any refused postback: a tracker whose URLs outgrow the limit
    (a long user agent and page URL) shows in the metrics and the journal, not only in its own logs."""
    label = name if known else "(unknown)"
    runtime.metrics.inc(runtime.metrics.postbacks, label, "rejected")
    if runtime.lines.allow("postback rejected", label):
        log.info("postback rejected", tracker=name[:64], why=why)
    return _json(413, {"error": why})


async def postback(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    config = runtime.config
    metrics = runtime.metrics
    name = request.match_info["tracker"]
    tracker = config.trackers.get(name)
    if (too_large := _too_large(request)) is not None:
        return _postback_too_large(runtime, name, tracker is not None, too_large)
    if tracker is None:
        # Tracker names come from the URL: counted under one label, never as a label of their own.
        metrics.inc(metrics.postbacks, "(unknown)", "unknown_tracker")
        if runtime.lines.allow("postback refused", "unknown tracker"):
            log.warning("postback refused", tracker=name[:64], why="unknown tracker (no such tracker file)")
        return _json(404, {"error": "unknown tracker"})
    source = client_ip(request, config.settings.server.trusted_proxies)
    if tracker.allow_ips and not _ip_in(source, tracker.allow_ips):
        metrics.inc(metrics.postbacks, name, "forbidden")
        if runtime.lines.allow("postback refused", name):
            log.warning(
                "postback refused", tracker=name, source=source, why="source address not in allow_ips"
            )
        return _json(403, {"error": "source address not allowed"})
    unreadable: BadParameter | None = None
    try:
        params = await read_params(request)
    except BadParameter as exc:
        params, unreadable = {}, exc
    except web.HTTPRequestEntityTooLarge:
        return _postback_too_large(runtime, name, True, BODY_TOO_LARGE)
    # The key is checked before anything else is judged: a sender without it learns only 403. From
    # a request that cannot be read whole, the key is taken from the query if it is there.
    given = request.query.get("key") if unreadable is not None else params.get("key")
    if not _key_ok(tracker, given):
        metrics.inc(metrics.postbacks, name, "forbidden")
        if runtime.lines.allow("postback refused", name):
            log.warning("postback refused", tracker=name, source=source, why="wrong or missing key")
        return _json(403, {"error": "wrong or missing key"})
    if unreadable is not None:
        metrics.inc(metrics.postbacks, name, "rejected")
        if runtime.lines.allow("postback rejected", name):
            log.info("postback rejected", tracker=name, why=str(unreadable))
        return _json(400, {"error": str(unreadable)})
    try:
        conversion = build_conversion(
            tracker, params, time.time(), config.settings.matching.default_phone_region
        )
        check_pixel(conversion, config)
    except BadParameter as exc:
        metrics.inc(metrics.postbacks, name, "rejected")
        if runtime.lines.allow("postback rejected", name):
            log.info("postback rejected", tracker=name, why=str(exc))
        return _json(400, {"error": str(exc)})
    try:
        ingested = await runtime.store.add_conversion(conversion)
    except StoreUnavailable as exc:
        metrics.inc(metrics.postbacks, name, "unavailable")
        if runtime.lines.allow("postback not stored", name, error=True):
            log.error("postback not stored", tracker=name, click_id=conversion.click_id, why=str(exc))
        return _json(503, {"error": "temporarily unavailable, retry later"})
    for field_name in conversion.dropped:
        metrics.inc(metrics.dropped_identifiers, field_name)
    metrics.inc(metrics.postbacks, name, ingested.result)
    if runtime.lines.allow("postback", ingested.result):
        log.info(
            "postback",
            tracker=name,
            click_id=conversion.click_id,
            status=conversion.status,
            tiktok_event=conversion.event,
            event_id=ingested.event_id,
            result=ingested.result,
            conversion_id=ingested.conversion_id,
            reason=conversion.ignored_reason,
            dropped=list(conversion.dropped) or None,
        )
    if ingested.result == "accepted":
        return _json(
            200,
            {
                "result": "accepted",
                "conversion_id": ingested.conversion_id,
                "event": conversion.event,
                "event_id": ingested.event_id,
            },
        )
    if ingested.result == "duplicate":
        return _json(200, {"result": "duplicate", "conversion_id": ingested.conversion_id})
    return _json(200, {"result": "ignored", "reason": conversion.ignored_reason})


class ClickLimiter:
    """Registrations per source address per minute; a fixed window keeps memory bounded."""

    def __init__(self) -> None:
        self._window = 0
        self._counts: dict[str, int] = {}

    def allow(self, address: str, limit: int, now: float) -> bool:
        if limit <= 0:
            return True
        window = int(now // 60)
        if window != self._window:
            self._window = window
            self._counts.clear()
        source = _rate_source(address)
        count = self._counts.get(source, 0) + 1
        self._counts[source] = count
        return count <= limit


def _rate_source(address: str) -> str:
    """What one sender controls: an IPv4 address, or an IPv6 /64 (one host gets a whole /64, and
    counting its addresses one by one would let it register without limit)."""
    try:
        ip = plain_address(ipaddress.ip_address(address))
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


CLICK_LIMITER = web.AppKey("click_limiter", ClickLimiter)


async def click(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    settings = runtime.config.settings
    metrics = runtime.metrics
    if (too_large := _too_large(request)) is not None:  # with the CORS headers, so the page can read it
        metrics.inc(metrics.clicks, "rejected")
        return _json(413, {"error": too_large}, CORS_HEADERS)
    ip = client_ip(request, settings.server.trusted_proxies)
    if not request.app[CLICK_LIMITER].allow(ip or "", settings.server.click_limit_per_minute, time.time()):
        metrics.inc(metrics.clicks, "rate_limited")
        return web.Response(
            status=429,
            text="too many click registrations\n",
            headers={**CORS_HEADERS, "Retry-After": str(60 - int(time.time()) % 60)},
        )
    try:
        params = await read_params(request)
        registration = build_click(
            params, ip, request.headers.get("User-Agent"), settings.matching.default_phone_region
        )
        if registration.pixel is not None and runtime.config.pixel_name(registration.pixel) is None:
            # A visitor must not route conversions to nowhere: an unknown pixel is dropped, counted.
            registration = dataclasses.replace(
                registration, pixel=None, dropped=(*registration.dropped, "pixel")
            )
    except BadParameter as exc:
        metrics.inc(metrics.clicks, "rejected")
        return _json(400, {"error": str(exc)}, CORS_HEADERS)
    except web.HTTPRequestEntityTooLarge:  # with the CORS headers, so the page's script can read it
        metrics.inc(metrics.clicks, "rejected")
        return _json(413, {"error": BODY_TOO_LARGE}, CORS_HEADERS)
    try:
        await runtime.store.add_click(registration)
    except StoreUnavailable as exc:
        metrics.inc(metrics.clicks, "unavailable")
        if runtime.lines.allow("click not stored", "click", error=True):
            log.error("click not stored", why=str(exc))
        return web.Response(status=503, text="temporarily unavailable\n", headers=CORS_HEADERS)
    for field_name in registration.dropped:
        metrics.inc(metrics.dropped_identifiers, field_name)
    metrics.inc(metrics.clicks, "registered")
    return web.Response(status=204, headers=CORS_HEADERS)


async def click_preflight(request: web.Request) -> web.Response:
    return web.Response(status=204, headers=CORS_HEADERS)


_SNIPPET: bytes | None = None


async def snippet(request: web.Request) -> web.Response:
    global _SNIPPET
    if _SNIPPET is None:
        _SNIPPET = resources.files("bridge").joinpath("static/bridge.js").read_bytes()
    return web.Response(
        body=_SNIPPET,
        content_type="application/javascript",
        charset="utf-8",
        headers={"Cache-Control": "public, max-age=300", "Access-Control-Allow-Origin": "*"},
    )


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def _operator_only(request: web.Request) -> web.Response | None:
    """/readyz and /metrics: loopback (or server.metrics_allow_ips) or the bearer token.

    A listener process has judged the client already, and asks over the daemon's private socket.
    """
    if from_listener_process(request):
        return None
    server = request.app[RUNTIME].config.settings.server
    if server.metrics_token:
        scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8", "replace"), server.metrics_token.encode()
        ):
            return None
    # Through a trusted reverse proxy the peer is the proxy itself (loopback): judge the client behind it,
    # or publishing the whole bridge through nginx would open these to everyone.
    if _ip_in(client_ip(request, server.trusted_proxies), server.metrics_allow_ips):
        return None
    return web.Response(status=403, text="forbidden\n")


async def readyz(request: web.Request) -> web.Response:
    if (refused := _operator_only(request)) is not None:
        return refused
    runtime = request.app[RUNTIME]
    if runtime.main_process is None and not runtime.worker_running:
        return web.Response(status=503, text="not ready: delivery worker is not running\n")
    problem = await runtime.store.writable()
    if problem is not None:
        return web.Response(status=503, text=f"not ready: {problem}\n")
    if runtime.main_process is not None:
        return await runtime.main_process.ask("/readyz")  # the worker runs there
    return web.Response(text="ready\n")


async def metrics_view(request: web.Request) -> web.Response:
    if (refused := _operator_only(request)) is not None:
        return refused
    runtime = request.app[RUNTIME]
    if runtime.main_process is not None:
        return await runtime.main_process.ask("/metrics")  # its gauges, and every process's counters
    await refresh_gauges(runtime)
    return web.Response(body=runtime.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guarded(handler: Handler) -> Handler:
    """No input may produce a traceback or a 5xx other than 503: answer 400/413 for what the client sent.

    A wrapper around each handler rather than an aiohttp middleware, which costs every request a
    few microseconds more in aiohttp's own machinery.
    """

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 413:
                return _json(413, {"error": BODY_TOO_LARGE})
            raise
        except BadParameter as exc:
            return _json(400, {"error": str(exc)})
        except StoreUnavailable:
            return _json(503, {"error": "temporarily unavailable, retry later"})

    return guarded


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (raw bytes in the URL, a line past PARSER_LIMITS, TLS on
    the plain port, a body that does not decompress) as an error with a traceback, and its message quotes
    the request line, postback key and all. The sender is at fault, not the bridge: one warning line,
    without either."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError | web.RequestPayloadError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "a client"
            record.msg = "malformed HTTP request from %s refused: %s"
            record.args = (peer, type(exc.__cause__ or exc).__name__)
            record.exc_info = None
            record.exc_text = None
            record.levelno = min(record.levelno, logging.WARNING)
            record.levelname = logging.getLevelName(record.levelno)
        return True


_MALFORMED_REQUESTS = _MalformedRequests()


def create_app(runtime: Runtime) -> web.Application:
    logging.getLogger("aiohttp.server").addFilter(_MALFORMED_REQUESTS)  # once: addFilter skips repeats
    # aiohttp's multipart reader warns of a malformed Content-Disposition with the header in the
    # message: printed raw to stderr (not a JSON line, and the sender writes it), and kept for good in
    # the warnings registry, one entry per distinct text, so senders could grow the process at will.
    # The part is then refused as having no name, which is all there is to say.
    for category in (BadContentDispositionHeader, BadContentDispositionParam):
        warnings.filterwarnings("ignore", category=category)
    app = web.Application(client_max_size=MAX_BODY)
    app[RUNTIME] = runtime
    app[CLICK_LIMITER] = ClickLimiter()
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/postback/{tracker}", postback),
        ("POST", "/postback/{tracker}", postback),
        # A trailing slash is an easy slip when pasting the URL into a tracker: taken the same.
        ("GET", "/postback/{tracker}/", postback),
        ("POST", "/postback/{tracker}/", postback),
        ("GET", "/click", click),
        ("POST", "/click", click),
        ("OPTIONS", "/click", click_preflight),
        ("GET", "/bridge.js", snippet),
        ("GET", "/healthz", healthz),
        ("HEAD", "/healthz", healthz),  # uptime checkers often ask with HEAD
        ("GET", "/readyz", readyz),
        ("HEAD", "/readyz", readyz),
        ("GET", "/metrics", metrics_view),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, _guarded(handler))
    return app
