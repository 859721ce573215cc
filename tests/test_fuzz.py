"""Fuzzing the listener: thousands of generated hostile postbacks, clicks and raw requests, never a 5xx.

Every example sends a batch of generated requests at the running app (real SQLite, real worker, fake TikTok),
then checks that no answer was a 5xx, nothing was logged as an error, /readyz is still 200 and an ordinary
postback is still accepted and delivered.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import itertools
import json
from dataclasses import dataclass, field
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from tests.conftest import Bridge, BridgeFactory

KEY = "fz-key-0a1b2c3d4e"

PARAM_NAMES = [
    "key",
    "subid",
    "status",
    "revenue",
    "currency",
    "tid",
    "external_id",
    "ip",
    "user_agent",
    "clickid",
    "externalid",
    "payout",
    "txid",
    "click_id",
    "ttclid",
    "ttp",
    "pixel",
    "url",
    "referrer",
    "email",
    "phone",
]
HOSTILE = [
    "",
    " ",
    "{subid}",
    "{{subid}}",
    "${SUBID}",
    "__CLICKID__",
    "#s2#",
    "%7Bsubid%7D",
    "NaN",
    "nan",
    "inf",
    "-Infinity",
    "1e309",
    "-1e309",
    "1e-400",
    "-0",
    "-5",
    "0x1F",
    "1_000",
    "45,00",
    "1,234.56",
    "\u0661\u0662\u0663",
    "sale",
    "SALE",
    "lead",
    "approved",
    "confirm",
    "rejected",
    "USD",
    "usd",
    "US",
    "\u20ac\u20ac\u20ac",
    "\x00",
    "a\r\nb",
    "\t",
    "' OR '1'='1",
    "1; DROP TABLE conversions; --",
    "<script>alert(1)</script>",
    "../../etc/passwd",
    "\ud800",
    "\udcff",
    "\ufffd",
    "\u202egnp.exe",
    "e\u0301",
    "\U0001f600" * 10,
    "a" * 256,
    "a" * 257,
    "b" * 1025,
    "c" * 3000,
    "E.C.P.CqgBqkM2fX",
    "203.0.113.7",
    "::1",
    "999.1.1.1",
    "user@example.com",
    "+1 (415) 555-2671",
    "0" * 64,
    "1700000000",
    "1700000000000",
    "99999999999999999999",
    KEY,
]
# Percent-encoding that is invalid, or valid escapes of bytes that are not UTF-8, sent raw on the wire.
JUNK = [
    "%ff",
    "%FE",
    "%e2%82",
    "%c3%28",
    "%ed%a0%80",
    "%c0%80",
    "%",
    "%%",
    "%zz",
    "%4",
    "+",
    "&",
    "=",
    "==",
    ";",
]
# Mostly the routes that read parameters and write to the database, where a mistake would hide.
PATHS = ["/postback/keitaro", "/postback/binom", "/postback/bemob", "/click"]
ODD_PATHS = [
    "/postback/",
    "/postback/KEITARO",
    "/postback/keitaro/extra",
    "//postback/keitaro",
    "/postback/%ff",
    "/postback/..%2f..%2fetc%2fpasswd",
    "/healthz",
    "/bridge.js",
    "/metrics",
]
CONTENT_TYPES = [
    None,
    "application/x-www-form-urlencoded",
    "application/json",
    "application/json; charset=latin-1",
    "text/plain",
    "application/octet-stream",
    "multipart/form-data; boundary=x",
    "application/xml",
    "garbage;;;=",
]
ENCODINGS = [None, None, None, "gzip", "deflate", "br", "identity", "x-nonsense"]


def pct(text: str) -> str:
    # surrogatepass: a lone surrogate becomes bytes that are not UTF-8, as a broken client would send.
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


names = st.one_of(st.sampled_from(PARAM_NAMES), st.text(max_size=12))
values = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=40),
    st.integers().map(str),
    st.floats().map(repr),
    st.text(alphabet="0123456789.,-+eE", max_size=12),
)


# Enough to pass the key check and carry a click id, so generated values reach validation and storage.
PLAUSIBLE = st.builds(
    lambda click_id, status: (
        f"key={KEY}&subid={click_id}&clickid={click_id}&externalid={click_id}"
        f"&click_id={click_id}&status={status}"
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=16),
    st.sampled_from(["sale", "lead", "approved", "confirm", "rebill", "rejected", "unknown"]),
)


@st.composite
def query_strings(draw: st.DrawFn) -> str:
    parts = []
    # First value of a repeated name wins: generated pairs before the plausible ones override them.
    plausible = draw(st.sampled_from(["none", "before", "after"]))
    if plausible == "after":
        parts.append(draw(PLAUSIBLE))
    for name, value, mode in draw(
        st.lists(
            st.tuples(names, values, st.sampled_from(["plain"] * 4 + ["junk", "bare", "empty"])), max_size=14
        )
    ):
        encoded_name, encoded_value = pct(name), pct(value)
        if mode == "junk":
            at = draw(st.integers(0, len(encoded_value)))
            encoded_value = encoded_value[:at] + draw(st.sampled_from(JUNK)) + encoded_value[at:]
        parts.append(
            encoded_name if mode == "bare" else "" if mode == "empty" else f"{encoded_name}={encoded_value}"
        )
    if plausible == "before":
        parts.append(draw(PLAUSIBLE))
    return "&".join(parts)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from(HOSTILE),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(names, children, max_size=4),
    max_leaves=12,
)
bodies = st.one_of(
    st.none(),
    query_strings().map(str.encode),
    st.dictionaries(names, json_values, max_size=10).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.just(b"[" * 50_000),
    st.just(b"subid=x&pad=" + b"x" * 70_000),
    st.just(gzip.compress(b"subid=x&pad=" + b"0" * 300_000)),
)


@st.composite
def multipart_bodies(draw: st.DrawFn) -> bytes:
    """Generated fields (and, before or after them, plausible ones) as multipart/form-data, boundary `x`."""
    fields = draw(st.lists(st.tuples(names, values), max_size=14))
    plausible = [tuple(pair.split("=", 1)) for pair in draw(PLAUSIBLE).split("&")]
    fields = draw(st.sampled_from([fields, plausible + fields, fields + plausible]))
    parts = []
    for name, value in fields:
        quoted = name.encode("utf-8", "surrogatepass").translate(None, b'"\r\n')
        if draw(st.integers(0, 9)) == 0:  # now and then a file, which is refused
            quoted += b'"; filename="' + quoted
        parts.append(
            b'--x\r\nContent-Disposition: form-data; name="'
            + quoted
            + b'"\r\n\r\n'
            + value.encode("utf-8", "surrogatepass")
            + b"\r\n"
        )
    return b"".join(parts) + b"--x--\r\n"


header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)


@dataclass
class Request:
    method: str
    path: str
    query: str
    body: bytes | None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


@st.composite
def requests(draw: st.DrawFn) -> Request:
    method = draw(st.sampled_from(["GET"] * 6 + ["POST"] * 6 + ["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    dice = draw(st.integers(0, 9))
    if dice < 8:
        path = draw(st.sampled_from(PATHS))
    elif dice == 8:
        path = draw(st.sampled_from(ODD_PATHS))
    else:
        path = "/postback/" + pct(draw(st.text(max_size=20)))
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        headers["User-Agent"] = draw(header_text)
    if draw(st.booleans()):
        headers["X-Forwarded-For"] = draw(
            st.sampled_from(["203.0.113.9", "::1", "junk", "1.2.3.4, 5.6.7.8", ""])
        )
    body = draw(bodies) if method in ("POST", "PUT", "PATCH") else None
    if method == "POST" and draw(st.integers(0, 5)) == 0:
        body = draw(multipart_bodies())
        headers["Content-Type"] = "multipart/form-data; boundary=x"
    elif body is not None:
        content_type = draw(st.sampled_from(CONTENT_TYPES))
        if content_type is not None:
            headers["Content-Type"] = content_type
        encoding = draw(st.sampled_from(ENCODINGS))
        if encoding is not None:
            headers["Content-Encoding"] = encoding
            if encoding == "gzip" and draw(st.booleans()):
                body = gzip.compress(body)
    return Request(method, path, draw(query_strings()), body, headers)


# Raw requests: bytes no HTTP client would send. The framing is whole (Connection: close, a true
# Content-Length or none, or a framing header the parser refuses at once), so every request must be answered.
VALID_RAW_TARGETS = [b"/click?click_id=raw-1&ttclid=E.C.P.r", b"/postback/binom?clickid=raw-1&status=sale"]
raw_targets = st.one_of(
    st.binary(max_size=60).map(lambda b: b"/postback/keitaro?subid=" + b),
    st.binary(max_size=60).map(lambda b: b"/click?click_id=" + b),
    st.binary(max_size=60),
)
raw_methods = st.sampled_from([b"GET", b"POST", b"get", b"BREW", b"G\x00T", b"", b"GET GET"])
raw_headers = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from([b"User-Agent", b"X-Forwarded-For", b"Content-Type", b"Cookie"]),
            st.binary(max_size=40),
        ),
        st.tuples(st.binary(min_size=1, max_size=12), st.binary(max_size=20)),
        st.sampled_from(
            [
                (b"Content-Length", b"-1"),
                (b"Content-Length", b"1e3"),
                (b"Transfer-Encoding", b"chunked, gzip"),
                (b"Host", b"\xff\xfe"),
                (b"Content-Length", b"99999999999999999999999"),
            ]
        ),
    ),
    max_size=5,
)


# Any byte but CR, LF and NUL may stand in a header value (obs-text), and the parser lets them through.
hostile_header_values = st.lists(
    st.tuples(
        st.sampled_from([b"User-Agent", b"X-Forwarded-For", b"Content-Type", b"Referer", b"Cookie"]),
        st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")),
    ),
    min_size=1,
    max_size=4,
)


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        # Well-formed but for its header values, so that those reach the handlers and the database.
        method, target, version = (
            draw(st.sampled_from([b"GET", b"POST"])),
            draw(st.sampled_from(VALID_RAW_TARGETS)),
            b"HTTP/1.1",
        )
        headers = draw(hostile_header_values)
    else:
        method, target = draw(raw_methods), draw(raw_targets)
        version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"HTTP/1.1 extra", b""]))
        headers = draw(raw_headers)
    lines = [method + b" " + target + b" " + version, b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    body = draw(st.binary(max_size=200))
    if body:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# -- the checks every example ends with -----------------------------------------------------------------

ORDINARY = itertools.count()


@pytest.fixture
async def fuzzed(make_bridge: BridgeFactory) -> Bridge:
    """The shipped trackers, Keitaro's with a postback key the fuzzer sometimes knows."""
    return await make_bridge(environ={"KEITARO_POSTBACK_KEY": KEY})


