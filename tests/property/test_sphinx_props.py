"""Property tests for the Sphinx packet format.

- any single bit flip anywhere in a packet, at any hop, is rejected by some
  hop or at the exit (never a silently wrong Deliver); the same for replies,
  where the SURB's creator detects it in open_reply;
- a packet has the same length at every hop whatever the path and message;
- arbitrary bytes given to process / use_surb / open_reply / SurbSecret
  decoding give only the typed rejection;
- ReplayCache behaves like a set per epoch.
"""

from __future__ import annotations

import hashlib
from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.crypto import OnionKey, SigningKey
from overlay.errors import DecodeError, Reason, Replay
from overlay.onion import (
    CLASSES,
    LARGE,
    SMALL,
    Deliver,
    Forward,
    Hop,
    PacketRejected,
    ReplayCache,
    SurbSecret,
    build_packet,
    make_surb,
    open_reply,
    process,
    use_surb,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLIPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _seed(label: str, n: int = 32) -> bytes:
    return hashlib.shake_256(label.encode()).digest(n)


@cache
def _path(n: int):
    out = []
    for i in range(n):
        node = SigningKey(_seed(f"p-node-{i}")).node_id
        key = OnionKey(_seed(f"p-onion-{i}"), 500 + i)
        out.append((node, key))
    return tuple(out)


def _hops(n: int) -> list[Hop]:
    return [Hop(node, key.public, key.epoch) for node, key in _path(n)]


@cache
def _forward_packets(params_name: str, n: int) -> tuple[bytes, tuple[bytes, ...]]:
    """A message and the packet as seen on arrival at each hop."""
    params = {p.name: p for p in CLASSES}[params_name]
    msg = _seed(f"msg-{n}", 300)
    packet, _ = build_packet(params, _hops(n), msg)
    seen = [packet]
    for _, key in _path(n)[:-1]:
        res = process(params, {key.epoch: key}, packet)
        assert isinstance(res, Forward)
        packet = res.packet
        seen.append(packet)
    return msg, tuple(seen)


def _run_from(params, n: int, start: int, packet: bytes):
    """Process ``packet`` from hop ``start`` to the end; return the final result."""
    for _, key in _path(n)[start:]:
        res = process(params, {key.epoch: key}, packet)
        if isinstance(res, Deliver):
            return res
        packet = res.packet
    raise AssertionError("path ended without Deliver")


def _flip(packet: bytes, bit: int) -> bytes:
    b = bytearray(packet)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


@FLIPS
@given(n=st.integers(1, 5), data=st.data())
def test_any_bit_flip_in_small_packet_is_rejected(n, data):
    msg, seen = _forward_packets("small", n)
    hop = data.draw(st.integers(0, n - 1), label="hop")
    bit = data.draw(st.integers(0, SMALL.packet_size * 8 - 1), label="bit")
    try:
        res = _run_from(SMALL, n, hop, _flip(seen[hop], bit))
    except PacketRejected as e:
        assert e.reason in (Reason.BAD_MAC, Reason.MALFORMED, Reason.UNKNOWN_EPOCH)
    else:
        raise AssertionError(f"flip of bit {bit} at hop {hop} delivered {res.payload[:16]!r}")


def test_every_single_bit_flip_of_a_two_hop_packet_is_rejected():
    """Exhaustive: all 16384 single-bit flips of a packet entering hop 0 of 2 (~3 s)."""
    _, seen = _forward_packets("small", 2)
    packet = seen[0]
    outcomes: dict[Reason, int] = {}
    for bit in range(SMALL.packet_size * 8):
        try:
            _run_from(SMALL, 2, 0, _flip(packet, bit))
        except PacketRejected as e:
            outcomes[e.reason] = outcomes.get(e.reason, 0) + 1
        else:
            raise AssertionError(f"flip of bit {bit} delivered")
    assert sum(outcomes.values()) == SMALL.packet_size * 8
    # epoch bits -> unknown epoch; format bits -> malformed; the rest -> a MAC
    assert outcomes[Reason.UNKNOWN_EPOCH] == 32
    assert outcomes[Reason.BAD_MAC] >= SMALL.packet_size * 8 - 8 - 32 - 32


@SLOW
@given(
    n=st.integers(1, 3),
    hop=st.integers(0, 2),
    where=st.sampled_from(["header", "payload"]),
    data=st.data(),
)
def test_any_bit_flip_in_large_packet_is_rejected(n, hop, where, data):
    hop = min(hop, n - 1)
    _, seen = _forward_packets("large", n)
    lo, hi = (0, LARGE.header_size) if where == "header" else (LARGE.header_size, LARGE.packet_size)
    bit = data.draw(st.integers(lo * 8, hi * 8 - 1), label="bit")
    try:
        _run_from(LARGE, n, hop, _flip(seen[hop], bit))
    except PacketRejected:
        pass
    else:
        raise AssertionError("tampered packet delivered")


@cache
def _reply_packets(n: int):
    surb, secret = make_surb(SMALL, _hops(n), _seeded_rng(f"surb-{n}"))
    _, packet = use_surb(SMALL, surb, b"reply body")
    seen = [packet]
    for _, key in _path(n)[:-1]:
        packet = process(SMALL, {key.epoch: key}, packet).packet
        seen.append(packet)
    return secret, tuple(seen)


def _seeded_rng(label: str):
    tape = _seed(label, 4096)
    pos = 0

    def rng(k: int) -> bytes:
        nonlocal pos
        pos += k
        return tape[pos - k : pos]

    return rng


@FLIPS
@given(n=st.integers(1, 5), data=st.data())
def test_any_bit_flip_in_reply_is_rejected_or_detected_by_creator(n, data):
    secret, seen = _reply_packets(n)
    hop = data.draw(st.integers(0, n - 1), label="hop")
    bit = data.draw(st.integers(0, SMALL.packet_size * 8 - 1), label="bit")
    try:
        res = _run_from(SMALL, n, hop, _flip(seen[hop], bit))
        assert res.is_reply and res.surb_id == secret.surb_id
        open_reply(SMALL, secret, res.payload)
    except PacketRejected:
        pass
    else:
        raise AssertionError("tampered reply opened")


@FAST
@given(
    params=st.sampled_from(CLASSES),
    n=st.integers(1, 5),
    msg_len=st.integers(0, SMALL.max_message),
    delays=st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4),
)
def test_packet_length_identical_at_every_hop(params, n, msg_len, delays):
    msg = _seed(f"len-{msg_len}", msg_len)
    packet, _ = build_packet(params, _hops(n), msg, delays_ms=delays[: n - 1])
    lengths, headers = [], []
    for i, (_, key) in enumerate(_path(n)):
        lengths.append(len(packet))
        headers.append(packet[0])
        res = process(params, {key.epoch: key}, packet)
        if isinstance(res, Forward):
            assert res.delay_ms == delays[i]
            packet = res.packet
    assert set(lengths) == {params.packet_size}
    assert set(headers) == {params.format}
    assert isinstance(res, Deliver) and res.payload == msg


