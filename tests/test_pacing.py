"""Per-pixel pacing: spacing at 1/rate, slowing down on rate limits, recovering on successes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.pacing import Pacer


def test_first_request_may_start_at_once() -> None:
    assert Pacer().next_send_at(100.0) == 100.0


def test_next_request_waits_one_over_rate_after_the_last_start() -> None:
    pacer = Pacer(rate=4.0)
    pacer.sent(100.0)
    assert pacer.next_send_at(100.0) == pytest.approx(100.25)


def test_a_request_after_the_spacing_has_passed_may_start_at_once() -> None:
    pacer = Pacer(rate=4.0)
    pacer.sent(100.0)
    assert pacer.next_send_at(101.0) == 101.0


def test_rate_limit_halves_the_rate() -> None:
    pacer = Pacer(rate=20.0)
    pacer.on_rate_limited()
    assert pacer.rate == 10.0


def test_rate_limit_widens_the_spacing_of_the_very_next_request() -> None:
    pacer = Pacer(rate=10.0)
    pacer.sent(0.0)
    pacer.on_rate_limited()
    assert pacer.next_send_at(0.0) == pytest.approx(0.2)


def test_repeated_rate_limits_stop_at_min_rate() -> None:
    pacer = Pacer(rate=20.0, min_rate=0.2)
    for _ in range(50):
        pacer.on_rate_limited()
    assert pacer.rate == 0.2


def test_success_adds_one_request_per_second() -> None:
    pacer = Pacer(rate=5.0)
    pacer.on_success()
    assert pacer.rate == 6.0


def test_successes_stop_at_max_rate() -> None:
    pacer = Pacer(rate=45.0, max_rate=50.0)
    for _ in range(20):
        pacer.on_success()
    assert pacer.rate == 50.0


def test_successes_recover_the_rate_after_a_rate_limit() -> None:
    pacer = Pacer(rate=20.0)
    for _ in range(3):
        pacer.on_rate_limited()
    assert pacer.rate == 2.5
    for _ in range(18):
        pacer.on_success()
    assert pacer.rate == 20.5


def test_a_clock_step_back_does_not_shorten_the_spacing() -> None:
    pacer = Pacer(rate=1.0)
    pacer.sent(100.0)
    pacer.sent(50.0)
    assert pacer.next_send_at(50.0) == 101.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0.1},
        {"rate": 60.0},
        {"min_rate": 0.0},
        {"min_rate": 10.0, "max_rate": 5.0, "rate": 7.0},
        {"decrease": 1.0},
        {"decrease": 0.0},
        {"increase": -1.0},
    ],
)
def test_nonsensical_settings_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Pacer(**kwargs)


steps = st.lists(
    st.tuples(
        st.sampled_from(["sent", "success", "rate_limited"]),
        st.floats(min_value=0.0, max_value=10.0),  # time that passes before the step
    ),
    max_size=200,
)


@given(steps=steps)
def test_rate_stays_within_bounds_whatever_tiktok_answers(steps: list[tuple[str, float]]) -> None:
    pacer = Pacer()
    now = 0.0
    for step, elapsed in steps:
        now += elapsed
        if step == "sent":
            pacer.sent(now)
        elif step == "success":
            pacer.on_success()
        else:
            pacer.on_rate_limited()
        assert pacer.min_rate <= pacer.rate <= pacer.max_rate


@given(steps=steps)
def test_next_send_is_never_before_now_nor_closer_than_one_over_rate(steps: list[tuple[str, float]]) -> None:
    pacer = Pacer()
    now = 0.0
    last_start = None
    for step, elapsed in steps:
        now += elapsed
        if step == "sent":
            start = pacer.next_send_at(now)
            pacer.sent(start)
            last_start = start
            now = start
        elif step == "success":
            pacer.on_success()
        else:
            pacer.on_rate_limited()
        at = pacer.next_send_at(now)
        assert at >= now
        if last_start is not None:
            assert at >= last_start + 1.0 / pacer.rate - 1e-9