def errors_logged(stream: io.StringIO) -> list[str]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [
        json.dumps(line)
        for line in lines
        if line.get("level") in ("error", "critical")
        or "exception" in line
        or "Traceback" in json.dumps(line)
    ]


async def assert_still_serving(bridge: Bridge, stream: io.StringIO) -> None:
    """No error was logged; /readyz answers 200; an ordinary postback is accepted and delivered."""
    assert errors_logged(stream) == []
    ready = await bridge.client.get("/readyz")
    assert ready.status == 200, await ready.text()
    click_id = f"ordinary-{next(ORDINARY)}"
    status, body = await bridge.postback(
        "keitaro", key=KEY, subid=click_id, status="sale", revenue="10", external_id="E.C.P.ok"
    )
    assert (status, body.get("result")) == (200, "accepted"), body
    await bridge.deliver()
    assert f"{click_id}_Purchase" in bridge.fake.event_ids()


async def send(bridge: Bridge, request: Request) -> int:
    url = URL(f"http://127.0.0.1:{bridge.client.port}{request.target}", encoded=True)
    async with bridge.client.session.request(
        request.method, url, data=request.body, headers=request.headers
    ) as resp:
        await resp.read()
        return resp.status


def status_of(answer: bytes) -> int | None:
    """The status code of a raw HTTP answer; None for no answer at all."""
    words = answer.split(b"\r\n", 1)[0].split(b" ")
    return int(words[1]) if len(words) > 1 and words[1].isdigit() else None