_KEY = OnionKey(_seed("fuzz-key"), 7)
_KEYS = {7: _KEY}


@FAST
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_give_only_typed_rejection(raw):
    try:
        process(SMALL, _KEYS, raw)
    except PacketRejected as e:
        assert e.reason in (Reason.MALFORMED, Reason.OVERSIZED, Reason.UNKNOWN_EPOCH)
    else:
        raise AssertionError("garbage accepted")


@FAST
@given(st.binary(min_size=SMALL.packet_size - 5, max_size=SMALL.packet_size - 5))
def test_well_framed_garbage_reaches_the_mac_and_is_rejected(body):
    # right length, right format byte, a live epoch: exercises X25519 and the MAC
    raw = bytes([SMALL.format]) + (7).to_bytes(4, "big") + body
    try:
        process(SMALL, _KEYS, raw)
    except PacketRejected as e:
        assert e.reason in (Reason.BAD_MAC, Reason.MALFORMED)
    else:
        raise AssertionError("garbage accepted")


@FAST
@given(surb=st.binary(max_size=600), reply=st.binary(max_size=64))
def test_arbitrary_surb_bytes_give_typed_rejection_or_a_packet(surb, reply):
    try:
        first, packet = use_surb(SMALL, surb, reply)
    except PacketRejected:
        return
    assert len(packet) == SMALL.packet_size


@FAST
@given(st.binary(max_size=SMALL.payload_size + 2))
def test_arbitrary_reply_payload_is_rejected(payload):
    secret, _ = _reply_packets(2)
    try:
        open_reply(SMALL, secret, payload)
    except PacketRejected:
        return
    raise AssertionError("garbage reply opened")


@FAST
@given(st.binary(max_size=800))
def test_surb_secret_decoding(raw):
    try:
        s = SurbSecret.from_bytes(raw)
    except DecodeError:
        return
    assert s.to_bytes() == raw


@FAST
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.binary(min_size=16, max_size=16)),
        max_size=60,
    )
)
def test_replay_cache_is_a_set_per_epoch(ops):
    cache, model = ReplayCache(), set()
    for epoch, tag in ops:
        try:
            cache.check_and_add(epoch, tag)
        except Replay:
            assert (epoch, tag) in model
        else:
            assert (epoch, tag) not in model
            model.add((epoch, tag))
    assert len(cache) == len(model)
    for e in range(3):
        assert cache.tags(e) == {t for (ep, t) in model if ep == e}
