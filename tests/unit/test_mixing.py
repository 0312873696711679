"""overlay.core.mixing: delays, the mix pool, Poisson timers, loop monitoring."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from overlay.core.mixing import (
    MAX_DELAY_MS,
    LoopMonitor,
    MixPool,
    draw_delays,
    next_poisson,
    ramp_keeps,
)
from overlay.core.outbox import Outbox
from overlay.crypto import SigningKey
from overlay.errors import LocalError


def nid(i: int):
    return SigningKey(bytes([i + 1]) * 32).node_id


def test_delays_are_exponential_with_the_chosen_mean():
    rng = random.Random(1)
    d = draw_delays(rng, 0.5, 20_000)
    assert all(isinstance(x, int) and 0 <= x <= MAX_DELAY_MS for x in d)
    assert statistics.mean(d) == pytest.approx(500, rel=0.03)
    # exponential: the median is mean * ln 2, P(X > 2 mean) = e^-2
    assert statistics.median(d) == pytest.approx(500 * math.log(2), rel=0.05)
    assert sum(x > 1000 for x in d) / len(d) == pytest.approx(math.exp(-2), abs=0.01)
    assert draw_delays(rng, 0, 3) == [0, 0, 0]
    assert draw_delays(rng, 1e9, 5) == [MAX_DELAY_MS] * 5
    with pytest.raises(LocalError):
        draw_delays(rng, 1, -1)


def test_pool_releases_by_due_time_independently_of_arrival():
    pool: MixPool[str] = MixPool(max_packets=10)
    assert pool.next_due() is None
    assert pool.hold(0.0, 5.0, "slow", 10)
    assert pool.hold(1.0, 1.0, "fast", 10)
    assert pool.hold(1.0, 1.0, "fast2", 10)  # same due time: arrival order
    assert pool.next_due() == 2.0 and len(pool) == 3 and pool.held_bytes == 30
    assert pool.due(1.9) == []
    assert pool.due(2.0) == ["fast", "fast2"]
    assert pool.due(100.0) == ["slow"]
    assert len(pool) == 0 and pool.held_bytes == 0 and pool.released == 3


def test_pool_bounds_refuse_the_arriving_packet():
    pool: MixPool[int] = MixPool(max_packets=3, max_bytes=2500)
    assert pool.hold(0, 1, 1, 1000) and pool.hold(0, 1, 2, 1000)
    assert not pool.hold(0, 1, 3, 1000)  # bytes
    assert pool.hold(0, 1, 4, 100)
    assert not pool.hold(0, 0.5, 5, 1)  # packets, even if due earlier
    assert pool.overflows == 2 and len(pool) == 3
    assert pool.drain() == [1, 2, 4] and len(pool) == 0
    with pytest.raises(LocalError):
        MixPool(max_packets=0)


def test_poisson_process_rate():
    rng = random.Random(3)
    t, n = 0.0, 0
    while True:
        t = next_poisson(rng, 2.0, t)
        if t > 5000:
            break
        n += 1
    assert n / 5000 == pytest.approx(2.0, rel=0.03)
    assert next_poisson(rng, 0.0, 1.0) == math.inf


def test_loop_monitor_blames_relays_of_lost_loops():
    m = LoopMonitor(slack=2.0, max_inflight=3, max_nodes=3)
    a, b, c, d = nid(0), nid(1), nid(2), nid(3)
    assert m.sent(b"1", [a, b], now=0.0, held=1.0)
    assert m.sent(b"2", [a, c], now=0.0, held=1.0)
    assert m.sent(b"3", [b, c], now=0.0, held=5.0)
    assert not m.sent(b"4", [d], now=0.0, held=1.0)  # bounded
    assert m.next_deadline() == 3.0
    assert m.returned(b"1", 2.0)
    assert m.tick(2.9) == []
    lost = m.tick(3.0)
    assert [x.loop_id for x in lost] == [b"2"] and lost[0].relays == (a, c)
    assert m.evidence == {a: 1, c: 1}
    assert not m.returned(b"2", 3.5)  # late: already counted lost
    assert m.returned(b"3", 6.0)
    assert m.suspects() == {a: 0.5, c: 0.5}
    assert m.stats == {"sent": 3, "returned": 2, "lost": 1, "late": 1, "refused": 1}


def test_outbox_timeout_starts_after_the_chosen_delays():
    ob = Outbox(timeout=3.0)
    path = (nid(0), nid(1), nid(2))
    ob.add(b"m" * 16, "smtp:a@example.org", b"x", 0.0)
    ob.sent(b"m" * 16, path, path[-1], 0.0, held=10.0)
    assert ob.get(b"m" * 16).next_at == 13.0
    assert not any(type(d).__name__ == "Attempt" for d in ob.tick(12.9))  # held, not lost
    assert any(type(d).__name__ == "Attempt" for d in ob.tick(13.0))
    # the round-trip sample leaves the chosen delays out
    ob.add(b"n" * 16, "smtp:a@example.org", b"x", 20.0)
    ob.sent(b"n" * 16, path, path[-1], 20.0, held=10.0)
    from overlay.wire.delivery import AckStatus

    ob.on_ack(b"n" * 16, AckStatus.QUEUED, "", path[-1], 30.5)
    assert ob.srtt == pytest.approx(0.5)


def test_loop_cover_ramps_up_linearly_over_the_ramp():
    """A starting relay's own loops: none kept at the start, about half of the
    full-rate events over the ramp, every one after it; ramp 0 keeps all."""
    rng = random.Random(7)
    ramp, rate = 300.0, 2.0
    kept_in_ramp = [0, 0, 0]  # per third of the ramp
    events_in_ramp = [0, 0, 0]
    now, after = 0.0, []
    while now < 2 * ramp:
        now = next_poisson(rng, rate, now)
        keep = ramp_keeps(rng, now, ramp)
        if now < ramp:
            third = int(3 * now / ramp)
            events_in_ramp[third] += 1
            kept_in_ramp[third] += keep
        else:
            after.append(keep)
    shares = [k / e for k, e in zip(kept_in_ramp, events_in_ramp, strict=True)]
    assert 0.1 < shares[0] < 0.25 and 0.4 < shares[1] < 0.6 and 0.75 < shares[2] < 0.92
    assert 0.45 < sum(kept_in_ramp) / sum(events_in_ramp) < 0.55
    assert all(after)
    assert not ramp_keeps(random.Random(1), 0.0, ramp)
    assert all(ramp_keeps(rng, 0.0, 0.0) for _ in range(100))
