"""Prometheus metrics: one registry per running bridge, so tests can run several side by side."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# `_created` series double the output and no dashboard uses them.
disable_created_metrics()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.postbacks = Counter(
            "bridge_postbacks",
            "Postbacks received, by tracker and result.",
            ["tracker", "result"],
            registry=r,
        )
        self.clicks = Counter("bridge_clicks", "Click registrations, by result.", ["result"], registry=r)
        self.dropped_identifiers = Counter(
            "bridge_identifiers_dropped",
            "Identifiers given but unusable (unparseable phone, invalid ip, unsubstituted macro).",
            ["field"],
            registry=r,
        )
        self.conversions = Gauge(
            "bridge_conversions", "Conversions in the database, by state.", ["state"], registry=r
        )
        self.attempts = Counter(
            "bridge_delivery_attempts",
            "Requests to the Events API, by pixel and TikTok's answer code (or http_NNN, timeout, error).",
            ["pixel", "code"],
            registry=r,
        )
        self.delivered = Counter(
            "bridge_events_finished",
            "Events leaving the queue, by pixel and final state.",
            ["pixel", "state"],
            registry=r,
        )
        self.batch_size = Histogram(
            "bridge_batch_size",
            "Events per Events API request.",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.latency = Histogram(
            "bridge_tiktok_request_seconds", "Events API request latency.", ["pixel"], registry=r
        )
        # Pending events are counted for the pixel the worker will send them to, as it routes them
        # (the click's pixel, else the conversion's, else default_pixel); "(unknown)" for a pixel the
        # config does not have.
        self.queue_depth = Gauge("bridge_queue_depth", "Pending events, by pixel.", ["pixel"], registry=r)
        self.oldest_pending = Gauge(
            "bridge_oldest_pending_seconds",
            "Age of the oldest pending event, by pixel.",
            ["pixel"],
            registry=r,
        )
        self.pixel_healthy = Gauge(
            "bridge_pixel_healthy",
            "1 when the pixel's token is accepted, 0 while its events are held.",
            ["pixel"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
