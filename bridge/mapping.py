"""Tracker postback parameters -> canonical conversion, by the tracker's YAML mapping (pure, no I/O)."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bridge.config import CURRENCIES, Config, TrackerConfig
from bridge.matching import HashedIdentifiers, hash_identifiers, scrub_url

# Longest value accepted per canonical field; anything longer is a 400 naming the field.
MAX_LENGTH = {
    # As long as a ttclid: BeMob's postbacks carry no click id of its own, so the ttclid serves as one.
    "click_id": 1024,
    "status": 64,
    "value": 32,
    "currency": 16,
    "transaction_id": 256,
    "ttclid": 1024,
    "ttp": 256,
    "ip": 64,
    "user_agent": 1024,
    "email": 320,
    "phone": 64,
    "external_id": 256,
    "pixel": 128,
    "event_time": 32,
    "page_url": 2048,
    "url": 2048,
    "referrer": 2048,
}

# A tracker or network that forgot to substitute a macro sends its name: `{subid}`, `{{subid}}`,
# `${SUBID}`, `__CLICKID__`, CAKE's `#s2#`, or `%7Bsubid%7D` when the URL was encoded twice.
_MACRO = re.compile(r"^(?:\$?\{+[^{}]*\}+|__[A-Z0-9_]+__|#[A-Za-z_][A-Za-z0-9_]*#|%7[Bb][^{}]*%7[Dd])$")
# Control characters are no part of any id, status, amount or URL: garbage or an injection attempt.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MACRO_FIRST = frozenset("${_#%")
# ASCII digits only: float() would also take "١٢٣", "1_000", "nan" and "inf".
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$", re.ASCII)
_DECIMAL_COMMA = re.compile(r"^[+-]?\d+,\d{1,2}$", re.ASCII)
# An IPv4 address already in canonical form (no leading zeros), which ipaddress would return unchanged.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")

IGNORED_UNMAPPED = "unmapped_status"
IGNORED_NOT_SENT = "status_not_sent"


class BadParameter(ValueError):
    """A postback or click parameter is missing or malformed; `str()` is the 400 message."""

    def __init__(self, field_name: str, why: str) -> None:
        super().__init__(f"{field_name}: {why}")
        self.field = field_name


# Conversion and Click are built once per request and never changed after: plain slotted classes,
# since a frozen dataclass's __init__ costs four times as much (a setattr call per field).
@dataclass(slots=True)
class Conversion:
    """One postback, validated and mapped; identifiers already hashed, nothing raw left."""

    tracker: str
    click_id: str
    status: str
    event: str | None  # None: recorded as ignored, never sent
    ignored_reason: str | None
    transaction_id: str  # "" when the tracker sent none
    event_id: str | None  # from the template; the store adds the rebill suffix
    event_time: int
    value: float | None = None
    currency: str | None = None
    pixel: str | None = None  # the postback's pixel, else the status route's, else the tracker's
    ttclid: str | None = None
    ttp: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    page_url: str | None = None
    email_hash: str | None = None
    phone_hash: str | None = None
    external_id_hash: str | None = None
    dropped: tuple[str, ...] = field(default=())  # fields given but unusable (unparseable phone, macro ...)


def clean(params: Mapping[str, str], name: str, dropped: list[str] | None = None) -> str | None:
    """A parameter's value, trimmed; None when empty or an unsubstituted macro; 400 when oversized."""
    value = params.get(name)
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if len(value) > MAX_LENGTH.get(name, 256):
        raise BadParameter(name, f"longer than {MAX_LENGTH.get(name, 256)} characters")
    if not value.isprintable() and _CONTROL.search(value):  # isprintable: the quick "none at all"
        raise BadParameter(name, "contains control characters")
    # Every macro form starts with one of these; the check spares the regex for ordinary values.
    if value[0] in _MACRO_FIRST and _MACRO.match(value):
        if dropped is not None:
            dropped.append(name)
        return None
    return value


def _unsubstituted(name: str, value: str) -> str:
    return f"parameter {name!r} holds an unsubstituted macro {value.strip()!r}"


