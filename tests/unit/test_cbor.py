"""The strict CBOR subset of overlay/wire/cbor.py: every rejection, and bounded frames."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.errors import DecodeError, Reason
from overlay.wire import cbor, sync

CAP = 1024


def reason(data: bytes, max_size: int = CAP) -> Reason:
    with pytest.raises(DecodeError) as ei:
        cbor.loads_canonical(data, max_size)
    return ei.value.reason


def scan_reason(data: bytes, **kw) -> Reason:
    with pytest.raises(DecodeError) as ei:
        cbor.scan(data, **kw)
    return ei.value.reason


def test_accepts_the_subset():
    value = {0: 1, 1: -5, 2: b"\x00" * 30, 3: "h\u00e9", 4: [[], {}, [2**64 - 1, -(2**64)]]}
    data = cbor.dumps(value)
    assert cbor.loads_canonical(data, CAP) == value
    assert cbor.scan(data) == 1 + 10 + 3 + 2  # the map, its keys and values, then nested


@pytest.mark.parametrize(
    "value",
    [
        cbor2.CBORTag(36, "Content-Type: text/plain\n\nx"),  # MIME: the costly one
        cbor2.CBORTag(2, b"\x01" * 9),  # bignum (what cbor2 emits for 2**64)
        cbor2.CBORTag(55799, 1),  # self-described CBOR
        {0: 1, 1: [cbor2.CBORTag(1, 0)]},  # nested
    ],
)
def test_rejects_tags(value):
    assert reason(cbor2.dumps(value)) is Reason.UNSUPPORTED_TYPE


@pytest.mark.parametrize(
    "data",
    [
        b"\xf4",  # false
        b"\xf5",  # true
        b"\xf6",  # null
        b"\xf7",  # undefined
        b"\xf0",  # simple(16)
        b"\xf8\x20",  # simple(32)
        b"\xf9\x3c\x00",  # float16 1.0
        b"\xfa\x3f\x80\x00\x00",  # float32 1.0
        b"\xfb\x3f\xf0\x00\x00\x00\x00\x00\x00",  # float64 1.0
        b"\xff",  # a lone break
        b"\xa1\x00\xf5",  # {0: true}
    ],
)
def test_rejects_floats_and_simple_values(data):
    assert reason(data) is Reason.UNSUPPORTED_TYPE


@pytest.mark.parametrize(
    "data",
    [b"\x5f\x41a\xff", b"\x7f\x61a\xff", b"\x9f\x01\xff", b"\xbf\x00\x01\xff"],
)
def test_rejects_indefinite_lengths(data):
    assert reason(data) is Reason.UNSUPPORTED_TYPE


@pytest.mark.parametrize(
    "data",
    [
        b"\x18\x05",  # 5 in one extra byte
        b"\x19\x00\xff",  # 255 in two
        b"\x1a\x00\x00\xff\xff",  # 65535 in four
        b"\x1b\x00\x00\x00\x00\xff\xff\xff\xff",  # 2**32 - 1 in eight
        b"\x38\x00",  # -1 in one extra byte
        b"\x58\x01a",  # a 1-byte string with a 1-byte length
        b"\x98\x01\x00",  # a 1-item array with a 1-byte count
        b"\xb9\x00\x01\x00\x00",  # a 1-pair map with a 2-byte count
    ],
)
def test_rejects_non_shortest_arguments(data):
    assert reason(data) is Reason.NON_CANONICAL


def test_rejects_non_canonical_values_the_scan_cannot_see():
    assert reason(cbor2.dumps({1: 0, 0: 0})) is Reason.NON_CANONICAL  # key order
    assert reason(b"\xa2\x00\x00\x00\x01") is Reason.NON_CANONICAL  # duplicate key


@pytest.mark.parametrize("data", [b"\x1c", b"\x3d", b"\x5e", b"\x1f", b"\x3f"])
def test_rejects_reserved_additional_info(data):
    assert reason(data) is Reason.MALFORMED


@pytest.mark.parametrize(
    "data",
    [
        b"\x59\xff\xff",  # a 65535-byte string in 3 bytes
        b"\x7a\x7f\xff\xff\xff" + b"x" * 10,  # 2**31 text characters declared
        b"\x9b\x00\x00\x00\x01\x00\x00\x00\x00",  # 2**32 items declared
        b"\xbb\x7f\xff\xff\xff\xff\xff\xff\xff",  # 2**63 pairs declared
        b"\x82\x01",  # an item missing
        b"\xa1\x00",  # a value missing
        b"\x19\x01",  # truncated argument
        b"\x1b\x01\x02",
        b"\x01\x02",  # trailing bytes
        b"",
    ],
)
def test_rejects_lengths_beyond_the_input_truncation_and_trailing_bytes(data):
    assert reason(data) is Reason.MALFORMED


def test_rejects_invalid_utf8():
    assert reason(b"\x62\xc3\x28") is Reason.MALFORMED


def nested(depth: int, inner: bytes = b"\x00") -> bytes:
    return b"\x81" * depth + inner


def test_depth_bound():
    assert cbor.loads_canonical(nested(cbor.MAX_DEPTH), CAP) is not None
    assert reason(nested(cbor.MAX_DEPTH + 1)) is Reason.TOO_DEEP
    assert reason(nested(cbor.MAX_DEPTH, b"\x80")) is Reason.TOO_DEEP  # an empty one too
    assert reason(nested(cbor.MAX_DEPTH, b"\xa0")) is Reason.TOO_DEEP
    assert scan_reason(nested(3), max_depth=2) is Reason.TOO_DEEP


def test_item_bound_follows_the_size_cap():
    limit = cbor.max_items(CAP)
    assert limit == CAP // 8 + 64
    ok = cbor.dumps([0] * (limit - 1))  # the array itself is an item
    assert cbor.loads_canonical(ok, CAP) == [0] * (limit - 1)
    assert reason(cbor.dumps([0] * limit)) is Reason.TOO_DEEP
    assert reason(cbor.dumps({i: 0 for i in range(limit // 2)})) is Reason.TOO_DEEP
    assert scan_reason(cbor.dumps([[0, 0], [0, 0]]), item_limit=6) is Reason.TOO_DEEP


def test_oversized_before_anything_else():
    assert reason(b"\xc0" * (CAP + 1)) is Reason.OVERSIZED


def _max_frame(item: bytes) -> bytes:
    """A sync frame as large as sync.MAX_SIZE allows, its body array full of ``item``."""
    head = b"\xa3\x00\x01\x01\x04\x02"  # {0: 1, 1: 4, 2: [...]}
    n = (sync.MAX_SIZE - len(head) - 5) // len(item)
    count = b"\x9a" + n.to_bytes(4, "big") if n >= 1 << 16 else b"\x99" + n.to_bytes(2, "big")
    frame = head + count + item * n  # the shortest array header for n items
    assert len(frame) <= sync.MAX_SIZE
    return frame


@pytest.mark.parametrize(
    "item, why",
    [
        # MIME tags (cbor2 would parse each as an e-mail message), few enough items
        (cbor2.dumps(cbor2.CBORTag(36, "Content-Type: text/plain\n\n" + "x" * 80)), "tag"),
        # one-byte tags: more items than the bound, refused at the array header
        (cbor2.dumps(cbor2.CBORTag(36, "")), "items"),
    ],
)
def test_max_size_frame_of_tags_is_rejected(item, why):
    frame = _max_frame(item)
    assert len(frame) > 260_000
    with pytest.raises(DecodeError) as ei:
        sync.decode(frame)
    expected = Reason.UNSUPPORTED_TYPE if why == "tag" else Reason.TOO_DEEP
    assert ei.value.reason is expected


def test_max_size_frame_of_nested_arrays_is_rejected():
    head = b"\xa3\x00\x01\x01\x04\x02"
    frame = head + b"\x81" * (sync.MAX_SIZE - len(head) - 1) + b"\x00"  # [[[[...0]]]]
    assert len(frame) == sync.MAX_SIZE
    with pytest.raises(DecodeError) as ei:
        sync.decode(frame)
    assert ei.value.reason is Reason.TOO_DEEP and "deeper" in ei.value.detail


def test_max_size_frame_of_many_small_items_is_rejected():
    frame = _max_frame(b"\x80")  # [[], [], [], ...]
    with pytest.raises(DecodeError) as ei:
        sync.decode(frame)
    assert ei.value.reason is Reason.TOO_DEEP and "items" in ei.value.detail


subset_values = st.recursive(
    st.integers(-(2**64), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.integers(0, 30), inner),
    max_leaves=20,
)


@given(subset_values)
def test_every_subset_value_round_trips(value):
    data = cbor.dumps(value)
    try:
        assert cbor.loads_canonical(data, 1 << 20) == value
    except DecodeError as e:  # only the depth bound may refuse a value of the subset
        assert e.reason is Reason.TOO_DEEP


@given(st.binary(max_size=200))
def test_arbitrary_bytes_give_a_canonical_value_or_decode_error(data):
    try:
        value = cbor.loads_canonical(data, CAP)
    except DecodeError:
        return
    assert cbor.dumps(value) == data
