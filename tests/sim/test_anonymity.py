"""The anonymity simulator: the adversary's arithmetic and the extremes it must show."""

from __future__ import annotations

import math

import pytest

from overlay.errors import DecodeError
from overlay.sim.anonymity import Adversary, AnonConfig, measure
from overlay.wire import cover


def test_poisson_mix_pool_arithmetic():
    adv = Adversary(clients=4, nodes=1)
    adv.arrive(0, 0)
    adv.arrive(0, 1)
    out = adv.depart(0)  # either of the two, equally likely
    assert list(out) == [0.5, 0.5, 0, 0, 0]
    adv.arrive(0, 2)
    out = adv.depart(0)  # the one left (half 0, half 1) or the new one
    assert list(out) == pytest.approx([0.25, 0.25, 0.5, 0, 0])
    assert adv.sender_entropy(out) == pytest.approx(1.5)
    last = adv.depart(0)
    assert sum(last) == pytest.approx(1.0) and adv.count[0] == 0
    assert adv.sender_entropy(3) == 0.0  # a packet seen leaving its client


def test_no_mixing_no_cover_is_traced_and_mixing_with_cover_is_not():
    small = dict(clients=20, nodes=6, exits=2, duration=120.0, warmup=30.0, msg_interval=10.0)
    base = measure(AnonConfig(mix_delay=0.0, **small)).summary()
    assert base["messages"] > 100 and base["entropy_p90"] == 0.0
    mixed = measure(
        AnonConfig(mix_delay=0.5, cover_rate=1.0, loop_rate=0.5, relay_loop_rate=0.2, **small)
    ).summary()
    assert mixed["entropy_p50"] > 3.0 and mixed["entropy_p50"] <= math.log2(20)
    assert mixed["latency_p50"] > 0.5  # three holds and a send slot
    # determinism: same config, same numbers
    again = measure(AnonConfig(mix_delay=0.0, **small)).summary()
    assert again == base


def test_cover_payload_codec():
    for kind in cover.KINDS:
        data = cover.encode(kind)
        assert cover.is_cover(data) and cover.decode(data) == kind
    for bad in (b"", b"\xa2\x00\x01\x10\x03", b"\xa2\x00\x02\x10\x01", bytes(17), b"\xa1\x00\x01"):
        with pytest.raises(DecodeError):
            cover.decode(bad)
