"""A stored conversion plus its click -> the TikTok event, its match keys and its pixel candidates.

Written as SQL, so that one query turns a whole claim into events: SQLite merges each conversion with
its click and writes the event's JSON text, ready to go into the request body. The worker's Python
then neither builds nor encodes a dict per event, and SQLite does that work without holding the GIL
the listener needs. `explain` runs the same query on the values it is given.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MATCH_KEYS = ("ttclid", "ttp", "ip_ua", "email", "phone", "external_id")

# Fields a click fills when the postback lacks them (conversion column: click column); values in the
# postback win, and an empty string counts as missing on both sides.
_FROM_CLICK = {
    "ttclid": "ttclid",
    "ttp": "ttp",
    "ip": "ip",
    "user_agent": "user_agent",
    "page_url": "url",
    "email_hash": "email_hash",
    "phone_hash": "phone_hash",
    "external_id_hash": "external_id_hash",
}
# The conversion's own columns the event needs, besides those.
_OWN = ("id", "tracker", "click_id", "event", "event_id", "event_time", "value", "currency", "pixel")
CONVERSION_COLUMNS = (*_OWN, "attempts", *_FROM_CLICK)
CLICK_COLUMNS = ("click_id", "pixel", *_FROM_CLICK.values())

_MERGED = ",\n        ".join(
    f"CAST(COALESCE(NULLIF(c.{own}, ''), NULLIF(k.{theirs}, '')) AS TEXT) AS {own}"
    for own, theirs in _FROM_CLICK.items()
)
# json_patch onto {} drops every member whose value is null, at any depth: absent fields are left out.
_EVENT = """json_patch('{}', json_object(
        'event', event,
        'event_time', event_time,
        'event_id', event_id,
        'user', json_object(
            'ttclid', ttclid, 'ttp', ttp, 'ip', ip, 'user_agent', user_agent,
            'email', CASE WHEN email_hash IS NOT NULL THEN json_array(email_hash) END,
            'phone', CASE WHEN phone_hash IS NOT NULL THEN json_array(phone_hash) END,
            'external_id', CASE WHEN external_id_hash IS NOT NULL THEN json_array(external_id_hash) END),
        'properties', CASE
            WHEN value IS NOT NULL THEN json_object('value', value, 'currency', currency)
            WHEN currency <> '' THEN json_object('currency', currency) END,
        'page', CASE WHEN page_url IS NOT NULL THEN json_object('url', page_url) END))"""
# Which of MATCH_KEYS the event carries, comma-separated in that order ('' for none).
_KEYS = """substr(
        CASE WHEN ttclid IS NOT NULL THEN ',ttclid' ELSE '' END
        || CASE WHEN ttp IS NOT NULL THEN ',ttp' ELSE '' END
        || CASE WHEN ip IS NOT NULL AND user_agent IS NOT NULL THEN ',ip_ua' ELSE '' END
        || CASE WHEN email_hash IS NOT NULL THEN ',email' ELSE '' END
        || CASE WHEN phone_hash IS NOT NULL THEN ',phone' ELSE '' END
        || CASE WHEN external_id_hash IS NOT NULL THEN ',external_id' ELSE '' END, 2)"""


def events_sql(source: str) -> str:
    """The query of events: `source` is a FROM clause (and WHERE) with conversions as `c` LEFT JOIN
    clicks as `k`. Each row: the conversion's id, tracker, click_id, event, event_id, event_time and
    attempts; `click_pixel` and `pixel`, the pixel candidates in order; `match_keys`; `event_json`."""
    return f"""
SELECT id, tracker, click_id, event, event_id, event_time, attempts, click_pixel, pixel,
    {_KEYS} AS match_keys,
    {_EVENT} AS event_json
FROM (
    SELECT c.id, c.tracker, c.click_id, c.event, CAST(c.event_id AS TEXT) AS event_id,
        CAST(c.event_time AS INTEGER) AS event_time, c.value, c.currency, c.attempts,
        NULLIF(k.pixel, '') AS click_pixel, NULLIF(c.pixel, '') AS pixel,
        {_MERGED}
    FROM {source}
)
ORDER BY id"""  # noqa: S608 -- column names are constants; `source` is a constant of the caller's


def pixel_refs(row: Mapping[str, Any]) -> tuple[str, ...]:
    """Where an event may go, in order: its click's pixel, then its own (postback, status route, tracker)."""
    return tuple(ref for ref in (row["click_pixel"], row["pixel"]) if ref)


@dataclass(frozen=True)
class Explained:
    event: dict[str, Any]
    pixel_refs: tuple[str, ...]
    match_keys: tuple[str, ...]


_EXPLAIN = (
    f"WITH c({', '.join(CONVERSION_COLUMNS)}) AS (VALUES ({', '.join('?' * len(CONVERSION_COLUMNS))})), "
    f"k({', '.join(CLICK_COLUMNS)}) AS (VALUES ({', '.join('?' * len(CLICK_COLUMNS))}))"
    + events_sql("c LEFT JOIN k ON k.click_id = c.click_id")
)


def explain(conversion: Mapping[str, Any], click: Mapping[str, Any] | None) -> Explained:
    """The event a conversion (not stored yet) would become with `click`: the worker's query, run on
    these values in an in-memory database."""
    values = [conversion.get(column) for column in CONVERSION_COLUMNS]
    theirs = [click[column] if click is not None else None for column in CLICK_COLUMNS]
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.row_factory = sqlite3.Row
        row = db.execute(_EXPLAIN, [*values, *theirs]).fetchone()
    keys = tuple(row["match_keys"].split(",")) if row["match_keys"] else ()
    return Explained(json.loads(row["event_json"]), pixel_refs(row), keys)
