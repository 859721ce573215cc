"""Read-only summaries of the database: `stats`, `failed list`, and the gauges behind /metrics."""

from __future__ import annotations

import time
from typing import Any

from bridge.enrich import MATCH_KEYS
from bridge.retry import FIX_HELD, FIX_UNCONFIGURED
from bridge.runtime import Runtime
from bridge.store import STATES, Store

# match_keys is a comma-separated list of MATCH_KEYS; each key's count per pixel.
_KEY_SUMS = ", ".join(f"SUM(instr(',' || match_keys || ',', ',{key},') > 0) AS {key}" for key in MATCH_KEYS)
_COVERAGE = f"""SELECT sent_pixel AS pixel, COUNT(*) AS n, {_KEY_SUMS} FROM conversions
WHERE match_keys IS NOT NULL AND sent_pixel IS NOT NULL GROUP BY sent_pixel"""  # noqa: S608 -- constant keys


# Where stats lists events the worker has not looked at yet.
NOT_ROUTED = "(not yet routed)"


async def collect(store: Store, now: float | None = None) -> dict[str, Any]:
    """Counts by state and pixel, oldest pending age, match-key coverage, last errors per pixel."""
    now = time.time() if now is None else now
    by_pixel: dict[str, dict[str, Any]] = {}

    def pixel_entry(name: str) -> dict[str, Any]:
        return by_pixel.setdefault(
            name,
            {
                "states": dict.fromkeys(STATES, 0),
                "oldest_pending_seconds": None,
                "coverage": {},
                "sent_with_keys": 0,
                "healthy": True,
                "last_code": None,
                "last_error": None,
            },
        )

    totals = dict.fromkeys(STATES, 0)
    for row in await store.fetchall(
        "SELECT COALESCE(sent_pixel, '') AS pixel, state, COUNT(*) AS n, MIN(received_at) AS oldest "
        "FROM conversions GROUP BY 1, 2"
    ):
        totals[row["state"]] += row["n"]
        if row["state"] == "ignored" and not row["pixel"]:
            continue  # never meant for a pixel: counted in the totals and by reason, below
        entry = pixel_entry(row["pixel"] or NOT_ROUTED)
        entry["states"][row["state"]] = row["n"]
        if row["state"] == "pending" and row["oldest"] is not None:
            age = max(0.0, now - row["oldest"])
            current = entry["oldest_pending_seconds"]
            entry["oldest_pending_seconds"] = age if current is None else max(current, age)

    # Coverage is over events the worker has looked at (it records which keys each one carried),
    # counted by SQLite: a large database is not read row by row into Python.
    for row in await store.fetchall(_COVERAGE):
        entry = pixel_entry(row["pixel"])
        entry["sent_with_keys"] = row["n"]
        entry["coverage"] = {key: row[key] for key in MATCH_KEYS}
    for entry in by_pixel.values():
        total = entry.pop("sent_with_keys")
        counts = entry["coverage"]
        entry["coverage"] = {
            key: (round(counts.get(key, 0) / total, 4) if total else None) for key in MATCH_KEYS
        }
        entry["events_examined"] = total

    for row in await store.fetchall("SELECT pixel, healthy, last_code, last_error FROM pixel_status"):
        entry = pixel_entry(row["pixel"])
        entry["healthy"] = bool(row["healthy"])
        entry["last_code"] = row["last_code"]
        entry["last_error"] = row["last_error"]
    for row in await store.fetchall(
        "SELECT sent_pixel AS pixel, last_code, last_error FROM conversions c WHERE id IN "
        "(SELECT MAX(id) FROM conversions WHERE last_error IS NOT NULL AND sent_pixel IS NOT NULL "
        "GROUP BY sent_pixel)"
    ):
        entry = pixel_entry(row["pixel"])
        entry.setdefault("last_event_error", row["last_error"])

    ignored = {
        row["reason"]: row["n"]
        for row in await store.fetchall(
            "SELECT reason, COUNT(*) AS n FROM conversions WHERE state = 'ignored' GROUP BY reason"
        )
    }
    return {"totals": totals, "ignored_reasons": ignored, "pixels": by_pixel}


