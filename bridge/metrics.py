"""Prometheus metrics: one registry per running bridge, so tests can run several side by side."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = CONTENT_TYPE_LATEST

# `_created` series double the output and no dashboard uses them.
disable_created_metrics()


class Gauges:
    """The gauges: counted from the database just before each scrape (stats.refresh_gauges), and kept
    here, not in prometheus_client's Gauge, so a series whose pixel or state is gone is gone from the
    next scrape also with listener processes (its multiprocess files cannot forget a series)."""

    FAMILIES = (
        ("bridge_conversions", "Conversions in the database, by state.", "state"),
        # Pending events are counted for the pixel the worker will send them to, as it routes them (the
        # click's pixel, else the conversion's, else default_pixel); a pixel the config no longer has
        # keeps the name or code the events were given, as long as they wait for it.
        ("bridge_queue_depth", "Pending events, by pixel.", "pixel"),
        ("bridge_oldest_pending_seconds", "Age of the oldest pending event, by pixel.", "pixel"),
        (
            "bridge_pixel_healthy",
            "1 when the pixel's token is accepted, 0 while its events are held.",
            "pixel",
        ),
    )

    def __init__(self) -> None:
        self.values: dict[str, dict[str, float]] = {name: {} for name, _, _ in self.FAMILIES}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, documentation, label in self.FAMILIES:
            family = GaugeMetricFamily(name, documentation, labels=[label])
            for value_label, value in self.values[name].items():
                family.add_metric([value_label], value)
            yield family


MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_between_processes(directory: Path) -> None:
    """From now on, metrics of this process and of the listener processes it starts (which inherit the
    environment) are kept in files in `directory`, and /metrics, in any of them, adds them all up.

    prometheus_client picks its storage from this variable when it is imported, long before the config
    says how many processes there are: the storage of metrics created after this call is switched too.
    """
    os.environ[MULTIPROCESS_ENV] = str(directory)
    values.ValueClass = values.MultiProcessValue()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.shared_dir = os.environ.get(MULTIPROCESS_ENV)
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
        self.gauges = Gauges()
        r.register(self.gauges)
        self._children: dict[tuple[Counter, tuple[str, ...]], Any] = {}

    def inc(self, counter: Counter, *labels: str) -> None:
        """`counter.labels(*labels).inc()`, with the labelled series looked up once, not per request
        (`labels()` validates, converts and locks on every call)."""
        key = (counter, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*labels)
        child.inc()

    def render(self) -> bytes:
        if self.shared_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.shared_dir)
            registry.register(self.gauges)
            return generate_latest(registry)
        return generate_latest(self.registry)