def ignored_why(tracker: TrackerConfig, raw: Mapping[str, str], conversion: Conversion) -> str:
    """Why a postback is recorded and not sent, in the tracker's own terms (for `explain`)."""
    name = tracker.params.get("status")
    if name is None:
        return "the tracker maps no status parameter"
    if "status" in conversion.dropped:
        return _unsubstituted(name, raw[name])
    if not conversion.status:
        return f"no status (the tracker sends it as {name!r})"
    if conversion.ignored_reason == IGNORED_UNMAPPED:
        return f"status {conversion.status!r} is not in the tracker's events: recorded, not sent"
    return f"status {conversion.status!r} is mapped to null in the tracker's events: recorded, not sent"


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def canonical_params(tracker: TrackerConfig, raw: Mapping[str, str]) -> dict[str, str]:
    """Rename the tracker's parameters to canonical fields (missing ones are left out)."""
    return {canonical: raw[name] for canonical, name in tracker.params.items() if name in raw}


def parse_value(text: str | None) -> float | None:
    if text is None:
        return None
    # Some networks write decimals with a comma ("45,00"). One or two digits after it can only be
    # cents; "1,000" could be a thousand or one, so it is refused rather than guessed.
    candidate = text.replace(",", ".") if _DECIMAL_COMMA.match(text) else text
    if not _NUMBER.match(candidate):
        why = "ambiguous comma (write 1000, or 1.00 for one)" if "," in text else "not a number"
        raise BadParameter("value", f"{why}: {text[:32]!r}")
    number = float(candidate)
    if not math.isfinite(number):
        raise BadParameter("value", f"not a finite number: {text[:32]!r}")
    if number < 0:
        raise BadParameter("value", "must not be negative")
    return number


def parse_currency(text: str | None, default: str) -> str:
    if text is None:
        return default
    code = text.upper()
    if code not in CURRENCIES:
        raise BadParameter("currency", f"not a three-letter ISO 4217 code: {text[:16]!r}")
    return code


def check_pixel(conversion: Conversion, config: Config) -> None:
    """Tracker and status-route pixels are checked with the config; only the postback's own can be unknown."""
    if conversion.pixel is not None and config.pixel_name(conversion.pixel) is None:
        raise BadParameter("pixel", "not a configured pixel name or code")


def parse_event_time(text: str | None, received_at: float) -> int:
    """Unix seconds; milliseconds are normalised; absent means the time the postback arrived."""
    if text is None:
        return int(received_at)
    try:
        number = float(text)
    except ValueError:
        raise BadParameter("event_time", "not a unix timestamp in seconds or milliseconds") from None
    if not math.isfinite(number) or number <= 0:
        raise BadParameter("event_time", "not a unix timestamp in seconds or milliseconds")
    if number > 1e11:
        number /= 1000
    if number < 1e9 or number > received_at + 86400:
        raise BadParameter("event_time", "out of range (before 2001 or more than a day in the future)")
    return int(number)


