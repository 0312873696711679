"""The cap accounting of overlay/core/caps.py: a byte token bucket and a sliding window."""

from __future__ import annotations

import math
import random

import pytest

from overlay.core.caps import ByteBucket, WindowCap


def test_bucket_starts_full_refills_at_rate_and_never_beyond_burst():
    b = ByteBucket(rate=1000, burst=4000, now=0.0)
    assert b.take(0.0, 4000)
    assert not b.take(0.0, 1)
    assert b.refused == 1 and b.refused_units == 1
    assert b.level(0.5) == pytest.approx(500)
    assert not b.take(0.5, 600)
    assert b.take(0.5, 500)
    assert b.level(100.0) == 4000  # capped at burst however long it rested
    assert b.taken == 4500


def test_bucket_admits_at_most_burst_plus_rate_times_time():
    """Under any offered load, what passes is bounded by burst + rate * elapsed."""
    rng = random.Random(7)
    b = ByteBucket(rate=2048, burst=32768, now=0.0)
    now, passed = 0.0, 0
    for _ in range(20_000):
        now += rng.random() * 0.01
        n = rng.choice((2048, 32768))
        if b.take(now, n):
            passed += n
        assert passed <= 32768 + 2048 * now + 1e-6
    # and it is not stingier than the rate either (a saturated bucket)
    assert passed >= 2048 * now - 32768


def test_bucket_wait_and_packets_larger_than_burst():
    b = ByteBucket(rate=100, burst=1000, now=0.0)
    assert b.wait(0.0, 1000) == 0.0
    assert b.take(0.0, 1000)
    assert b.wait(0.0, 250) == pytest.approx(2.5)
    assert b.wait(0.0, 1001) == math.inf
    assert b.take(2.5, 250)


def test_zero_rate_is_no_cap():
    b = ByteBucket(rate=0, burst=0, now=0.0)
    assert b.unlimited
    assert all(b.take(0.0, 1 << 20) for _ in range(100))
    assert b.level(0.0) == math.inf and b.wait(0.0, 1 << 30) == 0.0
    assert b.taken == 100 << 20 and b.refused == 0


def test_reconfigure_keeps_level_clipped_to_new_burst():
    b = ByteBucket(rate=100, burst=1000, now=0.0)
    b.take(0.0, 200)  # level 800
    b.configure(10, 500, now=0.0)
    assert b.level(0.0) == 500
    b.configure(10, 5000, now=0.0)
    assert b.level(0.0) == 500  # a larger burst does not hand out tokens
    assert b.level(10.0) == 600
    b.configure(0, 0, now=10.0)  # cap removed
    assert b.take(10.0, 10**9)
    with pytest.raises(ValueError):
        b.configure(10, 0, now=0.0)
    with pytest.raises(ValueError):
        b.configure(-1, 10, now=0.0)
    with pytest.raises(ValueError):
        ByteBucket(rate=math.inf, burst=1, now=0.0)


def test_bucket_clock_stepping_back_stands_still():
    b = ByteBucket(rate=100, burst=1000, now=50.0)
    assert b.take(50.0, 1000)
    assert b.level(10.0) == 0  # backwards: no tokens, no error
    assert b.level(51.0) == pytest.approx(100)


def test_window_holds_limit_per_window_and_frees_as_events_age():
    w = WindowCap(3, window=60.0)
    assert [w.take(t) for t in (0.0, 1.0, 2.0)] == [True, True, True]
    assert not w.take(30.0)
    assert w.used(30.0) == 3
    assert w.wait(30.0) == pytest.approx(30.0)  # the event at 0 ages out at 60
    assert w.take(60.0)  # exactly one window later
    assert not w.take(60.5)
    assert w.wait(60.5) == pytest.approx(0.5)
    assert w.used(200.0) == 0
    assert w.taken == 4


def test_window_never_exceeds_limit_in_any_window():
    rng = random.Random(3)
    w = WindowCap(10, window=60.0)
    times, now = [], 0.0
    for _ in range(5000):
        now += rng.random() * 5
        if w.take(now):
            times.append(now)
    for i, t in enumerate(times):
        inside = [u for u in times[i:] if u < t + 60.0]
        assert len(inside) <= 10
    assert len(times) > 100  # and it lets events through at its rate


def test_window_reconfigure_and_no_cap():
    w = WindowCap(0)
    assert w.unlimited and all(w.take(0.0) for _ in range(1000))
    assert w.used(0.0) == 1000 and w.wait(0.0) == 0.0
    w.configure(2)  # counted events stay counted
    assert not w.take(1.0)
    assert w.wait(1.0) == pytest.approx(59.0)
    w.configure(2000)
    assert w.take(1.0)
    with pytest.raises(ValueError):
        w.configure(-1)
    with pytest.raises(ValueError):
        WindowCap(1, window=0)


def test_window_clock_stepping_back_forgets_nothing_early():
    w = WindowCap(1, window=60.0)
    assert w.take(100.0)
    assert not w.take(20.0)  # earlier clock: still the same window
    assert w.used(20.0) == 1
    assert w.take(160.0)
