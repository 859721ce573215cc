"""What the listener and the worker share while the daemon runs: current config, store, metrics, health."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bridge.config import Config
from bridge.logs import LineBudget
from bridge.metrics import Metrics
from bridge.store import Store

if TYPE_CHECKING:
    from bridge.listeners import MainProcess


@dataclass
class PixelHealth:
    healthy: bool = True
    last_error: str | None = None
    last_code: int | None = None
    since: float = field(default_factory=time.time)


@dataclass
class Runtime:
    """Mutable on purpose: a SIGHUP reload swaps `config` in one assignment, seen by every reader next."""

    config: Config
    store: Store
    metrics: Metrics = field(default_factory=Metrics)
    health: dict[str, PixelHealth] = field(default_factory=dict)
    worker_running: bool = False
    # Lines written per request or per event, capped per kind: a burst of one kind stays under journald's
    # rate limit, past which it would drop the warnings among them too.
    lines: LineBudget = field(default_factory=LineBudget)
    # In a listener process: the daemon, which answers /readyz and /metrics for the whole bridge.
    main_process: MainProcess | None = None

    def pixel_health(self, pixel: str) -> PixelHealth:
        if pixel not in self.health:
            self.health[pixel] = PixelHealth()
        return self.health[pixel]


def event_loop_runner() -> asyncio.Runner:
    """The daemon's and the listener processes' event loop: uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional off Linux
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)