def plain_address(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4 address written as IPv6 (`::ffff:1.2.3.4`, what a dual-stack socket reports for an IPv4
    client) as the IPv4 address it is: so TikTok can match it, and IPv4 networks contain it."""
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return mapped if mapped is not None else ip


def parse_ip(text: str | None, dropped: list[str]) -> str | None:
    if text is None:
        return None
    if _CANONICAL_IPV4.fullmatch(text):  # the usual case, without ipaddress's slower parse
        return text
    try:
        return str(plain_address(ipaddress.ip_address(text)))
    except ValueError:
        dropped.append("ip")
        return None


_T = TypeVar("_T")
_NOTHING_HASHED = HashedIdentifiers()


def _hashed(email: str | None, phone: str | None, external_id: str | None, region: str) -> HashedIdentifiers:
    # Most postbacks and clicks carry none of the three: no call, no new object for them.
    if email is None and phone is None and external_id is None:
        return _NOTHING_HASHED
    return hash_identifiers(email, phone, external_id, region)


def _or_dropped(parse: Callable[..., _T], name: str, dropped: list[str], *args: Any) -> _T | None:
    """`parse(*args)`, or None with `name` added to `dropped` where it would refuse the postback."""
    try:
        return parse(*args)
    except BadParameter:
        dropped.append(name)
        return None


def render_event_id(template: str, **fields: str) -> str:
    return template.format_map(fields)


def build_conversion(
    tracker: TrackerConfig,
    raw: Mapping[str, str],
    received_at: float,
    default_phone_region: str,
) -> Conversion:
    """Map a postback's raw parameters through the tracker's mapping; raise BadParameter for a 400."""
    params = canonical_params(tracker, raw)
    dropped: list[str] = []
    click_id = clean(params, "click_id", dropped)
    if click_id is None:
        name = tracker.params["click_id"]
        if "click_id" in dropped:
            raise BadParameter("click_id", _unsubstituted(name, params["click_id"]))
        raise BadParameter("click_id", f"missing (the tracker sends it as {name!r})")

    status = (clean(params, "status", dropped) or "").lower()
    transaction_id = clean(params, "transaction_id", dropped) or ""
    route = tracker.events.get(status)
    if route is None:
        event, reason = None, IGNORED_UNMAPPED
    elif route.event is None:
        event, reason = None, IGNORED_NOT_SENT
    else:
        event, reason = route.event, None

    value_text = clean(params, "value", dropped)
    currency_text = clean(params, "currency", dropped)
    time_text = clean(params, "event_time", dropped)
    if event is not None:
        value = parse_value(value_text)
        currency = parse_currency(currency_text, tracker.default_currency)
        event_time = parse_event_time(time_text, received_at)
    else:
        # Never sent, so recorded whatever these say (a chargeback's negative revenue, say): a 400
        # would only make the tracker report a failed postback, and resend it.
        value = _or_dropped(parse_value, "value", dropped, value_text)
        currency = _or_dropped(parse_currency, "currency", dropped, currency_text, tracker.default_currency)
        event_time = _or_dropped(parse_event_time, "event_time", dropped, time_text, received_at)
        currency = currency or tracker.default_currency
        event_time = event_time or int(received_at)

    hashed = _hashed(
        clean(params, "email", dropped),
        clean(params, "phone", dropped),
        clean(params, "external_id", dropped),
        default_phone_region,
    )
    event_id = None
    if event is not None:
        event_id = render_event_id(
            tracker.event_id,
            click_id=click_id,
            event=event,
            transaction_id=transaction_id,
            status=status,
            tracker=tracker.name,
        )
    pixel = clean(params, "pixel", dropped) or (route.pixel if route else None) or tracker.pixel
    return Conversion(
        tracker=tracker.name,
        click_id=click_id,
        status=status,
        event=event,
        ignored_reason=reason,
        transaction_id=transaction_id,
        event_id=event_id,
        event_time=event_time,
        value=value,
        currency=currency if value is not None or event is not None else None,
        pixel=pixel,
        ttclid=clean(params, "ttclid", dropped),
        ttp=clean(params, "ttp", dropped),
        ip=parse_ip(clean(params, "ip", dropped), dropped),
        user_agent=clean(params, "user_agent", dropped),
        page_url=scrub_url(clean(params, "page_url", dropped)),
        email_hash=hashed.email,
        phone_hash=hashed.phone,
        external_id_hash=hashed.external_id,
        dropped=(*dropped, *hashed.dropped),
    )


@dataclass(slots=True)
class Click:
    """One landing-page click registration; identifiers already hashed."""

    click_id: str
    ttclid: str | None = None
    ttp: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    pixel: str | None = None
    url: str | None = None
    referrer: str | None = None
    email_hash: str | None = None
    phone_hash: str | None = None
    external_id_hash: str | None = None
    dropped: tuple[str, ...] = field(default=())  # fields given but unusable, for the metric


def build_click(
    raw: Mapping[str, str],
    ip: str | None,
    user_agent: str | None,
    default_phone_region: str,
) -> Click:
    """Validate a /click registration; raw email/phone/external_id are hashed here, at the edge."""
    click_id = clean(raw, "click_id")
    if click_id is None:
        raise BadParameter("click_id", "missing")
    dropped: list[str] = []
    hashed = _hashed(
        clean(raw, "email", dropped),
        clean(raw, "phone", dropped),
        clean(raw, "external_id", dropped),
        default_phone_region,
    )
    ua = (user_agent or "").strip()[: MAX_LENGTH["user_agent"]] or None
    if ua is not None and not _utf8(ua):
        # Header bytes that are not UTF-8 reach us as lone surrogates, which no database can store.
        ua = None
        dropped.append("user_agent")
    return Click(
        click_id=click_id,
        ttclid=clean(raw, "ttclid", dropped),
        ttp=clean(raw, "ttp", dropped),
        ip=ip,
        user_agent=ua,
        pixel=clean(raw, "pixel", dropped),
        url=scrub_url(clean(raw, "url")),
        referrer=scrub_url(clean(raw, "referrer")),
        email_hash=hashed.email,
        phone_hash=hashed.phone,
        external_id_hash=hashed.external_id,
        dropped=(*dropped, *hashed.dropped),
    )
