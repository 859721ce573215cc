"""Backoff policy: exponential, capped, jittered, never negative."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.retry import HELD_PIXEL_RETRY, Backoff

attempts = st.integers(min_value=1, max_value=10_000)
rands = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
policies = st.builds(
    Backoff,
    base=st.floats(min_value=0.0, max_value=1e6),
    factor=st.floats(min_value=1.0, max_value=100.0),
    cap=st.floats(min_value=0.0, max_value=1e6),
    jitter=st.floats(min_value=0.0, max_value=1.0),
)


def test_second_attempt_waits_base_seconds_at_the_jitter_midpoint() -> None:
    assert Backoff().delay(1, 0.5) == 2.0


def test_delay_doubles_per_attempt_until_the_cap() -> None:
    backoff = Backoff(jitter=0.0)
    assert [backoff.delay(n, 0.0) for n in range(1, 9)] == [2, 4, 8, 16, 32, 64, 120, 120]


@given(policy=policies, attempt=attempts, rand=rands)
def test_delay_never_exceeds_cap_and_is_never_negative(policy: Backoff, attempt: int, rand: float) -> None:
    assert 0.0 <= policy.delay(attempt, rand) <= policy.cap


@given(policy=policies, first=attempts, second=attempts)
def test_delay_without_jitter_never_shrinks_as_attempts_grow(
    policy: Backoff, first: int, second: int
) -> None:
    low, high = sorted((first, second))
    # rand 0.5 is the jitter midpoint: the delay is the nominal one.
    assert policy.delay(low, 0.5) <= policy.delay(high, 0.5)


@given(attempt=attempts, rand=rands)
def test_jitter_stays_within_its_fraction_of_the_nominal_delay(attempt: int, rand: float) -> None:
    backoff = Backoff()
    nominal = backoff.nominal(attempt)
    assert nominal * 0.8 - 1e-9 <= backoff.delay(attempt, rand) <= min(backoff.cap, nominal * 1.2)


def test_jitter_spreads_delays_that_would_otherwise_coincide() -> None:
    backoff = Backoff()
    assert backoff.delay(3, 0.0) < backoff.delay(3, 0.5) < backoff.delay(3, 0.99)


@pytest.mark.parametrize(("rand", "spread"), [(0.0, 0.8), (1 - 1e-12, 1.2)])
def test_jitter_reaches_its_full_fraction_at_either_end_of_rand(rand: float, spread: float) -> None:
    backoff = Backoff(jitter=0.2)
    assert backoff.delay(3, rand) == pytest.approx(backoff.nominal(3) * spread)


def test_huge_attempt_counts_give_the_cap_instead_of_overflowing() -> None:
    assert Backoff(jitter=0.0).delay(1_000_000, 0.3) == 120.0


def test_attempt_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="attempt"):
        Backoff().delay(0, 0.5)


@pytest.mark.parametrize("rand", [-0.1, 1.0, float("nan")])
def test_rand_outside_unit_interval_is_rejected(rand: float) -> None:
    with pytest.raises(ValueError, match="rand"):
        Backoff().delay(1, rand)


@pytest.mark.parametrize(
    "kwargs", [{"base": -1.0}, {"factor": 0.5}, {"cap": -1.0}, {"jitter": 1.5}, {"cap": float("inf")}]
)
def test_nonsensical_policy_is_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


def test_policy_is_an_immutable_value() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Backoff().cap = 5.0  # type: ignore[misc]


def test_held_pixels_are_probed_no_faster_than_the_slowest_transient_retry() -> None:
    assert Backoff().cap <= HELD_PIXEL_RETRY
