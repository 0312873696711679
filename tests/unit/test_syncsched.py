"""The anti-entropy schedule: backs off while rounds match, comes back when kicked."""

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.core.syncsched import DIFFERED, FAILED, SAME, Due, SyncSchedule


def _run(sched: SyncSchedule, outcomes, now: float = 0.0) -> list[float]:
    """Drive the schedule; return the gaps between the rounds it asked for."""
    gaps, last = [], now
    for outcome in outcomes:
        step = sched.poll(now)
        if not isinstance(step, Due):
            now += step
            step = sched.poll(now)
        assert isinstance(step, Due)
        gaps.append(now - last)
        last = now
        sched.done(outcome, now)
    return gaps


def test_matching_rounds_back_off_to_the_slowest_rate():
    s = SyncSchedule(0.5, 30.0, random.Random(1))
    gaps = _run(s, [SAME] * 12)
    assert s.interval == 30.0
    # each gap within the jitter of a doubling interval, capped at 30 s
    for k, gap in enumerate(gaps[1:]):
        want = min(0.5 * 2 ** (k + 1), 30.0)
        assert 0.75 * want - 1e-9 <= gap <= 1.25 * want + 1e-9


def test_a_round_that_found_differences_brings_the_fast_rate_back():
    s = SyncSchedule(0.5, 30.0, random.Random(2))
    _run(s, [SAME] * 10)
    assert s.interval == 30.0
    _run(s, [DIFFERED], now=1000.0)
    assert s.interval == 0.5
    assert s.next_at - 1000.0 <= 1.25 * 0.5 + 1e-9 or s.next_at >= 1000.0


def test_failed_rounds_back_off_too():
    s = SyncSchedule(0.5, 8.0, random.Random(3))
    _run(s, [FAILED] * 6)
    assert s.interval == 8.0


def test_kick_makes_a_round_due_soon_and_resets_the_rate():
    s = SyncSchedule(0.5, 30.0, random.Random(4))
    _run(s, [SAME] * 10)
    now = 500.0
    assert not isinstance(s.poll(now), Due) or s.next_at <= now
    s.kick(now)
    step = s.poll(now)
    assert isinstance(step, Due) or step <= 0.5
    assert s.interval == 0.5


def test_kick_for_one_peer_names_it_next_without_changing_the_rate():
    s = SyncSchedule(0.5, 30.0, random.Random(5))
    _run(s, [SAME] * 10)
    s.kick(100.0, peer="p1")
    s.kick(100.0, peer="p1")  # asked twice: one round
    assert s.poll(100.0) == Due("p1")
    assert s.interval == 30.0
    assert not isinstance(s.poll(100.0), Due) or s.next_at <= 100.0


def test_targeted_kicks_are_bounded():
    s = SyncSchedule(0.5, 30.0, random.Random(6))
    for i in range(100):
        s.kick(0.0, peer=i)
    assert len(s._targets) == 8
    assert [s.poll(0.0).peer for _ in range(8)] == list(range(92, 100))


def test_bounds_are_checked_and_reconfigurable():
    with pytest.raises(ValueError):
        SyncSchedule(0.0, 1.0)
    with pytest.raises(ValueError):
        SyncSchedule(2.0, 1.0)
    s = SyncSchedule(0.5, 30.0, random.Random(7))
    _run(s, [SAME] * 10)
    s.configure(0.5, 10.0)
    assert s.interval == 10.0


@given(
    st.lists(st.sampled_from([SAME, DIFFERED, FAILED, "kick", "kick-peer"]), max_size=60),
    st.integers(0, 2**32 - 1),
)
def test_any_sequence_keeps_the_interval_in_bounds_and_rounds_in_the_future(events, seed):
    s = SyncSchedule(0.25, 16.0, random.Random(seed))
    now = 0.0
    for ev in events:
        if ev == "kick":
            s.kick(now)
        elif ev == "kick-peer":
            s.kick(now, peer=seed % 3)
        else:
            step = s.poll(now)
            if not isinstance(step, Due):
                assert 0 < step <= 1.25 * 16.0 + 1e-9
                now += step
            s.done(ev, now)
            assert now < s.next_at <= now + 1.25 * 16.0 + 1e-9
        assert 0.25 <= s.interval <= 16.0
