"""Property tests for the record codec and the membership merge."""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.core.membership import MembershipView
from overlay.crypto import SigningKey
from overlay.errors import RemoteError
from overlay.records import decode, validate
from tests.recgen import NOW, exit_record

REC = exit_record(seq=7)
RAW = REC.encode()
ALT_KEYS = [SigningKey(bytes([i]) * 32) for i in range(1, 4)]


@given(seq=st.integers(0, 2**64 - 1), ttl=st.integers(1, 7 * 24 * 3600))
@settings(max_examples=60)
def test_round_trip(seq, ttl):
    rec = exit_record(seq=seq, ttl=ttl)
    raw = rec.encode()
    assert decode(raw).encode() == raw
    assert validate(raw, NOW) == rec


@given(pos=st.integers(0, len(RAW) - 1), delta=st.integers(1, 255))
@settings(max_examples=400)
def test_every_byte_mutation_rejected(pos, delta):
    data = bytearray(RAW)
    data[pos] = (data[pos] + delta) % 256
    try:
        validate(bytes(data), NOW)
    except RemoteError:
        return
    raise AssertionError(f"mutation at {pos} accepted")


@given(cut=st.integers(0, len(RAW) - 1))
def test_every_truncation_rejected(cut):
    try:
        validate(RAW[:cut], NOW)
    except RemoteError:
        return
    raise AssertionError("truncation accepted")


@given(extra=st.binary(min_size=1, max_size=8))
def test_trailing_bytes_rejected(extra):
    try:
        validate(RAW + extra, NOW)
    except RemoteError:
        return
    raise AssertionError("trailing bytes accepted")


@given(data=st.binary(max_size=1200))
@settings(max_examples=300)
def test_arbitrary_bytes_give_only_typed_rejection(data):
    try:
        decode(data)
    except RemoteError:
        pass


@given(seqs=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 20)), min_size=1, max_size=25))
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
def test_merge_commutative_idempotent_monotone(seqs):
    recs = [exit_record(seq=s, key=ALT_KEYS[k]) for k, s in seqs]
    a, b = MembershipView(), MembershipView()
    for r in recs:
        a.accept(r)
    shuffled = recs[:]
    random.Random(len(recs)).shuffle(shuffled)
    for r in shuffled + shuffled:  # duplicates change nothing
        b.accept(r)
    assert a.digest() == b.digest()
    for k in {k for k, _ in seqs}:
        best = max(s for kk, s in seqs if kk == k)
        assert a.seq_of(ALT_KEYS[k].node_id) == best
