"""Per-pixel request pacing: how fast the worker may call TikTok for one pixel (AIMD, clock-free)."""

from __future__ import annotations

import math


class Pacer:
    """Spaces requests for one pixel at 1/rate seconds and adapts the rate to TikTok's answers.

    TikTok does not publish the Events API's rate limit (the Marketing API's app limits are 10-30
    requests/s), so the rate is learnt the way TCP learns a link: each success adds `increase`
    requests/s, each rate-limit answer multiplies the rate by `decrease`. The caller passes `now`
    (any monotonic clock) so this holds no clock of its own and tests need no sleeping.
    """

    def __init__(
        self,
        rate: float = 20.0,
        min_rate: float = 0.2,
        max_rate: float = 50.0,
        increase: float = 1.0,
        decrease: float = 0.5,
    ) -> None:
        if not (math.isfinite(min_rate) and math.isfinite(max_rate) and 0 < min_rate <= max_rate):
            raise ValueError(f"need 0 < min_rate <= max_rate, got {min_rate!r} and {max_rate!r}")
        if not min_rate <= rate <= max_rate:
            raise ValueError(f"rate {rate!r} is outside [{min_rate!r}, {max_rate!r}]")
        if not (math.isfinite(increase) and increase >= 0):
            raise ValueError(f"increase must be a finite number >= 0, got {increase!r}")
        if not 0 < decrease < 1:
            raise ValueError(f"decrease must be within (0, 1), got {decrease!r}")
        self.rate = rate
        self.min_rate = min_rate
        self.max_rate = max_rate
        self.increase = increase
        self.decrease = decrease
        self._last_start: float | None = None

    def next_send_at(self, now: float) -> float:
        """The earliest time (>= now) the next request may start."""
        if self._last_start is None:
            return now
        # Spacing is measured from the last start with the current rate, so a slow-down after a
        # rate-limit answer applies to the very next request, not one interval later.
        return max(now, self._last_start + 1.0 / self.rate)

    def sent(self, now: float) -> None:
        """Record that a request started at `now`."""
        # max(): a caller reading a clock that stepped back must not shorten the spacing.
        self._last_start = now if self._last_start is None else max(self._last_start, now)

    def on_success(self) -> None:
        """Additive increase, up to max_rate."""
        self.rate = min(self.max_rate, self.rate + self.increase)

    def on_rate_limited(self) -> None:
        """Multiplicative decrease, down to min_rate."""
        self.rate = max(self.min_rate, self.rate * self.decrease)
