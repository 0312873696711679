"""Delivery notices: wire format round trip and rejection of malformed input."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.errors import DecodeError, Reason
from overlay.wire import cbor
from overlay.wire import delivered as wire

KEYS = st.lists(st.binary(min_size=16, max_size=16), min_size=0, max_size=wire.MAX_KEYS)


@given(KEYS)
def test_round_trip_and_size_bound(keys):
    frame = wire.Delivered(tuple(keys))
    raw = wire.encode(frame)
    assert len(raw) <= wire.MAX_SIZE
    assert wire.decode(raw) == frame


def test_notice_key_is_a_domain_separated_digest_not_the_id():
    mid = bytes(range(16))
    k = wire.notice_key(mid)
    assert len(k) == wire.KEY_SIZE and k != mid
    assert k == wire.notice_key(bytes(range(16)))
    assert k != wire.notice_key(bytes(range(1, 17)))


@pytest.mark.parametrize(
    "value, reason",
    [
        ({0: 2, 1: [b"k" * 16]}, Reason.UNKNOWN_VERSION),
        ({0: 1, 1: [b"k" * 15]}, Reason.MALFORMED),
        ({0: 1, 1: [b"k" * 16], 2: 0}, Reason.MALFORMED),  # unknown key
        ({0: 1, 1: b"k" * 16}, Reason.MALFORMED),  # not an array
        ([1, [b"k" * 16]], Reason.MALFORMED),
    ],
)
def test_rejects(value, reason):
    with pytest.raises(DecodeError) as e:
        wire.decode(cbor.dumps(value))
    assert e.value.reason is reason


def test_rejects_oversized_and_garbage():
    with pytest.raises(DecodeError) as e:
        wire.decode(cbor.dumps({0: 1, 1: [bytes(16)] * (wire.MAX_KEYS + 1)}))
    assert e.value.reason in (Reason.OVERSIZED, Reason.MALFORMED)
    with pytest.raises(DecodeError):
        wire.decode(b"\xff\x00garbage")
    with pytest.raises(ValueError):
        wire.Delivered((b"short",))
    # an empty frame is a valid answer to a question (never a valid gossip notice)
    assert wire.decode(wire.encode(wire.Delivered(()))) == wire.Delivered(())


@given(st.sets(st.binary(min_size=16, max_size=16), max_size=2 * wire.MAX_KEYS), st.data())
def test_answer_round_trip_and_size_bound(keys, data):
    keys = sorted(keys)
    split = data.draw(st.integers(0, len(keys)))
    delivered, holding = keys[:split][: wire.MAX_KEYS], keys[split:][: wire.MAX_KEYS]
    answer = wire.Answer(tuple(delivered), tuple(holding))
    raw = wire.encode_answer(answer)
    assert len(raw) <= wire.ANSWER_MAX_SIZE
    assert wire.decode_answer(raw) == answer


@pytest.mark.parametrize(
    "value",
    [
        {0: 1, 1: [b"k" * 16], 2: [b"k" * 16]},  # both delivered and held
        {0: 1, 1: []},  # holding missing
        {0: 1, 1: [], 2: [], 3: []},  # in-flight marks present but empty
        {0: 1, 1: [], 2: [], 4: []},  # unknown key
        {0: 1, 1: [], 2: [], 3: [[b"k" * 16]]},  # a mark without its exit
        {0: 1, 1: [], 2: [], 3: [[b"k" * 16, b"x" * 31]]},
        {0: 1, 1: [], 2: [], 3: [[b"k" * 16, b"x" * 32]] * (wire.MAX_KEYS + 1)},
        {0: 1, 1: [], 2: [b"k" * 16] * (wire.MAX_KEYS + 1)},
        {0: 1, 1: [], 2: [b"short"]},
    ],
)
def test_answer_rejects(value):
    with pytest.raises(DecodeError):
        wire.decode_answer(cbor.dumps(value))
    with pytest.raises(ValueError):
        wire.Answer((b"k" * 16,), (b"k" * 16,))


def test_answer_with_in_flight_marks_round_trips_within_the_cap():
    keys = [bytes([i]) * 16 for i in range(wire.MAX_KEYS)]
    full = wire.Answer(tuple(keys), (), tuple((k, bytes([7]) * 32) for k in keys))
    raw = wire.encode_answer(full)
    assert len(raw) <= wire.ANSWER_MAX_SIZE and wire.decode_answer(raw) == full
    # without marks the answer is byte for byte what it was before marks existed
    plain = wire.Answer((keys[0],), (keys[1],))
    assert wire.encode_answer(plain) == cbor.dumps({0: 1, 1: [keys[0]], 2: [keys[1]]})


@pytest.mark.parametrize("ended", [False, True])
def test_mark_round_trip(ended):
    mark = wire.Mark(b"m" * 16, ended)
    raw = wire.encode_mark(mark)
    assert len(raw) <= wire.MARK_MAX_SIZE and wire.decode_mark(raw) == mark


@pytest.mark.parametrize(
    "value",
    [
        {0: 1, 1: b"m" * 16},  # ended missing
        {0: 1, 1: b"m" * 15, 2: 0},
        {0: 1, 1: b"m" * 16, 2: 2},
        {0: 1, 1: b"m" * 16, 2: 0, 3: 0},
        {0: 2, 1: b"m" * 16, 2: 0},
    ],
)
def test_mark_rejects(value):
    with pytest.raises(DecodeError):
        wire.decode_mark(cbor.dumps(value))