async def refresh_gauges(runtime: Runtime, now: float | None = None) -> None:
    """Bring the queue, state and pixel gauges up to date just before a scrape.

    Cheap on a large database, since a scraper calls it every few seconds: counts by state come from
    an index, and only pending rows are read (routed like the worker routes them).
    """
    now = time.time() if now is None else now
    store = runtime.store
    config = runtime.config
    metrics = runtime.metrics
    counts = dict.fromkeys(STATES, 0)
    for row in await store.fetchall("SELECT state, COUNT(*) AS n FROM conversions GROUP BY state"):
        counts[row["state"]] = row["n"]
    depth: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for row in await store.fetchall(
        "SELECT k.pixel AS click_ref, c.pixel AS ref, COUNT(*) AS n, "
        "MIN(c.received_at) AS oldest FROM conversions c LEFT JOIN clicks k ON k.click_id = c.click_id "
        "WHERE c.state = 'pending' GROUP BY 1, 2"
    ):
        # Routed as the worker routes. A pixel no longer in the config keeps its events (they wait for
        # it), so its name stays a label while they do.
        pixel = config.route_pixel([ref for ref in (row["click_ref"], row["ref"]) if ref])
        depth[pixel] = depth.get(pixel, 0) + row["n"]
        oldest[pixel] = max(oldest.get(pixel, 0.0), now - row["oldest"])
    persisted = {
        row["pixel"]: bool(row["healthy"])
        for row in await store.fetchall("SELECT pixel, healthy FROM pixel_status")
    }

    healthy: dict[str, float] = {}
    for pixel in config.settings.pixels:
        # What this process saw last; before its first answer, what the previous run recorded.
        health = runtime.health.get(pixel)
        healthy[pixel] = 1 if (health.healthy if health is not None else persisted.get(pixel, True)) else 0
    pixels = sorted({*config.settings.pixels, *depth})
    metrics.gauges.values = {
        "bridge_conversions": dict(counts),
        "bridge_queue_depth": {pixel: depth.get(pixel, 0) for pixel in pixels},
        "bridge_oldest_pending_seconds": {pixel: max(0.0, oldest.get(pixel, 0.0)) for pixel in pixels},
        "bridge_pixel_healthy": healthy,
    }


def format_stats(summary: dict[str, Any]) -> str:
    lines = ["totals: " + ", ".join(f"{state} {n}" for state, n in summary["totals"].items())]
    if summary["ignored_reasons"]:
        lines.append("ignored: " + ", ".join(f"{r} {n}" for r, n in summary["ignored_reasons"].items()))
    if summary.get("test_event_pixels"):
        lines.append(
            f"TEST EVENTS for {', '.join(summary['test_event_pixels'])}: test_event_code is set in the"
            " config, so their events are not counted as conversions"
        )
    unconfigured = summary.get("unconfigured_pixels", ())
    for pixel, entry in sorted(summary["pixels"].items()):
        if pixel in unconfigured:
            lines.append(f"pixel {pixel}: NOT IN THE CONFIG, its pending events wait for it")
            lines.append(f"  {FIX_UNCONFIGURED}")
        else:
            lines.append(
                f"pixel {pixel}: " + ("healthy" if entry["healthy"] else "HELD (token or permission error)")
            )
            if not entry["healthy"]:
                lines.append(f"  {FIX_HELD}")
        lines.append("  " + ", ".join(f"{s} {n}" for s, n in entry["states"].items() if n))
        if entry["oldest_pending_seconds"] is not None:
            lines.append(f"  oldest pending: {entry['oldest_pending_seconds']:.0f}s")
        if entry["events_examined"]:
            cover = ", ".join(
                f"{key} {share:.0%}" for key, share in entry["coverage"].items() if share is not None
            )
            lines.append(f"  match keys ({entry['events_examined']} events): {cover}")
        if entry["states"].get("unmatched"):
            lines.append(f"  unmatched (no match key at all): {entry['states']['unmatched']}")
        if entry["last_error"] or entry.get("last_event_error"):
            code = f" [{entry['last_code']}]" if entry["last_code"] is not None else ""
            lines.append(f"  last error{code}: {entry['last_error'] or entry.get('last_event_error')}")
    return "\n".join(lines)
