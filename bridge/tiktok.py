"""Where events leave for TikTok: payload building, the Events API client, and what each answer means."""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

# TikTok rejects the whole request when `data` holds more than this.
MAX_EVENTS_PER_REQUEST = 1000

# Long messages (a 40002 may list many fields) are kept readable in logs and the database.
_MAX_MESSAGE = 1000


class Kind(enum.Enum):
    """What the worker should do with the events of a request, decided by TikTok's answer."""

    DELIVERED = "delivered"  # done: store the request_id
    RATE_LIMITED = "rate_limited"  # slow this pixel down, retry later
    TRANSIENT = "transient"  # retry with backoff
    AUTH = "auth"  # the pixel's token or rights are wrong: hold its events, probe slowly
    BAD_REQUEST = "bad_request"  # at least one event is invalid: split the batch to find it


@dataclass(frozen=True)
class Answer:
    kind: Kind
    code: int | None  # TikTok's body code when there was a JSON body with one
    message: str  # TikTok's message, or our short description of what happened instead
    request_id: str | None
    http_status: int | None  # None when no HTTP answer came (timeout, connection error)
    # For 40002: the event indices TikTok's message names ("Batch.3.properties.value: ..."), sorted.
    # Empty when it names none. Indices come from TikTok's text: check them against the batch size.
    bad_indices: tuple[int, ...] = ()


_DELIVERED_CODES = frozenset({0, 20001})  # 20001: accepted by RudderStack as success (possibly partial)
_RATE_LIMITED_CODES = frozenset({40100})
_BAD_REQUEST_CODES = frozenset({40002})
# Token and permission errors. 40001 (no permission for this pixel/token) is in our reference table;
# 40105 (access token incorrect or revoked) and 40104 (access token empty) are the Business API's token
# codes as integrators report them; 40003 is kept for "no permission" as the brief lists it. AUTH holds the
# pixel's events as pending and keeps probing, so an auth code we guessed wrongly costs slowness, not events.
_AUTH_CODES = frozenset({40001, 40003, 40104, 40105})
# Undocumented 4xxxx codes whose message talks about the token are treated as AUTH as well: burning
# an event's attempts on a token problem would dead-letter every event of the pixel.
_TOKEN_WORDS = re.compile(r"access[ _-]?token", re.IGNORECASE)
# At most 9 digits: a longer number is no index of a batch (and past 4300 digits int() raises).
_BATCH_INDEX = re.compile(r"\bbatch\.(\d{1,9})\b", re.IGNORECASE)


def _kind_for_code(code: int, message: str) -> Kind:
    if code in _DELIVERED_CODES:
        return Kind.DELIVERED
    if code in _RATE_LIMITED_CODES:
        return Kind.RATE_LIMITED
    if code in _BAD_REQUEST_CODES:
        return Kind.BAD_REQUEST
    if code in _AUTH_CODES:
        return Kind.AUTH
    if 40000 <= code <= 49999 and _TOKEN_WORDS.search(message):
        return Kind.AUTH
    # 40700, 5xxxx, and every code we do not know: retry with backoff. Unknown 4xxxx codes land here
    # too on purpose: TRANSIENT keeps the code and message, ends in `failed` (a dead letter that can
    # be retried by hand) after max_attempts, and never drops an event that a retry could deliver.
    return Kind.TRANSIENT


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _parse_json(body: bytes | None) -> Any:
    """The decoded body, or None when it is empty or not JSON."""
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON from a broken gateway
        return None


