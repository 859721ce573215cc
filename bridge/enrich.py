"""A stored conversion plus its click -> the TikTok event, its pixel and its match keys (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Fields a click fills when the postback lacks them; values in the postback win.
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

MATCH_KEYS = ("ttclid", "ttp", "ip_ua", "email", "phone", "external_id")


@dataclass(frozen=True)
class Prepared:
    event: dict[str, Any]
    # Candidates in order: the click's pixel, then the conversion's (postback, status route, tracker).
    pixel_refs: tuple[str, ...]
    match_keys: tuple[str, ...]  # which of MATCH_KEYS the event carries


def _get(row: Mapping[str, Any] | None, key: str) -> Any:
    if row is None:
        return None
    value = row[key]
    return value if value not in (None, "") else None


def prepare(conversion: Mapping[str, Any], click: Mapping[str, Any] | None) -> Prepared:
    merged = {
        field: _get(conversion, field) or _get(click, click_field)
        for field, click_field in _FROM_CLICK.items()
    }
    user: dict[str, Any] = {}
    for key in ("ttclid", "ttp", "ip", "user_agent"):
        if merged[key]:
            user[key] = merged[key]
    for key in ("email", "phone", "external_id"):
        if merged[f"{key}_hash"]:
            user[key] = [merged[f"{key}_hash"]]
    event: dict[str, Any] = {
        "event": conversion["event"],
        "event_time": int(conversion["event_time"]),
        "event_id": str(conversion["event_id"]),
        "user": user,
    }
    if conversion["value"] is not None:
        event["properties"] = {"value": conversion["value"], "currency": conversion["currency"]}
    elif conversion["currency"]:
        event["properties"] = {"currency": conversion["currency"]}
    if merged["page_url"]:
        event["page"] = {"url": merged["page_url"]}

    keys = []
    if "ttclid" in user:
        keys.append("ttclid")
    if "ttp" in user:
        keys.append("ttp")
    if "ip" in user and "user_agent" in user:
        keys.append("ip_ua")
    keys.extend(k for k in ("email", "phone", "external_id") if k in user)
    refs = tuple(ref for ref in (_get(click, "pixel"), _get(conversion, "pixel")) if ref)
    return Prepared(event=event, pixel_refs=refs, match_keys=tuple(keys))
