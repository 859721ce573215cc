"""Retry timing for deliveries: how long to wait before the next attempt at an event."""

from __future__ import annotations

import math
from dataclasses import dataclass

# A pixel whose token or permissions TikTok rejects is held, not failed: its events are probed this
# often until the operator fixes the config. Trying faster would only repeat the same rejection; a
# reload with a fixed token does not wait for this, it resumes delivery at once.
HELD_PIXEL_RETRY: float = 300.0
# How a held pixel is freed. systemd reads the environment file only when it starts the service, so
# a token fixed there takes a restart; a reload does not see it.
FIX_HELD = (
    "fix the token (or its rights in TikTok), then reload if the token is in the config file, "
    "or restart if it comes from the environment file"
)

# How events are freed whose pixel (named by their click or postback) is no longer in the config.
# They are looked at again every HELD_PIXEL_RETRY seconds; a reload that brings the pixel back makes
# them due at once.
FIX_UNCONFIGURED = (
    "put a pixel with this name or code back in the config and reload; until "
    "then its events wait, and expire after delivery.max_event_age"
)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter, capped (dramatiq's compute_backoff as a value object)."""

    base: float = 2.0  # seconds before the 2nd attempt
    factor: float = 2.0
    # The cap bounds how long a recovered TikTok waits for us: after a 15-minute outage every
    # pending event is tried again within at most `cap` seconds of recovery.
    cap: float = 120.0
    jitter: float = 0.2  # +- this fraction, so events that failed together do not retry in lockstep

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base) and self.base >= 0):
            raise ValueError(f"base must be a finite number >= 0, got {self.base!r}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"factor must be a finite number >= 1, got {self.factor!r}")
        if not (math.isfinite(self.cap) and self.cap >= 0):
            raise ValueError(f"cap must be a finite number >= 0, got {self.cap!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter!r}")

    def nominal(self, attempt: int) -> float:
        """The delay after `attempt` attempts without jitter: base * factor**(attempt-1), capped."""
        if attempt < 1:
            raise ValueError(f"attempt counts attempts already made and starts at 1, got {attempt!r}")
        try:
            raw = self.base * self.factor ** (attempt - 1)
        except OverflowError:
            # A long-held event can reach attempt counts where the power no longer fits a float.
            raw = math.inf
        return min(self.cap, raw)

    def delay(self, attempt: int, rand: float) -> float:
        """Seconds to wait after `attempt` attempts; the caller supplies `rand` in [0, 1), keeping this pure.

        The result lies in nominal * [1 - jitter, 1 + jitter), clipped to [0, cap]: jitter never
        pushes a delay past the cap, so the cap is a promise, not an average.
        """
        if not 0 <= rand < 1:
            raise ValueError(f"rand must be within [0, 1), got {rand!r}")
        spread = 1 + self.jitter * (2 * rand - 1)
        return max(0.0, min(self.cap, self.nominal(attempt) * spread))


# While a pixel's requests fail transiently (TikTok, or the way to it, is down) the worker probes it
# with one waiting event at most this far apart, and the first success makes all its waiting events
# due at once: an outage drains within about a minute of its end, although single events back off
# up to Backoff.cap, which keeps a long outage from using up their max_attempts.
RECOVERY_PROBE = Backoff(cap=60.0)