FUZZ = settings(
    max_examples=120,
    deadline=None,
    database=None,
    # One running bridge serves every example, as one daemon serves every sender.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@FUZZ
@given(batch=st.lists(requests(), min_size=10, max_size=20))
async def test_no_generated_postback_or_click_gets_a_5xx(
    fuzzed: Bridge, log_text: io.StringIO, batch: list[Request]
) -> None:
    log_text.seek(0)
    log_text.truncate()
    # Sent together, so the generated requests share group commits with each other.
    statuses = await asyncio.gather(*(send(fuzzed, request) for request in batch))

    assert [(r.method, r.target[:200], s) for r, s in zip(batch, statuses, strict=True) if s >= 500] == []
    await assert_still_serving(fuzzed, log_text)


@settings(FUZZ, max_examples=100)
@given(batch=st.lists(raw_requests(), min_size=5, max_size=10))
async def test_no_raw_malformed_request_gets_a_5xx(
    fuzzed: Bridge, log_text: io.StringIO, batch: list[bytes]
) -> None:
    log_text.seek(0)
    log_text.truncate()
    answers = await asyncio.gather(*(fuzzed.send_raw(data) for data in batch))

    statuses = [status_of(answer) for answer in answers]
    assert [(data[:200], s) for data, s in zip(batch, statuses, strict=True) if s is None or s >= 500] == []
    await assert_still_serving(fuzzed, log_text)