def classify(http_status: int | None, body: bytes | None, error: str | None = None) -> Answer:
    """Turn what came back from a request into an Answer. Pure.

    `error` describes a request that got no HTTP answer (timeout, connection error): always TRANSIENT.
    Otherwise a JSON object with an integer `code` decides, whatever the HTTP status says (TikTok
    answers 200 for errors too). Without one, the HTTP status and the body's shape decide.
    """
    if error is not None:
        return Answer(Kind.TRANSIENT, None, _short(error), None, http_status)

    parsed = _parse_json(body)
    if isinstance(parsed, dict):
        code = parsed.get("code")
        # bool is an int subclass; `"code": true` is not a code.
        if isinstance(code, int) and not isinstance(code, bool):
            raw_message = parsed.get("message")
            message = raw_message if isinstance(raw_message, str) and raw_message else f"code {code}"
            raw_request_id = parsed.get("request_id")
            request_id = raw_request_id if isinstance(raw_request_id, str) and raw_request_id else None
            kind = _kind_for_code(code, message)
            bad_indices: tuple[int, ...] = ()
            if kind is Kind.BAD_REQUEST:
                bad_indices = tuple(sorted({int(m) for m in _BATCH_INDEX.findall(message)}))
            return Answer(kind, code, _short(message), request_id, http_status, bad_indices)

    if http_status == 429:
        return Answer(Kind.RATE_LIMITED, None, "HTTP 429", None, http_status)
    if http_status is not None and http_status >= 500:
        return Answer(Kind.TRANSIENT, None, f"HTTP {http_status}", None, http_status)
    if not body:
        shape = "empty body"
    elif parsed is None:
        shape = "non-JSON body"
    else:
        shape = "JSON body without an integer code"
    if http_status is not None and not 200 <= http_status < 300:
        shape = f"HTTP {http_status}, {shape}"
    return Answer(Kind.TRANSIENT, None, shape, None, http_status)


def build_payload(
    pixel_code: str,
    events: Sequence[str],
    partner_name: str | None,
    test_event_code: str | None,
) -> bytes:
    """The Events API 2.0 request body for one pixel, from events already encoded as JSON objects. Pure.

    `test_event_code` goes at the top level (inside an event TikTok ignores it) and only when
    non-empty, since an empty one would still mark the request as a test.
    """
    if not events:
        raise ValueError("a request needs at least one event")
    if len(events) > MAX_EVENTS_PER_REQUEST:
        raise ValueError(
            f"{len(events)} events in one request, TikTok accepts at most {MAX_EVENTS_PER_REQUEST}"
        )
    head: dict[str, Any] = {"event_source": "web", "event_source_id": pixel_code}
    if partner_name:
        head["partner_name"] = partner_name
    if test_event_code:
        head["test_event_code"] = test_event_code
    # The events go in as they are, not decoded and encoded again: `{...head..., "data": [...]}`.
    head_json = json.dumps(head, separators=(",", ":"))
    return (head_json[:-1] + ',"data":[' + ",".join(events) + "]}").encode()


class TikTokClient:
    """Posts one payload to the Events API and returns an Answer; network trouble is an Answer too."""

    def __init__(self, session: aiohttp.ClientSession, endpoint: str, timeout: float) -> None:
        self._session = session
        self._endpoint = endpoint
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def send(self, access_token: str, body: bytes) -> Answer:
        """POST `body` (from build_payload); never raises for network problems, never puts the token
        in a message."""
        if not access_token:
            return Answer(Kind.AUTH, None, "access token is empty", None, None)
        if not (access_token.isascii() and access_token.isprintable()):
            # aiohttp would refuse such a header with an exception that may quote it.
            return Answer(
                Kind.AUTH,
                None,
                "access token has characters that cannot be sent in an HTTP header",
                None,
                None,
            )
        headers = {"Access-Token": access_token, "Content-Type": "application/json"}
        try:
            async with self._session.post(
                self._endpoint,
                data=body,
                headers=headers,
                timeout=self._timeout,
                # A redirect would carry the Access-Token header to wherever it points.
                allow_redirects=False,
                raise_for_status=False,
            ) as response:
                answer_body = await response.read()
                status = response.status
        except TimeoutError:  # also aiohttp's ServerTimeoutError, a TimeoutError subclass
            answer = classify(None, None, "timeout")
        except (aiohttp.ClientError, OSError) as exc:
            name = type(exc).__name__
            detail = f"{name}: {exc}" if str(exc) else name
            answer = classify(None, None, f"connection error: {detail.replace(access_token, '<token>')}")
        else:
            # Scrubbed before classify() shortens the message, so a cut cannot leave part of it behind.
            answer = classify(status, answer_body.replace(access_token.encode(), b"<token>"))
        if access_token in answer.message:
            answer = dataclasses.replace(answer, message=answer.message.replace(access_token, "<token>"))
        return answer
